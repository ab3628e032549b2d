"""Shared pieces of the benchmarks: interleaved timing and a report of the
BLAS and thread pools that ran. Machines are shared and noisy, so every
figure that matters is a ratio of ours to a baseline timed in the same run,
round by round."""

import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_info


def environment() -> str:
    """One line per thread pool: which BLAS/OpenMP, which kernel, how many threads."""
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    ]
    for pool in threadpool_info():
        lines.append(
            f"  {pool['user_api']}: {pool['internal_api']} {pool.get('version') or ''} "
            f"arch={pool.get('architecture', '-')} threads={pool['num_threads']}"
        )
    return "\n".join(lines)


def compare(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int = 15,
    repeat: int = 1,
    warmup: int = 2,
) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and ``baseline``, alternating the
    two each round so that background load hits both alike."""
    for _ in range(warmup):
        ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(rounds):
        for fn, sink in ((ours, t_ours), (baseline, t_base)):
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            sink.append((time.perf_counter() - start) / repeat)
    return statistics.median(t_ours), statistics.median(t_base)


def row(
    name: str,
    ours: float,
    base: float,
    base_name: str,
    target: float | None = None,
    unit: str = "ms",
) -> str:
    scale = {"ms": 1e3, "us": 1e6}[unit]
    ratio = base / ours
    verdict = (
        ""
        if target is None
        else ("  PASS" if ratio >= target else "  MISS") + f" (target >= {target:.2f}x)"
    )
    return (
        f"{name:<44} ours {ours * scale:9.3f} {unit}   {base_name} {base * scale:9.3f} {unit}"
        f"   ratio {ratio:5.2f}x{verdict}"
    )
