"""Requests and replies over one authenticated connection (see :class:`Channel`)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from ..errors import (
    ConfigError,
    ConnectionClosedError,
    LocalProtocolError,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    RequestTimeout,
)
from .connection import Connection, Outgoing
from .frames import ErrorCode, Frame, Header, MessageKind, encode_frame, error_frame
from .reply import DEFER, Handler, InlineHandler, Reply, error_reply
from .session import (
    ANSWER_KINDS,
    NOT_REQUESTS,
    CloseExchange,
    PeerError,
    as_code,
    check_flags,
    request_kind,
)

__all__ = ["Channel"]

log = logging.getLogger("dbnode.wire")


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
        conn.spin_if = lambda: serving or any(p.sent and not p.done for p in self._pending.values())
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
        self._close = CloseExchange()
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
        return self._ended is not None or self._close.closing

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
        shape.

        Args:
            kind: a request kind.
            key, seq, array, meta, flags: the request frame's fields.
            timeout: seconds for the whole round trip; None: no limit.
            into: where the answer's tensor lands, or None.

        Returns:
            The answer frame.

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
        kind = request_kind(kind)
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
            unsent = self.conn.start_send(parts)
            if unsent is None:
                pending.sent = True
            elif deadline == math.inf:
                await self.conn.finish_send(unsent)
                pending.sent = True
            else:
                with trio.CancelScope(deadline=deadline) as scope:
                    await self.conn.finish_send(unsent)
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

        Args:
            kind: a request kind.
            key, seq, array, meta, flags: the request frame's fields.

        Raises:
            ConnectionClosedError: the connection is closed, closing or lost.
            LocalProtocolError: the arguments do not make a valid request.
        """
        kind = request_kind(kind)
        self._check_can_request()
        await self.conn.send_frame(kind, key=key, seq=seq, array=array, meta=meta, flags=flags)

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip a PING; returns the seconds it took.

        Args:
            timeout: seconds to wait for the PONG; None: no limit.

        Returns:
            The round trip, in seconds.

        Raises:
            RequestTimeout, ConnectionClosedError: as :meth:`request`.
        """
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

        Args:
            task_status: told once the reader has started.

        Raises:
            LocalProtocolError: INTERNAL, the channel ran before.
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
    def _check_into(into: Any) -> None:
        if (
            not isinstance(into, np.ndarray)
            or not into.flags.c_contiguous
            or not (into.flags.writeable)
        ):
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "into", type(into).__name__,
                "need a writable C-contiguous numpy array",
            )  # fmt: skip

    def _check_can_request(self) -> None:
        if self._ended is not None:
            raise ConnectionClosedError(str(self._ended), self._ended.code)
        if self._close.closing:
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
        if self._close.sent or self._finished.is_set():
            return
        self._close.sent = True
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
        if not self._close.sent:  # aclose() may have sent it meanwhile
            self._close.sent = True
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
                if self._close.closing:
                    return ConnectionClosedError(f"channel to {self.conn.peer} closed")
                return exc
            except RemoteProtocolError as exc:
                violation = exc
            except PeerError as exc:
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
                self._idle_timeout is not None and not self._close.closing
                and not conn.poll()
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
            if kind in ANSWER_KINDS:
                self._on_answer(frame)
                # Nothing more to read yet: let the requests we just woke run
                # (and send their next requests) before this task goes back
                # to the socket; on a round trip that comes first. (trio
                # runs a batch of ready tasks in random order: yield until
                # they have run.)
                for _ in range(3):
                    if not self._waking or conn.buffered():
                        break
                    await trio.lowlevel.cancel_shielded_checkpoint()
            elif kind == MessageKind.CLOSE:
                if self._close.on_close():
                    return  # the exchange is complete
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
        if header.kind not in NOT_REQUESTS and self._allocate is not None:
            return self._allocate(header)
        return None

    def _on_answer(self, frame: Frame) -> None:
        if frame.request_id == 0:
            if frame.kind == MessageKind.ERROR:
                code = as_code(frame.meta["code"])
                if code < 32:  # fatal: the peer is closing the connection
                    raise PeerError(frame)
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
            code = as_code(frame.meta["code"])
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
        self._close.check_request(frame)
        if frame.flags:
            try:
                check_flags(frame)
            except RequestError as exc:
                await self._answer_inline(frame, MessageKind.ERROR, exc)
                return
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
            return error_frame(*error_reply(exc), frame.request_id)

    async def _answer_inline(self, frame: Frame, kind: MessageKind, reply: Any) -> None:
        """Send the answer to a request handled in the reader, without waiting if it can.

        A send the socket cannot take at once is finished by a task (with a
        slot), so the reader never waits for the peer to read.
        """
        release = reply.release if isinstance(reply, Reply) else None
        unsent = None
        try:
            if frame.request_id or kind == MessageKind.ERROR:
                unsent = self.conn.start_send(self._answer_parts(frame, kind, reply))
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
        self, frame: Frame, unsent: Outgoing, release: Callable[[], None] | None
    ) -> None:
        try:
            await self.conn.finish_send(unsent)
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
