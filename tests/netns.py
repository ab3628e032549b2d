"""A private test network of Linux network namespaces, for multi-host tests.

:class:`Testbed` builds, as root and with nothing but iproute2, a handful of
"hosts" — one network namespace each, loopback up, one ``eth0`` with its own
address — wired by veth pairs to a Linux bridge that lives in a namespace of
its own::

    dbn<tag>-h1  eth0 10.213.7.11 ─┐
    dbn<tag>-h2  eth0 10.213.7.12 ─┤ br0 in dbn<tag>-sw
    ...                            ┘

Nothing is created in the root namespace (not even transiently: each veth is
created in the switch namespace with its peer placed straight into the host
namespace), so the test network can neither clash with the machine's own
interfaces nor route a packet off the machine; the addresses exist only in
namespaces the testbed made. ``down()`` kills whatever the testbed started
and deletes every namespace, which deletes their interfaces with them.

:meth:`Testbed.impair` degrades one host's link like ``tc qdisc ... netem
delay D loss L%`` — with netem where the kernel has it, and otherwise with a
user-space link emulator (:func:`run_link`) spliced in place of that host's
veth: two TAP devices and a forwarder that delays every frame the host sends
and drops a seeded random fraction of them (both ways on request).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import heapq
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "dbn"
SUBNET = "10.213.7"  # private, and only ever configured inside our namespaces
HOST_OFFSET = 10  # host i (1-based) is SUBNET.(10 + i)
_counter = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why this machine cannot run namespace tests, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "the `ip` command (Debian package iproute2) is missing"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        for cmd in (
            ("link", "add", "br0", "type", "bridge"),
            ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ):
            out = _ip("-n", probe, *cmd, check=False)
            if out.returncode != 0:
                return (
                    f"cannot create a {cmd[-1] if cmd[-1] == 'bridge' else 'veth'} here: "
                    f"{out.stderr.strip()}"
                )
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (CONFIG_NET_SCH_NETEM)."""
    probe = f"{PREFIX}{os.getpid()}-netem"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    try:
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        tc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                probe,
                "tc",
                "qdisc",
                "add",
                "dev",
                "v0",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            capture_output=True,
            timeout=30,
        )
        return tc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _ip("netns", "del", probe, check=False)


def impair_unavailable() -> str | None:
    """Why :meth:`Testbed.impair` cannot work here, or None if it can."""
    if netem_available():
        return None
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return f"the kernel has no netem qdisc and /dev/net/tun cannot be opened ({exc.strerror})"
    return None


def remove_stale() -> list[str]:
    """Delete namespaces left by testbeds whose process died without
    cleaning up (``dbn<pid>...`` with no such pid). Returns their names."""
    gone = []
    for name in _ip("netns", "list", check=False).stdout.split():
        m = re.fullmatch(rf"{PREFIX}(\d+)(?:\.\d+)?-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            for pid in _ns_pids(name):
                _kill(pid, signal.SIGKILL)
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Process:
    """A process the testbed started in one of its namespaces; its stdout
    and stderr go to ``log`` (a file, so nothing can block on a full pipe)."""

    popen: subprocess.Popen
    log: Path
    host: str

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """The first match of ``pattern`` in the output, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.output(), re.M)
            if m:
                return m
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.host}: exited {self.popen.returncode} before "
                    f"printing {pattern!r}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.host}: no {pattern!r} within {timeout} s:\n{self.output()[-3000:]}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code (negative
        for a signal, as subprocess reports it)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


@dataclass
class Impairment:
    """What :meth:`Testbed.impair` did: ``how`` ("netem" or "emulated"),
    and the frames it ``dropped`` and ``passed`` (known once it is over)."""

    how: str
    dropped: int = 0
    passed: int = 0


@dataclass
class Testbed:
    """``hosts`` network namespaces on one bridge. Use as a context manager,
    or call :meth:`up` and, in a ``finally``, :meth:`down`."""

    hosts: list[str]
    workdir: Path
    tag: str = ""
    ns: dict[str, str] = field(default_factory=dict)
    address: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    _links: dict[str, Process] = field(default_factory=dict)
    _netem: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        global _counter
        _counter += 1
        self.tag = self.tag or f"{os.getpid()}.{_counter}"
        self.switch = f"{PREFIX}{self.tag}-sw"
        for i, host in enumerate(self.hosts, 1):
            self.ns[host] = f"{PREFIX}{self.tag}-{host}"
            self.address[host] = f"{SUBNET}.{HOST_OFFSET + i}"
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------ topology

    def up(self) -> None:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts, 1):
                ns = self.ns[host]
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                self._plug(i, host)
        except subprocess.CalledProcessError as exc:
            self.down()
            raise RuntimeError(f"testbed setup failed: {' '.join(exc.cmd)}: {exc.stderr}") from exc

    def _plug(self, i: int, host: str) -> None:
        """A veth from the bridge (port ``p<i>``) to ``eth0`` in ``host``."""
        ns = self.ns[host]
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            f"p{i}",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")
        self._configure(host)

    def _configure(self, host: str) -> None:
        # A fixed, locally administered MAC per host, so that swapping its
        # veth for the link emulator's tap (and back) leaves every peer's
        # ARP cache right: the swap is a short outage, not a new machine.
        ns, i = self.ns[host], self.hosts.index(host) + 1
        _ip("-n", ns, "link", "set", "eth0", "address", f"02:db:00:00:{i >> 8:02x}:{i & 255:02x}")
        _ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Stop every process, delete every namespace (and so every interface).
        Safe to call twice and after a partial :meth:`up`."""
        for proc in [*self.processes, *self._links.values()]:
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        self._links.clear()
        for ns in [*self.ns.values(), self.switch]:
            for pid in _ns_pids(ns):  # anything else still in our namespaces
                _kill(pid, signal.SIGKILL)
            _ip("netns", "del", ns, check=False)

    def exists(self) -> list[str]:
        """Which of the testbed's namespaces exist (for tests of teardown)."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        return [ns for ns in [*self.ns.values(), self.switch] if ns in names]

    # ----------------------------------------------------------- processes

    def run(self, host: str, args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        """Run ``args`` to completion inside ``host``'s namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[host], *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def start(self, host: str, args: list[str], name: str | None = None, **kw) -> Process:
        """Start ``args`` inside ``host``'s namespace (``ip netns exec`` execs
        it, so the Popen's pid is the process itself)."""
        log = self.workdir / f"{name or host}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[host], *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **kw,
            )
        proc = Process(popen, log, name or host)
        self.processes.append(proc)
        return proc

    # ---------------------------------------------------------- impairment

    @contextlib.contextmanager
    def impair(
        self, host: str, delay_ms: float, loss: float, *, both_ways: bool = False, seed: int = 0
    ):
        """Degrade ``host``'s link for the duration of the ``with``, as
        ``tc qdisc add dev eth0 root netem delay <delay_ms>ms loss <loss>%``
        on the host's veth does: what the host sends is delayed and a random
        ``loss`` percent of it dropped; with ``both_ways`` what it receives
        too (the same qdisc on the bridge's end of its veth). Yields a
        :class:`Impairment`: which of netem or the emulator did it, and, once
        the ``with`` is left, how many frames it dropped and passed."""
        i = self.hosts.index(host) + 1
        if netem_available():
            stats = Impairment("netem")
            qdisc = ["root", "netem", "delay", f"{delay_ms}ms", "loss", f"{loss}%"]
            devs = [(self.ns[host], "eth0")] + [(self.switch, f"p{i}")] * both_ways
            try:
                for ns, dev in devs:
                    self._netem.add(f"{ns}/{dev}")
                    subprocess.run(
                        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *qdisc],
                        check=True,
                        capture_output=True,
                        timeout=30,
                    )
                yield stats
            finally:
                for ns, dev in devs:
                    shown = subprocess.run(
                        ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                    # " Sent 123 bytes 4 pkt (dropped 5, overlimits 0 requeues 0)"
                    m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", shown.stdout)
                    if m:
                        stats.passed += int(m.group(1))
                        stats.dropped += int(m.group(2))
                    subprocess.run(
                        ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                        capture_output=True,
                        timeout=30,
                    )
                    self._netem.discard(f"{ns}/{dev}")
        else:
            stats = Impairment("emulated")
            try:
                self._emulate(host, delay_ms, loss, both_ways, seed)
                yield stats
            finally:
                out = self._restore(host)
                m = re.search(r"link: down, (\d+) frames forwarded, (\d+) dropped", out)
                if m:
                    stats.passed, stats.dropped = int(m.group(1)), int(m.group(2))

    def impaired(self) -> list[str]:
        """Links currently degraded (netem qdiscs or emulated links)."""
        return sorted([*self._netem, *self._links])

    def _emulate(self, host: str, delay_ms: float, loss: float, both_ways: bool, seed: int) -> None:
        """Replace ``host``'s veth by tap ``eth0`` <-> link emulator <-> tap
        ``p<i>`` on the bridge. The host keeps its address; its open TCP
        connections survive the swap (the address never leaves the host, so
        at worst a few segments are retransmitted)."""
        i = self.hosts.index(host) + 1
        _ip("-n", self.switch, "link", "del", f"p{i}")  # deletes eth0 in the host too
        proc = self.start(
            host,
            [
                sys.executable,
                __file__,
                "link",
                "--host-ns",
                self.ns[host],
                "--switch-ns",
                self.switch,
                "--host-dev",
                "eth0",
                "--switch-dev",
                f"p{i}",
                "--delay-ms",
                str(delay_ms),
                "--loss",
                str(loss),
                "--seed",
                str(seed),
                *(["--both-ways"] * both_ways),
            ],
            name=f"link-{host}-{len(list(self.workdir.glob(f'link-{host}-*')))}",
        )
        self.processes.remove(proc)
        self._links[host] = proc
        proc.wait_for(r"^link: up$", timeout=10)
        _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")
        self._configure(host)

    def _restore(self, host: str) -> str:
        """Stop the emulator (its taps vanish with it), plug a veth back;
        the emulator's output."""
        proc = self._links.pop(host, None)
        code = proc.stop(timeout=5) if proc else None
        i = self.hosts.index(host) + 1
        for ns, dev in ((self.switch, f"p{i}"), (self.ns[host], "eth0")):
            _ip("-n", ns, "link", "del", dev, check=False)  # if it outlived the emulator
        self._plug(i, host)
        if proc is None:
            return ""
        if code != 0:
            raise AssertionError(f"link emulator exited {code}:\n{proc.output()[-2000:]}")
        return proc.output()


# ------------------------------------------------------------- link emulator

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def _setns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


def _tap(name: str) -> int:
    """A TAP device named ``name`` in the calling thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def run_link(
    host_ns: str,
    switch_ns: str,
    host_dev: str,
    switch_dev: str,
    delay_ms: float,
    loss: float,
    both_ways: bool = False,
    seed: int = 0,
) -> None:
    """Forward Ethernet frames between a TAP in ``host_ns`` and one in
    ``switch_ns`` until SIGTERM, delaying each frame the host sends by
    ``delay_ms`` and dropping it with probability ``loss`` percent (frames
    to the host too with ``both_ways``): what netem's ``delay D loss L%``
    does on the host's end of a veth (on both ends), in user space, for
    kernels built without netem. Order within a direction is kept (a fixed
    delay), as netem keeps it without jitter."""
    _setns(host_ns)
    a = _tap(host_dev)
    _setns(switch_ns)
    b = _tap(switch_dev)
    print("link: up", flush=True)

    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(seed)
    delay = delay_ms / 1000.0
    other = {a: b, b: a}
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out fd, frame)
    seq = 0
    sent = dropped = 0
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    sel.register(b, selectors.EVENT_READ)
    while not stop:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(out, frame)
                sent += 1
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        for key, _ in sel.select(timeout):
            while True:
                try:
                    frame = os.read(key.fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # the other side of a tap not up yet
                    break
                if key.fd == b and not both_ways:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.write(a, frame)
                        sent += 1
                    continue
                if rng.random() * 100.0 < loss:
                    dropped += 1
                    continue
                seq += 1
                heapq.heappush(queue, (time.monotonic() + delay, seq, other[key.fd], frame))
    print(f"link: down, {sent} frames forwarded, {dropped} dropped", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="user-space netem stand-in (see run_link)")
    sub = parser.add_subparsers(dest="command", required=True)
    link = sub.add_parser("link")
    for opt in ("--host-ns", "--switch-ns", "--host-dev", "--switch-dev"):
        link.add_argument(opt, required=True)
    link.add_argument("--delay-ms", type=float, required=True)
    link.add_argument("--loss", type=float, required=True)
    link.add_argument("--both-ways", action="store_true")
    link.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_link(
        args.host_ns,
        args.switch_ns,
        args.host_dev,
        args.switch_dev,
        args.delay_ms,
        args.loss,
        args.both_ways,
        args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
