"""The parameter shards as a node serves them: request handlers, as tables.

:class:`ShardService` answers for the :class:`~dbnode.ps.shard.ParameterShard`
of each run on the node (every piece that run's driver placed on the node,
whatever plan shard it belongs to; see :mod:`dbnode.runs`):

- INIT, PULL, PUSH, PUSH_PULL, STATS **inline**: synchronously, in the
  connection's reader, in arrival order. Pushes are therefore applied one
  at a time and exactly in the order they came, and a PUSH_PULL's value
  is the one right after its own push.
- SNAPSHOT: writes the shard into the node's snapshot directory.
- the control ops ``restore``, ``export`` and ``import``
  (:mod:`dbnode.control`).

Tensors may come and go in a 16-bit wire codec (:mod:`dbnode.codecs`): a
pushed gradient in one is decoded to float32 before it is applied; a PULL
or PUSH_PULL whose meta names a ``codec`` gets its answer in that codec.

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

from .. import codecs, control, kernels
from ..control import Op
from ..errors import (
    ErrorCode,
    NotFiniteError,
    RequestError,
    ShapeMismatchError,
    ShardError,
    SnapshotError,
)
from ..runs import NodeRun, RunTable
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
    """The parameter shards of a node's runs, and their handlers.

    Every request names its run (meta ``run``) and acts on that run's shard
    alone; a shard request may also carry the ``epoch`` of its sender's
    shard map, and one of another epoch is refused (STALE_EPOCH).

    Args:
        runs: the node's runs.
        snapshot_dir: where SNAPSHOT writes and ``restore`` reads; None
            refuses both.

    Attributes:
        inline: MessageKind -> synchronous handler, for the transport's
            inline path.
        handlers: MessageKind -> async handler.
        ops: control :class:`~dbnode.control.Op` -> async handler taking the
            decoded request and returning its reply schema.
    """

    def __init__(self, runs: RunTable, snapshot_dir: str | Path | None = None) -> None:
        self.runs = runs
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._scratch = np.empty(0, np.float32)
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
            Op.SCALE: m(self._scale),
        }

    # -- requests answered inline -------------------------------------------------

    def _init(self, frame: Frame) -> Reply:
        run = self.runs.for_request(frame.meta)
        meta = frame.meta
        if frame.array is not None and frame.key not in run.shard:
            nbytes = frame.array.nbytes
            # The value, and optimizer state of at most the same size (dbnode.optim).
            self.runs.reserve(2 * nbytes, f"INIT of key {frame.key}")
        version = run.shard.init(
            frame.key, meta.get("name"), frame.array, optimizer=meta.get("optimizer")
        )
        return Reply(seq=version)

    def _reply_codec(self, run: NodeRun, frame: Frame) -> str:
        """The codec a value goes back in, checked before anything is done."""
        codec = frame.meta.get("codec", "f32")
        if codec not in codecs.CODECS:
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"codec {codec!r} is not one of {codecs.CODECS}"
            )
        dtype = run.shard.dtype(frame.key)
        if codec != "f32" and dtype != np.float32:
            raise RequestError(
                ErrorCode.DTYPE_MISMATCH,
                f"codec {codec} needs a float32 tensor; key {frame.key} is {dtype}",
            )
        return codec

    def _value(self, run: NodeRun, frame: Frame, codec: str) -> Reply:
        # The reply goes out from the live buffer, zero-copy; a push that
        # comes meanwhile updates a copy, until the send releases the pin.
        (value, version), unpin = run.shard.pin(frame.key)
        if codec == "f32":
            return Reply(array=value, seq=version, release=unpin)
        try:  # encoded at once, into a buffer of the reply's own
            return Reply(array=codecs.encode(value, codec), seq=version)
        finally:
            unpin()

    def _pull(self, frame: Frame) -> Reply:
        run = self.runs.for_request(frame.meta)
        return self._value(run, frame, self._reply_codec(run, frame))

    def _gradient(self, run: NodeRun, key: int, array: np.ndarray | None) -> np.ndarray | None:
        """A pushed gradient as float32, decoded into the service's scratch
        buffer if it came in a 16-bit codec (handlers run one at a time, and
        the shard is done with it when its push returns). Only a gradient
        that fits the tensor is decoded: the scratch grows to the largest
        tensor pushed, never to what a request says."""
        if array is None or codecs.codec_of(array.dtype) == "f32":
            return array
        shape = run.shard.shape(key)  # an unknown key raises here
        if array.shape != shape:
            raise ShapeMismatchError(
                key, f"key {key} ({run.shard.name(key)}): gradient shape expected {shape}, "
                f"got {array.shape}",
            )  # fmt: skip
        if self._scratch.size < array.size:
            self._scratch = kernels.empty(array.size, np.float32)
        return codecs.decode(array, out=self._scratch[: array.size].reshape(array.shape))

    def _apply(self, run: NodeRun, frame: Frame) -> int:
        meta = frame.meta
        pusher = meta.get("pusher")
        try:
            # Without a pusher a push is not deduplicated: its seq means nothing.
            return run.shard.push(
                frame.key,
                self._gradient(run, frame.key, frame.array),
                pusher=pusher,
                seq=frame.seq if pusher is not None else None,
                version=meta.get("version"),
                max_staleness=meta.get("max_staleness"),
            )
        except NotFiniteError:
            run.not_finite += 1
            raise

    def _push(self, frame: Frame) -> Reply:
        run = self.runs.for_request(frame.meta)
        return Reply(seq=self._apply(run, frame))

    def _push_pull(self, frame: Frame) -> Reply:
        run = self.runs.for_request(frame.meta)
        codec = self._reply_codec(run, frame)  # a request refused changes nothing
        self._apply(run, frame)
        return self._value(run, frame, codec)

    def _stats(self, frame: Frame) -> Reply:
        pushers = frame.meta.get("pushers", "")
        if not isinstance(pushers, str):
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"STATS: pushers must be a string, got {pushers!r}"
            )
        return Reply(meta=self.runs.for_request(frame.meta).shard.stats(pushers))

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
        run = self.runs.for_request(frame.meta)
        path = self.snapshot_path(frame.meta.get("name"))
        path.parent.mkdir(parents=True, exist_ok=True)
        written = run.shard.snapshot(path)
        return Reply(meta={"path": str(written)})

    # -- control ops --------------------------------------------------------------

    async def _restore(self, request: control.Restore) -> control.RestoreReply:
        run = self.runs.get(request.run)
        path = self.snapshot_path(request.name)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, f"snapshot {request.name!r}: {exc}") from None
        self.runs.reserve(max(0, size - run.shard.nbytes), f"restore of {request.name!r}")
        try:
            run.shard = ParameterShard.restore(path)
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return control.RestoreReply(keys=len(run.shard))

    async def _export(self, request: control.Export) -> control.ExportReply:
        run = self.runs.get(request.run)
        keys = None if request.keys is None else list(request.keys)
        data = run.shard.snapshot_bytes(keys)
        count = len(run.shard) if keys is None else len(keys)
        return control.ExportReply(keys=count, data=np.frombuffer(data, np.uint8))

    async def _import(self, request: control.Import) -> control.ImportReply:
        run = self.runs.get(request.run)
        self.runs.reserve(request.data.nbytes, "import")
        try:
            pieces = ParameterShard.from_bytes(request.data.tobytes(), "import")
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        run.shard.merge(pieces)
        return control.ImportReply(keys=len(pieces))

    async def _scale(self, request: control.Scale) -> control.ScaleReply:
        run = self.runs.get(request.run)
        run.shard.set_scale(request.scale)
        return control.ScaleReply(keys=len(run.shard))
