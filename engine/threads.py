"""The compute threads of a process: how many it may use, and setting them.

A node computes with BLAS (numpy's, for the GEMMs) and with dbnode's OpenMP
kernels. Each library keeps a thread pool sized for the whole machine by
default, so two nodes on two cores run four busy threads and fight for the
cores (measured 2-10x slower than pinned). A node therefore sizes both
pools to the cores it owns (:func:`limit_threads`), the embedded cluster
gives each node its share (:func:`shares`), and the driver warns when the
nodes of one machine together ask for more than it has.

threadpoolctl finds and sets the BLAS pools whatever library numpy was
built with (OpenBLAS, MKL, BLIS); dbnode's kernels take their limit from
:func:`dbnode.kernels.set_threads`, which holds in every thread (OpenMP's own
limit holds only in the thread that set it, and a node computes in workers).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from . import kernels

__all__ = [
    "THREAD_VARIABLES",
    "available_cores",
    "blas_pools",
    "environment_threads",
    "limit_threads",
    "machine_id",
    "shares",
    "thread_environment",
]

#: The environment variables that size BLAS and OpenMP pools at load time.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's
    count: a container or ``taskset`` may allow fewer).

    Returns:
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def environment_threads(environ: dict[str, str] | None = None) -> int | None:
    """The thread count the environment asks for, if it asks.

    Args:
        environ: the environment (default: this process's).

    Returns:
        The first of :data:`THREAD_VARIABLES` set to a positive integer
        (``OMP_NUM_THREADS=4,2`` counts as 4), or None.
    """
    environ = os.environ if environ is None else environ
    for var in THREAD_VARIABLES:
        text = environ.get(var, "").split(",")[0].strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def shares(cores: int, nodes: int) -> list[int]:
    """Split ``cores`` among ``nodes`` processes as evenly as possible.

    Args:
        cores: cores to share (at least 1).
        nodes: processes (at least 1).

    Returns:
        One count per node, each at least 1, the larger ones first; they
        sum to ``max(cores, nodes)``.
    """
    base, extra = divmod(max(cores, nodes), nodes)
    return [base + (i < extra) for i in range(nodes)]


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that size a new process's pools to ``threads``
    before any library loads.

    Args:
        threads: the process's compute threads.

    Returns:
        Every one of :data:`THREAD_VARIABLES` set to ``threads``.
    """
    return {var: str(threads) for var in THREAD_VARIABLES}


def limit_threads(threads: int) -> None:
    """Size this process's BLAS pools and dbnode's kernels to ``threads``.

    Args:
        threads: at least 1.

    Raises:
        ValueError: ``threads`` is below 1.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    from threadpoolctl import threadpool_limits

    # A pthreads BLAS (numpy's wheels' OpenBLAS, MKL) keeps one pool per
    # process, so the limit holds in every thread; an OpenMP-threaded BLAS
    # takes it per calling thread, which is why the embedded cluster also
    # sets the thread variables before a node starts.
    threadpool_limits(limits=threads, user_api="blas")
    kernels.set_threads(threads)


def blas_pools() -> list[dict[str, object]]:
    """What BLAS this process computes with.

    Returns:
        One entry per loaded BLAS library: ``{"library": "openblas",
        "kernel": "Haswell", "threads": 2}`` (``kernel`` is the CPU kernel
        the library picked, when it says).
    """
    from threadpoolctl import threadpool_info

    return [
        {
            "library": pool.get("internal_api"),
            "kernel": pool.get("architecture"),
            "threads": pool.get("num_threads"),
        }
        for pool in threadpool_info()
        if pool.get("user_api") == "blas"
    ]


@cache
def machine_id() -> str:
    """What tells machines apart: two processes with the same id share CPUs.

    Returns:
        The kernel's boot id (the same in every container and network
        namespace of one machine, new at each boot), else the host name.
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # pragma: no cover - not Linux
        import socket

        return socket.gethostname()
