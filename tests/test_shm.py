"""Payloads through shared memory between processes of one host: the rings'
arithmetic, what a node agrees to map, and frames over real loopback
connections, within one process and between two."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dbnode.errors import LocalProtocolError, RemoteProtocolError
from dbnode.wire import Channel, MessageKind, Reply, open_connection, serve
from dbnode.wire import shm as shm_mod
from dbnode.wire.frames import FLAG_SHM, FLAG_SHM_RESTART
from dbnode.wire.shm import MIN_PAYLOAD, SharedRings

SECRET = bytes(range(32))
SIZE = 1 << 20  # a small ring: wrap-arounds and full rings come quickly


def segments() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"dbnode-{os.getpid()}-"))


@pytest.fixture
def pair():
    client = SharedRings.offer(SIZE)
    server = SharedRings.attach({"path": client.path, "size": SIZE})
    client.unlink()
    yield client, server
    client.close()
    server.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(MIN_PAYLOAD, SIZE // 2), st.integers(0, 3)), max_size=40))
def test_every_payload_arrives_intact_or_goes_inline(steps):
    """A writer that runs ahead of its reader by up to three payloads: each
    payload either fits (and arrives exactly) or is refused (and would go
    inline); nothing unread is ever overwritten."""
    client = SharedRings.offer(SIZE)
    server = SharedRings.attach({"path": client.path, "size": SIZE})
    client.unlink()
    rng = np.random.default_rng(len(steps))
    pending = []
    try:
        for n, lag in steps:
            payload = rng.integers(0, 256, n, dtype=np.uint8)
            flags = client.put(memoryview(payload))
            if flags is not None:
                assert flags & FLAG_SHM
                pending.append((payload, flags))
            while len(pending) > lag:  # the reader catches up to ``lag`` behind
                sent, sent_flags = pending.pop(0)
                got = np.empty_like(sent)
                server.take(memoryview(got), sent_flags)
                np.testing.assert_array_equal(got, sent)
        for sent, sent_flags in pending:
            got = np.empty_like(sent)
            server.take(memoryview(got), sent_flags)
            np.testing.assert_array_equal(got, sent)
    finally:
        client.close()
        server.close()


def test_both_directions_and_restarts(pair):
    client, server = pair
    a = np.arange(MIN_PAYLOAD, dtype=np.uint8)
    for _ in range(50):  # request, answer, request...: each ring is empty when written
        flags = client.put(memoryview(a))
        assert flags == FLAG_SHM | FLAG_SHM_RESTART
        got = np.empty_like(a)
        server.take(memoryview(got), flags)
        back = server.put(memoryview(got))
        assert back == FLAG_SHM | FLAG_SHM_RESTART
        client.take(memoryview(got), back)
        np.testing.assert_array_equal(got, a)


def test_a_full_ring_refuses_and_small_or_huge_payloads_go_inline(pair):
    client, server = pair
    half = np.zeros(SIZE // 2, np.uint8)
    assert client.put(memoryview(half)) is not None
    assert client.put(memoryview(half)) is not None
    assert client.put(memoryview(half)) is None  # unread: nothing is overwritten
    server.take(memoryview(np.empty_like(half)), FLAG_SHM | FLAG_SHM_RESTART)
    assert client.put(memoryview(half)) is not None  # room again
    assert client.put(memoryview(np.zeros(MIN_PAYLOAD - 1, np.uint8))) is None
    assert client.put(memoryview(np.zeros(SIZE // 2 + 1, np.uint8))) is None
    with pytest.raises(RemoteProtocolError, match="cannot be shared"):
        server.take(memoryview(np.empty(SIZE, np.uint8)), FLAG_SHM)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda path: {"path": "/tmp/x", "size": SIZE}, "not in /dev/shm"),
        (lambda path: {"path": "/dev/shm/other-1-" + "0" * 32, "size": SIZE}, "not a dbnode"),
        (lambda path: {"path": path, "size": SIZE * 2}, "wrong mode or size"),
        (lambda path: {"path": path, "size": 3}, "out of range"),
        (lambda path: {"path": path}, "out of range"),
        (lambda path: [path], "not an object"),
    ],
)
def test_a_node_maps_only_a_private_dbnode_segment(change, match):
    rings = SharedRings.offer(SIZE)
    try:
        with pytest.raises(ValueError, match=match):
            SharedRings.attach(change(rings.path))
    finally:
        rings.close()


def test_a_segment_readable_by_others_or_a_symlink_is_refused(tmp_path):
    rings = SharedRings.offer(SIZE)
    try:
        os.chmod(rings.path, 0o644)
        with pytest.raises(ValueError, match="wrong mode"):
            SharedRings.attach({"path": rings.path, "size": SIZE})
        os.chmod(rings.path, stat.S_IRUSR | stat.S_IWUSR)
        link = f"/dev/shm/dbnode-{os.getpid()}-{'f' * 32}"
        os.symlink(rings.path, link)
        try:
            with pytest.raises(OSError):
                SharedRings.attach({"path": link, "size": SIZE})
        finally:
            os.unlink(link)
    finally:
        rings.close()


def test_only_loopback_peers_are_offered_it():
    assert shm_mod.is_loopback("127.0.0.1") and shm_mod.is_loopback("127.3.0.9")
    assert shm_mod.is_loopback("::1") and shm_mod.is_loopback("localhost")
    assert not shm_mod.is_loopback("10.213.7.11") and not shm_mod.is_loopback("0.0.0.0")


async def echo(frame):
    return Reply(array=frame.array, seq=frame.seq, meta=frame.meta)


async def test_frames_over_a_loopback_connection_use_the_rings(nursery):
    host, port = await nursery.start(
        lambda task_status: serve(echo, "127.0.0.1", 0, secret=SECRET, task_status=task_status)
    )
    conn = await open_connection(host, port, SECRET)
    assert conn.rings is not None
    assert segments() == []  # the name is gone once both ends have it
    ch = Channel(conn)
    await nursery.start(ch.run)
    rng = np.random.default_rng(0)
    sizes = [1, 1000, MIN_PAYLOAD // 4, MIN_PAYLOAD, 500_000, 2_000_000, 3_000_000]

    async def one(size):
        a = rng.standard_normal(size).astype(np.float32)
        into = np.empty_like(a)
        for seq in range(5):
            r = await ch.request(MessageKind.PUSH_PULL, key=1, array=a, seq=seq, into=into)
            assert r.array is into and r.seq == seq and r.flags == 0
            np.testing.assert_array_equal(into, a)

    async with trio.open_nursery() as n:  # concurrent senders share each ring
        for size in sizes:
            n.start_soon(one, size)
    before = conn.rings._out.pos
    await one(10)  # small: inline
    assert conn.rings._out.pos == before
    await ch.aclose()


async def test_with_shm_off_nothing_is_offered(nursery, monkeypatch):
    monkeypatch.setenv("DBNODE_SHM", "0")
    host, port = await nursery.start(
        lambda task_status: serve(echo, "127.0.0.1", 0, secret=SECRET, task_status=task_status)
    )
    conn = await open_connection(host, port, SECRET)
    assert conn.rings is None
    await conn.aclose()


PEER = """
import sys, numpy as np, trio
from dbnode.wire import Channel, MessageKind, open_connection
async def main():
    conn = await open_connection("127.0.0.1", int(sys.argv[1]), bytes(range(32)))
    assert conn.rings is not None
    async with trio.open_nursery() as n:
        ch = Channel(conn)
        await n.start(ch.run)
        a = np.arange(1_000_000, dtype=np.float32)
        for seq in range(20):
            r = await ch.request(MessageKind.PUSH_PULL, key=2, array=a + seq, seq=seq)
            assert np.array_equal(r.array, a + seq)
        await ch.aclose()
    print("ok")
trio.run(main)
"""


async def test_between_two_processes(nursery):
    host, port = await nursery.start(
        lambda task_status: serve(echo, "127.0.0.1", 0, secret=SECRET, task_status=task_status)
    )
    done = await trio.run_process(
        [sys.executable, "-c", PEER, str(port)], capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == "ok"


async def test_a_shared_flag_without_rings_is_a_protocol_error(nursery):
    """A peer that flags a payload as shared on a connection that has no
    rings gets BAD_HEADER, and the node carries on."""
    from dbnode.wire import ErrorCode, encode_frame

    host, port = await nursery.start(
        lambda task_status: serve(echo, "127.0.0.1", 0, secret=SECRET, task_status=task_status)
    )
    os.environ["DBNODE_SHM"] = "0"
    try:
        conn = await open_connection(host, port, SECRET)
    finally:
        del os.environ["DBNODE_SHM"]
    parts = encode_frame(MessageKind.PUSH, request_id=1, array=np.ones(4, np.float32))
    head = bytearray(parts[0])
    head[9] |= FLAG_SHM >> 8
    with pytest.raises(LocalProtocolError, match="belong to the transport"):
        encode_frame(MessageKind.PUSH, array=np.ones(4, np.float32), flags=FLAG_SHM)
    await conn.send_parts([head])  # a peer that sets it anyway
    answer = await conn.receive_frame()
    assert answer.kind == MessageKind.ERROR and answer.meta["code"] == ErrorCode.BAD_HEADER
    await conn.aclose()
    again = await open_connection(host, port, SECRET)  # the server still serves
    assert again.rings is not None
    await again.aclose()


def test_a_segment_left_by_a_dead_process_is_swept(monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = f"/dev/shm/dbnode-{dead.stdout.strip()}-{'a' * 32}"
    ours = f"/dev/shm/dbnode-{os.getpid()}-{'b' * 32}"
    for path in (stale, ours):
        open(path, "wb").close()
    monkeypatch.setattr(shm_mod, "_swept", False)
    try:
        SharedRings.offer(SIZE).close()
        assert not os.path.exists(stale)  # its creator is gone
        assert os.path.exists(ours)  # a live process's is left alone
    finally:
        for path in (stale, ours):
            if os.path.exists(path):
                os.unlink(path)


def test_a_segment_with_holes_is_refused():
    """A sparse file would fault (SIGBUS) on a page /dev/shm cannot supply."""
    path = f"/dev/shm/dbnode-{os.getpid()}-{'c' * 32}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 128 + 2 * SIZE)
        with pytest.raises(ValueError, match="not allocated"):
            SharedRings.attach({"path": path, "size": SIZE})
    finally:
        os.close(fd)
        os.unlink(path)


async def test_a_shared_frame_given_up_in_the_queue_still_goes_out_in_order():
    """A task that stops waiting for its frame (a timeout) while another
    task's big send holds the socket: its payload is in the ring already, so
    the frame still goes out, in its place; the rings stay in step and the
    connection usable."""
    from dbnode.wire import Connection

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    a = Connection(await trio.open_tcp_stream("127.0.0.1", port))
    b = Connection(await listeners[0].accept())
    await listeners[0].aclose()
    a.authenticated = b.authenticated = True
    a.rings = SharedRings.offer(SIZE)
    b.rings = SharedRings.attach({"path": a.rings.path, "size": SIZE})
    a.rings.unlink()
    big = np.arange(8_000_000, dtype=np.float32)  # 32 MB, inline: fills the socket
    mid = np.arange(100_000, dtype=np.float32)  # 400 KB, through the ring
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: a.send_frame(MessageKind.PUSH, key=1, array=big))
        await trio.sleep(0.1)
        with trio.move_on_after(0.1) as timer:
            await a.send_frame(MessageKind.PUSH, key=2, array=mid)
        assert timer.cancelled_caught and not a.closed
        got = [await b.receive_frame() for _ in range(2)]
    assert [f.key for f in got] == [1, 2] and b.rings._in.pos > 0  # mid took the ring
    np.testing.assert_array_equal(got[0].array, big)
    np.testing.assert_array_equal(got[1].array, mid)
    await a.send_frame(MessageKind.PUSH, key=3, array=mid + 1)
    again = await b.receive_frame()
    assert again.key == 3 and again.flags == 0
    np.testing.assert_array_equal(again.array, mid + 1)
    await a.aclose()
    await b.aclose()
