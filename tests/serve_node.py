"""A ``dbnode serve`` process for tests: started as an operator would, its
log in a file (a pipe nobody reads fills up and stalls the node), killed,
frozen, stopped or started again on its own port."""

import os
import signal
import subprocess
import sys
from pathlib import Path

DBNODE = [sys.executable, "-m", "dbnode.cli"]


class ServeNode:
    """One node named ``name``; its secret is ``tmp_path/"secret"``, made
    (owner-only) by the first node of the directory; ``extra``: more
    ``dbnode serve`` options."""

    def __init__(self, tmp_path: Path, name: str, port: int = 0, extra: tuple[str, ...] = ()):
        self.tmp_path, self.name, self.extra = tmp_path, name, list(extra)
        self.secret = tmp_path / "secret"
        if not self.secret.exists():
            self.secret.write_bytes(os.urandom(32))
            self.secret.chmod(0o600)
        self.starts = 0
        self.start(port)

    def start(self, port: int = 0) -> None:
        """Start the process (again), listening on ``port`` (0: any)."""
        self.starts += 1
        self.log = open(self.tmp_path / f"{self.name}-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [*DBNODE, "serve", "--listen", f"127.0.0.1:{port}", "--secret-file", str(self.secret),
             "--name", self.name, *self.extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        assert line.startswith("dbnode serve: listening on "), line + self.logs()
        self.address = line.rsplit(" ", 1)[1].strip()
        self.port = int(self.address.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time the process has used, user and system."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """``kill -9`` (a frozen process too), and wait for it."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self._reap()

    def stop(self) -> int:
        """SIGTERM (thawing it first) and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout=10)

    def _reap(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        self.proc.stdout.close()
        self.log.close()
        return code

    def logs(self) -> str:
        """Everything every start of this node logged."""
        if not self.log.closed:
            self.log.flush()
        return "".join(p.read_text() for p in sorted(self.tmp_path.glob(f"{self.name}-*.log")))
