"""The parameter shard as a node serves it: request handlers, as tables.

:class:`ShardService` holds a node's one :class:`~dbnode.ps.shard.ParameterShard`
(every piece the driver placed on the node, whatever plan shard it belongs
to) and answers:

- INIT, PULL, PUSH, PUSH_PULL, STATS **inline**: synchronously, in the
  connection's reader, in arrival order. Pushes are therefore applied one
  at a time and exactly in the order they came, and a PUSH_PULL's value
  is the one right after its own push.
- SNAPSHOT: writes the shard into the node's snapshot directory.
- the control ops ``restore``, ``export`` and ``import``
  (:mod:`dbnode.control`).

A :class:`~dbnode.errors.ShardError` (the shard refused: unknown key,
wrong shape, ...) becomes a :class:`~dbnode.errors.RequestError` of the
same code here, for every handler: the requester gets an ERROR frame,
the shard is unchanged and the connection carries on.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np

from .. import control
from ..control import Op
from ..errors import ErrorCode, RequestError, ShardError, SnapshotError
from ..wire import Frame, MessageKind, Reply
from .shard import ParameterShard

__all__ = ["ShardService"]

InlineHandler = Callable[[Frame], Reply]
AsyncHandler = Callable[[Frame], Awaitable[Reply]]
OpHandler = Callable[[Any], Awaitable[Any]]


def _answering_shard_errors(handler: Callable) -> Callable:
    """``handler`` with ShardError turned into RequestError of the same code:
    the one place that maps the shard's refusals onto request errors."""
    if inspect.iscoroutinefunction(handler):

        @wraps(handler)
        async def mapped_async(*args: Any) -> Any:
            try:
                return await handler(*args)
            except ShardError as exc:
                raise RequestError(exc.code, str(exc)) from None

        return mapped_async

    @wraps(handler)
    def mapped(*args: Any) -> Any:
        try:
            return handler(*args)
        except ShardError as exc:
            raise RequestError(exc.code, str(exc)) from None

    return mapped


class ShardService:
    """A node's parameter shard and its handlers.

    Args:
        shard: the shard to start with (default: an empty one), e.g. one
            restored from a snapshot at start-up.
        snapshot_dir: where SNAPSHOT writes and ``restore`` reads; None
            refuses both.

    Attributes:
        shard: the current shard (``restore`` and :meth:`reset` replace it:
            look it up through the service, never keep it).
        inline: MessageKind -> synchronous handler, for the transport's
            inline path.
        handlers: MessageKind -> async handler.
        ops: control :class:`~dbnode.control.Op` -> async handler taking the
            decoded request and returning its reply schema.
    """

    def __init__(
        self, shard: ParameterShard | None = None, snapshot_dir: str | Path | None = None
    ) -> None:
        self.shard = shard if shard is not None else ParameterShard()
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        m = _answering_shard_errors
        self.inline: dict[MessageKind, InlineHandler] = {
            MessageKind.INIT: m(self._init),
            MessageKind.PULL: m(self._pull),
            MessageKind.PUSH: m(self._push),
            MessageKind.PUSH_PULL: m(self._push_pull),
            MessageKind.STATS: m(self._stats),
        }
        self.handlers: dict[MessageKind, AsyncHandler] = {MessageKind.SNAPSHOT: m(self._snapshot)}
        self.ops: dict[Op, OpHandler] = {
            Op.RESTORE: m(self._restore),
            Op.EXPORT: m(self._export),
            Op.IMPORT: m(self._import),
        }

    def reset(self) -> None:
        """Drop every tensor: the shard starts over empty."""
        self.shard = ParameterShard()

    # -- requests answered inline -------------------------------------------------

    def _init(self, frame: Frame) -> Reply:
        meta = frame.meta
        version = self.shard.init(
            frame.key, meta.get("name"), frame.array, optimizer=meta.get("optimizer")
        )
        return Reply(seq=version)

    def _pinned(self, key: int) -> Reply:
        # The reply goes out from the live buffer, zero-copy; a push that
        # comes meanwhile updates a copy, until the send releases the pin.
        (value, version), unpin = self.shard.pin(key)
        return Reply(array=value, seq=version, release=unpin)

    def _pull(self, frame: Frame) -> Reply:
        return self._pinned(frame.key)

    def _apply(self, frame: Frame) -> int:
        pusher = frame.meta.get("pusher")
        # Without a pusher a push is not deduplicated: its seq means nothing.
        return self.shard.push(
            frame.key, frame.array, pusher=pusher, seq=frame.seq if pusher is not None else None
        )

    def _push(self, frame: Frame) -> Reply:
        return Reply(seq=self._apply(frame))

    def _push_pull(self, frame: Frame) -> Reply:
        self._apply(frame)
        return self._pinned(frame.key)

    def _stats(self, frame: Frame) -> Reply:
        return Reply(meta=self.shard.stats())

    # -- snapshots ----------------------------------------------------------------

    def snapshot_path(self, name: Any) -> Path:
        """The file a SNAPSHOT or ``restore`` names, inside the snapshot
        directory: only a plain file name is taken, so that no peer can make
        the node write or read anywhere else.

        Args:
            name: the request's ``name``.

        Returns:
            ``<snapshot_dir>/<name>``.

        Raises:
            RequestError: BAD_REQUEST: the node has no snapshot directory, or
                ``name`` is not a plain file name.
        """
        if self.snapshot_dir is None:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "this node was started without --snapshot-dir"
            )
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"snapshot name {name!r} is not a plain file name"
            )
        return self.snapshot_dir / name

    async def _snapshot(self, frame: Frame) -> Reply:
        path = self.snapshot_path(frame.meta.get("name"))
        path.parent.mkdir(parents=True, exist_ok=True)
        written = self.shard.snapshot(path)
        return Reply(meta={"path": str(written)})

    # -- control ops --------------------------------------------------------------

    async def _restore(self, request: control.Restore) -> control.RestoreReply:
        try:
            self.shard = ParameterShard.restore(self.snapshot_path(request.name))
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return control.RestoreReply(keys=len(self.shard))

    async def _export(self, request: control.Export) -> control.ExportReply:
        keys = None if request.keys is None else list(request.keys)
        data = self.shard.snapshot_bytes(keys)
        count = len(self.shard) if keys is None else len(keys)
        return control.ExportReply(keys=count, data=np.frombuffer(data, np.uint8))

    async def _import(self, request: control.Import) -> control.ImportReply:
        try:
            pieces = ParameterShard.from_bytes(request.data.tobytes(), "import")
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        self.shard.merge(pieces)
        return control.ImportReply(keys=len(pieces))
