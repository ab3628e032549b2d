"""What the compiled kernels were built from and for.

Shared by setup.py (which compiles it into the extensions) and
``dbnode.kernels`` (which checks it before loading them). Standard library
only: setup.py loads this file before dbnode is built.
"""

import hashlib
from pathlib import Path

# Compiler macros -> the /proc/cpuinfo flag a CPU must have to run code that
# was compiled with them (what -march=native may turn on).
ISA_MACROS = {
    "__SSE4_1__": "sse4_1",
    "__SSE4_2__": "sse4_2",
    "__AVX__": "avx",
    "__AVX2__": "avx2",
    "__FMA__": "fma",
    "__F16C__": "f16c",
    "__BMI2__": "bmi2",
    "__AVX512F__": "avx512f",
    "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl",
    "__AVX512CD__": "avx512cd",
}


def source_hash(csrc: Path) -> str:
    """Digest of the kernel sources (.pyx, .pxd, .h) in ``csrc``."""
    h = hashlib.sha256()
    sources = [p for p in Path(csrc).iterdir() if p.suffix in (".pyx", ".pxd", ".h")]
    for path in sorted(sources):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cpu_flags_of(predefined_macros: str) -> list[str]:
    """CPU flags required by code compiled with these ``cc -dM -E`` macros."""
    defined = {
        line.split()[1] for line in predefined_macros.splitlines() if line.startswith("#define ")
    }
    return sorted(flag for macro, flag in ISA_MACROS.items() if macro in defined)


def missing_cpu_flags(
    required: tuple[str, ...], cpuinfo: Path = Path("/proc/cpuinfo")
) -> list[str]:
    """The ``required`` flags this CPU lacks (none where it cannot tell)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted(set(required) - set(line.partition(":")[2].split()))
    return []
