"""Checkpoints of the parameter server, as the driver keeps them.

A checkpoint is a directory ``ckpt-NNNNNN`` holding one shard snapshot per
plan shard (``shard{i}.npz``, the format of
:meth:`dbnode.ps.shard.ParameterShard.snapshot`: values, optimizer state,
versions, dedup table) and ``manifest.json`` (its number, time, the run
config's hash, each replica's step, and the SHA-256 of every file).

Written atomically: everything goes into ``ckpt-NNNNNN.tmp``, each file
fsynced, the manifest last, then the directory is renamed and its parent
fsynced. A crash at any point leaves the previous checkpoints intact and at
worst a ``.tmp`` directory, which is ignored and cleaned up by the next
write. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import replace_dir, write_synced
from ..errors import CheckpointError

MANIFEST = "manifest.json"
PREFIX = "ckpt-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    number: int
    time: float
    config_hash: str
    replica_steps: dict[int, int]
    files: dict[str, str]  # file name -> sha256

    def read_shard(self, index: int) -> bytes:
        """The snapshot bytes of plan shard ``index``, checked against the manifest."""
        name = f"shard{index}.npz"
        data = (self.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files.get(name):
            raise CheckpointError(f"{self.path / name}: checksum does not match the manifest")
        return data


def config_hash(config: dict[str, Any]) -> str:
    """A stable digest of a run config (the parts that define the model)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write(
    directory: Path,
    number: int,
    shards: dict[int, bytes],
    config_hash: str,
    replica_steps: dict[int, int],
    keep: int,
) -> Checkpoint:
    """Write checkpoint ``number`` atomically, then keep only the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{number:06d}"
    tmp = directory / f"{PREFIX}{number:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for index, data in sorted(shards.items()):
        name = f"shard{index}.npz"
        write_synced(tmp / name, lambda f, data=data: f.write(data))
        files[name] = hashlib.sha256(data).hexdigest()
    manifest = {
        "number": number,
        "time": time.time(),
        "config_hash": config_hash,
        "replica_steps": {str(r): s for r, s in replica_steps.items()},
        "files": files,
    }
    text = json.dumps(manifest, indent=1).encode()
    write_synced(tmp / MANIFEST, lambda f: f.write(text))
    replace_dir(tmp, final)
    for old in complete(directory)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in directory.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return load(final)


def load(path: Path) -> Checkpoint:
    """A checkpoint directory, verified: manifest readable, every file present
    with the checksum the manifest gives."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        checkpoint = Checkpoint(
            path,
            int(manifest["number"]),
            float(manifest["time"]),
            str(manifest["config_hash"]),
            {int(r): int(s) for r, s in manifest["replica_steps"].items()},
            dict(manifest["files"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: no readable manifest ({exc})") from None
    for name, digest in checkpoint.files.items():
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path / name}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path / name}: checksum does not match the manifest")
    return checkpoint


def complete(directory: Path) -> list[Checkpoint]:
    """Every checkpoint in ``directory`` that verifies, oldest first."""
    found = []
    for path in sorted(directory.glob(f"{PREFIX}[0-9]*")):
        if path.is_dir() and not path.name.endswith(".tmp"):
            try:
                found.append(load(path))
            except CheckpointError:
                continue
    return sorted(found, key=lambda c: c.number)


def newest(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None."""
    found = complete(directory) if directory.is_dir() else []
    return found[-1] if found else None
