"""The trio transport: framed, authenticated connections that carry ndarrays.

This is the only module in dbnode that drives trio streams and sockets. It
builds on the sans-IO codec in :mod:`dbnode.protocol` and adds, bottom up:

* :class:`Connection` — one framed connection over a trio stream.
  :meth:`~Connection.send_frame` sends header+meta and the array's own memory
  in one scatter-gather ``sendmsg`` (no copy); :meth:`~Connection.receive_frame`
  decodes the header first and then ``recv_into``\\ s the payload straight into
  its destination array (a fresh one, or one the caller supplies).
* :func:`client_handshake` / :func:`server_handshake` — the mutual HMAC
  handshake of docs/protocol.md section 10.
* :class:`Channel` — request/reply multiplexing over an authenticated
  connection: request ids, a reader task that routes answers to waiting
  requests, timeouts, incoming requests handed to a handler, PING answered
  with PONG, the CLOSE exchange.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
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
    payload_view,
)

__all__ = [
    "Connection",
    "Channel",
    "Reply",
    "Handler",
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


@contextmanager
def _socket_errors(describe: Callable[[BaseException], str]) -> Iterator[None]:
    """Turn socket and trio stream errors into ConnectionClosedError.

    Every I/O call on a connection, and the connect call, runs inside this:
    callers of the transport see one error type for a lost or closed
    connection, never OSError or trio's Closed/BrokenResourceError.
    """
    try:
        yield
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectionClosedError(describe(exc)) from exc


# -- byte pipes: socket (zero copy) or any trio stream -----------------------------


class _SocketWire:
    """Raw I/O on a TCP socket: ``sendmsg`` of several buffers, ``recv_into``."""

    # A cancelled sendmsg/recv_into has moved no bytes, so a cancellation
    # between frames leaves the byte stream intact.
    clean_cancel = True

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._sock = stream.socket
        # SocketStream already sets it; say it here too because small control
        # frames (PULL, PING, replies without tensor) must not wait for Nagle.
        if self._sock.family in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
            self._sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        self._has_sendmsg = hasattr(self._sock, "sendmsg")  # not on Windows

    async def send_some(self, views: list[memoryview]) -> int:
        if self._has_sendmsg:
            return await self._sock.sendmsg(views)
        return await self._sock.send(views[0])

    async def recv_into(self, view: memoryview) -> int:
        return await self._sock.recv_into(view)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

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

    async def send_some(self, views: list[memoryview]) -> int:
        await self._stream.send_all(views[0])
        return len(views[0])

    async def _receive(self, max_bytes: int | None) -> None:
        data = await self._stream.receive_some(max_bytes)
        if self._aborted:  # closed while we waited: nothing may land anywhere
            raise trio.ClosedResourceError
        self._ahead = memoryview(data)
        self._eof = not data

    async def recv_into(self, view: memoryview) -> int:
        if not self._ahead and not self._eof:
            await self._receive(len(view))
        n = min(len(view), len(self._ahead))
        # The one copy of this path: a generic stream returns new bytes objects.
        view[:n] = self._ahead[:n]
        self._ahead = self._ahead[n:]
        return n

    async def wait_readable(self) -> None:
        if not self._ahead and not self._eof:
            await self._receive(None)

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


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of byte views (slicing, no copy)."""
    while n:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0
    return views


class Connection:
    """One framed dbnode connection over a trio stream.

    Wrap a connected stream; a :class:`trio.SocketStream` gets the zero-copy
    path (``sendmsg``/``recv_into``), any other :class:`trio.abc.Stream`
    works with one copy per received chunk. Until the handshake marks the
    connection authenticated, received frames are held to HANDSHAKE_LIMITS
    (no tensor, 1 KiB of meta); afterwards to ``limits``, and handshake
    kinds are rejected as UNEXPECTED.

    Sending is safe from several tasks at once: a lock keeps frames whole.
    Receiving is for one task at a time (a :class:`Channel`'s reader).

    A send cut short (cancelled or failed) after part of its frame went out
    poisons the connection: the peer's framing is lost, so it is closed and
    every later call raises :class:`ConnectionClosedError`. A receive that
    fails or is cancelled inside a frame poisons the receiving direction
    only, so that an ERROR can still tell the peer why before closing. A
    cancellation that moved no byte leaves the connection usable.

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
        self._send_lock = trio.Lock()  # trio.Lock is fair: senders go in FIFO order
        self._receiving = False
        self._header_buf = bytearray(HEADER_SIZE)  # reused: one receiver at a time
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

    def _io(self) -> Any:
        return _socket_errors(self._describe)

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

    async def aclose(self) -> None:
        """Close the connection (no CLOSE frame: see :meth:`Channel.aclose`)."""
        if self._closed is None:
            self._closed = ConnectionClosedError("connection closed")
        with trio.CancelScope(shield=True), self._io():
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

        All parts go out together under the send lock, so frames of
        concurrent senders never interleave.
        """
        # Byte views: a memoryview of a multi-byte format would count items,
        # not bytes, when slicing after a partial send.
        views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
        async with self._send_lock:
            self._check_open()
            sent = 0
            try:
                with self._io():
                    while views:
                        n = await self._wire.send_some(views)
                        sent += n
                        views = _advance(views, n)
            except BaseException:
                if sent or not self._wire.clean_cancel:
                    # Part of a frame is on the wire: the peer's framing is lost.
                    self.abort("a send was interrupted inside a frame; connection poisoned")
                raise

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
                    with self._io():
                        await self._wire.send_eof()
                    await self._linger()
            except ConnectionClosedError:
                pass
            if self._closed is None:
                self._closed = ConnectionClosedError(f"closed after error: {text}", code)
            await self.aclose()

    async def _linger(self) -> None:
        scratch = memoryview(bytearray(64 << 10))
        with trio.move_on_after(_LINGER_MAX), self._io():
            while True:
                with trio.move_on_after(_LINGER_QUIET) as quiet:
                    n = await self._wire.recv_into(scratch)
                if quiet.cancelled_caught or n == 0:
                    return

    # -- receiving ---------------------------------------------------------------

    async def wait_readable(self) -> None:
        """Wait until data (or the end of the stream) is there to receive."""
        self._check_open(receiving=True)
        with self._io():
            await self._wire.wait_readable()

    async def receive_frame(
        self, into: Callable[[Header], np.ndarray | None] | None = None
    ) -> Frame:
        """Receive one whole frame.

        The header is validated (docs/protocol.md section 3.1) before
        anything is allocated; then the meta is read and parsed; then the
        payload is received with ``recv_into`` straight into its array.
        That array is ``into(header)`` when ``into`` is given and returns
        one (it must be a writable C-contiguous array of exactly
        ``header.dtype`` and ``header.shape``: a pooled buffer, or the
        caller's own parameter buffer), else ``header.allocate()``.

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
        started = False  # has any byte of this frame been consumed?
        try:
            header_view = memoryview(self._header_buf)
            # Wait for the first byte without a stall limit: between frames a
            # peer may be silent as long as it likes.
            started = await self._recv_some(header_view, "header", 0)
            await self._recv_exactly(header_view, "header", started)
            header = decode_header(self._header_buf, self._receive_limits())
            if self.authenticated and header.kind in _HANDSHAKE_KINDS:
                raise RemoteProtocolError(
                    ErrorCode.UNEXPECTED, "kind", header.kind.name, "handshake is over"
                )
            meta_buf = bytearray(header.meta_length)
            await self._recv_exactly(memoryview(meta_buf), "meta", 0)
            meta = parse_meta(meta_buf, header.kind)
            array = self._destination(header, into)
            if array is not None and array.nbytes:
                await self._recv_exactly(payload_view(array), "payload", 0)
            return Frame.from_header(header, meta, array)
        except BaseException as exc:
            if started and self._recv_broken is None:
                # Mid-frame: whatever happened, the framing is lost.
                self._recv_broken = ConnectionClosedError(
                    f"an earlier receive failed inside a frame ({type(exc).__name__}): "
                    "connection poisoned", getattr(exc, "code", None),
                )  # fmt: skip
            raise
        finally:
            self._receiving = False

    def _receive_limits(self) -> Limits:
        # An unauthenticated peer gets no tensor and little meta: it cannot
        # make us allocate.
        return self.limits if self.authenticated else HANDSHAKE_LIMITS

    @staticmethod
    def _destination(
        header: Header, into: Callable[[Header], np.ndarray | None] | None
    ) -> np.ndarray | None:
        if header.dtype is None:
            return None
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

    async def _recv_some(self, view: memoryview, part: str, filled: int) -> int:
        """One receive into ``view[filled:]``; 0 bytes means EOF before the frame."""
        with self._io():
            n = await self._wire.recv_into(view[filled:])
        if n == 0 and filled == 0 and part == "header":
            raise ConnectionClosedError(f"{self.peer} closed the connection")
        return n

    async def _recv_exactly(self, view: memoryview, part: str, filled: int) -> None:
        """Fill ``view`` from ``filled`` on; the frame has started, so stalls count."""
        while filled < len(view):
            with trio.move_on_after(self.stall_timeout) as stall:
                with self._io():
                    n = await self._wire.recv_into(view[filled:])
            if stall.cancelled_caught:
                raise RemoteProtocolError(
                    ErrorCode.TIMEOUT, part, f"{filled} of {len(view)} bytes",
                    f"no data for {self.stall_timeout} s inside a frame",
                )  # fmt: skip
            if n == 0:
                raise RemoteProtocolError(
                    ErrorCode.TRUNCATED, part, f"{filled} of {len(view)} bytes",
                    "the stream ended inside a frame",
                )  # fmt: skip
            filled += n


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


Handler = Callable[[Frame], Awaitable["Reply | None"]]


class _Pending:
    """One request of ours waiting for its answer."""

    __slots__ = ("kind", "into", "done", "frame", "error", "receiving")

    def __init__(self, kind: MessageKind, into: np.ndarray | None) -> None:
        self.kind = kind
        self.into = into
        self.done = trio.Event()
        self.frame: Frame | None = None
        self.error: Exception | None = None
        self.receiving = False  # the reader is receiving its answer's payload


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
    may be in flight at once from any tasks; and it hands incoming requests
    to ``handler``, each in its own task, up to ``max_concurrent`` at once
    (then it stops reading: TCP pushes back on the peer). Requests on one
    channel are therefore handled concurrently and answered in completion
    order; PING is answered with PONG by the transport itself. With
    ``max_concurrent=1`` they are handled one at a time, in order. (While
    the reader waits for a free slot it reads nothing, answers to our own
    requests included: a handler must not wait for an answer on its own
    channel when all slots may be taken.)

    ``handler(frame) -> Reply | None`` gets the request frame (its
    ``array`` freshly allocated, or from ``allocate(header)``). Returning
    None answers an empty REPLY; raising :class:`RequestError` (or a
    ProtocolError) with a code of 32 or more answers an ERROR of that code,
    any other exception an INTERNAL ERROR; the channel carries on either
    way. Requests with ``request_id`` 0 get no REPLY, only an ERROR with
    ``request_id`` 0 if they fail. Without a handler, requests are answered
    BAD_REQUEST.

    A frame that breaks the protocol gets an ERROR with its code, then the
    connection is closed. When the connection ends for any reason, every
    request still waiting fails with :class:`ConnectionClosedError` and
    :meth:`run` returns; handler tasks still running finish first (their
    answers go nowhere, but nothing they do is cut short).

    Args:
        conn: an authenticated connection; the channel owns it.
        handler: answers the peer's requests, or None.
        max_concurrent: requests handled at once.
        idle_timeout: close the channel (CLOSE exchange) after this many
            seconds without traffic while nothing is in flight; None: never.
        close_timeout: how long :meth:`aclose` waits for the peer's CLOSE.
        allocate: ``allocate(header) -> ndarray | None`` supplies the array a
            request's payload is received into (e.g. from a pool); None or
            a None result allocate a fresh one.
    """

    def __init__(
        self,
        conn: Connection,
        handler: Handler | None = None,
        *,
        max_concurrent: int = 64,
        idle_timeout: float | None = None,
        close_timeout: float = 5.0,
        allocate: Callable[[Header], np.ndarray | None] | None = None,
    ) -> None:
        if not conn.authenticated:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED, "conn", "unauthenticated", "run the handshake first"
            )
        if max_concurrent < 1:
            raise ConfigError("max_concurrent", max_concurrent, "must be at least 1")
        self.conn = conn
        self._handler = handler
        self._allocate = allocate
        self._slots = trio.Semaphore(max_concurrent)
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._active = 0  # incoming requests being handled
        self._last_activity = trio.current_time()  # idle time counts from here
        self._quiet_waiter: trio.Event | None = None
        self._running = False
        self._sent_close = False  # we sent CLOSE: no more requests from us
        self._got_close = False  # the peer sent CLOSE: no more requests from it
        self._ended: ConnectionClosedError | None = None  # why the channel is over
        self._finished = trio.Event()
        self._reader_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None

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
        kind = self._request_kind(kind)
        if into is not None:
            self._check_into(into)
        parts = encode_frame(
            kind, request_id=(rid := next(self._ids)), key=key, seq=seq, array=array,
            meta=meta, flags=flags, limits=self.conn.limits,
        )  # fmt: skip
        self._check_can_request()
        pending = self._pending[rid] = _Pending(kind, into)
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await self.conn.send_parts(parts)
                await pending.done.wait()
        finally:
            del self._pending[rid]
            self._poke()
            if not pending.done.is_set() and pending.receiving and into is not None:
                # The reader is writing our answer into the caller's buffer and
                # cannot be stopped mid-frame; only closing stops it for sure.
                self._abort("a request was abandoned while its answer was landing in into=")
        if not pending.done.is_set():
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

        Returns once it is sent. If it fails, the peer may say so with an
        ERROR of ``request_id`` 0, which is logged here.
        """
        kind = self._request_kind(kind)
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
                task_status.started()
                ended = await self._read_until_end()
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

    def _end(self, reason: ConnectionClosedError) -> None:
        """No more requests; fail every waiting one with ``reason``."""
        if self._ended is None:
            self._ended = reason
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = ConnectionClosedError(str(self._ended), self._ended.code)
                pending.done.set()

    def _abort(self, reason: str) -> None:
        self._end(ConnectionClosedError(reason))
        self.conn.abort(reason)
        self._reader_scope.cancel()

    def _busy(self) -> bool:
        return bool(self._pending) or self._active > 0

    def _poke(self) -> None:
        """Something in flight finished: idle time restarts, quiet waiters wake."""
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
        while True:
            if self._idle_timeout is not None and not (self._sent_close or self._got_close):
                # Idle = no frame in and nothing in flight, since the later of
                # the last frame and the end of the last request either way.
                with trio.move_on_at(self._last_activity + self._idle_timeout) as idle:
                    await self.conn.wait_readable()
                if idle.cancelled_caught:
                    if not self._busy() and (
                        trio.current_time() >= self._last_activity + self._idle_timeout
                    ):
                        log.debug("closing idle connection to %s", self.conn.peer)
                        await self._send_close()
                    elif self._busy():
                        self._last_activity = trio.current_time()
                    continue
            frame = await self.conn.receive_frame(into=self._destination)
            self._last_activity = trio.current_time()
            if frame.kind == MessageKind.CLOSE:
                if self._sent_close:
                    return  # the exchange is complete
                self._got_close = True
                assert self._nursery is not None
                self._nursery.start_soon(self._close_when_quiet)
            elif frame.kind in _ANSWER_KINDS:
                self._on_answer(frame)
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
        pending.done.set()

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
        # Backpressure: with max_concurrent requests in progress, stop reading.
        await self._slots.acquire()
        self._active += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._handle, frame)

    async def _handle(self, frame: Frame) -> None:
        """Answer one incoming request; never raises (but lets Cancelled through)."""
        release: Callable[[], None] | None = None
        try:
            try:
                kind, reply = await self._call_handler(frame)
                release = reply.release
                if not frame.request_id:
                    return  # fire-and-forget: nobody waits for an answer
                parts = encode_frame(
                    kind, request_id=frame.request_id,
                    key=frame.key if reply.key is None else reply.key, seq=reply.seq,
                    array=reply.array, meta=reply.meta, flags=reply.flags,
                    limits=self.conn.limits,
                )  # fmt: skip
            except Exception as exc:
                parts = error_frame(*_error_reply(exc), frame.request_id)
            await self.conn.send_parts(parts)
        except ConnectionClosedError:
            log.debug("answer to %s request %d not sent: connection closed", frame.kind.name,
                      frame.request_id)  # fmt: skip
        finally:
            if release is not None:
                try:
                    release()
                except Exception:
                    log.exception("Reply.release failed")
            self._active -= 1
            self._slots.release()
            self._poke()

    async def _call_handler(self, frame: Frame) -> tuple[MessageKind, Reply]:
        if frame.kind == MessageKind.PING:
            return MessageKind.PONG, Reply(seq=frame.seq)
        if self._handler is None:
            raise RequestError(ErrorCode.BAD_REQUEST, "this peer serves no requests")
        reply = await self._handler(frame)
        if reply is None:
            reply = Reply()
        elif not isinstance(reply, Reply):
            raise TypeError(f"a handler must return a Reply or None, not {type(reply).__name__}")
        return MessageKind.REPLY, reply


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
    name: str | None = None,
    handshake_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    stall_timeout: float | None = None,
    max_concurrent: int = 64,
    close_timeout: float = 5.0,
) -> AsyncIterator[Channel]:
    """``async with connect(host, port, secret) as channel:`` — a running client Channel.

    Connects, authenticates (:func:`open_connection`), and runs the
    channel's reader in a nursery that lives as long as the ``async with``
    block. On exit the channel is closed gracefully (:meth:`Channel.aclose`,
    bounded by ``close_timeout``). ``handler`` answers requests the server
    sends on this connection (None: they get BAD_REQUEST).
    """
    conn = await open_connection(
        host, port, secret, name=name, handshake_timeout=handshake_timeout,
        limits=limits, stall_timeout=stall_timeout,
    )  # fmt: skip
    channel = Channel(conn, handler, max_concurrent=max_concurrent, close_timeout=close_timeout)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        try:
            yield channel
        finally:
            await channel.aclose()


# -- server ------------------------------------------------------------------------------


async def serve(
    handler: Handler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    secret: bytes,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    max_connections: int = 256,
    handshake_timeout: float = 10.0,
    idle_timeout: float | None = None,
    stall_timeout: float | None = 60.0,
    max_concurrent: int = 64,
    limits: Limits = DEFAULT_LIMITS,
    name: str | None = None,
) -> None:
    """Listen for dbnode connections and answer their requests with ``handler``.

    Binds ``host`` (loopback by default; None for every interface) and
    ``port`` (0: any free port), reports the bound ``(host, port)`` through
    ``task_status.started``, and serves until cancelled::

        host, port = await nursery.start(functools.partial(serve, handler, secret=key))

    Each connection is authenticated (:func:`server_handshake` within
    ``handshake_timeout``), then served by a :class:`Channel` with
    ``handler`` (see there for how requests, errors and PING are answered,
    and ``max_concurrent``/``idle_timeout``). A connection over
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
            conn, handler, max_concurrent=max_concurrent, idle_timeout=idle_timeout
        )
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
