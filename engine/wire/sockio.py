"""Byte pipes over trio streams: the one module that touches sockets.

Everything above it (:mod:`dbnode.wire.connection` and up) moves bytes
through a *wire*: :class:`SocketWire` on a TCP socket (``sendmsg`` of
several buffers, ``recv_into`` straight into arrays: zero copy) or
:class:`StreamWire` on any other trio stream (TLS, the in-memory streams of
``trio.testing``: one copy per received chunk). Socket errors become
:class:`~dbnode.errors.ConnectionClosedError` here, in :class:`socket_errors`,
and nowhere else.

The fast path uses the non-blocking stdlib socket inside trio's socket
(``trio.socket.SocketType._sock``, a private attribute). If a trio release
drops it, every call goes through trio's public socket methods instead (two
scheduler trips each, several times slower on small frames) and a warning
says so once per process; :data:`SocketWire.fast` tells which path runs
(tests/test_architecture.py checks it is the fast one with the pinned trio).
"""

from __future__ import annotations

import socket as _stdlib_socket
import warnings
from collections.abc import Callable
from typing import Any

import trio

from ..errors import ConfigError, ConnectionClosedError

__all__ = ["SocketWire", "StreamWire", "connect_tcp", "listen_tcp", "make_wire", "socket_errors"]

_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class socket_errors:  # noqa: N801 - used like a context manager function
    """Turn socket and trio stream errors into ConnectionClosedError.

    Every I/O call on a connection, and the connect call, runs inside this:
    callers of the transport see one error type for a lost or closed
    connection, never OSError or trio's Closed/BrokenResourceError.
    (A class, not a @contextmanager: it wraps every frame on the hot path,
    where a generator-based context manager costs a microsecond.)

    Args:
        describe: ``describe(exc) -> str``, the message of the
            ConnectionClosedError that replaces ``exc``.
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


class SocketWire:
    """Raw I/O on a TCP socket: ``sendmsg`` of several buffers, ``recv_into``.

    Its methods raise what the socket raises (OSError, trio's
    Closed/BrokenResourceError); callers wrap them in :class:`socket_errors`.

    Args:
        stream: the connected TCP stream; the wire owns it.
    """

    # A cancelled sendmsg/recv_into has moved no bytes, so a cancellation
    # between frames leaves the byte stream intact.
    clean_cancel = True

    @property
    def fast(self) -> bool:
        """Whether the zero-copy, scheduler-free fast path is in use."""
        return self._raw is not None

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._sock = stream.socket
        # The non-blocking stdlib socket inside trio's. Without it (a trio
        # that no longer has one) every call goes through trio's methods.
        raw = getattr(self._sock, "_sock", None)
        self._raw = raw if isinstance(raw, _stdlib_socket.socket) else None
        if self._raw is None:
            _warn_slow_path()
        # SocketStream already sets it; say it here too because small control
        # frames (PULL, PING, replies without tensor) must not wait for Nagle.
        if self._sock.family in (_stdlib_socket.AF_INET, _stdlib_socket.AF_INET6):
            self._sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
        self._has_sendmsg = hasattr(self._sock, "sendmsg")  # not on Windows

    def send_now(self, views: list[Any]) -> int:
        """Send what the socket takes right now; 0 if it takes nothing.

        Args:
            views: the buffers to send, in order.

        Returns:
            Bytes sent.
        """
        raw = self._raw
        if raw is None:
            return 0
        try:
            return raw.sendmsg(views) if self._has_sendmsg else raw.send(views[0])
        except BlockingIOError:
            return 0

    async def send_wait(self, views: list[memoryview]) -> int:
        """Wait until the socket takes something, send it; bytes sent (> 0).

        Args:
            views: the buffers to send, in order.

        Returns:
            Bytes sent.
        """
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
        """Receive what is there now; None if nothing is, 0 at end of stream.

        Args:
            view: where to receive.

        Returns:
            Bytes received, 0 at the end of the stream, or None.
        """
        raw = self._raw
        if raw is None:
            return None
        try:
            return raw.recv_into(view)
        except BlockingIOError:
            return None

    async def recv_wait(self, view: memoryview) -> int:
        """Wait for data (or the end of the stream), then receive it.

        Args:
            view: where to receive.

        Returns:
            Bytes received; 0 at the end of the stream.
        """
        if self._raw is None:
            return await self._sock.recv_into(view)
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            n = self.recv_now(view)
            if n is not None:
                return n

    async def wait_readable(self) -> None:
        """Wait until there is data (or the end of the stream) to receive."""
        await trio.lowlevel.wait_readable(self._sock)

    def set_lowat(self, n: int) -> int:
        """Set SO_RCVLOWAT (readable only with ``n`` bytes there, or at EOF); the value now.

        Args:
            n: the low-water mark, in bytes.

        Returns:
            The mark in effect: ``n``, or 1 where it cannot be set.
        """
        try:
            self._sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_RCVLOWAT, n)
        except (OSError, AttributeError):  # not everywhere: then every byte wakes us
            return 1
        return n

    async def send_eof(self) -> None:
        """Shut down the sending direction (once)."""
        await trio.lowlevel.checkpoint()
        if not self._sock.did_shutdown_SHUT_WR:
            self._sock.shutdown(_stdlib_socket.SHUT_WR)

    def abort(self) -> None:
        """Close the socket at once; tasks waiting on it wake with an error."""
        # Synchronous: closing wakes any task waiting on the socket with
        # ClosedResourceError, and no later recv_into can write anything.
        self._sock.close()

    async def aclose(self) -> None:
        """Close the stream."""
        await self._stream.aclose()

    def peer(self) -> str:
        """The peer's address for messages: ``host:port``, or ``?`` if unknown."""
        try:
            address = self._sock.getpeername()
        except OSError:
            return "?"
        if isinstance(address, tuple) and len(address) >= 2:  # IPv4 / IPv6
            return f"{address[0]}:{address[1]}"
        return repr(address) if address else "socketpair"


class StreamWire:
    """Raw I/O on any trio Stream (TLS, in-memory test streams): one copy in.

    The same methods as :class:`SocketWire`; none sends or receives without
    waiting except :meth:`recv_now` on data already read ahead.

    Args:
        stream: the stream; the wire owns it.
    """

    # A generic stream promises nothing about a cancelled send_all.
    clean_cancel = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._ahead = memoryview(b"")  # received by wait_readable, not consumed
        self._eof = False
        self._aborted = False

    def send_now(self, views: list[Any]) -> int:
        """Nothing: a generic stream has no synchronous send.

        Args:
            views: the buffers to send (ignored).

        Returns:
            0.
        """
        return 0  # a generic stream has no synchronous send

    async def send_wait(self, views: list[memoryview]) -> int:
        """Send the first buffer whole.

        Args:
            views: the buffers to send, in order.

        Returns:
            Bytes sent: the first buffer's length.
        """
        await self._stream.send_all(views[0])
        return len(views[0])

    async def _receive(self, max_bytes: int | None) -> None:
        data = await self._stream.receive_some(max_bytes)
        if self._aborted:  # closed while we waited: nothing may land anywhere
            raise trio.ClosedResourceError
        self._ahead = memoryview(data)
        self._eof = not data

    def recv_now(self, view: memoryview) -> int | None:
        """Receive from what was read ahead; None if nothing was, 0 at end of stream.

        Args:
            view: where to receive.

        Returns:
            Bytes received, 0 at the end of the stream, or None.

        Raises:
            trio.ClosedResourceError: the wire was aborted.
        """
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
        """Wait for data (or the end of the stream), then receive it.

        Args:
            view: where to receive.

        Returns:
            Bytes received; 0 at the end of the stream.
        """
        if not self._ahead and not self._eof:
            await self._receive(len(view))
        n = self.recv_now(view)
        assert n is not None
        return n

    async def wait_readable(self) -> None:
        """Wait until there is data (or the end of the stream), reading it ahead."""
        if not self._ahead and not self._eof:
            await self._receive(None)

    def set_lowat(self, n: int) -> int:
        """Nothing: a generic stream has no low-water mark.

        Args:
            n: the mark asked for (ignored).

        Returns:
            1.
        """
        return 1  # a generic stream has no low-water mark

    async def send_eof(self) -> None:
        """Close the sending direction, if the stream can."""
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    def abort(self) -> None:
        """Refuse all further data at once; :meth:`aclose` closes the stream."""
        # A generic stream cannot be closed synchronously; refuse further
        # data at once and close it for real in aclose().
        self._aborted = True

    async def aclose(self) -> None:
        """Close the stream (forcefully)."""
        await trio.aclose_forcefully(self._stream)

    def peer(self) -> str:
        """The stream's type name (a generic stream has no address)."""
        return type(self._stream).__name__


def make_wire(stream: trio.abc.Stream) -> SocketWire | StreamWire:
    """The wire for ``stream``: zero copy on a TCP socket, one copy otherwise.

    Args:
        stream: a connected trio stream.

    Returns:
        A :class:`SocketWire` or a :class:`StreamWire` that owns it.
    """
    return SocketWire(stream) if isinstance(stream, trio.SocketStream) else StreamWire(stream)


_warned = False


def _warn_slow_path() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"dbnode: trio {trio.__version__} has no stdlib socket inside its sockets; "
            "the transport falls back to trio's socket methods (slower on small frames)",
            RuntimeWarning,
            stacklevel=3,
        )


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host:port``.

    Args:
        host: a host name or address.
        port: the port.

    Returns:
        The connected stream.

    Raises:
        ConnectionClosedError: it cannot be made (the message names the address).
    """
    with socket_errors(lambda exc: f"cannot connect to {host}:{port}: {exc}"):
        return await trio.open_tcp_stream(host, port)


async def listen_tcp(
    host: str | None, port: int
) -> tuple[list[trio.SocketListener], tuple[str, int]]:
    """Listeners bound to ``host:port`` (None: every interface; port 0: any), and
    the address they report.

    With port 0 each of several listeners (IPv4 and IPv6 of "localhost") would
    get its own random port, and only one address can be reported: the first
    is kept.

    Args:
        host: the address to bind; None: every interface.
        port: the port; 0: any free one.

    Returns:
        ``(listeners, (host, port))``.

    Raises:
        ConfigError: the address cannot be bound.
    """
    with socket_errors(lambda exc: f"cannot listen on {host}:{port}: {exc}"):
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError("listen address", f"{host}:{port}", str(exc)) from None
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    sockname = listeners[0].socket.getsockname()
    return listeners, (sockname[0], sockname[1])
