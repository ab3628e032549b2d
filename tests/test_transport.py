"""The trio transport: real TCP on loopback, socketpairs, and trio.testing streams."""

import functools
import logging
import os
import random
import socket
import struct

import numpy as np
import pytest
import trio
import trio.testing

from dbnode.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionClosedError,
    DBNodeError,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    RequestTimeout,
)
from dbnode.wire import (
    DEFER,
    HEADER_SIZE,
    MAGIC,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Channel,
    Connection,
    ErrorCode,
    FrameDecoder,
    Reply,
    auth_mac,
    client_handshake,
    connect,
    encode_frame,
    load_secret,
    open_connection,
    serve,
    server_handshake,
)
from dbnode.wire import (
    MessageKind as K,
)

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
HDR = struct.Struct("<4sHHHBBIQQ8QIIQ")
assert HDR.size == HEADER_SIZE


# -- helpers -----------------------------------------------------------------------


async def echo(frame):
    """Answer with the request's own tensor, meta and seq."""
    return Reply(array=frame.array, meta=frame.meta, seq=frame.seq)


async def start_server(nursery, handler=echo, **kwargs):
    """Run serve() in ``nursery``; returns (host, port)."""
    kwargs.setdefault("secret", SECRET)
    return await nursery.start(functools.partial(serve, handler, **kwargs))


async def raw_connection(port):
    """A TCP connection that has not done the handshake (for hand-made frames)."""
    return Connection(await trio.open_tcp_stream("127.0.0.1", port))


def header(kind=K.PULL, *, magic=MAGIC, version=PROTOCOL_VERSION, dtype=0, shape=(), rid=1,
           meta_length=0, reserved=0, payload_length=0):  # fmt: skip
    """Hand-made header bytes, valid or not."""
    dims = list(shape) + [0] * (8 - len(shape))
    return HDR.pack(magic, version, kind, 0, dtype, len(shape), 0, rid, 0, *dims,
                    meta_length, reserved, payload_length)  # fmt: skip


async def expect_error_then_close(conn, code):
    """The peer must send ERROR(code, request_id 0) and then close."""
    with trio.fail_after(5):
        frame = await conn.receive_frame()
        assert frame.kind == K.ERROR, frame
        assert frame.meta["code"] == code, frame.meta
        assert frame.request_id == 0
        with pytest.raises(ConnectionClosedError):
            await conn.receive_frame()
    return frame


def random_array(rng, dtype, shape):
    """An array of random *bits*: NaN payloads and all, to check bit-exactness."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def fragmenting_pair(max_bytes):
    """A bidirectional in-memory stream pair that delivers at most max_bytes at a time."""

    def one_way():
        send, recv = trio.testing.memory_stream_one_way_pair()

        async def pump():
            trio.testing.memory_stream_pump(send, recv, max_bytes=max_bytes)

        send.send_all_hook = pump
        recv.receive_some_hook = pump
        send.close_hook = lambda: trio.testing.memory_stream_pump(send, recv)
        return send, recv

    s1, r1 = one_way()
    s2, r2 = one_way()
    return trio.StapledStream(s1, r2), trio.StapledStream(s2, r1)


async def memory_channels(nursery, a_handler=None, b_handler=None, *, pair=None, **kwargs):
    """Two authenticated Channels talking over in-memory streams, both running."""
    sa, sb = pair if pair is not None else trio.testing.memory_stream_pair()
    ca, cb = Connection(sa), Connection(sb)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(client_handshake, ca, SECRET, name="a"))
        n.start_soon(functools.partial(server_handshake, cb, SECRET, name="b"))
    cha, chb = Channel(ca, a_handler, **kwargs), Channel(cb, b_handler, **kwargs)
    await nursery.start(cha.run)
    await nursery.start(chb.run)
    return cha, chb


# -- secrets -------------------------------------------------------------------------


def test_load_secret_from_file_and_env(tmp_path, monkeypatch):
    for raw in (os.urandom(32), os.urandom(31) + b"\n", b"text\n" + os.urandom(16) + b"\n"):
        (tmp_path / "raw").write_bytes(raw)
        assert load_secret(tmp_path / "raw") == raw  # binary: byte for byte
    (tmp_path / "hex").write_text("ab" * 32 + "\r\n")
    assert load_secret(tmp_path / "hex") == b"ab" * 32
    # A trailing line break is not part of the secret: file and env agree.
    (tmp_path / "text").write_bytes(b"correct horse battery staple\n")
    monkeypatch.setenv("DBNODE_SECRET", "correct horse battery staple")
    assert load_secret(tmp_path / "text") == load_secret() == b"correct horse battery staple"
    monkeypatch.setenv("OTHER_VAR", "x" * 16)
    assert load_secret(env="OTHER_VAR") == b"x" * 16


def test_load_secret_errors_name_the_source(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        load_secret(missing)
    (tmp_path / "short").write_bytes(b"tooshort\n")
    with pytest.raises(ConfigError, match="short.*8 bytes"):
        load_secret(tmp_path / "short")
    monkeypatch.delenv("DBNODE_SECRET", raising=False)
    with pytest.raises(ConfigError, match="DBNODE_SECRET"):
        load_secret()
    monkeypatch.setenv("DBNODE_SECRET", "short")
    with pytest.raises(ConfigError, match="DBNODE_SECRET") as info:
        load_secret()
    assert "short'" not in str(info.value).replace("DBNODE_SECRET", "")  # never echo it


async def test_no_secret_is_a_config_error_before_any_io(nursery):
    for bad in (None, b"", b"x" * 15, "a str secret of enough length"):
        with pytest.raises(ConfigError):
            await nursery.start(functools.partial(serve, echo, secret=bad))
        with pytest.raises(ConfigError):
            await open_connection("127.0.0.1", 9, bad)  # port 9: never contacted


# -- handshake -------------------------------------------------------------------------


async def test_handshake_ok_names_and_ping(nursery):
    host, port = await start_server(nursery, name="node-a")
    assert host == "127.0.0.1" and port > 0
    async with connect(host, port, SECRET, name="driver") as channel:
        assert channel.peer_name == "node-a"
        assert channel.conn.authenticated
        sock = channel.conn._wire._sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert await channel.ping(timeout=5) > 0
    assert channel.closed


async def test_client_rejects_server_with_another_secret(nursery):
    host, port = await start_server(nursery, secret=OTHER)
    with pytest.raises(AuthenticationError, match="does not share our secret") as info:
        async with connect(host, port, SECRET):
            pass  # pragma: no cover
    assert info.value.code == ErrorCode.AUTH_FAILED
    async with connect(host, port, OTHER) as channel:  # the server is unharmed
        await channel.ping(timeout=5)


async def test_client_tells_a_fake_server_auth_failed(nursery):
    """A server that cannot compute MACs is told AUTH_FAILED and gets nothing else."""
    told = []

    async def fake_server(stream):
        conn = Connection(stream)
        hello = await conn.receive_frame()
        assert hello.kind == K.HELLO and len(hello.meta["nonce"]) == 2 * NONCE_SIZE
        await conn.send_frame(K.CHALLENGE, meta={"nonce": "ab" * 32, "mac": "cd" * 32})
        told.append(await conn.receive_frame())
        with pytest.raises(ConnectionClosedError):
            await conn.receive_frame()
        told.append("closed")

    listeners = await nursery.start(trio.serve_tcp, fake_server, 0)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(AuthenticationError):
        await open_connection("127.0.0.1", port, SECRET)
    with trio.fail_after(5):
        while len(told) < 2:
            await trio.sleep(0.01)
    assert told[0].kind == K.ERROR and told[0].meta["code"] == ErrorCode.AUTH_FAILED


async def test_server_rejects_a_wrong_client_proof(nursery):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    nc = os.urandom(NONCE_SIZE)
    await conn.send_frame(K.HELLO, meta={"nonce": nc.hex()})
    challenge = await conn.receive_frame()
    assert challenge.kind == K.CHALLENGE
    ns = bytes.fromhex(challenge.meta["nonce"])
    # The server's proof follows the spec exactly ...
    assert bytes.fromhex(challenge.meta["mac"]) == auth_mac(SECRET, "server", nc, ns)
    # ... and a client proof made with another secret is refused.
    await conn.send_frame(K.AUTH, meta={"mac": auth_mac(OTHER, "client", nc, ns).hex()})
    await expect_error_then_close(conn, ErrorCode.AUTH_FAILED)


async def test_server_rejects_its_own_proof_reflected(nursery):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    await conn.send_frame(K.HELLO, meta={"nonce": os.urandom(NONCE_SIZE).hex()})
    challenge = await conn.receive_frame()
    await conn.send_frame(K.AUTH, meta={"mac": challenge.meta["mac"]})
    await expect_error_then_close(conn, ErrorCode.AUTH_FAILED)


async def test_server_nonces_are_fresh(nursery):
    host, port = await start_server(nursery)
    nc = b"\xaa" * NONCE_SIZE  # even with the same client nonce
    seen = set()
    for _ in range(3):
        async with await raw_connection(port) as conn:
            await conn.send_frame(K.HELLO, meta={"nonce": nc.hex()})
            challenge = await conn.receive_frame()
            seen.add((challenge.meta["nonce"], challenge.meta["mac"]))
    assert len(seen) == 3


@pytest.mark.parametrize(
    "auth_meta", [{}, {"mac": ""}, {"mac": "zz" * 32}, {"mac": "ab" * 31}, {"mac": 5}]
)
async def test_peer_without_a_proof_is_rejected(nursery, auth_meta):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    await conn.send_frame(K.HELLO, meta={"nonce": os.urandom(NONCE_SIZE).hex()})
    assert (await conn.receive_frame()).kind == K.CHALLENGE
    await conn.send_frame(K.AUTH, meta=auth_meta)
    await expect_error_then_close(conn, ErrorCode.BAD_META)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([dict(kind=K.PULL, request_id=1, key=3)], ErrorCode.UNEXPECTED),
        ([dict(kind=K.PING, request_id=1)], ErrorCode.UNEXPECTED),
        ([dict(kind=K.AUTH, meta={"mac": "00" * 32})], ErrorCode.UNEXPECTED),
        ([dict(kind=K.HELLO, meta={})], ErrorCode.BAD_META),
        # HELLO then a request instead of AUTH.
        (
            [dict(kind=K.HELLO, meta={"nonce": "11" * 32}), dict(kind=K.PULL, request_id=1)],
            ErrorCode.UNEXPECTED,
        ),  # fmt: skip
        # No tensor before AUTH_OK: the handshake limits allow no payload.
        ([dict(kind=K.PUSH, request_id=1, array=np.zeros(4, np.float32))], ErrorCode.TOO_LARGE),
    ],
)
async def test_nothing_but_the_handshake_before_auth_ok(nursery, frames, code):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    for fields in frames:
        await conn.send_parts(encode_frame(**fields))
        if fields["kind"] == K.HELLO and fields["meta"]:
            assert (await conn.receive_frame()).kind == K.CHALLENGE
    await expect_error_then_close(conn, code)


async def test_other_protocol_version_is_refused(nursery):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    hello = bytearray(b"".join(encode_frame(K.HELLO, meta={"nonce": "11" * 32})))
    hello[4:6] = struct.pack("<H", 1)  # the version before bfloat16 and float16
    await conn.send_parts([bytes(hello)])
    await expect_error_then_close(conn, ErrorCode.BAD_VERSION)


async def test_a_node_gives_a_handshake_3_s_by_default(nursery):
    host, port = await start_server(nursery)
    conn = await raw_connection(port)
    start = trio.current_time()
    frame = await expect_error_then_close(conn, ErrorCode.TIMEOUT)
    assert 2.8 < trio.current_time() - start < 5
    assert "3.0 s" in frame.meta["message"]


async def test_handshake_timeout_for_a_silent_client(nursery):
    host, port = await start_server(nursery, handshake_timeout=0.2)
    conn = await raw_connection(port)
    start = trio.current_time()
    frame = await expect_error_then_close(conn, ErrorCode.TIMEOUT)
    assert 0.15 < trio.current_time() - start < 3
    assert "0.2 s" in frame.meta["message"]


async def test_handshake_timeout_for_a_silent_server(nursery):
    async def silent(stream):
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, silent, 0)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(ConnectionClosedError, match="handshake") as info:
        await open_connection("127.0.0.1", port, SECRET, handshake_timeout=0.2)
    assert info.value.code == ErrorCode.TIMEOUT


async def test_nothing_listening():
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        with pytest.raises(ConnectionClosedError, match=f"cannot connect to 127.0.0.1:{port}"):
            await open_connection("127.0.0.1", port, SECRET)


# -- tensors ---------------------------------------------------------------------------


CASES = [
    (np.float32, ()), (np.float32, (7,)), (np.float64, (3, 5)), (np.int32, (2, 3, 4)),
    (np.int64, (0,)), (np.uint8, (1000,)), (np.float32, (0, 3)), (np.int64, (1, 1, 1, 1)),
    (np.float64, (2,) * 8),
]  # fmt: skip


async def test_echo_of_dtypes_and_shapes_is_bit_exact(nursery):
    host, port = await start_server(nursery)
    rng = np.random.default_rng(0)
    async with connect(host, port, SECRET) as channel:
        for i, (dtype, shape) in enumerate(CASES):
            sent = random_array(rng, dtype, shape)
            into = np.empty(shape, dtype) if i % 2 else None
            reply = await channel.request(K.PUSH_PULL, key=i, seq=i + 100, array=sent,
                                          meta={"i": i}, into=into, timeout=5)  # fmt: skip
            assert reply.kind == K.REPLY and reply.key == i and reply.seq == i + 100
            assert reply.meta == {"i": i}
            assert same_bits(reply.array, sent), (dtype, shape)
            if into is not None:
                assert reply.array is into


async def test_64_mib_lands_bit_exact_in_the_callers_buffer(nursery):
    host, port = await start_server(nursery)
    rng = np.random.default_rng(1)
    sent = random_array(rng, np.float32, (4096, 4096))  # 64 MiB, NaN bit patterns included
    assert sent.nbytes == 64 << 20
    into = np.zeros_like(sent)
    async with connect(host, port, SECRET) as channel:
        reply = await channel.request(K.PUSH_PULL, key=1, array=sent, into=into, timeout=10)
    assert reply.array is into
    assert same_bits(into, sent)


async def test_into_mismatch_is_reported_and_leaves_into_untouched(nursery):
    host, port = await start_server(nursery)
    async with connect(host, port, SECRET) as channel:
        into = np.full((2, 2), 7, np.float32)
        with pytest.raises(RemoteProtocolError) as info:
            await channel.request(K.PUSH_PULL, array=np.ones((2, 3), np.float32), into=into)
        assert info.value.code == ErrorCode.SHAPE_MISMATCH
        with pytest.raises(RemoteProtocolError) as info:
            await channel.request(K.PUSH_PULL, array=np.ones((2, 2), np.float64), into=into)
        assert info.value.code == ErrorCode.DTYPE_MISMATCH
        with pytest.raises(RemoteProtocolError):  # no tensor at all
            await channel.request(K.PULL, into=into)
        assert (into == 7).all()
        with pytest.raises(LocalProtocolError):
            await channel.request(K.PULL, into=np.empty((4, 4), np.float32)[:, :2])
        await channel.ping(timeout=5)  # the channel carries on


async def test_server_receives_into_pooled_buffers(nursery):
    pool = [np.empty((64,), np.float64)]
    seen = []

    async def handler(frame):
        seen.append(frame.array is pool[0])
        return Reply(array=frame.array)

    def allocate(header):
        return pool[0] if header.shape == (64,) else None

    sa, sb = trio.testing.memory_stream_pair()
    ca, cb = Connection(sa), Connection(sb)
    async with trio.open_nursery() as n:
        n.start_soon(client_handshake, ca, SECRET)
        n.start_soon(server_handshake, cb, SECRET)
    client, server = Channel(ca), Channel(cb, handler, allocate=allocate)
    await nursery.start(client.run)
    await nursery.start(server.run)
    a = np.arange(64, dtype=np.float64)
    assert same_bits((await client.request(K.PUSH, array=a)).array, a)
    await client.request(K.PUSH, array=np.arange(3, dtype=np.float64))
    assert seen == [True, False]
    await client.aclose()


# -- multiplexing ------------------------------------------------------------------------


async def test_200_concurrent_requests_are_matched_to_their_replies(nursery):
    order = []

    async def handler(frame):
        await trio.sleep(random.uniform(0, 0.03))
        order.append(frame.key)
        # The reply depends on the request: key, seq and tensor all checked.
        return Reply(array=frame.array * 2, seq=frame.key + 1000, meta={"k": frame.key})

    host, port = await start_server(nursery, handler)
    results = {}

    async with connect(host, port, SECRET) as channel:

        async def one(key):
            sent = np.full((key % 7 + 1, 3), key, np.int64)
            reply = await channel.request(K.PUSH_PULL, key=key, array=sent, timeout=10)
            results[key] = (reply, sent)

        async with trio.open_nursery() as requests:
            for key in range(200):
                requests.start_soon(one, key)

    assert sorted(results) == list(range(200))
    for key, (reply, sent) in results.items():
        assert reply.key == key and reply.seq == key + 1000 and reply.meta == {"k": key}
        assert np.array_equal(reply.array, sent * 2) and reply.array.dtype == np.int64
    assert order != sorted(order)  # the replies really came back out of order


async def test_concurrent_large_sends_never_interleave(nursery):
    host, port = await start_server(nursery)
    rng = np.random.default_rng(2)
    arrays = [random_array(rng, np.uint8, (4 << 20,)) for _ in range(6)]
    async with connect(host, port, SECRET) as channel:
        replies = [None] * len(arrays)

        async def one(i):
            replies[i] = await channel.request(K.PUSH_PULL, key=i, array=arrays[i], timeout=10)

        async with trio.open_nursery() as n:
            for i in range(len(arrays)):
                n.start_soon(one, i)
    for i, reply in enumerate(replies):
        assert reply.key == i and same_bits(reply.array, arrays[i])


async def test_requests_both_ways_over_fragmented_memory_streams(nursery):
    """Symmetric channels, generic-stream path, frames delivered 7 bytes at a time."""

    async def doubler(frame):
        return Reply(array=None if frame.array is None else frame.array * 2, seq=frame.seq)

    a, b = await memory_channels(nursery, doubler, doubler, pair=fragmenting_pair(7))
    assert a.peer_name == "b" and b.peer_name == "a"  # from AUTH_OK and HELLO
    x = np.arange(100, dtype=np.float32).reshape(10, 10)
    into = np.empty_like(x)
    reply = await a.request(K.FORWARD, array=x, seq=5, into=into)
    assert reply.array is into and np.array_equal(into, x * 2) and reply.seq == 5
    reply = await b.request(K.BACKWARD, array=x[:3], seq=6)
    assert np.array_equal(reply.array, x[:3] * 2)
    assert (await a.request(K.PING, seq=9)).kind == K.PONG
    await b.ping()
    await a.aclose()
    assert a.closed and b.closed


# -- errors from handlers ------------------------------------------------------------------


async def test_handler_errors_become_error_replies_and_the_connection_stays(nursery):
    async def handler(frame):
        if frame.key == 1:
            raise RequestError(ErrorCode.UNKNOWN_KEY, "no tensor 1")
        if frame.key == 2:
            raise ValueError("a bug")
        if frame.key == 3:
            return ("not", "a", "Reply")
        if frame.key == 4:
            return Reply(array=np.zeros(2, np.complex64))  # not a wire dtype
        if frame.key == 5:
            raise RequestError(ErrorCode.BAD_MAGIC, "a fatal code from a handler")
        return None

    host, port = await start_server(nursery, handler)
    async with connect(host, port, SECRET) as channel:
        with pytest.raises(RemoteError) as info:
            await channel.request(K.PULL, key=1, timeout=5)
        assert info.value.code == ErrorCode.UNKNOWN_KEY and info.value.message == "no tensor 1"
        for key in (2, 3, 4, 5):  # bugs on the server side: INTERNAL, never fatal
            with pytest.raises(RemoteError) as info:
                await channel.request(K.PULL, key=key, timeout=5)
            assert info.value.code == ErrorCode.INTERNAL, key
        assert "ValueError: a bug" in str(await _error_of(channel, 2))
        reply = await channel.request(K.STATS, key=9, timeout=5)
        assert reply.kind == K.REPLY and reply.array is None and reply.meta == {}


async def test_unknown_flags_are_a_bad_request_and_the_connection_stays(nursery):
    seen = []

    async def handler(frame):
        seen.append(frame.key)

    host, port = await start_server(nursery, handler)
    async with connect(host, port, SECRET) as channel:
        for kind in (K.PULL, K.PING, K.PUSH):
            with pytest.raises(RemoteError) as info:
                await channel.request(kind, key=7, flags=0x0201, timeout=5)
            assert info.value.code == ErrorCode.BAD_REQUEST, kind
            assert "flags 0x0201" in info.value.message and kind.name in info.value.message
        await channel.request(K.PULL, key=8, timeout=5)
        assert seen == [8]  # the handler never saw a flagged request


async def _error_of(channel, key):
    with pytest.raises(RemoteError) as info:
        await channel.request(K.PULL, key=key, timeout=5)
    return info.value


async def test_a_channel_without_handler_answers_bad_request(nursery):
    a, b = await memory_channels(nursery)
    with pytest.raises(RemoteError) as info:
        await a.request(K.STATS)
    assert info.value.code == ErrorCode.BAD_REQUEST
    await a.ping()  # PING needs no handler


async def test_fire_and_forget(nursery, caplog):
    got = []

    async def handler(frame):
        got.append(frame.key)
        if frame.key == 13:
            raise RequestError(ErrorCode.UNKNOWN_KEY, "no tensor 13")
        return Reply(meta={"ignored": True})

    a, b = await memory_channels(nursery, None, handler)
    with caplog.at_level(logging.WARNING, logger="dbnode.wire"):
        await a.notify(K.PUSH, key=12, array=np.ones(3, np.float32))
        await a.notify(K.PUSH, key=13)
        await a.ping()  # in order on the wire: the notifies were read before it
        with trio.fail_after(5):
            while "no tensor 13" not in caplog.text:
                await trio.sleep(0.01)
    assert got == [12, 13]
    await a.ping()


async def test_misuse_is_reported_locally(nursery):
    a, b = await memory_channels(nursery)
    for kind in (K.REPLY, K.ERROR, K.PONG, K.HELLO, K.CLOSE, 99):
        with pytest.raises(LocalProtocolError):
            await a.request(kind)
    with pytest.raises(LocalProtocolError):
        await a.request(K.PULL, key=-1)
    with pytest.raises(LocalProtocolError):  # PULL carries no tensor
        await a.request(K.PULL, array=np.ones(2, np.float32))
    with pytest.raises(LocalProtocolError):
        await a.run()  # runs once
    with pytest.raises(LocalProtocolError):
        Channel(Connection(trio.testing.memory_stream_pair()[0]))  # not authenticated
    not_running = Channel(a.conn)
    with pytest.raises(LocalProtocolError, match="run"):
        await not_running.request(K.PULL)
    await a.ping()


# -- bad frames ---------------------------------------------------------------------------


BAD_FRAMES = {
    "bad magic": (header(magic=b"XXXX"), ErrorCode.BAD_MAGIC),
    "oversized payload": (
        header(K.PUSH, dtype=1, shape=((1 << 28) + 1,), payload_length=((1 << 28) + 1) * 4),
        ErrorCode.TOO_LARGE,
    ),
    "payload that does not match the shape": (
        header(K.PUSH, dtype=1, shape=(4,), payload_length=12),
        ErrorCode.BAD_SHAPE,
    ),
    "bad meta": (header(meta_length=5) + b"{oops", ErrorCode.BAD_META),
    "unknown kind": (header(kind=77), ErrorCode.BAD_KIND),
    "reserved set": (header(reserved=1), ErrorCode.BAD_HEADER),
    "handshake after auth": (header(K.HELLO, rid=0), ErrorCode.UNEXPECTED),
    "reply to nothing": (header(K.PONG, rid=0), ErrorCode.UNEXPECTED),
}


@pytest.mark.parametrize("data, code", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_bad_frame_gets_an_error_then_close_and_others_carry_on(nursery, data, code):
    host, port = await start_server(nursery)
    async with connect(host, port, SECRET) as good:
        await good.ping(timeout=5)
        bad = await open_connection("127.0.0.1", port, SECRET)
        await bad.send_parts([data])
        frame = await expect_error_then_close(bad, code)
        assert len(frame.meta["message"]) <= 1024
        x = np.arange(10, dtype=np.float64)
        assert same_bits((await good.request(K.PUSH_PULL, array=x, timeout=5)).array, x)


async def test_error_frame_survives_unread_junk_behind_the_bad_frame(nursery):
    """Closing with unread input makes the kernel reset the connection, which
    can destroy the ERROR on its way out; the server reads the junk first."""
    host, port = await start_server(nursery)
    for _ in range(3):
        bad = await open_connection("127.0.0.1", port, SECRET)
        await bad.send_parts([header(magic=b"JUNK") + os.urandom(256 << 10)])
        await trio.sleep(0.05)  # let the junk reach the server before it closes
        await expect_error_then_close(bad, ErrorCode.BAD_MAGIC)


async def test_truncated_frame_from_a_dying_peer_loses_nothing_else(nursery):
    host, port = await start_server(nursery)
    async with connect(host, port, SECRET) as good:
        bad = await open_connection("127.0.0.1", port, SECRET)
        frame = b"".join(encode_frame(K.PUSH, request_id=1, array=np.ones(1000, np.float32)))
        await bad.send_parts([frame[:-100]])
        await bad.aclose()
        for _ in range(3):
            await good.ping(timeout=5)


async def test_stall_inside_a_frame_times_out_and_the_peer_is_told(autojump_clock):
    sa, sb = trio.testing.memory_stream_pair()
    receiver = Connection(sb, stall_timeout=30)
    await sa.send_all(b"".join(encode_frame(K.HELLO, meta={"nonce": "11" * 32}))[:50])
    start = trio.current_time()
    with pytest.raises(RemoteProtocolError) as info:
        await receiver.receive_frame()
    assert info.value.code == ErrorCode.TIMEOUT and trio.current_time() - start == 30
    with pytest.raises(ConnectionClosedError, match="poisoned"):  # receiving is over ...
        await receiver.receive_frame()
    await receiver.close_with_error(info.value.code, str(info.value))  # ... sending is not
    decoder = FrameDecoder()
    while (data := await sa.receive_some()) != b"":
        decoder.receive_data(data)
    decoder.receive_data(b"")
    frame = decoder.next_frame()
    assert frame.kind == K.ERROR and frame.meta["code"] == ErrorCode.TIMEOUT


# -- timeouts, loss, close ---------------------------------------------------------------------


async def test_request_timeout_leaves_the_channel_usable(nursery):
    release = trio.Event()
    answered = trio.Event()

    async def handler(frame):
        if frame.key == 1:
            await release.wait()
            answered.set()
        return Reply(seq=frame.key)

    host, port = await start_server(nursery, handler)
    async with connect(host, port, SECRET) as channel:
        start = trio.current_time()
        with pytest.raises(RequestTimeout, match="PULL"):
            await channel.request(K.PULL, key=1, timeout=0.1)
        assert 0.1 <= trio.current_time() - start < 2
        assert isinstance(RequestTimeout("x"), TimeoutError)
        assert (await channel.request(K.PULL, key=2, timeout=5)).seq == 2
        release.set()
        await answered.wait()  # the late answer to key 1 arrives and is dropped
        assert (await channel.request(K.PULL, key=3, timeout=5)).seq == 3


async def test_timeout_while_the_answer_lands_in_into_closes_the_channel(autojump_clock, nursery):
    """After request() gives up, nothing may write into the caller's buffer."""
    c2s_send, c2s_recv = trio.testing.memory_stream_one_way_pair()
    s2c_send, s2c_recv = trio.testing.memory_stream_one_way_pair()
    client = Connection(trio.StapledStream(c2s_send, s2c_recv))
    server = Connection(trio.StapledStream(s2c_send, c2s_recv))
    async with trio.open_nursery() as n:
        n.start_soon(client_handshake, client, SECRET)
        n.start_soon(server_handshake, server, SECRET)
    channel = Channel(client)
    await nursery.start(channel.run)
    s2c_send.send_all_hook = None  # from now on we deliver the server's bytes by hand
    into = np.zeros(1 << 18, np.float32)
    outcome = []

    async def ask():
        try:
            await channel.request(K.PUSH_PULL, array=np.ones(1, np.float32), into=into, timeout=10)
        except RequestTimeout:
            outcome.append("timeout")

    nursery.start_soon(ask)
    request = await server.receive_frame()
    await server.send_frame(K.REPLY, request_id=request.request_id,
                            array=np.full(into.shape, 7, np.float32))  # fmt: skip
    trio.testing.memory_stream_pump(s2c_send, s2c_recv, max_bytes=HEADER_SIZE + 4000)
    await trio.sleep(20)  # the timeout fires with the answer half received
    assert outcome == ["timeout"]
    landed = int(np.count_nonzero(into))
    assert 0 < landed < into.size
    with pytest.raises(trio.BrokenResourceError):  # the client has closed its end:
        trio.testing.memory_stream_pump(s2c_send, s2c_recv)  # the rest goes nowhere
    await trio.sleep(1)
    assert int(np.count_nonzero(into)) == landed
    with pytest.raises(ConnectionClosedError, match="abandoned"):
        await channel.request(K.PULL)


async def test_peer_dies_mid_request(nursery):
    started = 0

    async def handler(frame):
        nonlocal started
        started += 1
        await trio.sleep_forever()

    server_scope = trio.CancelScope()

    async def run_server(task_status):
        with server_scope:
            await serve(handler, secret=SECRET, task_status=task_status)

    host, port = await nursery.start(run_server)
    failures = []
    async with connect(host, port, SECRET) as channel:

        async def one(key):
            try:
                await channel.request(K.PULL, key=key)
            except ConnectionClosedError as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                for key in range(5):
                    n.start_soon(one, key)
                while started < 5:
                    await trio.sleep(0.01)
                server_scope.cancel()  # the whole server process "dies"
        assert len(failures) == 5
        with pytest.raises(ConnectionClosedError):
            await channel.request(K.PULL, key=9)


async def test_peer_closes_socket_mid_request(nursery):
    """A peer that reads the request and hangs up, as a crashing process would."""

    async def dying_server(stream):
        conn = Connection(stream)
        await server_handshake(conn, SECRET)
        request = await conn.receive_frame()
        assert request.kind == K.PULL
        await conn.aclose()

    listeners = await nursery.start(trio.serve_tcp, dying_server, 0)
    port = listeners[0].socket.getsockname()[1]
    async with connect("127.0.0.1", port, SECRET) as channel:
        with trio.fail_after(5), pytest.raises(ConnectionClosedError) as info:
            await channel.request(K.PULL, key=1)
        assert info.value.code is None  # a plain loss, no error code


async def test_graceful_close_answers_what_is_in_flight(nursery):
    async def slow(frame):
        await trio.sleep(0.2)
        return Reply(seq=frame.key)

    host, port = await start_server(nursery, slow)
    async with connect(host, port, SECRET) as channel:
        replies = []

        async def one():
            replies.append(await channel.request(K.PULL, key=4, timeout=5))

        async with trio.open_nursery() as n:
            n.start_soon(one)
            await trio.sleep(0.05)  # the request is on the server now
            await channel.aclose()
            with pytest.raises(ConnectionClosedError):
                await channel.request(K.PULL)
        assert [r.seq for r in replies] == [4]


async def test_idle_connection_is_closed_with_the_close_exchange(autojump_clock, nursery):
    async def sleepy(frame):
        await trio.sleep(100)  # longer than the idle timeout: must not count as idle
        return Reply(seq=1)

    a, b = await memory_channels(nursery, None, sleepy, idle_timeout=30)
    assert (await a.request(K.PULL)).seq == 1
    await trio.sleep(29)
    await a.ping()
    await trio.sleep(31)
    with pytest.raises(ConnectionClosedError, match="clos"):
        await a.ping()
    assert a.closed and b.closed


async def test_idle_timeout_over_tcp(nursery):
    host, port = await start_server(nursery, idle_timeout=0.2)
    async with connect(host, port, SECRET) as channel:
        await channel.ping(timeout=5)
        await trio.sleep(0.6)
        with pytest.raises(ConnectionClosedError):
            await channel.ping(timeout=5)


async def test_connection_cap(nursery):
    host, port = await start_server(nursery, max_connections=2)
    # Connections still in their handshake are capped apart (tests/test_preauth.py):
    # these hold none of the two places.
    idle = [await raw_connection(port) for _ in range(3)]
    async with connect(host, port, SECRET) as first, connect(host, port, SECRET) as second:
        with pytest.raises(ConnectionClosedError) as info:
            await open_connection(host, port, SECRET)
        assert info.value.code == ErrorCode.UNAVAILABLE
        for conn in idle:
            await conn.aclose()
        await first.aclose()
        with trio.fail_after(5):
            while True:  # the server frees the slot right after the CLOSE exchange
                try:
                    third = await open_connection(host, port, SECRET)
                    break
                except ConnectionClosedError:
                    await trio.sleep(0.02)
        await third.aclose()
        await second.ping(timeout=5)


# -- Connection on a socketpair: partial sends and poisoning --------------------------------


async def test_cancelled_partial_send_poisons_the_connection():
    a, b = trio.socket.socketpair()
    sender, receiver = Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
    big = np.ones(64 << 20, np.uint8)  # far more than the socket buffers hold
    with trio.move_on_after(0.2):
        await sender.send_frame(K.PUSH, array=big)  # nobody reads: partial send
    assert sender.closed
    with pytest.raises(ConnectionClosedError, match="poisoned"):
        await sender.send_frame(K.PING, request_id=1)
    receiver.authenticated = True  # read with the session limits
    with pytest.raises(RemoteProtocolError) as info:
        await receiver.receive_frame()
    assert info.value.code == ErrorCode.TRUNCATED
    await receiver.aclose()


async def test_socket_connection_receives_into_the_given_array():
    a, b = trio.socket.socketpair()
    sender, receiver = Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
    sender.authenticated = receiver.authenticated = True
    x = np.arange(3 << 18, dtype=np.float64).reshape(3, -1)  # 6 MiB: many partial sends
    dest = np.empty_like(x)
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(sender.send_frame, K.PUSH, request_id=5, array=x))
        frame = await receiver.receive_frame(into=lambda header: dest)
    assert frame.array is dest and np.array_equal(dest, x) and frame.request_id == 5
    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(sender.send_frame, K.PUSH, array=x))
        with pytest.raises(LocalProtocolError):  # a wrong destination is a local bug
            await receiver.receive_frame(into=lambda header: dest[:1])
        n.cancel_scope.cancel()  # the sender would wait for a reader forever
    await sender.aclose()
    await receiver.aclose()


def test_error_types():
    assert issubclass(AuthenticationError, ConnectionClosedError)
    assert issubclass(ConnectionClosedError, DBNodeError)
    assert issubclass(RemoteError, RequestError)
    assert str(RemoteError(ErrorCode.UNKNOWN_KEY, "no tensor 9")) == "no tensor 9 [UNKNOWN_KEY]"


# -- the fast paths: inline handlers, read-ahead, queued sends, timers, spin -----------------


class Counter:
    """An inline handler: synchronous, keeps what it saw, DEFERs key 99 and up."""

    def __init__(self):
        self.seen = []

    def __call__(self, frame):
        if frame.key >= 99:
            return DEFER
        if frame.key == 13:
            raise RequestError(ErrorCode.UNKNOWN_KEY, "no tensor 13")
        if frame.key == 14:
            raise ValueError("a bug")
        self.seen.append((frame.kind, frame.key, frame.seq))
        if frame.kind == K.STATS:
            return Reply(meta={"seen": len(self.seen)})
        return Reply(array=frame.array, seq=frame.seq)


async def test_inline_handler_answers_in_the_reader_in_arrival_order(nursery, caplog):
    inline = Counter()
    deferred = []

    async def handler(frame):
        deferred.append(frame.key)
        await trio.sleep(0)
        return Reply(seq=frame.key)

    host, port = await start_server(nursery, handler, inline=inline)
    async with connect(host, port, SECRET) as channel:
        x = np.arange(7, dtype=np.float32)
        reply = await channel.request(K.PUSH_PULL, key=1, seq=5, array=x, timeout=5)
        assert reply.seq == 5 and same_bits(reply.array, x)
        assert (await channel.request(K.PULL, key=100, timeout=5)).seq == 100  # DEFERred
        assert deferred == [100]
        with pytest.raises(RemoteError) as info:
            await channel.request(K.PULL, key=13, timeout=5)
        assert info.value.code == ErrorCode.UNKNOWN_KEY
        with pytest.raises(RemoteError) as info:
            await channel.request(K.PULL, key=14, timeout=5)
        assert info.value.code == ErrorCode.INTERNAL
        # Pipelined notifies: every one applied, in order, before a request sent after them.
        with caplog.at_level(logging.WARNING, logger="dbnode.wire"):
            for seq in range(2000):
                await channel.notify(K.PUSH, key=2, seq=seq, array=x)
            await channel.notify(K.PUSH, key=13)  # fails: reported with request_id 0
            stats = await channel.request(K.STATS, key=3, timeout=5)
            with trio.fail_after(5):
                while "no tensor 13" not in caplog.text:
                    await trio.sleep(0.01)
        assert [s for k, key, s in inline.seen if key == 2] == list(range(2000))
        assert stats.meta == {"seen": len(inline.seen)}
        await channel.ping(timeout=5)  # PING is answered inline, whatever the handlers


async def test_deferred_requests_start_in_arrival_order(nursery):
    started = []

    async def handler(frame):
        started.append(frame.key)
        await trio.sleep(random.uniform(0, 0.01))

    a, b = await memory_channels(nursery, None, handler)
    for key in range(50):
        await a.notify(K.FORWARD, key=key)
    await a.ping()
    with trio.fail_after(5):
        while len(started) < 50:
            await trio.sleep(0.01)
    assert started == list(range(50))


async def test_inline_answers_larger_than_the_socket_buffer(nursery):
    """The reader never waits for the peer to read: a big answer is finished by a task."""
    big = random_array(np.random.default_rng(3), np.uint8, (8 << 20,))

    def inline(frame):
        return Reply(array=big if frame.key == 1 else frame.array)

    host, port = await start_server(nursery, None, inline=inline)
    async with connect(host, port, SECRET) as channel:
        results = {}

        async def one(i):
            if i % 4 == 0:
                results[i] = await channel.request(K.PULL, key=1, timeout=10)
            else:
                results[i] = await channel.request(
                    K.PUSH_PULL, key=2, array=np.full(3, i), timeout=10
                )

        async with trio.open_nursery() as n:
            for i in range(24):
                n.start_soon(one, i)
        for i, reply in results.items():
            if i % 4 == 0:
                assert same_bits(reply.array, big)
            else:
                assert np.array_equal(reply.array, np.full(3, i))
        await channel.ping(timeout=5)  # and small frames still come at once after big ones


def frame_stream(rng, count):
    """Encoded frames of every size class the receiver treats differently, and the frames."""
    frames = []
    for i in range(count):
        size = [0, 3, 1000, 5000, 20000, 300_000][i % 6]
        array = random_array(rng, np.float32, (size,)) if size else None
        meta = {"i": i, "pad": "x" * int(rng.integers(0, 3000))} if i % 3 == 0 else None
        frames.append((i, array, meta))
    data = b"".join(
        bytes(p) for i, array, meta in frames
        for p in encode_frame(K.PUSH, request_id=i + 1, key=i, array=array, meta=meta)
    )  # fmt: skip
    return frames, data


async def test_read_ahead_over_a_socket_with_frames_split_anywhere():
    a, b = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(a), Connection(trio.SocketStream(b))
    receiver.authenticated = True
    rng = np.random.default_rng(4)
    frames, data = frame_stream(rng, 60)

    async def send_in_random_pieces():
        at = 0
        while at < len(data):
            n = int(rng.integers(1, 70_000))
            await sender.send_all(data[at : at + n])
            at += n
            if rng.random() < 0.3:
                await trio.sleep(0.001)  # let the receiver catch up and wait mid-frame

    async with trio.open_nursery() as n:
        n.start_soon(send_in_random_pieces)
        for i, array, meta in frames:
            frame = await receiver.receive_frame()
            assert (frame.key, frame.request_id, frame.meta) == (i, i + 1, meta or {})
            assert (frame.array is None) == (array is None)
            if array is not None:
                assert same_bits(frame.array, array)
    await sender.aclose()
    await receiver.aclose()


async def test_a_cancelled_receive_that_consumed_nothing_loses_nothing():
    a, b = trio.socket.socketpair()
    sender, receiver = Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
    sender.authenticated = receiver.authenticated = True
    one = b"".join(bytes(p) for p in encode_frame(K.PING, request_id=1))
    two = b"".join(bytes(p) for p in encode_frame(K.PING, request_id=2, seq=7))
    await sender.send_parts([one + two[:50]])  # the first frame, and half a header
    assert (await receiver.receive_frame()).request_id == 1
    with trio.move_on_after(0.05) as waited:
        await receiver.receive_frame()  # waits for the rest of frame two: nothing consumed
    assert waited.cancelled_caught and not receiver.closed
    await sender.send_parts([two[50:]])
    frame = await receiver.receive_frame()
    assert (frame.request_id, frame.seq) == (2, 7)
    await sender.aclose()
    await receiver.aclose()


async def test_queued_sends_combine_and_a_cancelled_one_is_dropped_cleanly():
    a, b = trio.socket.socketpair()
    sender, receiver = Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
    sender.authenticated = receiver.authenticated = True
    big = np.ones(4 << 20, np.uint8)  # far more than the socket buffers: the first send waits
    sent = []

    async def send(i, array):
        await sender.send_frame(K.PUSH, request_id=i, array=array)
        sent.append(i)

    async with trio.open_nursery() as n:
        n.start_soon(send, 1, big)
        await trio.sleep(0.05)  # frame 1 is half out; these queue up behind it
        for i in range(2, 6):
            n.start_soon(send, i, np.full(10, i, np.uint8))
        doomed = trio.CancelScope()

        async def cancelled_send():
            with doomed:
                await sender.send_frame(K.PUSH, request_id=99, array=np.zeros(5, np.uint8))

        n.start_soon(cancelled_send)
        await trio.sleep(0.05)
        doomed.cancel()  # queued, nothing of it sent: dropped, the connection lives
        got = [await receiver.receive_frame() for _ in range(5)]
    # Frame 1 first, whole; then the others whole (new tasks start in any order).
    assert got[0].request_id == 1 and same_bits(got[0].array, big)
    assert sorted(f.request_id for f in got) == sorted(sent) == [1, 2, 3, 4, 5]
    for f in got[1:]:
        assert np.array_equal(f.array, np.full(10, f.request_id, np.uint8))
    assert not sender.closed
    await sender.send_frame(K.PING, request_id=7)
    assert (await receiver.receive_frame()).request_id == 7
    await sender.aclose()
    await receiver.aclose()


async def test_a_shorter_timeout_after_a_longer_one_fires_on_time(autojump_clock, nursery):
    async def never(frame):
        await trio.sleep_forever()

    a, b = await memory_channels(nursery, None, never)
    outcome = {}

    async def ask(key, timeout):
        start = trio.current_time()
        try:
            await a.request(K.PULL, key=key, timeout=timeout)
        except RequestTimeout:
            outcome[key] = trio.current_time() - start

    async with trio.open_nursery() as n:
        n.start_soon(ask, 1, 100)
        await trio.sleep(1)
        n.start_soon(ask, 2, 5)  # earlier than the timer's current target: it is woken
    assert outcome == {1: 100, 2: 5}
    await a.ping()


async def test_spin_is_a_latency_option_only(nursery):
    with pytest.raises(ConfigError):
        await serve(echo, secret=SECRET, spin=1.0)
    host, port = await start_server(nursery, echo, spin=50e-6)
    async with connect(host, port, SECRET, spin=50e-6) as channel:
        x = np.arange(1000, dtype=np.float64)
        for i in range(200):
            reply = await channel.request(K.PUSH_PULL, key=i, array=x, timeout=5)
            assert reply.key == i and same_bits(reply.array, x)
        await channel.ping(timeout=5)


async def test_small_frames_arrive_at_once_after_a_big_payload(nursery):
    """The receive low-water mark set for a big payload is reset after it."""
    host, port = await start_server(nursery)
    async with connect(host, port, SECRET) as channel:
        big = np.ones(16 << 20, np.uint8)
        into = np.zeros_like(big)
        await channel.request(K.PUSH_PULL, array=big, into=into, timeout=10)
        assert into.all()
        for _ in range(20):
            assert await channel.ping(timeout=1) < 1


async def test_many_senders_of_every_size_both_ways(nursery):
    """Queued, combined and handed-over sends; read-ahead and direct receives;
    inline and task-handled answers: every frame arrives whole and bit-exact."""
    rng = np.random.default_rng(5)

    def inline(frame):
        return DEFER if frame.key % 3 == 0 else Reply(array=frame.array, seq=frame.key)

    async def handler(frame):
        await trio.sleep(0)
        return Reply(array=frame.array, seq=frame.key)

    host, port = await start_server(nursery, handler, inline=inline)
    sizes = [0, 1, 100, 4000, 17000, 70000, 1 << 20, 3 << 20]
    arrays = [random_array(rng, np.uint8, (sizes[i % len(sizes)],)) for i in range(96)]
    async with connect(host, port, SECRET) as channel:
        got = {}

        async def one(i):
            into = np.empty_like(arrays[i]) if i % 2 else None
            reply = await channel.request(
                K.PUSH_PULL, key=i, array=arrays[i], into=into, timeout=30
            )
            got[i] = reply

        async with trio.open_nursery() as n:
            for i in range(len(arrays)):
                n.start_soon(one, i)
        for i, reply in got.items():
            assert reply.seq == i and same_bits(reply.array, arrays[i]), i
        assert len(got) == len(arrays)


async def test_a_slow_but_steady_payload_is_not_a_stall():
    """The receive low-water mark hides bytes until enough have come; a frame
    that keeps making progress must not time out as stalled because of it."""
    # Over TCP: a unix socketpair ignores the low-water mark.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    sender = await trio.open_tcp_stream(*listener.socket.getsockname())
    receiver = Connection(await listener.accept(), stall_timeout=0.35)
    await listener.aclose()
    receiver.authenticated = True
    x = np.arange(25_600, dtype=np.float32)  # 100 KiB
    data = b"".join(bytes(p) for p in encode_frame(K.PUSH, request_id=3, array=x))

    async def trickle():
        for at in range(0, len(data), 10_240):
            await sender.send_all(data[at : at + 10_240])
            await trio.sleep(0.1)  # 10 KiB every 0.1 s: about 1 s for the frame

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        frame = await receiver.receive_frame()
    assert frame.request_id == 3 and same_bits(frame.array, x)
    await sender.aclose()
    await receiver.aclose()
