"""Digest of the kernel sources, shared by setup.py (which compiles it into
``dbnode._kernels``) and ``dbnode.kernels`` (which compares it in a source
checkout to catch a module built from older sources). Standard library only:
setup.py loads this file before dbnode is built."""

import hashlib
from pathlib import Path


def source_hash(csrc: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(csrc).glob("*.p[yx][xd]")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
