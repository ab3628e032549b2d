"""The driver <-> node control vocabulary: every CONTROL op, written once.

A CONTROL frame names its op in ``meta["op"]`` (the :class:`Op` values are
the wire names); the op's other arguments are further meta fields, and a
few ops also use the frame's key (a partition uid) or its payload (a data
shard, a snapshot's bytes). Each op has one schema here: a frozen dataclass
of its request (``Info``, ``Open``, ``PartitionJob`` for ``start``, ...)
and, where the answer carries anything, one of its reply. A schema encodes
itself to the frame's parts (:meth:`Message.encode`, :meth:`Message.to_meta`)
and decodes from a received frame (:meth:`Message.from_frame`,
:meth:`Message.from_meta`; the machinery is :mod:`dbnode.schema`), checking
every field: a missing or malformed
one is a ``RequestError(BAD_REQUEST)`` whose message names it, e.g.
``start: field 'shards[1][1]' must be an integer, got '7070'``. Meta fields
a schema does not know are ignored, so that an older node still takes the
requests of a newer driver that only added optional fields.

Every op but ``info`` and ``status`` names its run in a ``run`` field: a
node holds each driver's run apart (:mod:`dbnode.runs`), and an op acts on
the caller's run only.

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
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from .codecs import CODECS
from .errors import DBNodeError, ErrorCode, RequestError
from .model import ModelSpec
from .schema import (
    REQUIRED,
    Bad,
    Codec,
    Message,
    Request,
    boolean,
    in_key,
    in_meta,
    in_payload,
    integer,
    is_required,
    list_of,
    mapping_of,
    nested,
    number,
    optional,
    positive,
    string,
    tuple_of,
)
from .wire.frames import Frame, MessageKind

__all__ = [
    "Op",
    "Message",
    "Request",
    "Info",
    "InfoReply",
    "Open",
    "OpenReply",
    "Close",
    "CloseReply",
    "Heartbeat",
    "HeartbeatReply",
    "Status",
    "StatusReply",
    "RunReport",
    "StalenessReport",
    "Remap",
    "PartitionJob",
    "Data",
    "Run",
    "Stop",
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
    OPEN = "open"
    CLOSE = "close"
    HEARTBEAT = "heartbeat"
    STATUS = "status"
    REMAP = "remap"
    START = "start"
    DATA = "data"
    RUN = "run"
    STOP = "stop"
    RESTORE = "restore"
    EXPORT = "export"
    IMPORT = "import"
    SCALE = "scale"
    DUMP = "dump"


_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _run_id() -> Codec:
    def decode(value: Any) -> str:
        if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
            raise Bad(f"must be a run id (1-64 letters, digits, '_', '-', '.'), got {value!r}")
        return value

    return Codec(decode)


def _model() -> Codec:
    parts = {
        "layers": list_of(integer(1)),
        "activation": string(),
        "output": string(),
        "loss": string(),
        "dtype": string(),
    }

    def decode(value: Any) -> ModelSpec:
        if not isinstance(value, dict):
            raise Bad(f"must be an object, got {value!r}")
        args = {}
        for name, codec in parts.items():
            if name not in value:
                raise Bad("is missing", f".{name}")
            try:
                args[name] = codec.decode(value[name])
            except Bad as exc:
                raise Bad(exc.reason, f".{name}{exc.path}") from None
        try:
            return ModelSpec(**args)
        except ValueError as exc:  # ModelSpec's own checks name the part
            raise Bad(str(exc)) from None

    def encode(spec: ModelSpec) -> dict[str, Any]:
        return {
            "layers": [int(n) for n in spec.layers],
            "activation": spec.activation,
            "output": spec.output,
            "loss": spec.loss,
            "dtype": spec.dtype,
        }

    return Codec(decode, encode)


_COUNT = integer(0)
_ADDRESS = tuple_of("[host, port]", string(), _COUNT)
_NEIGHBOUR = optional(tuple_of("[host, port, uid]", string(), _COUNT, _COUNT))
_UIDS = list_of(_COUNT)


_RUN = _run_id()


def _run() -> Any:
    """The ``run`` field of every run-scoped request: which driver's run it acts on."""
    return in_meta(_RUN)


# -- node ops (dbnode.node) --


@dataclass(frozen=True)
class InfoReply(Message):
    """Who a node is."""

    label: ClassVar[str] = "info reply"
    node_id: str = in_meta(string())
    name: str = in_meta(string())
    version: str = in_meta(string())
    pid: int = in_meta(_COUNT)
    cores: int | None = in_meta(optional(_COUNT))
    address: tuple[str, int] = in_meta(_ADDRESS)
    max_memory: int = in_meta(_COUNT)
    memory: int = in_meta(_COUNT)
    runs: int = in_meta(_COUNT)
    threads: int = in_meta(_COUNT, 0)  # 0: a node too old to say
    machine: str = in_meta(string(), "")


@dataclass(frozen=True)
class Info(Request):
    """Answers who the node is: its id (new at every start: two addresses of one
    node give the same id), name, dbnode version, pid, cores, the compute threads
    it runs with, its machine (nodes with one machine id share its cores),
    address, memory budget and use, and how many runs it holds."""

    op: ClassVar[Op] = Op.INFO
    reply: ClassVar[type[Message]] = InfoReply


@dataclass(frozen=True)
class OpenReply(Message):
    """Whether the run is new on the node, and its shard map's epoch there."""

    label: ClassVar[str] = "open reply"
    created: bool = in_meta(boolean())
    epoch: int = in_meta(_COUNT)


@dataclass(frozen=True)
class Open(Request):
    """Opens run `run` on the node, or renews it if open: the node frees the run
    (its partitions and shard) when `lease` seconds pass without an `open` or
    `heartbeat` for it."""

    op: ClassVar[Op] = Op.OPEN
    reply: ClassVar[type[Message]] = OpenReply
    run: str = _run()
    name: str = in_meta(string())
    lease: float = in_meta(positive())
    epoch: int = in_meta(_COUNT, 0)


@dataclass(frozen=True)
class CloseReply(Message):
    """What closing the run freed."""

    label: ClassVar[str] = "close reply"
    partitions: int = in_meta(_COUNT)
    keys: int = in_meta(_COUNT)


@dataclass(frozen=True)
class Close(Request):
    """Frees run `run` on the node: stops its partitions, drops its shard. A run
    the node does not hold is no error (closing twice is harmless)."""

    op: ClassVar[Op] = Op.CLOSE
    reply: ClassVar[type[Message]] = CloseReply
    run: str = _run()


@dataclass(frozen=True)
class PartitionReport(Message):
    """One partition's progress; losses are summed since the partition started."""

    step: int = in_meta(_COUNT)
    steps: int = in_meta(_COUNT)
    examples: int = in_meta(_COUNT)
    loss_sum: float = in_meta(number())
    loss_count: int = in_meta(_COUNT)
    seconds: float = in_meta(number())  # in the training loop, until the last push was applied
    done: bool = in_meta(boolean())
    error: str | None = in_meta(optional(string()))
    diverged: bool = in_meta(boolean(), False)
    pushes: int = in_meta(_COUNT, 0)  # piece updates the shards acknowledged
    # Payload bytes this partition sent to / received from other processes,
    # by their "host:port": sent, its pushes, activations and deltas;
    # received, its fetches (what a neighbour sent it, the neighbour counts).
    sent: dict[str, int] = in_meta(mapping_of(_COUNT, keys="peer"), {})
    received: dict[str, int] = in_meta(mapping_of(_COUNT, keys="peer"), {})
    # Pipelining (dbnode.pipeline): seconds waiting for neighbours, the most
    # weight versions and bytes kept for minibatches in flight, the most
    # local updates between its forward's weights and those below.
    idle: float = in_meta(number(), 0.0)
    stashed: int = in_meta(_COUNT, 0)
    held_bytes: int = in_meta(_COUNT, 0)
    lag: int = in_meta(_COUNT, 0)


_REPORTS = mapping_of(nested(PartitionReport))


@dataclass(frozen=True)
class StalenessReport(Message):
    """How stale the pushes the run's shard on a node applied were
    (:class:`~dbnode.ps.shard.Staleness`): pushes by staleness in versions
    (the last bucket counts that many or more), their exact total and
    largest staleness, and pushes refused as staler than ``max_staleness``."""

    histogram: dict[str, int] = in_meta(mapping_of(_COUNT, keys="staleness"), {})
    total: int = in_meta(_COUNT, 0)
    max: int = in_meta(_COUNT, 0)
    refused: int = in_meta(_COUNT, 0)

    @classmethod
    def of(cls, staleness) -> StalenessReport:
        """The report of a shard's :class:`~dbnode.ps.shard.Staleness`.

        Args:
            staleness: what the shard counted.

        Returns:
            Its report (a copy: reading it changes nothing).
        """
        return cls(
            histogram={str(k): n for k, n in sorted(staleness.histogram.items())},
            total=staleness.total,
            max=staleness.max,
            refused=staleness.refused,
        )

    @staticmethod
    def figures(reports) -> dict[str, Any]:
        """What several nodes' reports say together, as ``summary.json``'s
        ``staleness`` has it.

        Args:
            reports: :class:`StalenessReport` objects (one per node).

        Returns:
            ``{"histogram": {staleness: pushes}, "mean", "max", "refused"}``
            (``mean`` None when no push said its version).
        """
        histogram: dict[int, int] = {}
        for report in reports:
            for tau, n in report.histogram.items():
                histogram[int(tau)] = histogram.get(int(tau), 0) + n
        pushes = sum(histogram.values())
        total = sum(r.total for r in reports)
        return {
            "histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "mean": round(total / pushes, 4) if pushes else None,
            "max": max((r.max for r in reports), default=0),
            "refused": sum(r.refused for r in reports),
        }


_STALENESS = nested(StalenessReport)


@dataclass(frozen=True)
class HeartbeatReply(Message):
    """The run on this node: every partition's report by uid, the version of
    every shard key it holds, and requests it refused (stale epoch, not finite)."""

    label: ClassVar[str] = "heartbeat reply"
    epoch: int = in_meta(_COUNT)
    partitions: dict[str, PartitionReport] = in_meta(_REPORTS)
    versions: dict[str, int] = in_meta(mapping_of(_COUNT, keys="key"))
    fenced: int = in_meta(_COUNT)
    not_finite: int = in_meta(_COUNT)
    staleness: StalenessReport = in_meta(_STALENESS, StalenessReport())


@dataclass(frozen=True)
class Heartbeat(Request):
    """Renews the run's lease and answers its state on the node: the driver's
    poll."""

    op: ClassVar[Op] = Op.HEARTBEAT
    reply: ClassVar[type[Message]] = HeartbeatReply
    run: str = _run()


@dataclass(frozen=True)
class RunReport(Message):
    """One run as ``status`` shows it."""

    name: str = in_meta(string())
    lease_left: float = in_meta(number())
    epoch: int = in_meta(_COUNT)
    partitions: dict[str, PartitionReport] = in_meta(_REPORTS)
    keys: int = in_meta(_COUNT)
    bytes: int = in_meta(_COUNT)
    pushes: int = in_meta(_COUNT)
    staleness: StalenessReport = in_meta(_STALENESS, StalenessReport())


@dataclass(frozen=True)
class StatusReply(Message):
    """Every run on the node, by run id."""

    label: ClassVar[str] = "status reply"
    runs: dict[str, RunReport] = in_meta(mapping_of(nested(RunReport), keys="run id"))


@dataclass(frozen=True)
class Status(Request):
    """Answers every run the node holds, with its partitions' progress and its
    shard's size; changes nothing (a monitor may ask at any rate)."""

    op: ClassVar[Op] = Op.STATUS
    reply: ClassVar[type[Message]] = StatusReply


@dataclass(frozen=True)
class Remap(Request):
    """Moves the run to shard map `epoch`: its partitions on the node send to
    `shards` from now on, and the node refuses shard requests of any other
    epoch (STALE_EPOCH). A remap to an older epoch than the run's is itself
    STALE_EPOCH, and one whose `shards` do not fit the run's partitions'
    plan BAD_REQUEST: either changes nothing."""

    op: ClassVar[Op] = Op.REMAP
    run: str = _run()
    epoch: int = in_meta(_COUNT)
    shards: tuple[tuple[str, int], ...] = in_meta(list_of(_ADDRESS))


# -- layer partitions (dbnode.partition) --


@dataclass(frozen=True)
class PartitionJob(Request):
    """Creates a layer partition (not running yet): layers `[first, last)`
    of replica `replica`, the `index`-th of its partitions, with what it
    needs to train; `prev`/`next` are its neighbours as `[host, port,
    uid]` (null at the ends of the replica). Repeating it is harmless; a
    different job under the same uid is refused.

    This is the ``start`` op's request, and the job a
    :class:`~dbnode.partition.PartitionRunner` runs.

    Attributes:
        run: the run it belongs to.
        uid: the partition's id in its run (the key of its FORWARD,
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
        epoch: the shard map's epoch (see :class:`Remap`).
        wire_fetch, wire_push, wire_activations: the codecs of its fetches,
            pushes and the activations or deltas it sends (``[wire]``).
        pipeline: minibatches its replica keeps in flight
            (:func:`dbnode.pipeline.depth_of`).
        max_staleness: the shards refuse a push computed from parameters
            more versions behind theirs than this (None: any).
        end_step: where it stops (0: the end of the schedule); a backup
            trains the steps ``[start_step, end_step)`` of another's schedule.
        portion_steps: steps per leased portion of the schedule (0: one
            portion); its pushes are named after their portion (:meth:`pusher`).
    """

    op: ClassVar[Op] = Op.START
    run: str = _run()
    uid: int = in_meta(_COUNT)
    replica: int = in_meta(_COUNT)
    index: int = in_meta(_COUNT)
    first: int = in_meta(_COUNT)
    last: int = in_meta(integer(1))
    model: ModelSpec = in_meta(_model())
    learning_rate: float = in_meta(number())
    n_fetch: int = in_meta(integer(1))
    n_push: int = in_meta(integer(1))
    batch_size: int = in_meta(integer(1))
    epochs: int = in_meta(integer(1))
    seed: int = in_meta(integer())
    n_examples: int = in_meta(_COUNT)
    shards: tuple[tuple[str, int], ...] = in_meta(list_of(_ADDRESS))
    min_split_bytes: int = in_meta(_COUNT)
    bounds: tuple[tuple[int, int], ...] = in_meta(
        list_of(tuple_of("[first, last]", _COUNT, _COUNT))
    )
    prev: tuple[str, int, int] | None = in_meta(_NEIGHBOUR, None)
    next: tuple[str, int, int] | None = in_meta(_NEIGHBOUR, None)
    start_step: int = in_meta(_COUNT, 0)
    incarnation: int = in_meta(_COUNT, 0)
    epoch: int = in_meta(_COUNT, 0)
    wire_fetch: str = in_meta(string(CODECS), "f32", omit_default=True)
    wire_push: str = in_meta(string(CODECS), "f32", omit_default=True)
    wire_activations: str = in_meta(string(CODECS), "f32", omit_default=True)
    pipeline: int = in_meta(integer(1), 1, omit_default=True)
    max_staleness: int | None = in_meta(optional(_COUNT), None, omit_default=True)
    end_step: int = in_meta(_COUNT, 0, omit_default=True)
    portion_steps: int = in_meta(_COUNT, 0, omit_default=True)

    @property
    def spec(self) -> ModelSpec:
        """The model (the ``model`` field)."""
        return self.model

    def pusher(self, step: int) -> str:
        """The name this partition pushes ``step``'s gradients under."""
        # The same in every incarnation of the replica and in any backup of
        # its portion: sequence numbers are steps of its schedule, so a push
        # of a step that another had pushed already is dropped as a retry.
        # One name per portion: a backup of a later portion never makes the
        # shards drop the replica's own pushes of an earlier one.
        return pusher_name(self.replica, self.index, self.portion_steps, step)


def pusher_name(replica: int, index: int, portion_steps: int, step: int) -> str:
    """The name partition ``index`` of replica ``replica``'s schedule (or a
    backup of it) pushes ``step``'s gradients under: one per portion of
    ``portion_steps`` steps (0: one for the whole schedule)."""
    name = f"{pusher_prefix(replica)}{index}"
    return f"{name}q{step // portion_steps}" if portion_steps else name


def pusher_prefix(replica: int) -> str:
    """What the names of every push of replica ``replica``'s schedule (and
    of its backups) start with, and no other's."""
    return f"r{replica}p"


@dataclass(frozen=True)
class Data(Request):
    """Gives a partition its data shard: inputs (`role` x, first partition)
    or targets (`role` y, last partition), checked against the model."""

    op: ClassVar[Op] = Op.DATA
    run: str = _run()
    uid: int = in_key("partition uid")
    role: str = in_meta(string(("x", "y")))
    array: np.ndarray = in_payload("inputs or targets, one row per example")


@dataclass(frozen=True)
class Run(Request):
    """Starts the run's partitions `uids` (default: every one it has on the
    node); a partition already started is left alone."""

    op: ClassVar[Op] = Op.RUN
    run: str = _run()
    uids: tuple[int, ...] | None = in_meta(optional(_UIDS), None, omit_default=True)


@dataclass(frozen=True)
class Stop(Request):
    """Cancels and forgets the run's partitions `uids` (those of a replica
    being restarted elsewhere); unknown uids are ignored."""

    op: ClassVar[Op] = Op.STOP
    run: str = _run()
    uids: tuple[int, ...] = in_meta(_UIDS, ())


# -- the parameter shard (dbnode.ps.service) --


@dataclass(frozen=True)
class RestoreReply(Message):
    """How many tensors the restored shard holds."""

    label: ClassVar[str] = "restore reply"
    keys: int = in_meta(_COUNT)


@dataclass(frozen=True)
class Restore(Request):
    """Replaces the run's shard with the snapshot `<--snapshot-dir>/<name>`."""

    op: ClassVar[Op] = Op.RESTORE
    reply: ClassVar[type[Message]] = RestoreReply
    run: str = _run()
    name: str = in_meta(string())


@dataclass(frozen=True)
class ExportReply(Message):
    """The snapshot's bytes, and how many keys were asked for."""

    label: ClassVar[str] = "export reply"
    keys: int = in_meta(_COUNT)
    data: np.ndarray = in_payload("the snapshot's bytes (uint8)", np.uint8)


@dataclass(frozen=True)
class Export(Request):
    """Answers a snapshot of the run's shard `keys` (default: all) as bytes:
    what the driver checkpoints and keeps as the shard's backup."""

    op: ClassVar[Op] = Op.EXPORT
    reply: ClassVar[type[Message]] = ExportReply
    run: str = _run()
    keys: tuple[int, ...] | None = in_meta(optional(_UIDS), None, omit_default=True)


@dataclass(frozen=True)
class ImportReply(Message):
    """How many tensors were taken over."""

    label: ClassVar[str] = "import reply"
    keys: int = in_meta(_COUNT)


@dataclass(frozen=True)
class Import(Request):
    """Takes over the tensors of an exported snapshot into the run's shard (a
    dead node's pieces, from the driver's backup or checkpoint); their keys
    must be new to it, and each is checked as INIT checks a tensor (keys,
    dtypes, finite values and state)."""

    op: ClassVar[Op] = Op.IMPORT
    reply: ClassVar[type[Message]] = ImportReply
    run: str = _run()
    data: np.ndarray = in_payload("an exported snapshot's bytes (uint8)", np.uint8)


@dataclass(frozen=True)
class ScaleReply(Message):
    """How many tensors now learn at the new rate."""

    label: ClassVar[str] = "scale reply"
    keys: int = in_meta(_COUNT)


@dataclass(frozen=True)
class Scale(Request):
    """Sets the factor on the learning rate of every tensor of the run's
    shard on the node (reduce-on-plateau: the driver lowers it when the
    held-out figure stalls); the schedule's own factor applies on top."""

    op: ClassVar[Op] = Op.SCALE
    reply: ClassVar[type[Message]] = ScaleReply
    run: str = _run()
    scale: float = in_meta(positive())


@dataclass(frozen=True)
class DumpReply(Message):
    """The node's trio task tree and every thread's stack, as text."""

    label: ClassVar[str] = "dump reply"
    text: str = in_meta(string())


@dataclass(frozen=True)
class Dump(Request):
    """Answers what the node is doing: its task tree and thread stacks (what
    SIGUSR1 writes to its log), for an operator looking at a stuck node."""

    op: ClassVar[Op] = Op.DUMP
    reply: ClassVar[type[Message]] = DumpReply


#: Every op's request schema.
REQUESTS: dict[Op, type[Request]] = {
    cls.op: cls
    for cls in (
        Info,
        Open,
        Close,
        Heartbeat,
        Status,
        Remap,
        PartitionJob,
        Data,
        Run,
        Stop,
        Restore,
        Export,
        Import,
        Scale,
        Dump,
    )
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
        elif is_required(f):
            nested = f.metadata["codec"].schema
            by = f.metadata["codec"].keys
            each = f" (by {by}, each: {_cells(nested)[2]})" if nested is not None else ""
            meta.append(f"`{f.name}`{each}")
        else:
            value = f.default_factory() if f.default is REQUIRED else f.default
            if isinstance(value, Message):  # a nested message: its own fields
                meta.append(f"`{f.name}` ({_cells(type(value))[2]})")
                continue
            default = "null" if value is None else repr(value).lower()
            default = "[]" if value == () else default
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
