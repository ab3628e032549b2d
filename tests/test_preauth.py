"""Unauthenticated connections cannot keep a client out: strangers are
answered at once, pending handshakes are capped apart from authenticated
connections (in all and per address), failures are logged without flooding
the log, and a secret file open to others is reported. Real TCP on loopback."""

import functools
import inspect
import logging
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import trio

from dbnode.errors import ConnectionClosedError, RemoteProtocolError
from dbnode.wire import (
    DEFAULT_LIMITS,
    Connection,
    ErrorCode,
    FrameDecoder,
    Reply,
    admission,
    connect,
    endpoints,
    load_secret,
    open_connection,
    serve,
    server_handshake,
)
from dbnode.wire import MessageKind as K
from dbnode.wire.admission import LogLimiter, PreauthGate, source_of
from dbnode.wire.session import ClientHandshake

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))


# -- helpers -----------------------------------------------------------------------


async def echo(frame):
    return Reply(array=frame.array, meta=frame.meta, seq=frame.seq)


async def start_server(nursery, handler=echo, **kwargs):
    """Run serve() in ``nursery``; returns (host, port)."""
    kwargs.setdefault("secret", SECRET)
    return await nursery.start(functools.partial(serve, handler, **kwargs))


async def raw_socket(port, source="127.0.0.1"):
    """A TCP connection from ``source`` that says nothing (yet)."""
    sock = trio.socket.socket()
    try:
        if source != "127.0.0.1":
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        if source != "127.0.0.1":
            pytest.skip(f"cannot connect from {source}: {exc}")
        raise
    return sock


async def idle_sockets(port, n, sources=("127.0.0.1",)):
    """``n`` silent connections, spread over ``sources`` in turn."""
    return [await raw_socket(port, sources[i % len(sources)]) for i in range(n)]


def close_all(socks):
    for sock in socks:
        sock.close()


async def read_to_eof(sock, timeout):
    """What the server sent before closing, or None if it is still open after ``timeout``."""
    data = b""
    with trio.move_on_after(timeout):
        try:
            while chunk := await sock.recv(1 << 16):
                data += chunk
        except OSError:  # reset: closed too
            pass
        return data
    return None


async def count_open(socks):
    """How many of ``socks`` the server has not closed."""
    return sum([await read_to_eof(sock, 0.002) is None for sock in socks])


async def settles(measure, ok, timeout=10.0):
    """``measure()`` once ``ok`` holds of it, or its last value after ``timeout``
    seconds: what the server does next takes longer on a loaded machine."""
    deadline = trio.current_time() + timeout
    while True:
        value = await measure()
        if ok(value) or trio.current_time() > deadline:
            return value
        await trio.sleep(0.05)


def async_of(fn, *args):
    async def call():
        return fn(*args)

    return call


def frames_of(data):
    decoder = FrameDecoder(DEFAULT_LIMITS)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def error_code(data):
    (frame,) = frames_of(data)
    assert frame.kind == K.ERROR and frame.request_id == 0
    return frame.meta["code"]


@pytest.fixture
def many_files():
    """Room for a flood of sockets (both ends live in this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def exchange(host, port):
    """A legitimate client: connect, handshake, one request; within 5 s."""
    x = np.arange(100, dtype=np.float64)
    with trio.fail_after(5):
        async with connect(host, port, SECRET) as channel:
            reply = await channel.request(K.PUSH_PULL, array=x, timeout=5)
    assert np.array_equal(reply.array, x)


# -- strangers are answered at once ----------------------------------------------------


async def test_an_http_request_is_bad_magic_at_once(nursery):
    host, port = await start_server(nursery)
    sock = await raw_socket(port)
    start = trio.current_time()
    await sock.send(b"GET / HTTP/1.1\r\n\r\n")  # 18 bytes: far from a 112-byte header
    data = await read_to_eof(sock, 5)
    assert trio.current_time() - start < 0.5
    assert error_code(data) == ErrorCode.BAD_MAGIC
    sock.close()
    await exchange(host, port)


@pytest.mark.parametrize("first", [b"G", b"DX", b"DBN2"])
async def test_the_first_wrong_byte_is_enough(nursery, first):
    host, port = await start_server(nursery)
    sock = await raw_socket(port)
    start = trio.current_time()
    await sock.send(first)
    data = await read_to_eof(sock, 5)
    assert trio.current_time() - start < 0.5
    assert error_code(data) == ErrorCode.BAD_MAGIC
    sock.close()


async def test_a_stalled_start_of_the_magic_waits_for_the_handshake_timeout(nursery):
    host, port = await start_server(nursery, handshake_timeout=0.3)
    sock = await raw_socket(port)
    await sock.send(b"DBN")
    start = trio.current_time()
    data = await read_to_eof(sock, 5)
    assert 0.2 < trio.current_time() - start < 2
    assert error_code(data) == ErrorCode.TIMEOUT
    sock.close()


def test_both_parsers_reject_a_wrong_magic_on_its_first_bytes():
    decoder = FrameDecoder()
    decoder.receive_data(b"DX")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.BAD_MAGIC
    decoder = FrameDecoder()
    decoder.receive_data(b"DBN")
    assert decoder.next_frame() is None  # could still be a frame


def test_the_server_handshake_timeout_is_short_by_default():
    # (tests/test_transport.py times a silent client against the default)
    assert inspect.signature(serve).parameters["handshake_timeout"].default == 3.0
    assert inspect.signature(server_handshake).parameters["timeout"].default == 3.0
    assert inspect.signature(open_connection).parameters["handshake_timeout"].default == 10.0


# -- floods of idle sockets ----------------------------------------------------------------


async def test_500_idle_sockets_do_not_keep_a_client_out(nursery, many_files):
    host, port = await start_server(nursery)
    flood = await idle_sockets(port, 500)
    try:
        await exchange(host, port)
        # The oldest idle sockets were closed to make room, told why ...
        for sock in flood[:50]:
            data = await read_to_eof(sock, 5)
            assert data is not None and error_code(data) == ErrorCode.UNAVAILABLE
        # ... and at most 64 still wait for their handshake.
        assert await settles(lambda: count_open(flood), lambda n: n <= 64) <= 64
        await exchange(host, port)  # the server still serves
    finally:
        close_all(flood)


async def test_idle_sockets_from_many_addresses_are_capped_in_all(nursery, many_files):
    host, port = await start_server(nursery, max_preauth=16, max_preauth_per_source=8)
    sources = [f"127.0.0.{i}" for i in range(2, 42)]  # 40 addresses, 5 sockets each
    flood = await idle_sockets(port, 200, sources)
    try:
        await exchange(host, port)
        assert await settles(lambda: count_open(flood), lambda n: n <= 16) <= 16
        await exchange(host, port)
    finally:
        close_all(flood)


async def test_idle_sockets_from_one_address_are_capped(nursery, monkeypatch):
    monkeypatch.setattr(endpoints, "_IDLE_GRACE", 0.2)
    host, port = await start_server(nursery, max_preauth_per_source=4)
    flood = await idle_sockets(port, 20)  # young: none is idle yet
    try:
        await trio.sleep(0.1)
        assert await count_open(flood) == 20
        await trio.sleep(0.2)  # now all are
        flood.append(await raw_socket(port))
        # the 3 newest idle ones and the newcomer
        assert await settles(lambda: count_open(flood), lambda n: n == 4) == 4
        assert await count_open(flood[-4:]) == 4
        await exchange(host, port)
    finally:
        close_all(flood)


async def test_a_client_gets_in_while_idle_sockets_keep_coming(nursery, many_files):
    """Pending connections that said nothing are shed before one that said HELLO."""
    host, port = await start_server(nursery, max_preauth=16)
    flood = []
    stop = trio.Event()

    async def churn():
        while not stop.is_set():
            flood.append(await raw_socket(port))
            if len(flood) > 400:
                close_all(flood[:200])
                del flood[:200]

    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(churn)
            await trio.sleep(0.05)
            for _ in range(5):
                await exchange(host, port)
            stop.set()
    finally:
        close_all(flood)


async def test_authenticated_connections_are_counted_apart(nursery, many_files):
    host, port = await start_server(nursery, max_connections=2, max_preauth=4)
    async with connect(host, port, SECRET) as before:
        flood = await idle_sockets(port, 50)
        try:
            async with connect(host, port, SECRET) as second:  # idle ones hold no slot
                await before.ping(timeout=5)
                await second.ping(timeout=5)
                with pytest.raises(ConnectionClosedError) as info:  # but the cap of 2 holds
                    await open_connection(host, port, SECRET)
                assert info.value.code == ErrorCode.UNAVAILABLE
        finally:
            close_all(flood)


async def test_the_cap_is_checked_again_before_auth_ok(nursery):
    """A client that was let in while a slot was free is refused at AUTH if
    the slot has gone meanwhile: the cap holds however handshakes interleave."""
    host, port = await start_server(nursery, max_connections=1)
    conn = Connection(await trio.open_tcp_stream(host, port))
    shake = ClientHandshake(SECRET)
    await conn.send_frame(K.HELLO, meta=shake.hello())
    auth = shake.on_challenge(await conn.receive_frame())
    async with connect(host, port, SECRET) as winner:  # takes the only slot
        await conn.send_frame(K.AUTH, meta=auth)
        with trio.fail_after(5):
            frame = await conn.receive_frame()
        assert frame.kind == K.ERROR and frame.meta["code"] == ErrorCode.UNAVAILABLE
        await winner.ping(timeout=5)
    await conn.aclose()


# -- logging -------------------------------------------------------------------------------


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "dbnode.wire" and r.levelno == logging.WARNING]


async def test_failed_handshakes_are_warnings_rate_limited_per_address(
    nursery, caplog, monkeypatch
):
    monkeypatch.setattr(endpoints, "_LOG_INTERVAL", 1.0)
    caplog.set_level(logging.DEBUG, logger="dbnode.wire")
    host, port = await start_server(nursery)
    peers = []
    for _ in range(4):  # a bad magic, then wrong secrets: one line in all
        sock = await raw_socket(port)
        peers.append(f"127.0.0.1:{sock.getsockname()[1]}")
        await sock.send(b"GET / HTTP/1.1\r\n\r\n")
        assert await read_to_eof(sock, 5) is not None
        sock.close()
    for _ in range(2):
        with pytest.raises(ConnectionClosedError):
            await open_connection(host, port, OTHER)
    lines = await settles(async_of(warnings_of, caplog), lambda ls: len(ls) >= 1)
    assert len(lines) == 1
    assert peers[0] in lines[0].getMessage() and "BAD_MAGIC" in lines[0].getMessage()
    await exchange(host, port)  # a good client is no failure

    await trio.sleep(1.1)
    with pytest.raises(ConnectionClosedError):
        await open_connection(host, port, OTHER)
    lines = await settles(async_of(warnings_of, caplog), lambda ls: len(ls) >= 2)
    assert len(lines) == 2
    text = lines[1].getMessage()
    assert "handshake with 127.0.0.1:" in text and "5 more from 127.0.0.1" in text

    # Another address has its own budget.
    sock = await raw_socket(port, "127.0.0.2")
    await sock.send(b"nope")
    assert await read_to_eof(sock, 5) is not None
    sock.close()
    lines = await settles(async_of(warnings_of, caplog), lambda ls: len(ls) >= 3)
    assert len(lines) == 3 and "127.0.0.2:" in lines[2].getMessage()


async def test_timeouts_are_warnings_and_a_plain_disconnect_is_not(nursery, caplog):
    caplog.set_level(logging.DEBUG, logger="dbnode.wire")
    host, port = await start_server(nursery, handshake_timeout=0.2)
    sock = await raw_socket(port)
    sock.close()  # a port probe: connect and go
    await trio.sleep(0.1)
    assert warnings_of(caplog) == []
    sock = await raw_socket(port, "127.0.0.3")
    name = f"127.0.0.3:{sock.getsockname()[1]}"
    assert error_code(await read_to_eof(sock, 5)) == ErrorCode.TIMEOUT
    sock.close()
    (line,) = await settles(async_of(warnings_of, caplog), lambda ls: len(ls) >= 1)
    assert name in line.getMessage() and "0.2 s" in line.getMessage()


# -- the secret file -------------------------------------------------------------------------


def test_a_secret_file_open_to_others_is_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dbnode.wire")
    path = tmp_path / "shared-secret"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    assert len(load_secret(path)) == 32  # still used
    (line,) = warnings_of(caplog)
    assert str(path) in line.getMessage() and "chmod 600" in line.getMessage()
    load_secret(path)  # once per file
    assert len(warnings_of(caplog)) == 1
    path.chmod(0o660)  # group access counts too
    load_secret(path)
    assert len(warnings_of(caplog)) == 2

    private = tmp_path / "private-secret"
    private.write_bytes(os.urandom(32))
    private.chmod(0o600)
    load_secret(private)
    assert len(warnings_of(caplog)) == 2


# -- the sans-IO parts -------------------------------------------------------------------------


def test_gate_sheds_idle_connections_of_the_same_source_oldest_first():
    gate = PreauthGate(max_total=10, max_per_source=3, grace=1.0)
    assert gate.admit("a1", "A", 0.0) == [] and gate.admit("a2", "A", 0.1) == []
    gate.spoke("a1")  # a1 said HELLO: it is never idle
    assert gate.admit("a3", "A", 0.2) == []
    assert gate.admit("b1", "B", 0.3) == []
    # A burst of young connections is not a flood: nothing is idle yet.
    assert [gate.admit(f"a{i}", "A", 0.5) for i in range(4, 8)] == [[]] * 4
    assert gate.count("A") == 7
    # A second later a2..a7 are idle (a1 spoke): down to 2, then the newcomer.
    assert gate.admit("a8", "A", 1.6) == ["a2", "a3", "a4", "a5"]
    assert gate.count("A") == 4 and gate.count("B") == 1
    assert gate.admit("a9", "A", 1.7) == []  # a6, a7 idle, a8 young: under the cap
    assert gate.admit("a10", "A", 2.7) == ["a6", "a7"]  # a6, a7, a8, a9 idle
    gate.release("a8")
    gate.release("a8")  # idempotent
    assert "a8" not in gate and len(gate) == 4


def test_gate_over_the_total_sheds_from_the_busiest_source():
    gate = PreauthGate(max_total=6, max_per_source=4)
    for key, source in [("a1", "A"), ("b1", "B"), ("b2", "B"), ("b3", "B"), ("c1", "C")]:
        assert gate.admit(key, source, 0.0) == []
    assert gate.admit("d1", "D", 0.0) == []
    gate.spoke("b1")  # B's silent ones go first
    assert gate.admit("e1", "E", 0.0) == ["b2"]  # B has the most
    assert gate.admit("e2", "E", 0.0) == ["b3"]  # B still has the most
    assert gate.admit("e3", "E", 0.0) == ["e1"]  # now E has
    gate.spoke("e2")
    gate.spoke("e3")
    assert gate.admit("f1", "F", 0.0) == ["e2"]  # all of E spoke: its oldest
    assert len(gate) == 6 and gate.count("B") == 1


def test_gate_breaks_ties_by_age():
    gate = PreauthGate(max_total=3, max_per_source=3)
    for t, (key, source) in enumerate([("a1", "A"), ("b1", "B"), ("c1", "C")]):
        gate.admit(key, source, float(t))
    assert gate.admit("d1", "D", 3.0) == ["a1"]
    assert gate.admit("d2", "D", 4.0) == ["b1"]
    assert gate.admit("d3", "D", 5.0) == ["d1"]  # D has 2, C has 1


def test_log_limiter():
    limiter = LogLimiter(interval=10, max_sources=2)
    assert limiter.hit("A", 0) == 0
    assert limiter.hit("A", 1) is None and limiter.hit("A", 9.9) is None
    assert limiter.hit("B", 5) == 0
    assert limiter.hit("A", 10) == 2
    assert limiter.hit("A", 11) is None
    assert limiter.hit("C", 12) == 0  # forgets one: the table stays small
    assert len(limiter._seen) == 2


@pytest.mark.parametrize(
    "peer, source",
    [
        ("127.0.0.1:5000", "127.0.0.1"),
        ("::1:5000", "::/64"),
        ("2001:db8:1:2:3:4:5:6:443", "2001:db8:1:2::/64"),
        ("::ffff:10.0.0.1:80", "10.0.0.1"),
        ("MemoryStream", "MemoryStream"),
        ("?", "?"),
    ],
)
def test_source_of(peer, source):
    assert source_of(peer) == source


def test_admission_is_sans_io():
    assert "sans-IO" in admission.__doc__.splitlines()[0]
    out = subprocess.run(
        [sys.executable, "-c", "import sys, dbnode.wire.admission; "
         "print(sorted(m for m in ('trio', 'socket') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
