"""The driver <-> node control vocabulary: every CONTROL op, written once.

A CONTROL frame names its op in ``meta["op"]`` (the :class:`Op` values are
the wire names); the op's other arguments are further meta fields, and a
few ops also use the frame's key (a partition uid) or its payload (a data
shard, a snapshot's bytes). Each op has one schema here: a frozen dataclass
of its request (``Info``, ``Reset``, ``PartitionJob`` for ``start``, ...)
and, where the answer carries anything, one of its reply. A schema encodes
itself to the frame's parts (:meth:`Message.encode`, :meth:`Message.to_meta`)
and decodes from a received frame (:meth:`Message.from_frame`,
:meth:`Message.from_meta`), checking every field: a missing or malformed
one is a ``RequestError(BAD_REQUEST)`` whose message names it, e.g.
``start: field 'shards[1][1]' must be an integer, got '7070'``. Meta fields
a schema does not know are ignored, so that an older node still takes the
requests of a newer driver that only added optional fields.

Adding an op means one schema here (a subclass of :class:`Request` with its
``op``) and one handler in the service that owns it (``dbnode.ps.service``,
``dbnode.partition`` or ``dbnode.node``); docs/cluster.md's table is
:func:`markdown_table`, and tests/test_control.py holds the two equal.

The driver sends a request with :func:`call`; a node decodes one with
:func:`decode_request`. No I/O here: :func:`call` only awaits the channel
it is given.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

import numpy as np

from .errors import DBNodeError, ErrorCode, RequestError
from .model import ModelSpec
from .wire.frames import Frame, MessageKind

__all__ = [
    "Op",
    "Message",
    "Request",
    "Info",
    "InfoReply",
    "Reset",
    "PartitionJob",
    "Data",
    "Run",
    "Stop",
    "Status",
    "StatusReply",
    "PartitionReport",
    "Restore",
    "RestoreReply",
    "Export",
    "ExportReply",
    "Import",
    "ImportReply",
    "REQUESTS",
    "decode_request",
    "call",
    "markdown_table",
]


class Op(enum.StrEnum):
    """The control ops; each value is the op's name on the wire (``meta["op"]``)."""

    INFO = "info"
    RESET = "reset"
    START = "start"
    DATA = "data"
    RUN = "run"
    STOP = "stop"
    STATUS = "status"
    RESTORE = "restore"
    EXPORT = "export"
    IMPORT = "import"


# -- field codecs ------------------------------------------------------------------
#
# A codec turns one JSON value into the schema's Python value (checking it)
# and back. Containers decode to tuples, so that schemas stay immutable.


class _Bad(Exception):
    """A value that does not fit its field: why, and where below the field."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(reason)


@dataclass(frozen=True)
class _Codec:
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any] = lambda value: value
    schema: type[Message] | None = None  # the nested schema, for the docs table


def _integer(minimum: int | None = None) -> _Codec:
    def decode(value: Any) -> int:
        # bool is an int to Python, never to the protocol.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise _Bad(f"must be >= {minimum}, got {value}")
        return value

    return _Codec(decode, int)


def _number() -> _Codec:
    def decode(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"must be a number, got {value!r}")
        return float(value)

    # Encoded as given: an int stays an int on the wire, as it always was.
    return _Codec(decode)


def _boolean() -> _Codec:
    def decode(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Bad(f"must be true or false, got {value!r}")
        return value

    return _Codec(decode)


def _string(choices: tuple[str, ...] | None = None) -> _Codec:
    def decode(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad(f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise _Bad(f"must be one of {list(choices)}, got {value!r}")
        return value

    return _Codec(decode)


def _optional(codec: _Codec) -> _Codec:
    return _Codec(
        lambda value: None if value is None else codec.decode(value),
        lambda value: None if value is None else codec.encode(value),
    )


def _items(values: Any, codecs: list[_Codec]) -> tuple:
    out = []
    for i, (value, codec) in enumerate(zip(values, codecs)):
        try:
            out.append(codec.decode(value))
        except _Bad as exc:
            raise _Bad(exc.reason, f"[{i}]{exc.path}") from None
    return tuple(out)


def _list(codec: _Codec) -> _Codec:
    def decode(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"must be a list, got {value!r}")
        return _items(value, [codec] * len(value))

    return _Codec(decode, lambda value: [codec.encode(v) for v in value])


def _tuple(name: str, *codecs: _Codec) -> _Codec:
    def decode(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(codecs):
            raise _Bad(f"must be {name}, got {value!r}")
        return _items(value, list(codecs))

    return _Codec(decode, lambda value: [c.encode(v) for c, v in zip(codecs, value)])


def _mapping(codec: _Codec) -> _Codec:
    def decode(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"must be an object, got {value!r}")
        out = {}
        for k, v in value.items():
            try:
                out[k] = codec.decode(v)
            except _Bad as exc:
                raise _Bad(exc.reason, f"[{k}]{exc.path}") from None
        return out

    return _Codec(
        decode,
        lambda value: {str(k): codec.encode(v) for k, v in value.items()},
        codec.schema,
    )


def _schema(cls: type[Message]) -> _Codec:
    """A nested schema (one partition's report inside the status reply)."""

    def decode(value: Any) -> Message:
        if not isinstance(value, dict):
            raise _Bad(f"must be an object, got {value!r}")
        try:
            return cls._decode_fields(value, 0, None)
        except _Bad as exc:
            raise _Bad(exc.reason, f".{exc.path}") from None

    return _Codec(decode, lambda value: value.to_meta(), cls)


def _model() -> _Codec:
    parts = {
        "layers": _list(_integer(1)),
        "activation": _string(),
        "output": _string(),
        "loss": _string(),
        "dtype": _string(),
    }

    def decode(value: Any) -> ModelSpec:
        if not isinstance(value, dict):
            raise _Bad(f"must be an object, got {value!r}")
        args = {}
        for name, codec in parts.items():
            if name not in value:
                raise _Bad("is missing", f".{name}")
            try:
                args[name] = codec.decode(value[name])
            except _Bad as exc:
                raise _Bad(exc.reason, f".{name}{exc.path}") from None
        try:
            return ModelSpec(**args)
        except ValueError as exc:  # ModelSpec's own checks name the part
            raise _Bad(str(exc)) from None

    def encode(spec: ModelSpec) -> dict[str, Any]:
        return {
            "layers": [int(n) for n in spec.layers],
            "activation": spec.activation,
            "output": spec.output,
            "loss": spec.loss,
            "dtype": spec.dtype,
        }

    return _Codec(decode, encode)


_COUNT = _integer(0)
_ADDRESS = _tuple("[host, port]", _string(), _COUNT)
_NEIGHBOUR = _optional(_tuple("[host, port, uid]", _string(), _COUNT, _COUNT))
_UIDS = _list(_COUNT)


# -- schemas -----------------------------------------------------------------------

_REQUIRED = dataclasses.MISSING


def _meta(codec: _Codec, default: Any = _REQUIRED, *, omit_default: bool = False) -> Any:
    """A field carried in the frame's meta. With ``omit_default`` it is left
    out of the meta when it has its default value (what the driver always did
    for that field: the bytes on the wire stay the same)."""
    return field(default=default, metadata={"at": "meta", "codec": codec, "omit": omit_default})


def _key(doc: str) -> Any:
    """A field carried in the frame header's ``key``."""
    return field(metadata={"at": "key", "doc": doc})


def _payload(doc: str, dtype: type | None = None) -> Any:
    """A field carried as the frame's tensor payload (compared by identity:
    arrays have no single truth value)."""
    return field(compare=False, metadata={"at": "payload", "doc": doc, "dtype": dtype})


class Message:
    """What control schemas share: encoding to a frame's parts and decoding
    from a received frame's, field by field. Subclasses are frozen
    dataclasses whose fields are declared with ``_meta``, ``_key`` or
    ``_payload``; ``label`` names the message in errors."""

    label: ClassVar[str] = ""

    @classmethod
    def _where(cls) -> str:
        return cls.label or cls.__name__

    def to_meta(self) -> dict[str, Any]:
        """The meta fields as the frame carries them (JSON values).

        Returns:
            A new dict, in the order of the schema's fields.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("at") != "meta":
                continue
            value = getattr(self, f.name)
            if f.metadata["omit"] and value == f.default:
                continue
            out[f.name] = f.metadata["codec"].encode(value)
        return out

    def encode(self) -> tuple[int, dict[str, Any], np.ndarray | None]:
        """The frame's parts: ``(key, meta, array)``.

        Returns:
            The header key (0 unless the schema has a key field), the meta
            (:meth:`to_meta`) and the payload (None unless it has one).
        """
        key, array = 0, None
        for f in dataclasses.fields(self):
            if f.metadata.get("at") == "key":
                key = getattr(self, f.name)
            elif f.metadata.get("at") == "payload":
                array = getattr(self, f.name)
        return key, self.to_meta(), array

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], *, key: int = 0, array: np.ndarray | None = None
    ) -> Self:
        """Decode and check a received message.

        Args:
            meta: the frame's meta (fields the schema does not know are ignored).
            key: the frame header's key.
            array: the frame's payload, or None.

        Returns:
            An instance of the schema.

        Raises:
            RequestError: BAD_REQUEST, naming the missing or malformed field.
        """
        if not isinstance(meta, dict):
            raise RequestError(ErrorCode.BAD_REQUEST, f"{cls._where()}: meta must be an object")
        try:
            return cls._decode_fields(meta, key, array)
        except _Bad as exc:
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"{cls._where()}: field '{exc.path}' {exc.reason}"
            ) from None

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        """:meth:`from_meta` of a received frame's meta, key and payload.

        Raises:
            RequestError: BAD_REQUEST, naming the missing or malformed field.
        """
        return cls.from_meta(frame.meta, key=frame.key, array=frame.array)

    @classmethod
    def _decode_fields(cls, meta: dict[str, Any], key: int, array: np.ndarray | None) -> Self:
        """The schema from checked fields; a bad meta field is a :class:`_Bad`
        whose path starts with the field's name."""
        args: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            at = f.metadata.get("at")
            if at == "key":
                args[f.name] = key
            elif at == "payload":
                args[f.name] = _decode_payload(cls, f, array)
            elif at == "meta":
                if f.name not in meta:
                    if f.default is _REQUIRED:
                        raise _Bad("is missing", f.name)
                    continue
                try:
                    args[f.name] = f.metadata["codec"].decode(meta[f.name])
                except _Bad as exc:
                    raise _Bad(exc.reason, f.name + exc.path) from None
        return cls(**args)


def _decode_payload(cls: type[Message], f: dataclasses.Field, array: np.ndarray | None):
    where = f"{cls._where()}: payload ({f.name})"
    if array is None:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{where} is missing: it needs an array")
    dtype = f.metadata["dtype"]
    if dtype is not None and array.dtype != dtype:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"{where} must be {np.dtype(dtype).name}, got {array.dtype}"
        )
    return array


class Request(Message):
    """A control op's request. Subclasses set ``op`` and, when the answer
    carries anything, ``reply`` (its schema); a request without one is
    answered with an empty REPLY."""

    op: ClassVar[Op]
    reply: ClassVar[type[Message] | None] = None

    @classmethod
    def _where(cls) -> str:
        return cls.op.value

    def to_meta(self) -> dict[str, Any]:
        """The meta as the frame carries it: ``op`` first, then the fields.

        Returns:
            A new dict.
        """
        return {"op": self.op.value, **super().to_meta()}


# -- node ops (dbnode.node) --


@dataclass(frozen=True)
class InfoReply(Message):
    """Who a node is."""

    label: ClassVar[str] = "info reply"
    name: str = _meta(_string())
    version: str = _meta(_string())
    pid: int = _meta(_COUNT)
    cores: int | None = _meta(_optional(_COUNT))
    address: tuple[str, int] = _meta(_ADDRESS)


@dataclass(frozen=True)
class Info(Request):
    """Answers who the node is: its name, dbnode version, pid, cores and address."""

    op: ClassVar[Op] = Op.INFO
    reply: ClassVar[type[Message]] = InfoReply


@dataclass(frozen=True)
class Reset(Request):
    """Drops every partition and the shard's tensors; refused while partitions
    run, unless ``force``."""

    op: ClassVar[Op] = Op.RESET
    force: bool = _meta(_boolean(), False)


# -- layer partitions (dbnode.partition) --


@dataclass(frozen=True)
class PartitionJob(Request):
    """Creates a layer partition (not running yet): layers ``[first, last)``
    of replica ``replica``, the ``index``-th of its partitions, with what it
    needs to train; ``prev``/``next`` are its neighbours as ``[host, port,
    uid]`` (null at the ends of the replica).

    This is the ``start`` op's request, and the job a
    :class:`~dbnode.partition.PartitionRunner` runs.

    Attributes:
        uid: the partition's id on its node (the key of its FORWARD,
            BACKWARD and ``data`` frames).
        model: the whole model (:attr:`spec`).
        learning_rate: of the partition's local updates.
        n_fetch, n_push: fetch and push periods, in steps.
        batch_size, epochs, seed, n_examples: the replica's schedule over
            its data shard (the same in every partition of the replica).
        shards: the node of every plan shard, by shard index.
        min_split_bytes, bounds: the inputs of the shard plan, which the
            partition computes exactly as the driver did.
        start_step: where a restarted replica resumes its schedule.
        incarnation: how many times the replica was restarted.
    """

    op: ClassVar[Op] = Op.START
    uid: int = _meta(_COUNT)
    replica: int = _meta(_COUNT)
    index: int = _meta(_COUNT)
    first: int = _meta(_COUNT)
    last: int = _meta(_integer(1))
    model: ModelSpec = _meta(_model())
    learning_rate: float = _meta(_number())
    n_fetch: int = _meta(_integer(1))
    n_push: int = _meta(_integer(1))
    batch_size: int = _meta(_integer(1))
    epochs: int = _meta(_integer(1))
    seed: int = _meta(_integer())
    n_examples: int = _meta(_COUNT)
    shards: tuple[tuple[str, int], ...] = _meta(_list(_ADDRESS))
    min_split_bytes: int = _meta(_COUNT)
    bounds: tuple[tuple[int, int], ...] = _meta(_list(_tuple("[first, last]", _COUNT, _COUNT)))
    prev: tuple[str, int, int] | None = _meta(_NEIGHBOUR, None)
    next: tuple[str, int, int] | None = _meta(_NEIGHBOUR, None)
    start_step: int = _meta(_COUNT, 0)
    incarnation: int = _meta(_COUNT, 0)

    @property
    def spec(self) -> ModelSpec:
        """The model (the ``model`` field)."""
        return self.model

    @property
    def pusher(self) -> str:
        """The name this partition pushes under."""
        # A restarted replica pushes under a new name: its sequence numbers
        # start again, and the shards must not take them for retries.
        return f"r{self.replica}p{self.index}i{self.incarnation}"


@dataclass(frozen=True)
class Data(Request):
    """Gives a partition its data shard: inputs (``role`` x, first partition)
    or targets (``role`` y, last partition), checked against the model."""

    op: ClassVar[Op] = Op.DATA
    uid: int = _key("partition uid")
    role: str = _meta(_string(("x", "y")))
    array: np.ndarray = _payload("inputs or targets, one row per example")


@dataclass(frozen=True)
class Run(Request):
    """Starts the partitions ``uids`` (default: every one on the node); a
    partition already started is left alone."""

    op: ClassVar[Op] = Op.RUN
    uids: tuple[int, ...] | None = _meta(_optional(_UIDS), None, omit_default=True)


@dataclass(frozen=True)
class Stop(Request):
    """Cancels and forgets the partitions ``uids`` (those of a replica being
    restarted elsewhere); unknown uids are ignored."""

    op: ClassVar[Op] = Op.STOP
    uids: tuple[int, ...] = _meta(_UIDS, ())


@dataclass(frozen=True)
class PartitionReport(Message):
    """One partition's progress; the loss is summed since the previous report."""

    step: int = _meta(_COUNT)
    steps: int = _meta(_COUNT)
    examples: int = _meta(_COUNT)
    loss_sum: float = _meta(_number())
    loss_count: int = _meta(_COUNT)
    seconds: float = _meta(_number())  # in the training loop, until the last push was applied
    done: bool = _meta(_boolean())
    error: str | None = _meta(_optional(_string()))


@dataclass(frozen=True)
class StatusReply(Message):
    """Every partition's report, by uid (a string: JSON object keys are)."""

    label: ClassVar[str] = "status reply"
    partitions: dict[str, PartitionReport] = _meta(_mapping(_schema(PartitionReport)))


@dataclass(frozen=True)
class Status(Request):
    """Answers every partition's progress, the loss summed since the previous
    status."""

    op: ClassVar[Op] = Op.STATUS
    reply: ClassVar[type[Message]] = StatusReply


# -- the parameter shard (dbnode.ps.service) --


@dataclass(frozen=True)
class RestoreReply(Message):
    """How many tensors the restored shard holds."""

    label: ClassVar[str] = "restore reply"
    keys: int = _meta(_COUNT)


@dataclass(frozen=True)
class Restore(Request):
    """Replaces the shard with the snapshot ``<--snapshot-dir>/<name>``."""

    op: ClassVar[Op] = Op.RESTORE
    reply: ClassVar[type[Message]] = RestoreReply
    name: str = _meta(_string())


@dataclass(frozen=True)
class ExportReply(Message):
    """The snapshot's bytes, and how many keys were asked for."""

    label: ClassVar[str] = "export reply"
    keys: int = _meta(_COUNT)
    data: np.ndarray = _payload("the snapshot's bytes (uint8)", np.uint8)


@dataclass(frozen=True)
class Export(Request):
    """Answers a snapshot of the shard's ``keys`` (default: all) as bytes:
    what the driver checkpoints."""

    op: ClassVar[Op] = Op.EXPORT
    reply: ClassVar[type[Message]] = ExportReply
    keys: tuple[int, ...] | None = _meta(_optional(_UIDS), None, omit_default=True)


@dataclass(frozen=True)
class ImportReply(Message):
    """How many tensors were taken over."""

    label: ClassVar[str] = "import reply"
    keys: int = _meta(_COUNT)


@dataclass(frozen=True)
class Import(Request):
    """Takes over the tensors of an exported snapshot (a dead node's pieces,
    from the driver's newest checkpoint); their keys must be new to the shard."""

    op: ClassVar[Op] = Op.IMPORT
    reply: ClassVar[type[Message]] = ImportReply
    data: np.ndarray = _payload("an exported snapshot's bytes (uint8)", np.uint8)


#: Every op's request schema.
REQUESTS: dict[Op, type[Request]] = {
    cls.op: cls
    for cls in (Info, Reset, PartitionJob, Data, Run, Stop, Status, Restore, Export, Import)
}
assert set(REQUESTS) == set(Op), "every op needs exactly one request schema"


def decode_request(frame: Frame) -> Request:
    """The request a received CONTROL frame carries.

    Args:
        frame: a CONTROL frame.

    Returns:
        The op's request schema, decoded and checked.

    Raises:
        RequestError: BAD_REQUEST for an unknown op, or naming the missing or
            malformed field.
    """
    op = frame.meta.get("op")
    # A str check first: the op may be any JSON value, a list among them.
    schema = REQUESTS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise RequestError(ErrorCode.BAD_REQUEST, f"unknown control op {op!r}")
    return schema.from_frame(frame)


class _Requester(Protocol):
    async def request(
        self,
        kind: MessageKind | int,
        *,
        key: int = 0,
        array: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Frame: ...


async def call(channel: _Requester, request: Request, *, timeout: float | None = 60.0):
    """Send a control request and decode its answer.

    Args:
        channel: a :class:`~dbnode.wire.Channel` (anything with its ``request``).
        request: the op and its arguments.
        timeout: seconds to wait for the answer (None: forever).

    Returns:
        The reply schema (``request.reply``) decoded from the answer, or None
        for an op whose answer carries nothing.

    Raises:
        RemoteError: the node refused the request (its code and message).
        TransportError: the channel failed or the answer did not come in time.
        DBNodeError: the answer does not fit the op's reply schema.
    """
    key, meta, array = request.encode()
    frame = await channel.request(
        MessageKind.CONTROL, key=key, array=array, meta=meta, timeout=timeout
    )
    if request.reply is None:
        return None
    try:
        return request.reply.from_frame(frame)
    except RequestError as exc:  # the node's fault, not ours: not a BAD_REQUEST
        raise DBNodeError(f"malformed answer to {request.op.value}: {exc.message}") from None


# -- the table of docs/cluster.md ------------------------------------------------


def _cells(schema: type[Message] | None) -> tuple[str, str, str]:
    """(key, payload, meta) cells of a schema's row."""
    key = payload = "—"
    meta = []
    for f in dataclasses.fields(schema) if schema is not None else ():
        at = f.metadata.get("at")
        if at == "key":
            key = f.metadata["doc"]
        elif at == "payload":
            payload = f.metadata["doc"]
        elif f.default is _REQUIRED:
            nested = f.metadata["codec"].schema
            each = f" (by uid, each: {_cells(nested)[2]})" if nested is not None else ""
            meta.append(f"`{f.name}`{each}")
        else:
            default = "null" if f.default is None else repr(f.default).lower()
            default = "[]" if f.default == () else default
            meta.append(f"`{f.name}` = {default}")
    return key, payload, ", ".join(meta) or "—"


def _does(cls: type) -> str:
    # The docstring's first paragraph, on one line, its RST literals as Markdown's.
    return " ".join((cls.__doc__ or "").split("\n\n")[0].split()).replace("``", "`")


def markdown_table() -> str:
    """docs/cluster.md's table of control ops, generated from the schemas.

    Returns:
        A Markdown table, one row per :class:`Op`: key, payload and meta
        fields of the request (``= value`` marks a default), the fields of
        the answer, and what the op does.
    """
    rows = [
        "| `op` | key | payload | request meta | answer | does |",
        "|---|---|---|---|---|---|",
    ]
    for op, schema in REQUESTS.items():
        key, payload, meta = _cells(schema)
        answer = "—"
        if schema.reply is not None:
            _, reply_payload, reply_meta = _cells(schema.reply)
            answer = reply_meta + ("" if reply_payload == "—" else f"; payload: {reply_payload}")
        rows.append(f"| `{op.value}` | {key} | {payload} | {meta} | {answer} | {_does(schema)} |")
    return "\n".join(rows) + "\n"
