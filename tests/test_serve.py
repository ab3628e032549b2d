"""``dbnode serve`` as a parameter server: real processes, real TCP on loopback."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import trio

from dbnode import control, reference
from dbnode.errors import AuthenticationError, ConnectionClosedError, RemoteError
from dbnode.wire import HEADER_SIZE, MAGIC, Channel, MessageKind, encode_frame, open_connection

DBNODE = [sys.executable, "-m", "dbnode.cli"]
SGD = {"name": "sgd", "learning_rate": 1.0}


class NodeProcess:
    def __init__(self, tmp_path, *extra):
        # The node's log goes to a file: a pipe nobody reads fills up, and
        # then the node blocks writing its log.
        self.log = open(tmp_path / f"node-{len(list(tmp_path.glob('node-*.log')))}.log", "w")
        self.secret_file = tmp_path / "secret"
        if not self.secret_file.exists():
            self.secret_file.write_bytes(os.urandom(32))
        self.secret = self.secret_file.read_bytes()
        self.proc = subprocess.Popen(
            [
                *DBNODE,
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--secret-file",
                str(self.secret_file),
                "--snapshot-dir",
                str(tmp_path / "snaps"),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("dbnode serve: listening on "), line + self.log_text()
        host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
        self.address = (host, int(port))

    def log_text(self) -> str:
        self.log.flush()
        return open(self.log.name).read()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.log.close()
        return code


@pytest.fixture
def node(tmp_path):
    n = NodeProcess(tmp_path)
    yield n
    if n.proc.poll() is None:
        assert n.stop() == 0


RUN = "t"


class InRun:
    """A channel whose requests name the test's run: what every client of a
    node's shards does (control requests name it in their own fields)."""

    def __init__(self, ch: Channel, run: str = RUN):
        self.ch, self.run = ch, run

    def _meta(self, kind, meta):
        if kind == MessageKind.CONTROL or not (meta is None or isinstance(meta, dict)):
            return meta
        return {"run": self.run, **(meta or {})}

    async def request(self, kind, *, meta=None, **kw):
        return await self.ch.request(kind, meta=self._meta(kind, meta), **kw)

    async def notify(self, kind, *, meta=None, **kw):
        return await self.ch.notify(kind, meta=self._meta(kind, meta), **kw)

    async def ping(self, **kw):
        return await self.ch.ping(**kw)

    async def aclose(self):
        await self.ch.aclose()


async def channel(nursery, node, secret=None, run=RUN) -> InRun:
    conn = await open_connection(*node.address, secret or node.secret)
    ch = Channel(conn)
    await nursery.start(ch.run)
    await control.call(ch, control.Open(run=run, name="test", lease=600.0))
    return InRun(ch, run)


async def init(ch, key, value, optimizer=SGD):
    await ch.request(
        MessageKind.INIT, key=key, array=value, meta={"name": f"t{key}", "optimizer": optimizer}
    )


async def pull(ch, key):
    frame = await ch.request(MessageKind.PULL, key=key)
    return frame.array, frame.seq


def run_cli(*args, timeout=30):
    return subprocess.run([*DBNODE, *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_a_public_address_without_a_secret():
    env = {k: v for k, v in os.environ.items() if k != "DBNODE_SECRET"}
    out = subprocess.run(
        [*DBNODE, "serve", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2
    assert "needs a secret" in out.stderr


def test_serve_on_loopback_without_a_secret_makes_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DBNODE_SECRET"}
    proc = subprocess.Popen(
        [*DBNODE, "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        made = proc.stdout.readline()
        listening = proc.stdout.readline()
        assert made.startswith("dbnode serve: secret written to ")
        path = made.rsplit(" ", 1)[1].strip()
        assert os.stat(path).st_mode & 0o077 == 0  # owner-only
        assert len(open(path, "rb").read()) == 32
        assert listening.startswith("dbnode serve: listening on 127.0.0.1:")
        assert not listening.strip().endswith(":0")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
        proc.stderr.close()


async def test_wrong_or_missing_secret_is_rejected_and_good_clients_still_served(node):
    with pytest.raises(AuthenticationError):
        await open_connection(*node.address, os.urandom(32))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*node.address)
        # A request before any handshake: answered with an ERROR, then closed.
        for part in encode_frame(MessageKind.PULL, request_id=1, key=1):
            await stream.send_all(part)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        assert received[:4] == MAGIC
        await stream.aclose()
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, np.arange(3.0))
        value, version = await pull(ch, 1)
        np.testing.assert_array_equal(value, [0.0, 1.0, 2.0])
        assert version == 0 and value.dtype == np.float64
        await ch.aclose()


def malformed_frames(rng, count):
    """Headers that lie, bytes that are not frames at all, truncations."""
    good = b"".join(
        bytes(p) for p in encode_frame(MessageKind.PUSH, request_id=7, key=1, array=np.ones(3))
    )
    for i in range(count):
        kind = i % 5
        if kind == 0:
            yield rng.bytes(int(rng.integers(1, 400)))
        elif kind == 1:  # bit flips in the header
            frame = bytearray(good)
            for _ in range(int(rng.integers(1, 6))):
                bit = int(rng.integers(0, HEADER_SIZE * 8))
                frame[bit // 8] ^= 1 << (bit % 8)
            yield bytes(frame)
        elif kind == 2:  # a payload of 2**60 bytes
            frame = bytearray(good)
            frame[104:112] = (1 << 60).to_bytes(8, "little")
            yield bytes(frame)
        elif kind == 3:  # wrong magic
            yield b"XXXX" + good[4:]
        else:  # a truncated frame, then EOF
            yield good[: int(rng.integers(1, len(good)))]


async def test_thousands_of_malformed_frames_change_nothing(node, monkeypatch):
    # The attackers' connections go without shared memory (a segment each,
    # every page of it made and unmade, would be most of the test's time).
    monkeypatch.setenv("DBNODE_SHM", "0")
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, np.arange(4.0))
        await ch.request(MessageKind.PUSH, key=1, array=np.ones(4))
        before, version = await pull(ch, 1)

        rng = np.random.default_rng(0)
        frames = list(malformed_frames(rng, 2000))
        limit = trio.CapacityLimiter(64)

        async def attack(data: bytes, authenticate: bool) -> None:
            async with limit:
                with trio.fail_after(20):
                    if authenticate:
                        conn = await open_connection(*node.address, node.secret)
                        try:
                            await conn.send_parts([data])
                            # The node answers garbage with an ERROR and a close;
                            # a frame it is still waiting to complete, we abandon.
                            with trio.move_on_after(0.5):
                                while True:
                                    await conn.receive_frame()
                        except ConnectionClosedError:
                            pass
                        finally:
                            conn.abort()
                    else:
                        stream = await trio.open_tcp_stream(*node.address)
                        try:
                            await stream.send_all(data)
                            await stream.send_eof()
                            while await stream.receive_some(65536):
                                pass
                        except trio.BrokenResourceError:
                            pass
                        finally:
                            await stream.aclose()

        async with trio.open_nursery() as attackers:
            for i, data in enumerate(frames):
                attackers.start_soon(attack, data, i % 2 == 0)

        after, version_after = await pull(ch, 1)  # the old channel still works
        np.testing.assert_array_equal(after, before)
        assert version_after == version == 1
        fresh = await channel(nursery, node)  # and so does a new one
        np.testing.assert_array_equal((await pull(fresh, 1))[0], before)
        stats = (await fresh.request(MessageKind.STATS)).meta
        assert stats["totals"]["pushes"] == 1
        await fresh.aclose()
        await ch.aclose()


async def test_shard_requests_answer_as_the_protocol_says(node):
    """docs/protocol.md section 17, request by request, against a live node."""
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)

        async def refused(kind, key=1, **kw):
            with pytest.raises(RemoteError) as info:
                await ch.request(kind, key=key, timeout=5, **kw)
            return info.value.code, info.value.message

        value = np.arange(3.0, dtype=np.float32)
        assert await refused(MessageKind.INIT, array=value.astype(np.int32),
                             meta={"name": "w", "optimizer": SGD}) == (35, "key 1 (w): dtype must be float32 or float64, got int32")  # fmt: skip
        code, text = await refused(MessageKind.INIT, array=value)  # meta is required
        assert code == 32 and "name" in text
        code, text = await refused(
            MessageKind.INIT, array=value, meta={"name": "w", "optimizer": {**SGD, "momentum": 0.9}}
        )
        assert code == 32 and "optimizer.momentum=0.9: unknown setting for sgd" in text
        code, text = await refused(MessageKind.INIT, meta={"name": "w", "optimizer": SGD})
        assert code == 32  # no payload
        momentum = {"name": "momentum", "learning_rate": 0.5}
        await ch.request(
            MessageKind.INIT, key=1, array=value, meta={"name": "w", "optimizer": momentum}
        )
        again = await ch.request(
            MessageKind.INIT, key=1, array=value * 0, meta={"name": "w", "optimizer": momentum}
        )
        assert again.seq == 0  # idempotent
        code, text = await refused(
            MessageKind.INIT, array=value, meta={"name": "v", "optimizer": momentum}
        )
        assert code == 32 and "name" in text  # a conflict
        assert (await refused(MessageKind.PUSH, array=value.astype(np.float64)))[0] == 35
        assert (await refused(MessageKind.PUSH, array=value[:2]))[0] == 34
        assert (await refused(MessageKind.PUSH, key=2, array=value))[0] == 33
        assert (await refused(MessageKind.PUSH, array=value, flags=1))[0] == 32
        grad = np.ones(3, np.float32)
        for _ in range(2):  # a retried push (same pusher and seq) is applied once
            reply = await ch.request(
                MessageKind.PUSH_PULL, key=1, array=grad, seq=5, meta={"pusher": "p"}
            )
        v = -0.5 * grad  # v = 0.9 v - lr g
        np.testing.assert_array_equal(reply.array, value + v)
        assert reply.seq == 1
        stats = (await ch.request(MessageKind.STATS)).meta["tensors"][0]
        assert stats["optimizer"] == {**momentum, "momentum": 0.9}
        assert (stats["version"], stats["pushes"], stats["duplicates"], stats["rejected"]) == (
            1,
            1,
            1,
            2,
        )
        await ch.aclose()


async def test_concurrent_pushers_lose_no_update(node):
    clients, pushes = 8, 150
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, np.zeros(1024))
        await init(ch, 2, np.zeros((3, 5), np.float32))

        async def pusher(i):
            mine = await channel(nursery, node)
            for k in range(pushes):
                await mine.request(
                    MessageKind.PUSH,
                    key=1 + (k % 2),
                    array=np.full(1024, 1.0) if k % 2 == 0 else np.ones((3, 5), np.float32),
                )
            await mine.aclose()

        async with trio.open_nursery() as pushers:
            for i in range(clients):
                pushers.start_soon(pusher, i)
        value, version = await pull(ch, 1)
        np.testing.assert_array_equal(value, np.full(1024, -clients * pushes / 2))
        assert version == clients * pushes // 2
        value2, version2 = await pull(ch, 2)
        np.testing.assert_array_equal(value2, np.full((3, 5), -clients * pushes / 2, np.float32))
        assert version2 == clients * pushes // 2 and value2.dtype == np.float32
        with pytest.raises(RemoteError, match="shape"):
            await ch.request(MessageKind.PUSH, key=1, array=np.ones(3))
        with pytest.raises(RemoteError, match="no such tensor"):
            await ch.request(MessageKind.PULL, key=99)
        assert (await pull(ch, 1))[1] == version
        await ch.aclose()


async def test_snapshot_then_restart_restores_exact_values_and_versions(tmp_path):
    node = NodeProcess(tmp_path)
    rng = np.random.default_rng(1)
    values = {1: rng.normal(size=(6, 4)), 2: rng.normal(size=7).astype(np.float32)}
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, values[1], {"name": "adagrad", "learning_rate": 0.1})
        await init(ch, 2, values[2], {"name": "momentum", "learning_rate": 0.1, "momentum": 0.9})
        grads = [rng.normal(size=(6, 4)) for _ in range(4)]
        for g in grads[:3]:
            await ch.request(MessageKind.PUSH, key=1, array=g)
            await ch.request(MessageKind.PUSH, key=2, array=rng.normal(size=7).astype(np.float32))
        saved = {k: await pull(ch, k) for k in (1, 2)}
        reply = await ch.request(MessageKind.SNAPSHOT, meta={"name": "shard.npz"})
        assert reply.meta["path"].endswith("shard.npz")
        with pytest.raises(RemoteError, match="plain file name"):
            await ch.request(MessageKind.SNAPSHOT, meta={"name": "../escape.npz"})
        await ch.aclose()
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL

    node = NodeProcess(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            ch = await channel(nursery, node)
            restored = await control.call(ch.ch, control.Restore(run=RUN, name="shard.npz"))
            assert restored.keys == 2
            for k, (value, version) in saved.items():
                got, got_version = await pull(ch, k)
                np.testing.assert_array_equal(got, value)
                assert got_version == version == 3 and got.dtype == value.dtype
            # The optimizer state came back too: a fourth push lands where
            # Adagrad's accumulated squares from the first three put it.
            await ch.request(MessageKind.PUSH, key=1, array=grads[3])
            expected, sum_sq = values[1].copy(), np.zeros((6, 4))
            for g in grads:
                reference.adagrad(expected, g, sum_sq, 0.1)
            got, version = await pull(ch, 1)
            np.testing.assert_allclose(got, expected, rtol=1e-12)
            assert version == 4
            await ch.aclose()
    finally:
        assert node.stop() == 0


async def test_a_thousand_handshakes_with_a_wrong_secret_are_all_rejected(node):
    limit = trio.CapacityLimiter(32)
    rejected = 0

    async def attempt(i):
        nonlocal rejected
        async with limit:
            try:
                conn = await open_connection(*node.address, os.urandom(32), handshake_timeout=20)
            except AuthenticationError:
                rejected += 1
            else:  # pragma: no cover - the assertion below reports it
                conn.abort()

    async with trio.open_nursery() as nursery:
        for i in range(1000):
            nursery.start_soon(attempt, i)
    assert rejected == 1000
    async with trio.open_nursery() as nursery:  # and the node still serves its own
        ch = await channel(nursery, node)
        await init(ch, 1, np.ones(2))
        assert (await pull(ch, 1))[1] == 0
        await ch.aclose()


def bad_requests(rng, count):
    """Well-framed requests that are wrong: unknown keys, wrong shapes and
    dtypes, bad metadata, commands that do not exist, stray partition traffic."""
    kinds = [
        MessageKind.PUSH,
        MessageKind.PUSH_PULL,
        MessageKind.PULL,
        MessageKind.INIT,
        MessageKind.CONTROL,
        MessageKind.FORWARD,
        MessageKind.BACKWARD,
        MessageKind.SNAPSHOT,
    ]
    dtypes = [np.float32, np.float64, np.int32, np.int64, np.uint8]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        key = int(rng.choice([1, 2, int(rng.integers(3, 2**32))]))
        shape = tuple(int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 3))))
        tensorless = kind in (MessageKind.PULL, MessageKind.SNAPSHOT)
        array = (
            None if tensorless or rng.random() < 0.2 else np.zeros(shape, dtypes[i % len(dtypes)])
        )
        meta = rng.choice(
            [
                None,
                {"op": "nope"},
                {"pusher": 5},
                {"name": "../x"},
                {"op": "start"},
                {"op": "start", "run": RUN},
                {"optimizer": {"name": "sgd"}},
                {"op": "data", "role": "z"},
                {"op": "data", "run": RUN, "role": "x"},
                {"op": "close", "run": "another"},
                {"op": "stop", "run": RUN, "uids": [5]},
                {"op": "run", "run": RUN, "uids": [1]},
                {"op": "remap", "run": RUN, "epoch": "x"},
                {"run": "another"},
                {"run": RUN, "epoch": 7},
                {"run": [RUN]},
            ]
        )
        if (
            key == 1
            and kind in (MessageKind.PUSH, MessageKind.PUSH_PULL)
            and array is not None
            and array.shape == (4,)
            and array.dtype == np.float64
        ):
            array = np.zeros(3)  # never a valid push to the watched key
        if kind is MessageKind.INIT and key == 1:
            meta = {"name": "other", "optimizer": {"name": "sgd", "learning_rate": 1.0}}
        yield kind, key, array, meta


async def test_a_hundred_thousand_bad_requests_change_nothing(node):
    count = int(os.environ.get("DBNODE_FUZZ_REQUESTS", "100000"))
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, np.arange(4.0))
        before, version = await pull(ch, 1)
        rng = np.random.default_rng(7)
        senders = [await channel(nursery, node) for _ in range(4)]
        requests = list(bad_requests(rng, count))

        sent = 0

        async def send(sender, part):
            nonlocal sent
            for kind, key, array, meta in part:
                await sender.notify(kind, key=key, array=array, meta=meta)
                sent += 1

        with trio.fail_after(240):
            async with trio.open_nursery() as fuzz:
                for i, sender in enumerate(senders):
                    fuzz.start_soon(send, sender, requests[i::4])
            for s in senders:  # every bad request was handled
                await s.ping(timeout=60)
        after, version_after = await pull(ch, 1)
        np.testing.assert_array_equal(after, before)
        assert version_after == version == 0
        stats = (await ch.request(MessageKind.STATS)).meta
        assert stats["totals"]["pushes"] == 0 and sent == count
        for s in senders:
            await s.aclose()
        await ch.aclose()
    assert node.proc.poll() is None  # alive


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_load_applies_every_acknowledged_push_exactly_once_with_flat_memory(node):
    # DBNODE_LOAD_SECONDS=30 for the full-length run; the suite runs 3 s.
    seconds = float(os.environ.get("DBNODE_LOAD_SECONDS", "3"))
    clients = 32
    acked = retried = 0
    samples = []
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, node)
        await init(ch, 1, np.zeros(1024))
        deadline = trio.current_time() + seconds

        async def client(i):
            nonlocal acked, retried
            mine = await channel(nursery, node)
            grad, seq = np.ones(1024), 0
            while trio.current_time() < deadline:
                seq += 1
                await mine.request(
                    MessageKind.PUSH, key=1, array=grad, seq=seq, meta={"pusher": f"c{i}"}
                )
                acked += 1
                if seq % 10 == 0:  # a retry of an acknowledged push: must be dropped
                    await mine.request(
                        MessageKind.PUSH, key=1, array=grad, seq=seq, meta={"pusher": f"c{i}"}
                    )
                    retried += 1
            await mine.aclose()

        async def sample_memory():
            while trio.current_time() < deadline:
                samples.append(rss_bytes(node.proc.pid))
                await trio.sleep(seconds / 20)

        async with trio.open_nursery() as load:
            for i in range(clients):
                load.start_soon(client, i)
            load.start_soon(sample_memory)
        value, version = await pull(ch, 1)
        stats = (await ch.request(MessageKind.STATS)).meta
        await ch.aclose()
    np.testing.assert_array_equal(value, np.full(1024, -float(acked)))
    assert version == acked and stats["totals"]["duplicates"] == retried > 0
    warm = samples[len(samples) // 3 :]
    print(
        f"load: {clients} clients, {seconds:.0f} s, {acked} pushes acknowledged and applied once, "
        f"{retried} retries dropped, node RSS {min(warm) >> 20}-{max(warm) >> 20} MiB after warm-up"
    )
    assert max(warm) - min(warm) < 16 << 20, [s >> 20 for s in samples]
