r"""Wire benchmarks: dbnode's transport against raw blocking sockets, same run.

    python benchmarks/wire.py [--client-cpu 0] [--server-cpu 1] [--same-core]
                              [--spin-us 50] [--only pull rt push] [--quick]

Every figure is ours next to a baseline measured in the same run, the two
alternating round by round (``--rounds``), each round's time per operation
taken as the median over rounds. Both sides are real processes on
loopback: ours is a ``dbnode serve`` node started by
:class:`dbnode.driver.LocalCluster`, the baseline a plain Python process
(this script with ``--raw-peer``) that does the same job on blocking sockets
with nothing on top. The client process and the peer process are pinned to
``--client-cpu`` and ``--server-cpu`` (every thread), the same for ours and
for the baseline; ``--same-core`` adds the latency figures with both on the
client's cpu.

1. PULL of a 16 MiB / 64 MiB float32 tensor, received straight into the
   caller's array (``request(PULL, into=...)``), against the raw peer
   sending the same number of bytes over a blocking socket into a
   preallocated buffer (``recv_into``), after the same 8-byte request.
   Target: ours >= 0.85x the raw throughput.
2. PUSH_PULL round trip of a 1024-float32 tensor (gradient out, updated
   parameters back into the caller's array), against a raw 4 KiB
   request/response ping-pong. Target: ours <= 1.5x the raw round trip
   (ratio raw/ours >= 0.67x). Timed twice: with the defaults, and with the
   transport's ``spin`` latency option (``--spin-us``, on the client's
   Channel and on the node's serve(); ``dbnode serve`` has no flag for it,
   so that node is ``dbnode.node.run_node`` started by this script).
3. Pipelined PUSH of 1024-float32 gradients from one client
   (``Channel.notify`` in a loop), then STATS polled until the shard reports
   them all applied: pushes applied per second, counted by the shard.
   Target: >= 50 000 per second. Also shown: the same pushes as 64
   concurrent ``request``\ s (each waits for its REPLY).
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

import numpy as np
import trio
from common import environment

from dbnode import control
from dbnode.driver import LocalCluster
from dbnode.wire import Channel, MessageKind, open_connection

MiB = 1 << 20
# Every shard request names its run (the node holds each driver's apart).
RUN = {"run": "bench"}
PING_BYTES = 4096
_LEN = struct.Struct("<Q")


# -- pinning -----------------------------------------------------------------------


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` (0: this one) to ``cpu``.

    ``sched_setaffinity(pid)`` moves only that thread; threads started
    earlier (BLAS, OpenMP pools) keep their mask, so go through all of them.
    """
    tasks = f"/proc/{pid or os.getpid()}/task"
    for tid in os.listdir(tasks):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:  # a thread that just ended
            pass


# -- the raw baseline peer ---------------------------------------------------------


def raw_peer_main() -> None:
    """``--raw-peer``: serve the baselines on blocking sockets, one connection at a time.

    The first byte of a connection picks the job: ``E`` echoes 4 KiB
    messages (ping-pong); ``B`` answers each 8-byte length n with n bytes
    from a preallocated buffer (bulk, as a PULL would).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    bulk = np.ones(64 * MiB, np.uint8)  # touched, so no page faults while timed
    bulk_view = memoryview(bulk)
    msg = bytearray(PING_BYTES)
    msg_view = memoryview(msg)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            mode = conn.recv(1)
            if mode == b"E":
                while _recv_exactly(conn, msg_view):
                    conn.sendall(msg_view)
            elif mode == b"B":
                head = bytearray(8)
                while _recv_exactly(conn, memoryview(head)):
                    conn.sendall(bulk_view[: _LEN.unpack(head)[0]])
            elif mode == b"Q":
                return


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


class RawPeer:
    """The ``--raw-peer`` process, pinned like the node it stands next to."""

    def __init__(self, cpu: int):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--raw-peer"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.port = int(self.process.stdout.readline())
        pin(self.process.pid, cpu)

    def connect(self, mode: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(mode)
        return sock

    def close(self) -> None:
        try:
            self.connect(b"Q").close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class SpinNode:
    """A node process with ``serve(spin=...)``: dbnode.node.run_node, as ``dbnode serve`` runs it.

    (``dbnode serve`` has no option for it; the node code is the same.)
    """

    def __init__(self, secret_file, spin: float, cpu: int):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--spin-node", str(secret_file), str(spin)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.address = ("127.0.0.1", int(self.process.stdout.readline()))
        pin(self.process.pid, cpu)

    def close(self) -> None:
        self.process.stdin.close()  # the node exits at the end of its stdin
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


async def spin_node_main(secret_file: str, spin: float) -> None:
    """``--spin-node``: run a node with ``spin`` until stdin closes."""
    from dbnode.node import run_node

    secret = open(secret_file, "rb").read()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(run_node, "127.0.0.1", 0, secret, name="spin", spin=spin)
        )
        print(address[1], flush=True)
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            while await stdin.receive_some(4096):
                pass
        nursery.cancel_scope.cancel()


# -- timing ------------------------------------------------------------------------


async def compare(ours, baseline, rounds: int, repeat: int, warmup: int = 1):
    """Median seconds per call of async ``ours`` and sync ``baseline``, alternating.

    The baseline's blocking calls run in the event loop's thread: nothing
    else is running then, and ours and the baseline share one client cpu.
    """
    for _ in range(warmup):
        await ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            await ours()
        t_ours.append((time.perf_counter() - start) / repeat)
        start = time.perf_counter()
        for _ in range(repeat):
            baseline()
        t_base.append((time.perf_counter() - start) / repeat)
    return statistics.median(t_ours), statistics.median(t_base)


def verdict(ratio: float, target: float) -> str:
    return f"{'PASS' if ratio >= target else 'MISS'} (target >= {target:.2f}x)"


# -- the benchmarks ----------------------------------------------------------------


async def bench_pull(ch: Channel, peer: RawPeer, sizes: list[int], rounds: int) -> list[str]:
    out = []
    sock = peer.connect(b"B")
    try:
        for key, nbytes in enumerate(sizes, start=100):
            value = np.arange(nbytes // 4, dtype=np.float32)
            await ch.request(MessageKind.INIT, key=key, array=value,
                             meta={**RUN, "name": f"pull{nbytes}", "optimizer": {"name": "sgd", "learning_rate": 0.1}})  # fmt: skip
            into = np.zeros_like(value)
            raw_into = memoryview(np.zeros(nbytes, np.uint8))
            request = _LEN.pack(nbytes)

            async def ours(key=key, into=into):
                await ch.request(MessageKind.PULL, key=key, into=into, meta=RUN)

            def raw(request=request, raw_into=raw_into):
                sock.sendall(request)
                _recv_exactly(sock, raw_into)

            await ours()
            assert np.array_equal(into, value), "PULL returned wrong data"
            repeat = max(1, (256 * MiB) // nbytes // 4)
            t_ours, t_raw = await compare(ours, raw, max(rounds, 15), repeat, warmup=3)
            ratio = t_raw / t_ours
            out.append(
                f"PULL {nbytes // MiB:3d} MiB f32 into caller's array   ours {nbytes / t_ours / 1e9:6.2f} GB/s"
                f"   raw blocking socket {nbytes / t_raw / 1e9:6.2f} GB/s   ratio {ratio:5.2f}x   "
                f"{verdict(ratio, 0.85)}"
            )  # fmt: skip
    finally:
        sock.close()
    return out


async def bench_push_pull(ch: Channel, peer: RawPeer, rounds: int, repeat: int,
                          label: str) -> list[str]:  # fmt: skip
    key = 200
    w = np.zeros(1024, np.float32)
    await ch.request(MessageKind.INIT, key=key, array=w,
                     meta={**RUN, "name": "pp", "optimizer": {"name": "sgd", "learning_rate": 0.01}})  # fmt: skip
    grad = np.full(1024, 1.0, np.float32)
    into = np.empty(1024, np.float32)
    sock = peer.connect(b"E")
    msg = memoryview(bytearray(PING_BYTES))
    back = memoryview(bytearray(PING_BYTES))

    async def ours():
        await ch.request(MessageKind.PUSH_PULL, key=key, array=grad, into=into, meta=RUN)

    def raw():
        sock.sendall(msg)
        _recv_exactly(sock, back)

    try:
        t_ours, t_raw = await compare(ours, raw, rounds, repeat)
    finally:
        sock.close()
    ratio = t_raw / t_ours
    return [
        f"PUSH_PULL 1024 f32 round trip ({label})   ours {t_ours * 1e6:7.1f} us   "
        f"raw 4 KiB ping-pong {t_raw * 1e6:7.1f} us   ours/raw {t_ours / t_raw:4.2f}   "
        f"ratio {ratio:5.2f}x   {verdict(ratio, 1 / 1.5)}"
    ]


async def _pushes(ch: Channel, key: int) -> int:
    stats = (await ch.request(MessageKind.STATS, meta=RUN)).meta
    return next(t["pushes"] for t in stats["tensors"] if t["key"] == key)


async def bench_pipelined_push(ch: Channel, n: int) -> list[str]:
    out = []
    grad = np.full(1024, 1e-6, np.float32)
    for key, how in ((300, "notify"), (301, "64 concurrent requests")):
        await ch.request(MessageKind.INIT, key=key, array=np.zeros(1024, np.float32),
                         meta={**RUN, "name": f"push{key}", "optimizer": {"name": "sgd", "learning_rate": 0.01}})  # fmt: skip
        before = await _pushes(ch, key)
        start = time.perf_counter()
        if how == "notify":
            for _ in range(n):
                await ch.notify(MessageKind.PUSH, key=key, array=grad, meta=RUN)
        else:
            todo = iter(range(n))

            async def worker(todo=todo, key=key):
                for _ in todo:
                    await ch.request(MessageKind.PUSH, key=key, array=grad, meta=RUN)

            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(worker)
        # Count only what the shard applied: poll STATS until all are in.
        with trio.fail_after(120):
            while (applied := await _pushes(ch, key) - before) < n:
                await trio.sleep(0.001)
        elapsed = time.perf_counter() - start
        rate = applied / elapsed
        out.append(
            f"pipelined PUSH 1024 f32, one client, {how:<22} {rate:9.0f} pushes/s applied "
            f"({applied} in {elapsed:.2f} s)   ratio to target {rate / 50_000:5.2f}x   "
            f"{verdict(rate / 50_000, 1.0)}"
        )
    return out


async def _channel(address, secret: bytes, nursery, spin: float = 0.0) -> Channel:
    conn = await open_connection(address[0], address[1], secret, name="bench")
    ch = Channel(conn, spin=spin)
    await nursery.start(ch.run)
    await control.call(ch, control.Open(run=RUN["run"], name="bench", lease=3600.0))
    return ch


async def run(args, cluster: LocalCluster, peer: RawPeer, spinner: SpinNode | None) -> list[str]:
    secret = cluster.secret_file.read_bytes()
    lines = []
    async with trio.open_nursery() as nursery:
        ch = await _channel(cluster.addresses[0], secret, nursery)
        sizes = [16 * MiB] if args.quick else [16 * MiB, 64 * MiB]
        if "pull" in args.only:
            lines += await bench_pull(ch, peer, sizes, args.rounds)
        if "rt" in args.only:
            servers = [(ch, cluster.processes[0].pid, "dbnode serve")]
            if spinner is not None:
                spin_ch = await _channel(spinner.address, secret, nursery, args.spin_us * 1e-6)
                servers.append(
                    (spin_ch, spinner.process.pid, f"spin {args.spin_us:g} us both sides")
                )
            placements = [
                (args.server_cpu, f"client cpu {args.client_cpu}, server cpu {args.server_cpu}")
            ]
            if args.same_core:
                placements.append((args.client_cpu, f"both on cpu {args.client_cpu}"))
            for cpu, where in placements:
                pin(peer.process.pid, cpu)
                for channel, pid, what in servers:
                    pin(pid, cpu)
                    lines += await bench_push_pull(channel, peer, args.rounds, args.repeat,
                                                   f"{what}; {where}")  # fmt: skip
                    pin(pid, args.server_cpu)
            pin(peer.process.pid, args.server_cpu)
        if "push" in args.only:
            lines += await bench_pipelined_push(ch, args.pushes)
        nursery.cancel_scope.cancel()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spin-node", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--spin-us",
        type=float,
        default=50.0,
        help="also time the round trip with this busy-poll on both sides "
        "(Channel/serve spin=); 0: don't",
    )
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument(
        "--same-core",
        action="store_true",
        help="also time the round trips with both processes on the client cpu",
    )
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=2000, help="round trips per round")
    parser.add_argument("--pushes", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["pull", "rt", "push"],
        default=["pull", "rt", "push"],
        help="run only these benchmarks",
    )
    args = parser.parse_args()
    if args.raw_peer:
        raw_peer_main()
        return
    if args.spin_node:
        trio.run(spin_node_main, args.spin_node[0], float(args.spin_node[1]))
        return
    if args.quick:
        args.rounds, args.repeat, args.pushes = 5, 500, 50_000
    print(environment())
    print(f"cpus available {sorted(os.sched_getaffinity(0))}; pinned: client cpu {args.client_cpu}, "
          f"server (dbnode serve / raw peer) cpu {args.server_cpu}; every thread of each process")  # fmt: skip
    with LocalCluster(1) as cluster:
        pin(cluster.processes[0].pid, args.server_cpu)
        peer = RawPeer(args.server_cpu)
        spinner = None
        try:
            if args.spin_us and "rt" in args.only:
                spinner = SpinNode(cluster.secret_file, args.spin_us * 1e-6, args.server_cpu)
            pin(0, args.client_cpu)
            lines = trio.run(run, args, cluster, peer, spinner)
        finally:
            peer.close()
            if spinner is not None:
                spinner.close()
    print(
        "ratio: baseline time / ours (higher is better); a round trip within 1.5x of the "
        "raw one is a ratio >= 0.67x"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
