"""The embedded local cluster: ``dbnode serve`` processes on loopback.

``dbnode train`` with no hosts starts node processes on 127.0.0.1 with a
fresh secret (one per layer partition of every replica, up to one per core:
:func:`embedded_nodes`), and stops them all when the run ends, fails or is
interrupted. Each node also exits by itself when its standard input closes,
so that a driver killed outright leaves no orphans.

The nodes share the machine's cores: each gets its share as its compute
threads (``--threads`` and the thread variables of its environment, so its
BLAS pool is sized before it loads), unless the user's environment already
sets a thread count, which every node then keeps.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import DBNodeError
from ..node import parse_ready_line
from ..runs import default_max_memory
from ..threads import available_cores, environment_threads, shares, thread_environment

__all__ = [
    "CLI_MODULE",
    "LocalCluster",
    "embedded_nodes",
    "embedded_threads",
    "serve_command",
    "write_secret",
]

Address = tuple[str, int]

#: The module ``python -m`` runs as the ``dbnode`` command.
CLI_MODULE = "dbnode.cli"


def serve_command(*args: str) -> list[str]:
    """The command line of a ``dbnode serve`` process.

    Args:
        args: its options, e.g. ``"--listen", "127.0.0.1:0"``.

    Returns:
        This interpreter running :data:`CLI_MODULE` (not a ``dbnode`` script
        on ``PATH``, which may be another install), ``serve`` and ``args``.
    """
    return [sys.executable, "-m", CLI_MODULE, "serve", *args]


def write_secret(path: str | os.PathLike) -> Path:
    """A fresh 32-byte random secret in a new file readable by its owner only.

    Args:
        path: the file to create.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists (it is never overwritten).
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def embedded_nodes(roles: int, cores: int | None = None) -> int:
    """How many nodes the embedded cluster starts for a run.

    One per layer partition of every replica (``roles``), so that each
    computes in its own process with its own share of the cores, but never
    more than the cores: a lone replica then gets every core in one node,
    with its parameter shard beside it.

    Args:
        roles: replicas x partitions.
        cores: the cores to use (default: :func:`~dbnode.threads.available_cores`).

    Returns:
        At least 1.
    """
    return max(1, min(roles, cores or available_cores()))


def embedded_threads(n: int) -> list[int]:
    """Each embedded node's compute threads.

    Args:
        n: the embedded cluster's nodes.

    Returns:
        The environment's thread count for every node when it sets one (the
        user pinned the pools), else the cores shared out evenly.
    """
    pinned = environment_threads()
    return [pinned] * n if pinned else shares(available_cores(), n)


class LocalCluster:
    """``n`` node processes on loopback, as a context manager.

    Args:
        n: how many nodes (default: one per core).
        startup_timeout: seconds each node has to start listening.
        threads: each node's compute threads (default: the environment's
            thread count if it sets one, else the cores shared out evenly).

    Attributes (inside the ``with``):
        addresses: where each node listens.
        secret_file: the secret they share.
        threads: each node's compute threads.

    Raises:
        DBNodeError: on entering, a node exited or did not listen in time
            (every node started so far is stopped).
    """

    def __init__(
        self,
        n: int | None = None,
        startup_timeout: float = 30.0,
        threads: list[int] | None = None,
    ):
        self.n = n or available_cores()
        self.startup_timeout = startup_timeout
        self.threads = list(threads or embedded_threads(self.n))
        if len(self.threads) != self.n:
            raise ValueError(f"{len(self.threads)} thread counts for {self.n} nodes")
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[Address] = []

    def __enter__(self) -> LocalCluster:
        self._dir = tempfile.TemporaryDirectory(prefix="dbnode-cluster-")
        self.secret_file = write_secret(Path(self._dir.name) / "secret")
        try:
            for i, threads in enumerate(self.threads):
                self.processes.append(
                    subprocess.Popen(
                        serve_command(
                            "--listen",
                            "127.0.0.1:0",
                            "--secret-file",
                            str(self.secret_file),
                            "--name",
                            f"local-{i}",
                            "--exit-on-eof",
                            # The machine's RAM is shared by its nodes.
                            "--max-memory",
                            str(default_max_memory(nodes=self.n)),
                            "--threads",
                            str(threads),
                            # Their runs are the driver's: it reports what matters.
                            "--log-level",
                            "warning",
                        ),
                        env={**os.environ, **thread_environment(threads)},
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        # A terminal's Ctrl-C goes to its foreground process
                        # group: only the driver must get it (it stops the run
                        # cleanly and then the nodes); the nodes end when their
                        # stdin closes, however the driver ends.
                        start_new_session=True,
                    )
                )
            self.addresses = [self._ready(p) for p in self.processes]
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, process: subprocess.Popen) -> Address:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise DBNodeError(
                    f"local node (pid {process.pid}) exited with code "
                    f"{process.wait()} before listening"
                )
            address = parse_ready_line(line)
            if address is not None:
                return address
        raise DBNodeError(
            f"local node (pid {process.pid}) did not start within {self.startup_timeout} s"
        )

    def stop(self) -> None:
        """Terminate every node (SIGTERM, then SIGKILL after 5 s) and wait."""
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream:
                    stream.close()
        self.processes = []
        if getattr(self, "_dir", None) is not None:
            self._dir.cleanup()
            self._dir = None

    def __exit__(self, *exc_info) -> None:
        self.stop()
