"""The trio transport: framed, authenticated connections that carry ndarrays.

This is the only module in dbnode that drives trio streams and sockets. It
builds on the sans-IO codec in :mod:`dbnode.protocol` and adds, bottom up:

* :class:`Connection` — one framed connection over a trio stream.
  :meth:`~Connection.send_frame` sends header+meta and the array's own memory
  in one scatter-gather ``sendmsg`` (no copy); :meth:`~Connection.receive_frame`
  decodes the header first and then ``recv_into``\\ s the payload straight into
  its destination array (a fresh one, or one the caller supplies). Small
  frames come out of a read-ahead buffer: one system call each, or less.
* :func:`client_handshake` / :func:`server_handshake` — the mutual HMAC
  handshake of docs/protocol.md section 10.
* :class:`Channel` — request/reply multiplexing over an authenticated
  connection: request ids, a reader task that routes answers to waiting
  requests, timeouts, incoming requests answered inline by a synchronous
  handler (in arrival order, no task per request) or by an async one in
  tasks, PING answered with PONG, the CLOSE exchange.

Speed: a small frame costs a few microseconds of Python and one system call
each way, and never waits in trio's scheduler when the socket is ready
(see Connection); what is left of a round trip is mostly trio's own wakeup,
which the ``spin`` option of Channel and serve trades for CPU.
* :func:`connect` (client) and :func:`serve` (server).
* :func:`load_secret` — the shared secret from a file or the environment.

Failures surface as the errors of :mod:`dbnode.errors`: socket errors
become :class:`ConnectionClosedError` in exactly one place
(:func:`_socket_errors`), a failed handshake proof is an
:class:`AuthenticationError`, an ERROR answer is a :class:`RemoteError`, a
request that times out a :class:`RequestTimeout`.

Zero copy holds on the fast path (a :class:`trio.SocketStream`). Any other
trio stream (an ``SSLStream`` for a TLS tunnel, the in-memory streams of
``trio.testing``) works too, with one copy per received chunk because a
generic stream only hands out new ``bytes`` objects.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import math
import os
import re
import socket as _stdlib_socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .errors import (
    AuthenticationError,
    ConfigError,
    ConnectionClosedError,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    RequestTimeout,
)
from .protocol import (
    DEFAULT_LIMITS,
    HANDSHAKE_LIMITS,
    HEADER_SIZE,
    NONCE_SIZE,
    ErrorCode,
    Frame,
    Header,
    Limits,
    MessageKind,
    auth_mac,
    decode_header,
    encode_frame,
    error_frame,
    parse_meta,
)

__all__ = [
    "Connection",
    "Channel",
    "Reply",
    "Handler",
    "InlineHandler",
    "DEFER",
    "connect",
    "open_connection",
    "serve",
    "client_handshake",
    "server_handshake",
    "load_secret",
    "MIN_SECRET_BYTES",
]

log = logging.getLogger("dbnode.transport")

MIN_SECRET_BYTES = 16  # docs/protocol.md section 10
_HANDSHAKE_KINDS = frozenset(
    {MessageKind.HELLO, MessageKind.CHALLENGE, MessageKind.AUTH, MessageKind.AUTH_OK}
)
# Kinds that answer a request; everything else after the handshake (except
# CLOSE) is a request.
_ANSWER_KINDS = frozenset({MessageKind.REPLY, MessageKind.ERROR, MessageKind.PONG})
_NOT_REQUESTS = _HANDSHAKE_KINDS | _ANSWER_KINDS | {MessageKind.CLOSE}
_HEX_NONCE = re.compile(r"[0-9a-fA-F]{%d}" % (2 * NONCE_SIZE))

# After a fatal error we tell the peer why, but never wait on it for long.
_ERROR_SEND_TIMEOUT = 1.0
# Lingering close: read (and drop) what the peer already sent before closing,
# so that the kernel does not answer unread data with a RST that could destroy
# the ERROR frame we just sent. Stop when the peer is quiet or after the cap.
_LINGER_QUIET = 0.1
_LINGER_MAX = 1.0
# ERROR text sent before AUTH_OK: its JSON must fit HANDSHAKE_LIMITS.max_meta
# even if every character takes 6 bytes (a \uXXXX escape).
_HANDSHAKE_ERROR_TEXT = (HANDSHAKE_LIMITS.max_meta - 64) // 6


# -- secrets ---------------------------------------------------------------------


def load_secret(path: str | os.PathLike[str] | None = None, env: str = "DBNODE_SECRET") -> bytes:
    """Load the shared handshake secret.

    From the file ``path`` when given, otherwise from the environment
    variable ``env`` (its UTF-8 bytes). A file is used byte for byte (a
    good secret is 32 random bytes: ``head -c 32 /dev/urandom > secret``),
    except that a file holding one line of printable ASCII text, like the
    output of ``openssl rand -hex 32``, loses its line break, so it matches
    the same text in the environment.

    Raises:
        ConfigError: the file cannot be read, the variable is not set, or
            the secret is shorter than MIN_SECRET_BYTES. The message names
            the file or the variable, never the secret.
    """
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError("secret file", str(path), f"cannot read it: {exc.strerror}") from None
        data = _strip_text_line_break(data)
        where, value = "secret file", str(path)
    else:
        text = os.environ.get(env)
        if not text:
            raise ConfigError(
                "secret", None, f"no secret: pass a secret file or set the {env} variable"
            )
        data, where, value = text.encode("utf-8"), "secret variable", env
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            where, value, f"holds {len(data)} bytes, need at least {MIN_SECRET_BYTES}"
        )
    return data


_TEXT_LINE = re.compile(rb"[\x20-\x7e]+(\r?\n)")


def _strip_text_line_break(data: bytes) -> bytes:
    # Only a text secret loses its line break: random bytes that happen to
    # end in 0x0a are kept whole, as any other reader of the file keeps them.
    match = _TEXT_LINE.fullmatch(data)
    return data[: match.start(1)] if match else data


def _check_secret(secret: Any) -> bytes:
    """The secret as bytes, or a ConfigError (which never shows the secret)."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise ConfigError(
            "secret", type(secret).__name__, "need bytes (see dbnode.transport.load_secret)"
        )
    secret = bytes(secret)
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            "secret", f"<{len(secret)} bytes>", f"need at least {MIN_SECRET_BYTES} bytes"
        )
    return secret


# -- the one place where socket errors are translated ----------------------------

_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _socket_errors:  # noqa: N801 - used like the context manager function it was
    """Turn socket and trio stream errors into ConnectionClosedError.

    Every I/O call on a connection, and the connect call, runs inside this:
    callers of the transport see one error type for a lost or closed
    connection, never OSError or trio's Closed/BrokenResourceError.
    (A class, not a @contextmanager: it wraps every frame on the hot path,
    where a generator-based context manager costs a microsecond.)
    """

    __slots__ = ("_describe",)

    def __init__(self, describe: Callable[[BaseException], str]) -> None:
        self._describe = describe

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:  # fmt: skip
        if typ is not None and issubclass(typ, _SOCKET_ERRORS):
            raise ConnectionClosedError(self._describe(exc)) from exc  # type: ignore[arg-type]
        return False


# -- byte pipes: socket (zero copy) or any trio stream -----------------------------
#
# Each pipe has a synchronous ``*_now`` half that never waits (the fast path:
# a frame that the socket buffers can take or already hold costs one system
# call and no trip through trio's scheduler) and an async ``*_wait`` half
# that waits for the socket first. trio's own socket methods always take two
# scheduler trips per call, which is most of the cost of a small frame.


class _SocketWire:
    """Raw I/O on a TCP socket: ``sendmsg`` of several buffers, ``recv_into``."""

    # A cancelled sendmsg/recv_into has moved no bytes, so a cancellation
    # between frames leaves the byte stream intact.
    clean_cancel = True

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._sock = stream.socket
        # The non-blocking stdlib socket inside trio's. Without it (a trio
        # that no longer has one) every call goes through trio's methods.
        raw = getattr(self._sock, "_sock", None)
        self._raw = raw if isinstance(raw, _stdlib_socket.socket) else None
        # SocketStream already sets it; say it here too because small control
        # frames (PULL, PING, replies without tensor) must not wait for Nagle.
        if self._sock.family in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
            self._sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        self._has_sendmsg = hasattr(self._sock, "sendmsg")  # not on Windows

    def send_now(self, views: list[Any]) -> int:
        """Send what the socket takes right now; 0 if it takes nothing."""
        raw = self._raw
        if raw is None:
            return 0
        try:
            return raw.sendmsg(views) if self._has_sendmsg else raw.send(views[0])
        except BlockingIOError:
            return 0

    async def send_wait(self, views: list[memoryview]) -> int:
        """Wait until the socket takes something, send it; bytes sent (> 0)."""
        if self._raw is None:
            if self._has_sendmsg:
                return await self._sock.sendmsg(views)
            return await self._sock.send(views[0])
        while True:
            await trio.lowlevel.wait_writable(self._sock)
            n = self.send_now(views)
            if n:
                return n

    def recv_now(self, view: memoryview) -> int | None:
        """Receive what is there now; None if nothing is, 0 at end of stream."""
        raw = self._raw
        if raw is None:
            return None
        try:
            return raw.recv_into(view)
        except BlockingIOError:
            return None

    async def recv_wait(self, view: memoryview) -> int:
        """Wait for data (or the end of the stream), then receive it."""
        if self._raw is None:
            return await self._sock.recv_into(view)
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            n = self.recv_now(view)
            if n is not None:
                return n

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

    def set_lowat(self, n: int) -> int:
        """Set SO_RCVLOWAT (readable only with ``n`` bytes there, or at EOF); the value now."""
        try:
            self._sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_RCVLOWAT, n)
        except (OSError, AttributeError):  # not everywhere: then every byte wakes us
            return 1
        return n

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._sock.did_shutdown_SHUT_WR:
            self._sock.shutdown(_stdlib_socket.SHUT_WR)

    def abort(self) -> None:
        # Synchronous: closing wakes any task waiting on the socket with
        # ClosedResourceError, and no later recv_into can write anything.
        self._sock.close()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def peer(self) -> str:
        try:
            address = self._sock.getpeername()
        except OSError:
            return "?"
        if isinstance(address, tuple) and len(address) >= 2:  # IPv4 / IPv6
            return f"{address[0]}:{address[1]}"
        return repr(address) if address else "socketpair"


class _StreamWire:
    """Raw I/O on any trio Stream (TLS, in-memory test streams): one copy in."""

    # A generic stream promises nothing about a cancelled send_all.
    clean_cancel = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ahead = memoryview(b"")  # received by wait_readable, not consumed
        self._eof = False
        self._aborted = False

    def send_now(self, views: list[Any]) -> int:
        return 0  # a generic stream has no synchronous send

    async def send_wait(self, views: list[memoryview]) -> int:
        await self._stream.send_all(views[0])
        return len(views[0])

    async def _receive(self, max_bytes: int | None) -> None:
        data = await self._stream.receive_some(max_bytes)
        if self._aborted:  # closed while we waited: nothing may land anywhere
            raise trio.ClosedResourceError
        self._ahead = memoryview(data)
        self._eof = not data

    def recv_now(self, view: memoryview) -> int | None:
        if self._aborted:
            raise trio.ClosedResourceError
        if not self._ahead:
            return 0 if self._eof else None
        n = min(len(view), len(self._ahead))
        # The one copy of this path: a generic stream returns new bytes objects.
        view[:n] = self._ahead[:n]
        self._ahead = self._ahead[n:]
        return n

    async def recv_wait(self, view: memoryview) -> int:
        if not self._ahead and not self._eof:
            await self._receive(len(view))
        n = self.recv_now(view)
        assert n is not None
        return n

    async def wait_readable(self) -> None:
        if not self._ahead and not self._eof:
            await self._receive(None)

    def set_lowat(self, n: int) -> int:
        return 1  # a generic stream has no low-water mark

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    def abort(self) -> None:
        # A generic stream cannot be closed synchronously; refuse further
        # data at once and close it for real in aclose().
        self._aborted = True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    def peer(self) -> str:
        return type(self._stream).__name__


# -- Connection --------------------------------------------------------------------

# Bytes of the read-ahead buffer: one receive brings a small frame whole
# (header, meta and payload) and often the frames behind it too.
_READ_AHEAD = 64 << 10
# Payload (or meta) bytes still missing at or above this are received
# straight into their destination, without a copy; fewer go through the
# read-ahead buffer (one small copy, and the receive may bring the next
# frames along with them).
_DIRECT_MIN = 16 << 10
# While a big payload streams in, wake up only when this much more of it
# has arrived (SO_RCVLOWAT), or all that is left of it if less: each
# wakeup costs a trip through trio's scheduler.
_LOW_WATER = 512 << 10
# A task whose sends or receives complete without waiting never passes
# through trio's scheduler; after this many in a row it yields anyway, so
# that a busy connection cannot starve the other tasks.
_YIELD_EVERY = 64


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of byte views (slicing, no copy)."""
    while n:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0
    return views


def _byte_views(parts: list[Any]) -> list[memoryview]:
    # Byte views: a memoryview of a multi-byte format would count items,
    # not bytes, when slicing after a partial send. Empty ones are dropped.
    return [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]


# At most this many buffers in one sendmsg (IOV_MAX is 1024 on Linux).
_IOV_MAX = 512


class _Outgoing:
    """A frame waiting to go out, or going out, while another task sends.

    Frames leave in the order they were queued. The task whose frame is at
    the front of the queue is the *sender*: it sends the front frames,
    several per ``sendmsg`` (combining), wakes the tasks whose frames went
    out whole, and when its own frame is gone hands the sending over to the
    task of the next frame (see :meth:`Connection._send_finish`).
    """

    __slots__ = ("views", "left", "sent", "task", "done", "error", "sender")

    def __init__(self, views: list[memoryview], left: int, sent: int) -> None:
        self.views = views  # byte views not sent yet
        self.left = left  # bytes not sent yet
        self.sent = sent  # bytes already sent: > 0 means the frame is half out
        self.task: Any = None  # the task waiting for this frame
        self.done = False
        self.error: BaseException | None = None
        self.sender = False  # this frame's task sends the queue


class Connection:
    """One framed dbnode connection over a trio stream.

    Wrap a connected stream; a :class:`trio.SocketStream` gets the zero-copy
    path (``sendmsg``/``recv_into``), any other :class:`trio.abc.Stream`
    works with one copy per received chunk. Until the handshake marks the
    connection authenticated, received frames are held to HANDSHAKE_LIMITS
    (no tensor, 1 KiB of meta); afterwards to ``limits``, and handshake
    kinds are rejected as UNEXPECTED.

    Sending is safe from several tasks at once: frames stay whole and leave
    in the order the sends were made (while one task waits for the socket,
    the others' frames queue behind it and go out several per ``sendmsg``).
    Receiving is for one task at a time (a :class:`Channel`'s reader).

    Fast paths: a send the socket's buffer can take at once, and a receive
    of a frame that is already there, complete without waiting and without
    a trip through trio's scheduler (one ``sendmsg``; one ``recv_into``
    brings up to 64 KiB, so one system call receives a small frame whole,
    and often the frames behind it). Such calls still raise Cancelled when
    the task is cancelled, and every 64th of them yields to the scheduler.
    Payloads of 16 KiB and more are received straight into their array.

    A send cut short (cancelled or failed) after part of its frame went out
    poisons the connection: the peer's framing is lost, so it is closed and
    every later call raises :class:`ConnectionClosedError`. A receive that
    fails or is cancelled after consuming part of a frame, or that finds a
    protocol error, poisons the receiving direction only, so that an ERROR
    can still tell the peer why before closing. A cancellation that consumed
    nothing leaves the connection usable (bytes read ahead stay buffered).

    Args:
        stream: a connected trio stream; the Connection owns it.
        limits: receive limits after the handshake, and the limits our sent
            frames are checked against (both sides use one configuration).
        stall_timeout: seconds a frame may stall once its first byte has
            arrived before the receive fails with TIMEOUT; None waits forever.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        limits: Limits = DEFAULT_LIMITS,
        stall_timeout: float | None = None,
    ) -> None:
        self._wire = (
            _SocketWire(stream) if isinstance(stream, trio.SocketStream) else _StreamWire(stream)
        )
        self.limits = limits
        self.stall_timeout = math.inf if stall_timeout is None else stall_timeout
        self.authenticated = False
        self.peer_name = ""  # the peer's "name" from the handshake, for logs
        self.peer = self._wire.peer()
        # Frames that wait for another task's send to finish, in order; the
        # front one's task is sending (see _Outgoing).
        self._queue: deque[_Outgoing] = deque()
        self._receiving = False
        # Read-ahead: bytes [_rpos, _rend) of _rbuf are received, not consumed.
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._unyielded = 0  # calls completed in a row without waiting
        self._drained = False  # the last read-ahead receive left the socket empty
        self._lowat = 1  # the socket's SO_RCVLOWAT
        # Busy-poll before sleeping (see Channel's ``spin``); 0: never.
        self.spin = 0.0
        self._spin_if: Callable[[], bool] | None = None
        self._io = _socket_errors(self._describe)
        self._closed: ConnectionClosedError | None = None
        # Set when a receive failed inside a frame: the incoming byte stream
        # has lost its framing, but we may still send (an ERROR saying why).
        self._recv_broken: ConnectionClosedError | None = None

    # -- state -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection was closed or poisoned on this side."""
        return self._closed is not None

    def _describe(self, exc: BaseException) -> str:
        if self._closed is not None:
            return str(self._closed)
        return f"connection to {self.peer} lost: {exc}"

    def _check_open(self, receiving: bool = False) -> None:
        broken = self._closed or (self._recv_broken if receiving else None)
        if broken is not None:
            raise ConnectionClosedError(str(broken), broken.code)

    def abort(self, reason: str = "connection closed", code: int | None = None) -> None:
        """Close at once, without telling the peer; synchronous.

        Tasks blocked on the connection wake with ConnectionClosedError
        (giving ``reason``); call :meth:`aclose` afterwards to release the
        stream. Idempotent: the first reason sticks.
        """
        if self._closed is None:
            self._closed = ConnectionClosedError(reason, code)
        self._wire.abort()
        self._fail_queue()

    async def aclose(self) -> None:
        """Close the connection (no CLOSE frame: see :meth:`Channel.aclose`)."""
        if self._closed is None:
            self._closed = ConnectionClosedError("connection closed")
        with trio.CancelScope(shield=True), self._io:
            await self._wire.aclose()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- sending -----------------------------------------------------------------

    async def send_frame(
        self,
        kind: MessageKind | int,
        *,
        request_id: int = 0,
        key: int = 0,
        seq: int = 0,
        array: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
        flags: int = 0,
    ) -> None:
        """Encode one frame and send it as one scatter-gather send.

        The array's memory goes out as it is (no copy, unless it is not
        little-endian C-ordered) and must not change until this returns.

        Raises:
            LocalProtocolError: the arguments do not make a valid frame
                (nothing was sent).
            ConnectionClosedError: the connection is closed or was lost.
        """
        parts = encode_frame(
            kind, request_id=request_id, key=key, seq=seq, array=array, meta=meta,
            flags=flags, limits=self.limits,
        )  # fmt: skip
        await self.send_parts(parts)

    async def send_parts(self, parts: list[bytes | memoryview]) -> None:
        """Send the buffers of one already encoded frame, e.g. from error_frame().

        All parts go out together, in the order the sends were made, so
        frames of concurrent senders never interleave.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        unsent = self._send_start(parts)
        if unsent is not None:
            await self._send_finish(unsent)
        else:
            # Fairness: a task whose calls keep completing without waiting
            # never passes through the scheduler; now and then it must.
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()

    def _send_start(self, parts: list[Any]) -> _Outgoing | None:
        """Send the frame now if nothing is queued and the socket takes it all.

        Synchronous. Returns None when the whole frame went out; else the
        queued frame, which :meth:`_send_finish` must then be awaited on
        (by the caller or a task it starts), or nothing more goes out.
        """
        self._check_open()
        if self._queue:  # another task is sending: queue up behind it
            views = _byte_views(parts)
            item = _Outgoing(views, sum(len(v) for v in views), 0)
            self._queue.append(item)
            return item
        with self._io:
            sent = self._wire.send_now(parts)  # a failed sendmsg moved no byte
        total = 0
        for p in parts:
            total += len(p) if type(p) is bytes else memoryview(p).nbytes
        if sent == total:
            return None
        item = _Outgoing(_advance(_byte_views(parts), sent), total - sent, sent)
        item.sender = True
        self._queue.append(item)
        return item

    async def _send_finish(self, item: _Outgoing) -> None:
        """Wait until a frame queued by :meth:`_send_start` is out.

        Raises ConnectionClosedError if the connection fails first.
        Cancelled before any byte of the frame went out, the frame is
        dropped and the connection stays usable; after, the connection is
        poisoned (the frame cannot be finished, so the peer's framing is
        lost) and closed.
        """
        if not item.sender:
            if item.error is None and not item.done:  # (sent already by the sender)
                item.task = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    item.task = None
                    if item.sent:  # half out, sent by another task: cannot stop it
                        self.abort("a send was interrupted inside a frame; connection poisoned")
                    elif item in self._queue:
                        self._queue.remove(item)
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
            if item.error is not None:
                raise item.error
            if item.done:
                return
            # Handed the sending: our frame is at the front now.
        elif item.error is not None:  # the connection failed before our turn came
            raise item.error
        await self._pump(item)

    async def _pump(self, own: _Outgoing) -> None:
        """Send the queue's front frames until ``own`` is out, then hand over."""
        queue = self._queue
        try:
            with self._io:
                while not own.done:
                    views: list[memoryview] = []
                    for item in queue:  # combine: several frames per sendmsg
                        views.extend(item.views)
                        if len(views) >= _IOV_MAX:
                            del views[_IOV_MAX:]
                            break
                    n = self._wire.send_now(views) or await self._wire.send_wait(views)
                    while n:
                        item = queue[0]
                        if n < item.left:
                            item.views = _advance(item.views, n)
                            item.left -= n
                            item.sent += n
                            break
                        n -= item.left
                        queue.popleft()
                        item.views, item.left, item.done = [], 0, True
                        if item.task is not None:
                            trio.lowlevel.reschedule(item.task)
                            item.task = None
        except BaseException as exc:
            front = queue[0] if queue else None
            if (front is not None and front.sent) or not self._wire.clean_cancel or (
                not isinstance(exc, trio.Cancelled)
            ):
                # Part of a frame is on the wire, or the socket failed: the
                # peer's framing is lost.
                self.abort("a send was interrupted inside a frame; connection poisoned")
            else:  # cancelled with nothing of ours sent: drop our frame
                if front is own:
                    queue.popleft()
                self._hand_over()
            raise
        self._hand_over()

    def _hand_over(self) -> None:
        """The sender is done: the task of the next queued frame sends next.

        (If that task has not called _send_finish yet, it will find itself
        the sender when it does.)
        """
        if self._queue:
            item = self._queue[0]
            item.sender = True
            if item.task is not None:
                trio.lowlevel.reschedule(item.task)
                item.task = None

    def _fail_queue(self) -> None:
        """The connection is closed: every queued frame fails."""
        queue, self._queue = self._queue, deque()
        for item in queue:
            if not item.done:
                code = self._closed.code if self._closed is not None else None
                item.error = ConnectionClosedError(str(self._closed), code)
                if item.task is not None:
                    trio.lowlevel.reschedule(item.task)
                    item.task = None

    async def send_error(self, code: ErrorCode | int, text: str, request_id: int = 0) -> None:
        """Send an ERROR frame (``{"code", "message"}``; text cut to MAX_ERROR_TEXT)."""
        await self.send_parts(error_frame(code, text, request_id))

    async def close_with_error(self, code: ErrorCode | int, text: str) -> None:
        """Tell the peer why (ERROR, ``request_id`` 0), then close.

        Best effort and bounded in time: the peer may be gone or not reading.
        What the peer already sent is read and dropped first (briefly), so
        that closing with unread data does not reset the connection and
        destroy the ERROR frame on its way out.
        """
        if not self.authenticated:
            # The peer still applies the handshake limits (1 KiB of meta):
            # keep the ERROR well under them, or it would be rejected too.
            text = text[:_HANDSHAKE_ERROR_TEXT]
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(_ERROR_SEND_TIMEOUT):
                    await self.send_error(code, text)
                    with self._io:
                        await self._wire.send_eof()
                    await self._linger()
            except ConnectionClosedError:
                pass
            if self._closed is None:
                self._closed = ConnectionClosedError(f"closed after error: {text}", code)
            await self.aclose()

    async def _linger(self) -> None:
        self._rpos = self._rend = 0  # what was read ahead is dropped too
        if self._lowat != 1:
            self._lowat = self._wire.set_lowat(1)
        scratch = memoryview(bytearray(64 << 10))
        with trio.move_on_after(_LINGER_MAX), self._io:
            while True:
                with trio.move_on_after(_LINGER_QUIET) as quiet:
                    n = self._wire.recv_now(scratch)
                    if n is None:
                        n = await self._wire.recv_wait(scratch)
                    else:
                        await trio.lowlevel.checkpoint()
                if quiet.cancelled_caught or n == 0:
                    return

    # -- receiving ---------------------------------------------------------------

    def _poll(self) -> bool:
        """Whether receive_frame has bytes (or the end of stream) to start on without waiting.

        Synchronous: reads ahead what the socket already holds.
        """
        if self._rend > self._rpos:
            return True
        if self._closed is not None or self._receiving:
            return False
        self._rpos = self._rend = 0
        with self._io:
            n = self._wire.recv_now(self._rview)
        if n is None:
            self._drained = True
            return False
        self._drained = n < _READ_AHEAD
        if n == 0:
            return True  # the end of the stream: receive_frame reports it
        self._rend = n
        return True

    def _buffered(self) -> bool:
        """Whether bytes of the next frame are already received."""
        return self._rend > self._rpos

    async def wait_readable(self) -> None:
        """Wait until data (or the end of the stream) is there to receive."""
        self._check_open(receiving=True)
        if self._rend > self._rpos:
            await trio.lowlevel.checkpoint()
            return
        with self._io:
            await self._wire.wait_readable()

    async def receive_frame(
        self, into: Callable[[Header], np.ndarray | None] | None = None
    ) -> Frame:
        """Receive one whole frame.

        The header is validated (docs/protocol.md section 3.1) before
        anything is allocated; then the meta is read and parsed; then the
        payload is received into its array: straight from the socket with
        ``recv_into`` (from 16 KiB on; a smaller one is copied out of the
        read-ahead buffer). That array is ``into(header)`` when ``into`` is
        given and returns one (it must be a writable C-contiguous array of
        exactly ``header.dtype`` and ``header.shape``: a pooled buffer, or
        the caller's own parameter buffer), else ``header.allocate()``.

        Raises:
            ConnectionClosedError: the peer closed the connection between
                frames, or it was lost or closed, or an earlier receive was
                cut short inside a frame.
            RemoteProtocolError: the peer sent an invalid frame, or ended or
                stalled (``stall_timeout``) inside one; ``.code`` is the code
                to send back with :meth:`close_with_error`. The connection
                cannot receive again (it can still send).
            LocalProtocolError: ``into`` returned an unsuitable array, or
                another task is receiving.
        """
        self._check_open(receiving=True)
        if self._receiving:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "receive_frame", "concurrent", "one receiver at a time"
            )
        self._receiving = True
        consumed = False  # has any byte of this frame been consumed?
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            rview = self._rview
            with self._io:
                if self._rend - self._rpos < HEADER_SIZE:
                    await self._fill(HEADER_SIZE, "header")
                pos = self._rpos
                header = decode_header(
                    rview[pos : pos + HEADER_SIZE],
                    self.limits if self.authenticated else HANDSHAKE_LIMITS,
                )  # an unauthenticated peer gets no tensor and little meta
                if self.authenticated and header.kind in _HANDSHAKE_KINDS:
                    raise RemoteProtocolError(
                        ErrorCode.UNEXPECTED, "kind", header.kind.name, "handshake is over"
                    )
                pos += HEADER_SIZE
                self._rpos = pos
                consumed = True
                n = header.meta_length
                if not n:
                    meta: dict[str, Any] = {}
                elif self._rend - pos >= n:
                    meta = parse_meta(rview[pos : pos + n], header.kind)
                    self._rpos = pos + n
                else:
                    meta_buf = bytearray(n)
                    await self._read_into(memoryview(meta_buf), "meta")
                    meta = parse_meta(meta_buf, header.kind)
                array = None if header.dtype is None else self._destination(header, into)
                n = header.payload_length
                if n:
                    dest = memoryview(array).cast("B")
                    pos = self._rpos
                    if self._rend - pos >= n:
                        dest[:] = rview[pos : pos + n]  # a small payload: one small copy
                        self._rpos = pos + n
                    else:
                        await self._read_into(dest, "payload")
            frame = Frame(
                header.kind, header.request_id, header.key, header.seq, header.flags, array, meta
            )
        except BaseException as exc:
            # Bytes read ahead but not consumed stay for the next call, so
            # only a frame cut short (or a broken one) poisons the receiver.
            if (consumed or isinstance(exc, ProtocolError)) and self._recv_broken is None:
                # Mid-frame: whatever happened, the framing is lost.
                self._recv_broken = ConnectionClosedError(
                    f"an earlier receive failed inside a frame ({type(exc).__name__}): "
                    "connection poisoned", getattr(exc, "code", None),
                )  # fmt: skip
            raise
        finally:
            self._receiving = False
        if self._rpos == self._rend:
            self._rpos = self._rend = 0  # empty: the next receive gets the whole buffer
        self._unyielded += 1
        if self._unyielded >= _YIELD_EVERY:  # fairness, as in send_parts
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return frame

    @staticmethod
    def _destination(
        header: Header, into: Callable[[Header], np.ndarray | None] | None
    ) -> np.ndarray | None:
        array = into(header) if into is not None else None
        if array is None:
            return header.allocate()
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != header.dtype
            or array.shape != header.shape
            or not array.flags.c_contiguous
            or not array.flags.writeable
        ):
            got = (array.dtype.str, array.shape) if isinstance(array, np.ndarray) else array
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "into", got,
                f"need a writable C-contiguous {header.dtype.str} array of shape {header.shape}",
            )  # fmt: skip
        return array

    async def _recv_wait(self, view: memoryview, part: str, stall: bool, got: int,
                         size: int) -> int:  # fmt: skip
        """Wait for data and receive it into ``view``; ``stall``: inside a frame."""
        if not stall or self.stall_timeout == math.inf:
            # Between frames a peer may be silent as long as it likes.
            n = await self._wire.recv_wait(view)
        else:
            with trio.move_on_after(self.stall_timeout) as timer:
                n = await self._wire.recv_wait(view)
            if timer.cancelled_caught:
                # The receive low-water mark may have hidden bytes that did
                # come: only a frame that made no progress at all stalled.
                n = self._wire.recv_now(view)
            if n is None:
                raise RemoteProtocolError(
                    ErrorCode.TIMEOUT, part, f"{got} of {size} bytes",
                    f"no data for {self.stall_timeout} s inside a frame",
                )  # fmt: skip
        self._unyielded = 0
        return n

    def _spin_recv(self, view: memoryview) -> int | None:
        """Poll the socket for up to ``spin`` seconds instead of sleeping at once.

        Only while no other task is ready to run (it would wait meanwhile)
        and the owner says it is worth it (a Channel: an answer is awaited,
        or it serves requests). None: nothing came.
        """
        if self._spin_if is not None and not self._spin_if():
            return None
        if trio.lowlevel.current_statistics().tasks_runnable:
            return None
        recv_now = self._wire.recv_now
        clock = time.perf_counter
        deadline = clock() + self.spin
        while clock() < deadline:
            n = recv_now(view)
            if n is not None:
                return n
            # Let a process that shares this core run (the peer may be it):
            # without one, sched_yield returns at once.
            os.sched_yield()
        return None

    async def _fill(self, need: int, part: str) -> None:
        """Receive until ``need`` (<= the buffer's size) bytes are read ahead."""
        pos, end = self._rpos, self._rend
        if pos + need > _READ_AHEAD:  # no room behind: move the start of the frame to the front
            self._rbuf[: end - pos] = self._rbuf[pos:end]
            pos, end = self._rpos, self._rend = 0, end - pos
        rview = self._rview
        while end - pos < need:
            view = rview[end:]
            # After a short read the socket is most likely empty: wait for it
            # straight away rather than spend a system call on EAGAIN.
            n = None if self._drained else self._wire.recv_now(view)
            if n is None:
                stall = end > pos or part != "header"
                if not stall and self.spin:
                    n = self._spin_recv(view)
                if n is None:
                    n = await self._recv_wait(view, part, stall, end - pos, need)
            self._drained = n < len(view)
            if n == 0:
                if end == pos and part == "header":
                    raise ConnectionClosedError(f"{self.peer} closed the connection")
                raise RemoteProtocolError(
                    ErrorCode.TRUNCATED, part, f"{end - pos} of {need} bytes",
                    "the stream ended inside a frame",
                )  # fmt: skip
            end += n
            self._rend = end

    async def _read_into(self, dest: memoryview, part: str) -> None:
        """Fill ``dest``: first from the read-ahead buffer, then from the socket."""
        pos = self._rpos
        got = min(len(dest), self._rend - pos)
        if got:
            dest[:got] = self._rview[pos : pos + got]
            self._rpos = pos + got
        size = len(dest)
        while got < size:
            left = size - got
            if left < _DIRECT_MIN:
                # The small rest of it: through the buffer, in one receive
                # that may bring the next frames along.
                if self._lowat != 1:
                    self._lowat = self._wire.set_lowat(1)
                if self._rpos == self._rend:
                    self._rpos = self._rend = 0
                await self._fill(left, part)
                pos = self._rpos
                dest[got:] = self._rview[pos : pos + left]
                self._rpos = pos + left
                return
            view = dest[got:]
            n = self._wire.recv_now(view)
            if n is None:
                # A big payload on its way: have the kernel wake us only once
                # a good chunk of it is there. Each wakeup costs a trip
                # through trio's scheduler, and the sender's pace would
                # otherwise make it one per 64 KiB.
                lowat = min(left, _LOW_WATER)
                if lowat != self._lowat:
                    self._lowat = self._wire.set_lowat(lowat)
                n = await self._recv_wait(view, part, True, got, size)
            if n == 0:
                raise RemoteProtocolError(
                    ErrorCode.TRUNCATED, part, f"{got} of {size} bytes",
                    "the stream ended inside a frame",
                )  # fmt: skip
            got += n
        if self._lowat != 1:
            self._lowat = self._wire.set_lowat(1)


# -- handshake -----------------------------------------------------------------------


class _BadProof(Exception):
    """The peer's handshake MAC did not verify."""


class _PeerError(Exception):
    """The peer sent an ERROR frame where we expected something else."""

    def __init__(self, frame: Frame) -> None:
        self.code = _as_code(frame.meta["code"])
        self.message = frame.meta["message"]
        super().__init__(f"{self.message} [{getattr(self.code, 'name', self.code)}]")


def _as_code(value: int) -> ErrorCode | int:
    try:
        return ErrorCode(value)
    except ValueError:
        return value  # unknown codes are kept and judged by their range


async def _expect(conn: Connection, kind: MessageKind) -> Frame:
    """Receive the next handshake frame; it must be ``kind`` (or an ERROR)."""
    frame = await conn.receive_frame()
    if frame.kind == MessageKind.ERROR:
        raise _PeerError(frame)
    if frame.kind != kind:
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED, "kind", frame.kind.name, f"expected {kind.name} in the handshake"
        )
    return frame


def _hex_field(meta: dict[str, Any], key: str) -> bytes:
    value = meta.get(key)
    if not isinstance(value, str) or not _HEX_NONCE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise RemoteProtocolError(
            ErrorCode.BAD_META, f"meta.{key}", shown, f"need {2 * NONCE_SIZE} hex digits"
        )
    return bytes.fromhex(value)


def _named(meta: dict[str, Any], name: str | None) -> dict[str, Any]:
    return meta if not name else {**meta, "name": name}


async def _run_handshake(
    conn: Connection, steps: Callable[[], Awaitable[dict[str, Any]]], role: str, timeout: float
) -> dict[str, Any]:
    """Run the handshake ``steps``; on any failure tell the peer, close, raise.

    Maps every way a handshake can fail to what the peer is told and what
    our caller sees: this is the only place that decides either.
    """
    other = "server" if role == "client" else "client"
    tell: tuple[ErrorCode | int, str] | None = None
    try:
        with trio.fail_after(timeout):
            meta = await steps()
    except trio.TooSlowError:
        tell = (ErrorCode.TIMEOUT, f"handshake not completed within {timeout} s")
        error = ConnectionClosedError(f"{tell[1]} (peer {conn.peer})", ErrorCode.TIMEOUT)
    except _BadProof:
        tell = (ErrorCode.AUTH_FAILED, f"the {other}'s proof does not verify")
        error = AuthenticationError(
            f"the {other} at {conn.peer} failed to prove it knows the shared secret",
            ErrorCode.AUTH_FAILED,
        )
    except _PeerError as exc:
        if exc.code == ErrorCode.AUTH_FAILED:
            error = AuthenticationError(
                f"the {other} at {conn.peer} rejected our proof (different secret?): {exc}",
                ErrorCode.AUTH_FAILED,
            )
        else:
            error = ConnectionClosedError(
                f"the {other} at {conn.peer} refused the connection: {exc}", exc.code
            )
    except RemoteProtocolError as exc:
        if exc.code != ErrorCode.TRUNCATED:  # no one left to tell otherwise
            tell = (exc.code, str(exc))
        error = ConnectionClosedError(f"handshake with {conn.peer} failed: {exc}", exc.code)
        error.__cause__ = exc
    except ConnectionClosedError as exc:
        error = ConnectionClosedError(f"handshake with {conn.peer} failed: {exc}", exc.code)
    except BaseException:
        await conn.aclose()
        raise
    else:
        conn.authenticated = True
        name = meta.get("name")
        conn.peer_name = name if isinstance(name, str) else ""
        return meta
    if tell is not None:
        await conn.close_with_error(*tell)
    else:
        await conn.aclose()
    raise error


async def client_handshake(
    conn: Connection, secret: bytes, *, name: str | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Authenticate a fresh connection as the client (docs/protocol.md section 10).

    HELLO -> CHALLENGE -> AUTH -> AUTH_OK: both sides prove they know
    ``secret`` (HMAC-SHA256 over both fresh nonces, compared in constant
    time). ``name`` goes into HELLO for the server's logs. On success the
    connection is authenticated and the server's AUTH_OK meta is returned.

    On failure the peer is told why when it can be (AUTH_FAILED, TIMEOUT,
    the code of a bad frame), the connection is closed, and this raises
    :class:`AuthenticationError` (a proof failed, either way) or
    :class:`ConnectionClosedError` with ``.code`` (refused, e.g.
    UNAVAILABLE; timed out: TIMEOUT; bad frame; lost).
    """
    secret = _check_secret(secret)

    async def steps() -> dict[str, Any]:
        nc = os.urandom(NONCE_SIZE)
        await conn.send_frame(MessageKind.HELLO, meta=_named({"nonce": nc.hex()}, name))
        challenge = await _expect(conn, MessageKind.CHALLENGE)
        ns = _hex_field(challenge.meta, "nonce")
        mac = _hex_field(challenge.meta, "mac")
        if not hmac.compare_digest(mac, auth_mac(secret, "server", nc, ns)):
            raise _BadProof
        mac_c = auth_mac(secret, "client", nc, ns)
        await conn.send_frame(MessageKind.AUTH, meta={"mac": mac_c.hex()})
        return (await _expect(conn, MessageKind.AUTH_OK)).meta

    return await _run_handshake(conn, steps, "client", timeout)


async def server_handshake(
    conn: Connection, secret: bytes, *, name: str | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Authenticate a fresh connection as the server; the mirror of client_handshake.

    Nothing but HELLO, then AUTH (or an ERROR) is accepted before AUTH_OK;
    anything else is UNEXPECTED. Returns the client's HELLO meta.
    """
    secret = _check_secret(secret)

    async def steps() -> dict[str, Any]:
        hello = await _expect(conn, MessageKind.HELLO)
        nc = _hex_field(hello.meta, "nonce")
        ns = os.urandom(NONCE_SIZE)
        mac_s = auth_mac(secret, "server", nc, ns)
        await conn.send_frame(MessageKind.CHALLENGE, meta={"nonce": ns.hex(), "mac": mac_s.hex()})
        mac = _hex_field((await _expect(conn, MessageKind.AUTH)).meta, "mac")
        if not hmac.compare_digest(mac, auth_mac(secret, "client", nc, ns)):
            raise _BadProof
        await conn.send_frame(MessageKind.AUTH_OK, meta=_named({}, name))
        return hello.meta

    return await _run_handshake(conn, steps, "server", timeout)


# -- Channel: requests and replies -------------------------------------------------------


@dataclass
class Reply:
    """What a request handler answers with; the transport sends it as a REPLY.

    Attributes:
        array: the tensor to send back, or None. Sent zero-copy: it must not
            change until the reply has gone out (see ``release``).
        meta: control information (a JSON-able dict), or None.
        seq: the reply's ``seq`` (e.g. the tensor's version).
        key: the reply's ``key``; None echoes the request's.
        flags: the reply's flags (version 1 defines none).
        release: called once the reply has left or failed to, e.g. to give
            a pooled buffer back or release a lock that kept ``array``
            from being updated while it was on its way out.
    """

    array: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    seq: int = 0
    key: int | None = None
    flags: int = 0
    release: Callable[[], None] | None = None


class _Defer:
    """The type of :data:`DEFER`."""

    _instance: _Defer | None = None

    def __new__(cls) -> _Defer:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFER"


#: What an inline handler returns for a request it leaves to the (async) handler.
DEFER = _Defer()

Handler = Callable[[Frame], Awaitable["Reply | None"]]
InlineHandler = Callable[[Frame], "Reply | None | _Defer"]

# Request kinds by wire value, for request() and notify().
_REQUEST_KIND_OF = {int(k): k for k in MessageKind if k not in _NOT_REQUESTS}


class _Pending:
    """One request of ours waiting for its answer."""

    __slots__ = (
        "kind", "into", "task", "done", "sent", "woken", "frame", "error", "receiving", "deadline",
    )  # fmt: skip

    def __init__(self, kind: MessageKind, into: np.ndarray | None) -> None:
        self.kind = kind
        self.into = into
        self.task: Any = None  # the requesting task while it waits
        self.done = False  # answered: frame or error is set
        self.sent = False  # the request is on the wire
        self.woken = False  # counted in Channel._waking until the requester runs
        self.frame: Frame | None = None
        self.error: Exception | None = None
        self.receiving = False  # the reader is receiving its answer's payload
        self.deadline = math.inf

    async def wait(self) -> None:
        """Sleep until :meth:`wake` (an answer, the end, or the deadline).

        trio's lowest-level wait: an Event (or a CancelScope for the
        timeout) costs microseconds a round trip cannot spare.
        """
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> bool:
        """Resume the waiting task; whether there was one."""
        task = self.task
        if task is None:
            return False
        self.task = None
        trio.lowlevel.reschedule(task)
        return True


def _error_reply(exc: Exception) -> tuple[ErrorCode | int, str]:
    """The ERROR code and text that answer a request whose handler raised ``exc``."""
    code = getattr(exc, "code", None)
    if isinstance(exc, (RequestError, ProtocolError)) and isinstance(code, int) and code >= 32:
        return code, exc.message if isinstance(exc, RequestError) else str(exc)
    # Anything else is a bug or failure on this side: the peer learns that
    # much; the traceback goes to our log.
    log.error("request handler failed", exc_info=exc)
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"


class Channel:
    """Requests and replies over one authenticated :class:`Connection`.

    Start :meth:`run` in a nursery you own (``await nursery.start(ch.run)``):
    it is the reader task. It routes each REPLY/ERROR/PONG to the request
    waiting for it (by request id), so any number of :meth:`request` calls
    may be in flight at once from any tasks; and it answers incoming
    requests.

    Incoming requests are answered two ways:

    * **inline**: ``inline(frame) -> Reply | None | DEFER``, a synchronous
      function, is called by the reader itself for each request, one at a
      time in arrival order, before the next frame is read; its answer is
      sent right away (when the socket cannot take all of it at once, a
      task finishes the send and the reader reads on). This is the fast
      path for quick synchronous work, e.g. a parameter shard's PULL and
      PUSH: no task per request, no scheduler trip, and the effects of
      inline requests happen in the order they were sent. An inline
      handler must not block (it stalls the whole connection) and cannot
      await. PING is always answered inline, with PONG.
    * **concurrently**: a request the inline handler returns :data:`DEFER`
      for (or every request, without one) goes to ``handler(frame)``, an
      async function, each in its own task, up to ``max_concurrent`` at
      once (then the reader stops reading: TCP pushes back on the peer).
      These are answered in completion order, and may overtake each other
      and later inline requests. With ``max_concurrent=1`` they are handled
      one at a time, in order. (While the reader waits for a free slot it
      reads nothing, answers to our own requests included: a handler must
      not wait for an answer on its own channel when all slots may be
      taken.)

    Either handler gets the request frame (its ``array`` freshly
    allocated, or from ``allocate(header)``). Returning None answers an
    empty REPLY; raising :class:`RequestError` (or a ProtocolError) with a
    code of 32 or more answers an ERROR of that code, any other exception
    an INTERNAL ERROR; the channel carries on either way. Requests with
    ``request_id`` 0 get no REPLY, only an ERROR with ``request_id`` 0 if
    they fail. Without any handler, requests are answered BAD_REQUEST.

    A frame that breaks the protocol gets an ERROR with its code, then the
    connection is closed. When the connection ends for any reason, every
    request still waiting fails with :class:`ConnectionClosedError` and
    :meth:`run` returns; handler tasks still running finish first (their
    answers go nowhere, but nothing they do is cut short).

    Args:
        conn: an authenticated connection; the channel owns it.
        handler: answers the peer's requests in tasks, or None.
        inline: answers the peer's requests in the reader, or None.
        max_concurrent: requests handled at once (by ``handler``, plus
            inline answers still being sent).
        idle_timeout: close the channel (CLOSE exchange) after this many
            seconds without traffic while nothing is in flight; None: never.
        close_timeout: how long :meth:`aclose` waits for the peer's CLOSE.
        allocate: ``allocate(header) -> ndarray | None`` supplies the array a
            request's payload is received into (e.g. from a pool); None or
            a None result allocate a fresh one.
        spin: a latency option, in seconds (0, the default: off; at most
            0.01). Before the reader goes to sleep waiting for the next
            frame, it polls the socket for up to this long, provided no
            other task of the process is ready to run and the channel
            expects something (an answer to one of our requests, or it
            serves requests). Where waking a sleeping core is slow (virtual
            machines above all) this saves tens of microseconds a round
            trip; it costs up to ``spin`` seconds of CPU each time the
            connection falls quiet, and the process's other connections
            wait that long at most. ``50e-6`` is a good value to try.
    """

    def __init__(
        self,
        conn: Connection,
        handler: Handler | None = None,
        *,
        inline: InlineHandler | None = None,
        max_concurrent: int = 64,
        idle_timeout: float | None = None,
        close_timeout: float = 5.0,
        allocate: Callable[[Header], np.ndarray | None] | None = None,
        spin: float = 0.0,
    ) -> None:
        if not conn.authenticated:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, "conn", "unauthenticated", "run the handshake first"
            )
        if max_concurrent < 1:
            raise ConfigError("max_concurrent", max_concurrent, "must be at least 1")
        if not 0 <= spin <= 0.01:
            raise ConfigError("spin", spin, "must be in [0, 0.01] seconds")
        self.conn = conn
        conn.spin = spin
        serving = handler is not None or inline is not None
        conn._spin_if = lambda: serving or any(
            p.sent and not p.done for p in self._pending.values()
        )
        self._handler = handler
        self._inline = inline
        self._allocate = allocate
        self._slots = trio.Semaphore(max_concurrent)
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._active = 0  # incoming requests being handled in tasks
        self._backlog = 0  # inline answers that tasks are still sending
        self._max_backlog = max_concurrent
        self._backlog_lot = trio.lowlevel.ParkingLot()
        self._last_activity = trio.current_time()  # idle time counts from here
        self._quiet_waiter: trio.Event | None = None
        self._running = False
        self._sent_close = False  # we sent CLOSE: no more requests from us
        self._got_close = False  # the peer sent CLOSE: no more requests from it
        self._ended: ConnectionClosedError | None = None  # why the channel is over
        self._finished = trio.Event()
        self._reader_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        # Request timeouts: one timer task for the channel, asleep until the
        # earliest deadline, instead of a CancelScope per request.
        self._timer_stop = trio.CancelScope()
        self._timer_scope: trio.CancelScope | None = None
        self._timer_target = -math.inf  # the timer wakes by then; -inf: not started
        self._waking = 0  # requesters woken that have not run yet

    # -- public API ----------------------------------------------------------------

    @property
    def peer_name(self) -> str:
        """The peer's name from the handshake ("" if it gave none)."""
        return self.conn.peer_name

    @property
    def closed(self) -> bool:
        """Whether the channel no longer accepts requests (closing or closed)."""
        return self._ended is not None or self._sent_close or self._got_close

    async def request(
        self,
        kind: MessageKind | int,
        *,
        key: int = 0,
        seq: int = 0,
        array: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
        flags: int = 0,
        timeout: float | None = None,
        into: np.ndarray | None = None,
    ) -> Frame:
        """Send a request and wait for its answer; returns the REPLY (or PONG) frame.

        ``array`` is sent zero-copy and must not change until this returns.
        With ``into`` (a writable C-contiguous array), the answer's tensor
        is received straight into it and the returned frame's ``array`` *is*
        ``into``; the answer must carry a tensor of exactly its dtype and
        shape. ``timeout`` bounds the whole round trip.

        Raises:
            RemoteError: the peer answered with an ERROR (``.code``, ``.message``).
            RequestTimeout: no answer within ``timeout``; the connection stays
                usable (the late answer is dropped) unless the timeout cut a
                send short, or the answer was already landing in ``into``
                (then the connection is closed, so that nothing writes into
                ``into`` after this returns).
            RemoteProtocolError: the answer's tensor did not match ``into``
                (code SHAPE_MISMATCH or DTYPE_MISMATCH; ``into`` is untouched
                and the channel carries on).
            ConnectionClosedError: the connection is closed, closing or lost.
            LocalProtocolError: the arguments do not make a valid request.
        """
        try:
            kind = _REQUEST_KIND_OF[kind]
        except (KeyError, TypeError):
            kind = self._request_kind(kind)  # raises
        if into is not None:
            self._check_into(into)
        parts = encode_frame(
            kind, request_id=(rid := next(self._ids)), key=key, seq=seq, array=array,
            meta=meta, flags=flags, limits=self.conn.limits,
        )  # fmt: skip
        self._check_can_request()
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: nothing is sent
        pending = self._pending[rid] = _Pending(kind, into)
        deadline = math.inf
        try:
            if timeout is not None:
                deadline = pending.deadline = trio.current_time() + timeout
                if deadline < self._timer_target:
                    self._timer_target = deadline
                    assert self._timer_scope is not None
                    self._timer_scope.cancel()  # wake the timer to sleep less
            unsent = self.conn._send_start(parts)
            if unsent is None:
                pending.sent = True
            elif deadline == math.inf:
                await self.conn._send_finish(unsent)
                pending.sent = True
            else:
                with trio.CancelScope(deadline=deadline) as scope:
                    await self.conn._send_finish(unsent)
                pending.sent = not scope.cancelled_caught
            if not pending.done and (deadline == math.inf or deadline > trio.current_time()):
                await pending.wait()
        finally:
            if pending.woken:
                self._waking -= 1
            del self._pending[rid]
            self._poke()
            if not pending.done and pending.receiving and into is not None:
                # The reader is writing our answer into the caller's buffer and
                # cannot be stopped mid-frame; only closing stops it for sure.
                self._abort("a request was abandoned while its answer was landing in into=")
        if not pending.done:
            raise RequestTimeout(
                f"{kind.name} request (key {key}) to {self.conn.peer} got no answer within "
                f"{timeout} s"
            )
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        return pending.frame

    async def notify(
        self,
        kind: MessageKind | int,
        *,
        key: int = 0,
        seq: int = 0,
        array: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
        flags: int = 0,
    ) -> None:
        """Send a request that wants no answer (``request_id`` 0), e.g. an async PUSH.

        Returns once it is sent (usually at once: into the socket's buffer,
        without waiting), so a loop of notifies pipelines them. If it
        fails, the peer may say so with an ERROR of ``request_id`` 0, which
        is logged here.
        """
        try:
            kind = _REQUEST_KIND_OF[kind]
        except (KeyError, TypeError):
            kind = self._request_kind(kind)  # raises
        self._check_can_request()
        await self.conn.send_frame(
            kind, key=key, seq=seq, array=array, meta=meta, flags=flags
        )

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip a PING; returns the seconds it took."""
        start = trio.current_time()
        await self.request(MessageKind.PING, timeout=timeout)
        return trio.current_time() - start

    async def aclose(self) -> None:
        """Close gracefully: no new requests; the CLOSE exchange of section 11.

        Sends CLOSE and keeps reading until the peer has answered what it
        received and sent its own CLOSE (at most ``close_timeout`` seconds),
        then closes. Requests still waiting then fail with
        ConnectionClosedError. Safe to call more than once and from any task.
        """
        if not self._running:
            self._end(ConnectionClosedError("channel closed"))
            await self.conn.aclose()
            return
        with trio.CancelScope(shield=True):
            await self._send_close()
            await self._finished.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The channel's reader: run it in a nursery until the connection ends.

        Returns when the connection has ended (closed by either side, lost,
        or after a protocol error) and every handler task has finished.
        """
        if self._running or self._finished.is_set():
            raise LocalProtocolError(ErrorCode.INTERNAL, "run", "again", "a channel runs once")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer)
                task_status.started()
                ended = await self._read_until_end()
                self._timer_stop.cancel()
                self._end(ended)
                await self.conn.aclose()
        finally:
            self._end(ConnectionClosedError("channel stopped"))
            self.conn.abort("channel stopped")
            await self.conn.aclose()
            self._finished.set()

    # -- requests ----------------------------------------------------------------

    @staticmethod
    def _request_kind(kind: MessageKind | int) -> MessageKind:
        try:
            kind = MessageKind(kind)
        except ValueError:
            raise LocalProtocolError(ErrorCode.BAD_KIND, "kind", kind, "unknown kind") from None
        if kind in _NOT_REQUESTS:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, "kind", kind.name, "not a request kind"
            )
        return kind

    @staticmethod
    def _check_into(into: Any) -> None:
        if not isinstance(into, np.ndarray) or not into.flags.c_contiguous or not (
            into.flags.writeable
        ):
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "into", type(into).__name__,
                "need a writable C-contiguous numpy array",
            )  # fmt: skip

    def _check_can_request(self) -> None:
        if self._ended is not None:
            raise ConnectionClosedError(str(self._ended), self._ended.code)
        if self._sent_close or self._got_close:
            raise ConnectionClosedError(f"channel to {self.conn.peer} is closing")
        if not self._running:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "channel", "not running", "start Channel.run in a nursery first"
            )

    async def _timer(self) -> None:
        """Wake requests whose deadline passed; sleep until the next one."""
        with self._timer_stop:
            while True:
                now = trio.current_time()
                nearest = math.inf
                for pending in list(self._pending.values()):
                    if pending.deadline <= now:
                        self._wake(pending)  # not done: request() raises RequestTimeout
                    elif pending.deadline < nearest:
                        nearest = pending.deadline
                # A request with an earlier deadline lowers the target and
                # cancels the sleep; one with a later deadline needs nothing,
                # so a steady stream of requests with one timeout costs the
                # timer one wakeup per timeout period.
                self._timer_target = nearest
                with trio.CancelScope(deadline=nearest) as self._timer_scope:
                    await trio.sleep_forever()

    def _end(self, reason: ConnectionClosedError) -> None:
        """No more requests; fail every waiting one with ``reason``."""
        if self._ended is None:
            self._ended = reason
        for pending in self._pending.values():
            if not pending.done:
                pending.error = ConnectionClosedError(str(self._ended), self._ended.code)
                pending.done = True
                self._wake(pending)

    def _wake(self, pending: _Pending) -> None:
        if pending.wake():
            pending.woken = True
            self._waking += 1

    def _abort(self, reason: str) -> None:
        self._end(ConnectionClosedError(reason))
        self.conn.abort(reason)
        self._reader_scope.cancel()

    def _busy(self) -> bool:
        return bool(self._pending) or self._active > 0 or self._backlog > 0

    def _poke(self) -> None:
        """Something in flight finished: idle time restarts, quiet waiters wake."""
        if self._idle_timeout is not None:
            self._last_activity = trio.current_time()
        if self._quiet_waiter is not None and not self._busy():
            self._quiet_waiter.set()

    async def _wait_quiet(self) -> None:
        while self._busy():
            self._quiet_waiter = trio.Event()
            await self._quiet_waiter.wait()

    # -- closing -------------------------------------------------------------------

    async def _send_close(self) -> None:
        """We start the CLOSE exchange: tell the peer, then read until its CLOSE."""
        if self._sent_close or self._finished.is_set():
            return
        self._sent_close = True
        try:
            with trio.move_on_after(self._close_timeout):
                await self.conn.send_frame(MessageKind.CLOSE)
        except ConnectionClosedError:
            pass
        deadline = trio.current_time() + self._close_timeout
        self._reader_scope.deadline = min(self._reader_scope.deadline, deadline)

    async def _close_when_quiet(self) -> None:
        """The peer sent CLOSE: finish what is in flight, answer CLOSE, close."""
        await self._wait_quiet()
        if not self._sent_close:  # aclose() may have sent it meanwhile
            self._sent_close = True
            try:
                with trio.move_on_after(self._close_timeout):
                    await self.conn.send_frame(MessageKind.CLOSE)
            except ConnectionClosedError:
                pass
        self._reader_scope.cancel()

    # -- the reader ----------------------------------------------------------------

    async def _read_until_end(self) -> ConnectionClosedError:
        """Read and dispatch frames until the connection ends; say why it ended."""
        violation: RemoteProtocolError | None = None
        with self._reader_scope:
            try:
                await self._read_loop()
            except ConnectionClosedError as exc:
                if self._sent_close or self._got_close:
                    return ConnectionClosedError(f"channel to {self.conn.peer} closed")
                return exc
            except RemoteProtocolError as exc:
                violation = exc
            except _PeerError as exc:
                return ConnectionClosedError(
                    f"{self.conn.peer} closed the connection after an error: {exc}", exc.code
                )
        if violation is not None:
            log.warning("closing connection to %s: %s", self.conn.peer, violation)
            if violation.code != ErrorCode.TRUNCATED:  # no one left to tell otherwise
                await self.conn.close_with_error(violation.code, str(violation))
            error = ConnectionClosedError(
                f"connection to {self.conn.peer} closed after a protocol error: {violation}",
                violation.code,
            )
            error.__cause__ = violation
            return error
        # Cancelled: the CLOSE exchange finished, its deadline passed, or abort.
        return self._ended or ConnectionClosedError(f"channel to {self.conn.peer} closed")

    async def _read_loop(self) -> None:
        conn = self.conn
        while True:
            if (
                self._idle_timeout is not None and not (self._sent_close or self._got_close)
                and not conn._poll()
            ):  # fmt: skip
                # Idle = no frame in and nothing in flight, since the later of
                # the last frame and the end of the last request either way.
                with trio.move_on_at(self._last_activity + self._idle_timeout) as idle:
                    await conn.wait_readable()
                if idle.cancelled_caught:
                    if not self._busy() and (
                        trio.current_time() >= self._last_activity + self._idle_timeout
                    ):
                        log.debug("closing idle connection to %s", conn.peer)
                        await self._send_close()
                    elif self._busy():
                        self._last_activity = trio.current_time()
                    continue
            frame = await conn.receive_frame(into=self._destination)
            if self._idle_timeout is not None:
                self._last_activity = trio.current_time()
            kind = frame.kind
            if kind in _ANSWER_KINDS:
                self._on_answer(frame)
                # Nothing more to read yet: let the requests we just woke run
                # (and send their next requests) before this task goes back
                # to the socket; on a round trip that comes first. (trio
                # runs a batch of ready tasks in random order: yield until
                # they have run.)
                for _ in range(3):
                    if not self._waking or conn._buffered():
                        break
                    await trio.lowlevel.cancel_shielded_checkpoint()
            elif kind == MessageKind.CLOSE:
                if self._sent_close:
                    return  # the exchange is complete
                self._got_close = True
                assert self._nursery is not None
                self._nursery.start_soon(self._close_when_quiet)
            else:
                await self._on_request(frame)

    def _destination(self, header: Header) -> np.ndarray | None:
        """Where a payload lands: the waiting request's ``into``, a pooled array, or new."""
        if header.kind == MessageKind.REPLY:
            pending = self._pending.get(header.request_id) if header.request_id else None
            if pending is None:
                return None
            pending.receiving = True
            into = pending.into
            if into is not None and into.dtype == header.dtype and into.shape == header.shape:
                return into
            return None  # no into, or a mismatch (reported by _on_answer)
        if header.kind not in _NOT_REQUESTS and self._allocate is not None:
            return self._allocate(header)
        return None

    def _on_answer(self, frame: Frame) -> None:
        if frame.request_id == 0:
            if frame.kind == MessageKind.ERROR:
                code = _as_code(frame.meta["code"])
                if code < 32:  # fatal: the peer is closing the connection
                    raise _PeerError(frame)
                log.warning("%s reports: %s [%s]", self.conn.peer, frame.meta["message"], code)
                return
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED, "request_id", 0, f"a {frame.kind.name} must answer a request"
            )
        pending = self._pending.get(frame.request_id)
        if pending is None:
            # The answer to a request that timed out or was cancelled.
            log.debug("dropping late %s for request %d", frame.kind.name, frame.request_id)
            return
        expected = MessageKind.PONG if pending.kind == MessageKind.PING else MessageKind.REPLY
        if frame.kind == MessageKind.ERROR:
            code = _as_code(frame.meta["code"])
            pending.error = RemoteError(code, frame.meta["message"])
        elif frame.kind != expected:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED, "kind", frame.kind.name,
                f"request {frame.request_id} was a {pending.kind.name}",
            )  # fmt: skip
        elif pending.into is not None and frame.array is not pending.into:
            pending.error = self._mismatch(frame, pending.into)
        else:
            pending.frame = frame
        pending.receiving = False
        pending.done = True
        self._wake(pending)

    @staticmethod
    def _mismatch(frame: Frame, into: np.ndarray) -> RemoteProtocolError:
        got = None if frame.array is None else (frame.array.dtype.str, frame.array.shape)
        dtype_ok = frame.array is not None and frame.array.dtype == into.dtype
        return RemoteProtocolError(
            ErrorCode.SHAPE_MISMATCH if dtype_ok else ErrorCode.DTYPE_MISMATCH,
            "reply.array", got, f"into= is {into.dtype.str} {into.shape}",
        )  # fmt: skip

    async def _on_request(self, frame: Frame) -> None:
        if self._got_close:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED, "kind", frame.kind.name, "a request after CLOSE"
            )
        if frame.kind == MessageKind.PING:
            await self._answer_inline(frame, MessageKind.PONG, Reply(seq=frame.seq))
            return
        if self._inline is not None:
            try:
                reply = self._inline(frame)
            except Exception as exc:
                await self._answer_inline(frame, MessageKind.ERROR, exc)
                return
            if reply is not DEFER:
                await self._answer_inline(frame, MessageKind.REPLY, reply)
                return
        # Backpressure: with max_concurrent requests in progress, stop reading.
        await self._take_slot()
        self._nursery.start_soon(self._handle, frame)  # type: ignore[union-attr]
        # Let it start before reading on: handlers then start in the order
        # the requests came (trio runs a batch of new tasks in random order).
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _take_slot(self) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        self._active += 1

    def _free_slot(self) -> None:
        self._active -= 1
        self._slots.release()
        self._poke()

    def _answer_parts(
        self, frame: Frame, kind: MessageKind, reply: Any
    ) -> list[bytes | memoryview]:
        """Encode the answer to ``frame``: a REPLY/PONG from ``reply``, or an ERROR."""
        try:
            if kind == MessageKind.ERROR:
                raise reply
            if reply is None:
                reply = Reply()
            elif not isinstance(reply, Reply):
                raise TypeError(
                    f"a handler must return a Reply or None, not {type(reply).__name__}"
                )
            return encode_frame(
                kind, request_id=frame.request_id,
                key=frame.key if reply.key is None else reply.key, seq=reply.seq,
                array=reply.array, meta=reply.meta, flags=reply.flags, limits=self.conn.limits,
            )  # fmt: skip
        except Exception as exc:
            return error_frame(*_error_reply(exc), frame.request_id)

    async def _answer_inline(self, frame: Frame, kind: MessageKind, reply: Any) -> None:
        """Send the answer to a request handled in the reader, without waiting if it can.

        A send the socket cannot take at once is finished by a task (with a
        slot), so the reader never waits for the peer to read.
        """
        release = reply.release if isinstance(reply, Reply) else None
        unsent = None
        try:
            if frame.request_id or kind == MessageKind.ERROR:
                unsent = self.conn._send_start(self._answer_parts(frame, kind, reply))
        except ConnectionClosedError:
            log.debug("answer to %s request %d not sent: connection closed", frame.kind.name,
                      frame.request_id)  # fmt: skip
        if unsent is None:
            self._released(release)
            self._poke()
            return
        # Its task starts at once (not after a free slot): the frame is
        # queued already, and the tasks queued behind it need it to be sent.
        self._backlog += 1
        self._nursery.start_soon(self._finish_answer, frame, unsent, release)  # type: ignore[union-attr]
        while self._backlog >= self._max_backlog:  # backpressure: stop reading
            await self._backlog_lot.park()

    async def _finish_answer(
        self, frame: Frame, unsent: _Outgoing, release: Callable[[], None] | None
    ) -> None:
        try:
            await self.conn._send_finish(unsent)
        except ConnectionClosedError:
            log.debug("answer to %s request %d not sent: connection closed", frame.kind.name,
                      frame.request_id)  # fmt: skip
        finally:
            self._released(release)
            self._backlog -= 1
            self._backlog_lot.unpark()
            self._poke()

    @staticmethod
    def _released(release: Callable[[], None] | None) -> None:
        if release is not None:
            try:
                release()
            except Exception:
                log.exception("Reply.release failed")

    async def _handle(self, frame: Frame) -> None:
        """Answer one incoming request in a task; never raises (but lets Cancelled through)."""
        release: Callable[[], None] | None = None
        try:
            if self._handler is None:
                kind: MessageKind = MessageKind.ERROR
                reply: Any = RequestError(ErrorCode.BAD_REQUEST, "this peer serves no requests")
            else:
                try:
                    reply = await self._handler(frame)
                    kind = MessageKind.REPLY
                    if isinstance(reply, Reply):
                        release = reply.release
                except Exception as exc:
                    kind, reply = MessageKind.ERROR, exc
            if not frame.request_id and kind != MessageKind.ERROR:
                return  # fire-and-forget: nobody waits for an answer
            await self.conn.send_parts(self._answer_parts(frame, kind, reply))
        except ConnectionClosedError:
            log.debug("answer to %s request %d not sent: connection closed", frame.kind.name,
                      frame.request_id)  # fmt: skip
        finally:
            self._released(release)
            self._free_slot()


# -- client ------------------------------------------------------------------------------


async def open_connection(
    host: str,
    port: int,
    secret: bytes,
    *,
    name: str | None = None,
    handshake_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    stall_timeout: float | None = None,
) -> Connection:
    """Connect over TCP and run the client handshake; returns an authenticated Connection.

    Raises:
        ConfigError: the secret is missing or too short (before connecting).
        AuthenticationError, ConnectionClosedError: see :func:`client_handshake`;
            also when the TCP connection cannot be made.
    """
    secret = _check_secret(secret)
    with _socket_errors(lambda exc: f"cannot connect to {host}:{port}: {exc}"):
        stream = await trio.open_tcp_stream(host, port)
    conn = Connection(stream, limits=limits, stall_timeout=stall_timeout)
    await client_handshake(conn, secret, name=name, timeout=handshake_timeout)
    return conn


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    secret: bytes,
    *,
    handler: Handler | None = None,
    inline: InlineHandler | None = None,
    name: str | None = None,
    handshake_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    stall_timeout: float | None = None,
    max_concurrent: int = 64,
    close_timeout: float = 5.0,
    spin: float = 0.0,
) -> AsyncIterator[Channel]:
    """``async with connect(host, port, secret) as channel:`` — a running client Channel.

    Connects, authenticates (:func:`open_connection`), and runs the
    channel's reader in a nursery that lives as long as the ``async with``
    block. On exit the channel is closed gracefully (:meth:`Channel.aclose`,
    bounded by ``close_timeout``). ``handler`` and ``inline`` answer
    requests the server sends on this connection, as in :class:`Channel`
    (neither: they get BAD_REQUEST); ``spin`` is the Channel's too.
    """
    conn = await open_connection(
        host, port, secret, name=name, handshake_timeout=handshake_timeout,
        limits=limits, stall_timeout=stall_timeout,
    )  # fmt: skip
    channel = Channel(
        conn, handler, inline=inline, max_concurrent=max_concurrent,
        close_timeout=close_timeout, spin=spin,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        try:
            yield channel
        finally:
            await channel.aclose()


# -- server ------------------------------------------------------------------------------


async def serve(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    secret: bytes,
    inline: InlineHandler | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    max_connections: int = 256,
    handshake_timeout: float = 10.0,
    idle_timeout: float | None = None,
    stall_timeout: float | None = 60.0,
    max_concurrent: int = 64,
    limits: Limits = DEFAULT_LIMITS,
    name: str | None = None,
    spin: float = 0.0,
) -> None:
    """Listen for dbnode connections and answer their requests with ``handler``.

    Binds ``host`` (loopback by default; None for every interface) and
    ``port`` (0: any free port), reports the bound ``(host, port)`` through
    ``task_status.started``, and serves until cancelled::

        host, port = await nursery.start(functools.partial(serve, handler, secret=key))

    Each connection is authenticated (:func:`server_handshake` within
    ``handshake_timeout``), then served by a :class:`Channel` with
    ``handler`` and ``inline`` (see there for how requests, errors and PING
    are answered, in the reader or in tasks, and ``max_concurrent``,
    ``idle_timeout`` and ``spin``). A connection over
    ``max_connections`` gets an ERROR UNAVAILABLE and is closed. A frame
    that breaks the protocol costs its sender the connection (ERROR with the
    code first), never the server or the other connections. A peer that
    stalls inside a frame for ``stall_timeout`` seconds gets TIMEOUT.

    Raises:
        ConfigError: bad secret or arguments, or the address cannot be bound.
    """
    secret = _check_secret(secret)
    if max_connections < 1:
        raise ConfigError("max_connections", max_connections, "must be at least 1")
    if not 0 <= spin <= 0.01:
        raise ConfigError("spin", spin, "must be in [0, 0.01] seconds")
    with _socket_errors(lambda exc: f"cannot listen on {host}:{port}: {exc}"):
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError("listen address", f"{host}:{port}", str(exc)) from None
    active = 0

    async def on_stream(stream: trio.SocketStream) -> None:
        nonlocal active
        conn = Connection(stream, limits=limits, stall_timeout=stall_timeout)
        if active >= max_connections:
            log.warning("refusing %s: at the limit of %d connections", conn.peer, max_connections)
            await conn.close_with_error(
                ErrorCode.UNAVAILABLE, f"node is at its limit of {max_connections} connections"
            )
            return
        active += 1
        try:
            await _serve_connection(conn)
        except Exception:  # a bug here must not take the other connections down
            log.exception("connection from %s failed", conn.peer)
        finally:
            active -= 1
            await conn.aclose()

    async def _serve_connection(conn: Connection) -> None:
        try:
            await server_handshake(conn, secret, name=name, timeout=handshake_timeout)
        except ConnectionClosedError as exc:
            log.info("handshake with %s failed: %s", conn.peer, exc)
            return
        channel = Channel(
            conn, handler, inline=inline, max_concurrent=max_concurrent,
            idle_timeout=idle_timeout, spin=spin,
        )  # fmt: skip
        await channel.run()

    if port == 0 and len(listeners) > 1:
        # Each listener got its own random port, but we can report only one
        # address: keep the first (e.g. IPv4 of "localhost").
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))
    await trio.serve_listeners(on_stream, listeners)
