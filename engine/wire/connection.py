"""One framed dbnode connection over a trio stream (see :class:`Connection`).

Built on a wire of :mod:`dbnode.wire.sockio` (the only code that touches the
socket) and the sans-IO frame codec of :mod:`dbnode.wire.frames`; the
session rules it enforces on receive come from :mod:`dbnode.wire.session`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from ..errors import ConnectionClosedError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import (
    DEFAULT_LIMITS,
    FLAG_SHM,
    HANDSHAKE_LIMITS,
    HEADER_SIZE,
    MAGIC,
    TRANSPORT_FLAGS,
    ErrorCode,
    Frame,
    Header,
    Limits,
    MessageKind,
    check_magic,
    decode_header,
    encode_frame,
    error_frame,
    parse_meta,
)
from .session import HANDSHAKE_ERROR_TEXT, check_received
from .shm import SharedRings
from .sockio import make_wire, socket_errors

__all__ = ["Connection"]

# After a fatal error we tell the peer why, but never wait on it for long.
_ERROR_SEND_TIMEOUT = 1.0
# Lingering close: read (and drop) what the peer already sent before closing,
# so that the kernel does not answer unread data with a RST that could destroy
# the ERROR frame we just sent. Stop when the peer is quiet or after the cap.
_LINGER_QUIET = 0.1
_LINGER_MAX = 1.0

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


class Outgoing:
    """A frame waiting to go out, or going out, while another task sends.

    Frames leave in the order they were queued. The task whose frame is at
    the front of the queue is the *sender*: it sends the front frames,
    several per ``sendmsg`` (combining), wakes the tasks whose frames went
    out whole, and when its own frame is gone hands the sending over to the
    task of the next frame (see :meth:`Connection.finish_send`).
    """

    __slots__ = ("views", "left", "sent", "task", "done", "error", "sender", "shared")

    def __init__(self, views: list[memoryview], left: int, sent: int, shared: bool) -> None:
        self.views = views  # byte views not sent yet
        self.left = left  # bytes not sent yet
        self.sent = sent  # bytes already sent: > 0 means the frame is half out
        # Its payload is in the shared ring already: it must go out even if
        # its task gives up, or the peer's ring positions fall behind ours.
        self.shared = shared
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
        self._wire = make_wire(stream)
        self.limits = limits
        self.stall_timeout = math.inf if stall_timeout is None else stall_timeout
        self.authenticated = False
        self.peer_name = ""  # the peer's "name" from the handshake, for logs
        self.peer = self._wire.peer()
        # Shared rings with a peer on this host, set up by the handshake.
        self.rings: SharedRings | None = None
        # Frames that wait for another task's send to finish, in order; the
        # front one's task is sending (see Outgoing).
        self._queue: deque[Outgoing] = deque()
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
        self.spin_if: Callable[[], bool] | None = None
        self._io = socket_errors(self._describe)
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

        Args:
            reason: the message of the errors it causes.
            code: their ``.code``, or None.
        """
        if self._closed is None:
            self._closed = ConnectionClosedError(reason, code)
        self._wire.abort()
        self._fail_queue()
        self._drop_rings()

    async def aclose(self) -> None:
        """Close the connection (no CLOSE frame: see :meth:`Channel.aclose`)."""
        if self._closed is None:
            self._closed = ConnectionClosedError("connection closed")
        with trio.CancelScope(shield=True), self._io:
            await self._wire.aclose()
        self._drop_rings()

    def _drop_rings(self) -> None:
        if self.rings is not None:
            self.rings.close()
            self.rings = None

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

        Args:
            kind, request_id, key, seq, array, meta, flags: the frame, as
                :func:`~dbnode.wire.frames.encode_frame` takes them.

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

        Args:
            parts: the frame's buffers, in order.

        Raises:
            ConnectionClosedError: the connection is closed or was lost.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        unsent = self.start_send(parts)
        if unsent is not None:
            await self.finish_send(unsent)
        else:
            # Fairness: a task whose calls keep completing without waiting
            # never passes through the scheduler; now and then it must.
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.cancel_shielded_checkpoint()

    def start_send(self, parts: list[Any]) -> Outgoing | None:
        """Send the frame now if nothing is queued and the socket takes it all.

        Synchronous.

        Args:
            parts: the frame's buffers, in order.

        Returns:
            None when the whole frame went out; else the queued frame, which
            :meth:`finish_send` must then be awaited on (by the caller or a
            task it starts), or nothing more goes out.

        Raises:
            ConnectionClosedError: the connection is closed or was lost.
        """
        self._check_open()
        shared = False
        if self.rings is not None and len(parts) == 2:  # [header + meta, payload]
            flags = self.rings.put(memoryview(parts[1]).cast("B"))
            if flags is not None:
                head = bytearray(parts[0])
                head[9] |= flags >> 8  # the header's u16 flags, little-endian
                parts, shared = [head], True
        if self._queue:  # another task is sending: queue up behind it
            views = _byte_views(parts)
            item = Outgoing(views, sum(len(v) for v in views), 0, shared)
            self._queue.append(item)
            return item
        try:
            with self._io:
                sent = self._wire.send_now(parts)  # a failed sendmsg moved no byte
        except BaseException:
            if shared:  # the peer will never hear of the payload in the ring
                self.abort("a send failed after its payload went to the shared ring")
            raise
        total = 0
        for p in parts:
            total += len(p) if type(p) is bytes else memoryview(p).nbytes
        if sent == total:
            return None
        item = Outgoing(_advance(_byte_views(parts), sent), total - sent, sent, shared)
        item.sender = True
        self._queue.append(item)
        return item

    async def finish_send(self, item: Outgoing) -> None:
        """Wait until a frame queued by :meth:`start_send` is out.

        Cancelled before any byte of the frame went out, the frame is
        dropped and the connection stays usable; after, the connection is
        poisoned (the frame cannot be finished, so the peer's framing is
        lost) and closed.

        Args:
            item: what :meth:`start_send` returned.

        Raises:
            ConnectionClosedError: the connection failed first.
        """
        if not item.sender:
            if item.error is None and not item.done:  # (sent already by the sender)
                item.task = trio.lowlevel.current_task()

                def abort(_: Any) -> trio.lowlevel.Abort:
                    item.task = None
                    if item.sent:  # half out, sent by another task: cannot stop it
                        self.abort("a send was interrupted inside a frame; connection poisoned")
                    elif item.shared:
                        pass  # stays queued: the sender sends it without us (see _pump)
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

    async def _pump(self, own: Outgoing) -> None:
        """Send the queue's front frames until ``own`` is out, then hand over."""
        queue = self._queue
        try:
            with self._io:
                # Our frame, then those at the front that no task waits on:
                # abandoned ones whose payloads are in the shared ring must
                # still go out (and sending one whose task has yet to wait
                # for it only saves that task the trouble).
                while not own.done or (queue and queue[0].task is None):
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
            if (
                (front is not None and (front.sent or front.shared))
                or not self._wire.clean_cancel
                or (not isinstance(exc, trio.Cancelled))
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

        (If that task has not called finish_send yet, it will find itself
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
        """Send an ERROR frame (``{"code", "message"}``; text cut to MAX_ERROR_TEXT).

        Args:
            code: the error code.
            text: what went wrong.
            request_id: the failed request's; 0 for the connection.

        Raises:
            ConnectionClosedError: the connection is closed or was lost.
        """
        await self.send_parts(error_frame(code, text, request_id))

    async def close_with_error(self, code: ErrorCode | int, text: str) -> None:
        """Tell the peer why (ERROR, ``request_id`` 0), then close.

        Best effort and bounded in time: the peer may be gone or not reading.
        What the peer already sent is read and dropped first (briefly), so
        that closing with unread data does not reset the connection and
        destroy the ERROR frame on its way out.

        Args:
            code: the error code.
            text: why; cut to fit the peer's limits.
        """
        if not self.authenticated:
            # The peer still applies the handshake limits (1 KiB of meta):
            # keep the ERROR well under them, or it would be rejected too.
            text = text[:HANDSHAKE_ERROR_TEXT]
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

    def poll(self) -> bool:
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

    def buffered(self) -> bool:
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

        Args:
            into: ``into(header) -> ndarray | None``, or None.

        Returns:
            The frame.

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
                check_received(header.kind, self.authenticated)
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
                flags = header.flags
                if flags & TRANSPORT_FLAGS:
                    if self.rings is None or not n or not flags & FLAG_SHM:
                        raise RemoteProtocolError(
                            ErrorCode.BAD_HEADER,
                            "flags",
                            flags,
                            "no shared payload on this connection",
                        )
                    self.rings.take(memoryview(array).cast("B"), flags)
                    flags &= ~TRANSPORT_FLAGS
                elif n:
                    dest = memoryview(array).cast("B")
                    pos = self._rpos
                    if self._rend - pos >= n:
                        dest[:] = rview[pos : pos + n]  # a small payload: one small copy
                        self._rpos = pos + n
                    else:
                        await self._read_into(dest, "payload")
            frame = Frame(
                header.kind, header.request_id, header.key, header.seq, flags, array, meta
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
        if self.spin_if is not None and not self.spin_if():
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
            if end > pos and part == "header":
                # A header's first bytes that cannot start the magic are
                # BAD_MAGIC at once: a stranger (``GET / HTTP/1.1``) is not
                # held until it has sent a whole header.
                check_magic(rview[pos : min(end, pos + len(MAGIC))])
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
