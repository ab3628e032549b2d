"""The control vocabulary (dbnode.control): schemas, their wire form, the docs table, and
the node's control ops answered by a real node over TCP."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio

from dbnode import codecs, control
from dbnode.control import Op
from dbnode.errors import DBNodeError, ErrorCode, RemoteError, RequestError
from dbnode.model import ModelSpec
from dbnode.node import READY_PREFIX, parse_ready_line, ready_line, run_node
from dbnode.wire import Channel, Frame, MessageKind, encode_frame, open_connection

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"
SECRET = os.urandom(32)
SPEC = ModelSpec((2, 3, 1), "tanh", "sigmoid", "squared_error", "float64")


RUN = "r1"


def job(**changes) -> control.PartitionJob:
    fields = dict(
        run=RUN, uid=7, replica=1, index=0, first=0, last=2, model=SPEC, learning_rate=0.5, n_fetch=1,
        n_push=2, batch_size=1, epochs=1, seed=3, n_examples=4, shards=(("127.0.0.1", 7070),),
        min_split_bytes=4096, bounds=((0, 2),), prev=None, next=("10.0.0.2", 7071, 8),
        start_step=5, incarnation=1,
    )  # fmt: skip
    fields.update(changes)
    return control.PartitionJob(**fields)


REPORT = control.PartitionReport(
    step=3, steps=10, examples=3, loss_sum=0.25, loss_count=3, seconds=0.5, done=False, error=None
)
DIVERGED = dataclasses.replace(REPORT, loss_sum=float("inf"), error="diverged", diverged=True)

#: One example of every schema, requests and replies.
EXAMPLES = [
    control.Info(),
    control.InfoReply(
        node_id="ab12",
        name="n",
        version="0.1.0",
        pid=12,
        cores=None,
        threads=2,
        machine="m-1",
        address=("::1", 7070),
        max_memory=2**30,
        memory=0,
        runs=1,
    ),  # fmt: skip
    control.Open(run=RUN, name="digits", lease=10.0),
    control.Open(run=RUN, name="digits", lease=2, epoch=3),
    control.OpenReply(created=True, epoch=0),
    control.Close(run=RUN),
    control.CloseReply(partitions=2, keys=1),
    control.Heartbeat(run=RUN),
    control.HeartbeatReply(
        epoch=1, partitions={"7": REPORT, "8": DIVERGED}, versions={"3": 9}, fenced=2, not_finite=0
    ),
    control.Status(),
    control.StatusReply(
        runs={
            RUN: control.RunReport(
                name="digits",
                lease_left=4.5,
                epoch=0,
                keys=2,
                bytes=100,
                pushes=7,
                partitions={"7": REPORT, "8": dataclasses.replace(REPORT, error="boom")},
            )
        }
    ),  # fmt: skip
    control.Remap(run=RUN, epoch=2, shards=(("10.0.0.1", 7070),)),
    job(),
    control.Data(run=RUN, uid=7, role="y", array=np.arange(4.0)),
    control.Run(run=RUN),
    control.Run(run=RUN, uids=(1, 2)),
    control.Stop(run=RUN, uids=(3,)),
    control.Restore(run=RUN, name="shard.npz"),
    control.RestoreReply(keys=2),
    control.Export(run=RUN),
    control.Export(run=RUN, keys=(1, 5)),
    control.ExportReply(keys=2, data=np.frombuffer(b"snapshot", np.uint8)),
    control.Import(run=RUN, data=np.frombuffer(b"snapshot", np.uint8)),
    control.ImportReply(keys=2),
    control.Scale(run=RUN, scale=0.5),
    control.ScaleReply(keys=2),
    control.Dump(),
    control.DumpReply(text="== trio tasks"),
]


def payload(message):
    return message.encode()[2]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_schema_round_trips(message):
    key, meta, array = message.encode()
    json.dumps(meta, allow_nan=False)  # strict JSON, as the meta must be
    back = type(message).from_meta(meta, key=key, array=array)
    assert back == message
    assert back.to_meta() == meta
    assert payload(back) is array
    # What the peer decodes is what was sent: through real frame bytes too.
    frame = Frame(MessageKind.CONTROL, key=key, meta=meta, array=array)
    assert type(message).from_frame(frame) == message


def test_every_op_has_a_schema_and_every_schema_is_covered_here():
    assert set(control.REQUESTS) == set(Op)
    assert {type(m) for m in EXAMPLES if isinstance(m, control.Request)} == set(
        control.REQUESTS.values()
    )
    assert {r.reply for r in control.REQUESTS.values() if r.reply} <= {type(m) for m in EXAMPLES}
    for op, schema in control.REQUESTS.items():
        assert schema.op is op and op.value == str(op)


def test_requests_encode_to_the_metas_the_driver_sends():
    old = {
        "op": "start", "run": "r1", "uid": 7, "replica": 1, "index": 0, "first": 0, "last": 2,
        "model": {"layers": [2, 3, 1], "activation": "tanh", "output": "sigmoid",
                  "loss": "squared_error", "dtype": "float64"},
        "learning_rate": 0.5, "n_fetch": 1, "n_push": 2, "batch_size": 1, "epochs": 1,
        "seed": 3, "n_examples": 4, "shards": [["127.0.0.1", 7070]], "min_split_bytes": 4096,
        "bounds": [[0, 2]], "prev": None, "next": ["10.0.0.2", 7071, 8], "start_step": 5,
        "incarnation": 1, "epoch": 0,
    }  # fmt: skip
    r = {"run": RUN}
    cases = [
        (job(), old),
        (control.Info(), {"op": "info"}),
        (control.Open(run=RUN, name="n", lease=5), {"op": "open", **r, "name": "n", "lease": 5, "epoch": 0}),
        (control.Close(run=RUN), {"op": "close", **r}),
        (control.Run(run=RUN), {"op": "run", **r}),
        (control.Run(run=RUN, uids=(4, 5)), {"op": "run", **r, "uids": [4, 5]}),
        (control.Stop(run=RUN, uids=(4,)), {"op": "stop", **r, "uids": [4]}),
        (control.Status(), {"op": "status"}),
        (control.Export(run=RUN, keys=(1, 2)), {"op": "export", **r, "keys": [1, 2]}),
        (control.Import(run=RUN, data=np.zeros(3, np.uint8)), {"op": "import", **r}),
        (control.Data(run=RUN, uid=9, role="x", array=np.zeros((4, 2))), {"op": "data", **r, "role": "x"}),
    ]  # fmt: skip
    for request, meta in cases:
        key, got, array = request.encode()
        assert got == meta and list(got) == list(meta)  # same keys in the same order
        before = b"".join(
            bytes(p)
            for p in encode_frame(
                MessageKind.CONTROL, request_id=1, key=key, array=array, meta=meta
            )
        )
        after = b"".join(
            bytes(p)
            for p in encode_frame(MessageKind.CONTROL, request_id=1, key=key, array=array, meta=got)
        )
        assert after == before
    assert control.Data(run=RUN, uid=9, role="x", array=np.zeros(1)).encode()[0] == 9


def required_meta_fields(schema):
    return [
        f.name
        for f in dataclasses.fields(schema)
        if f.metadata.get("at") == "meta" and f.default is dataclasses.MISSING
    ]


META_SCHEMAS = [type(m) for m in EXAMPLES if required_meta_fields(type(m))]


@pytest.mark.parametrize("schema", dict.fromkeys(META_SCHEMAS), ids=lambda s: s.__name__)
def test_a_missing_or_malformed_field_is_a_bad_request_naming_it(schema):
    example = next(m for m in EXAMPLES if type(m) is schema)
    key, meta, array = example.encode()
    for name in required_meta_fields(schema):
        for value in (..., [[[]]]):
            bad = {k: v for k, v in meta.items() if k != name}
            if value is not ...:
                bad[name] = value
            with pytest.raises(RequestError) as info:
                schema.from_meta(bad, key=key, array=array)
            assert info.value.code == ErrorCode.BAD_REQUEST
            assert f"'{name}" in info.value.message, info.value.message
            assert ("missing" in info.value.message) == (value is ...)


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"uid": True}, "field 'uid' must be an integer, got True"),
        ({"n_fetch": 0}, "field 'n_fetch' must be >= 1, got 0"),
        ({"learning_rate": "0.5"}, "field 'learning_rate' must be a number"),
        ({"shards": [["h", "7070"]]}, "field 'shards[0][1]' must be an integer, got '7070'"),
        ({"shards": [["h"]]}, "field 'shards[0]' must be [host, port]"),
        ({"prev": ["h", 1]}, "field 'prev' must be [host, port, uid]"),
        ({"model": {"layers": [2, 1]}}, "field 'model.activation' is missing"),
        ({"model": {**job().to_meta()["model"], "layers": [2, -1]}},
         "field 'model.layers[1]' must be >= 1"),
        ({"model": {**job().to_meta()["model"], "loss": "hinge"}},
         "field 'model' loss: 'hinge' is not one of"),
    ],
)  # fmt: skip
def test_start_names_the_field_at_fault(meta, message):
    with pytest.raises(RequestError, match=re.escape(f"start: {message}")) as info:
        control.PartitionJob.from_meta({**job().to_meta(), **meta})
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_payloads_keys_and_ops_are_checked():
    x = np.zeros((4, 2))
    with pytest.raises(RequestError, match=r"data: field 'role' must be one of \['x', 'y'\]"):
        control.Data.from_meta({"op": "data", "run": RUN, "role": "z"}, key=1, array=x)
    with pytest.raises(RequestError, match=r"data: payload \(array\) is missing"):
        control.Data.from_meta({"op": "data", "run": RUN, "role": "x"}, key=1)
    with pytest.raises(RequestError, match=r"import: payload \(data\) must be uint8, got float64"):
        control.Import.from_meta({"op": "import", "run": RUN}, array=x)
    with pytest.raises(
        RequestError,
        match=r"heartbeat reply: field 'partitions\[7\].done' must be true or false, got 1",
    ):
        control.HeartbeatReply.from_meta(
            {"epoch": 0, "partitions": {"7": {**REPORT.to_meta(), "done": 1}}, "versions": {},
             "fenced": 0, "not_finite": 0}
        )  # fmt: skip
    for bad in ("", "a b", "x" * 65, 7, None, "../x"):
        with pytest.raises(RequestError, match="field 'run' must be a run id"):
            control.Close.from_meta({"op": "close", "run": bad})
    with pytest.raises(RequestError, match="field 'lease' must be a finite number > 0"):
        control.Open.from_meta({"op": "open", "run": RUN, "name": "n", "lease": "nan"})
    with pytest.raises(RequestError, match="meta must be an object"):
        control.Info.from_meta([])
    for op in ("nope", ["info"], None, 5):
        with pytest.raises(RequestError, match="unknown control op") as info:
            control.decode_request(Frame(MessageKind.CONTROL, meta={"op": op}))
        assert info.value.code == ErrorCode.BAD_REQUEST
    request = control.decode_request(
        Frame(MessageKind.CONTROL, key=3, meta={"op": "data", "run": RUN, "role": "x", "extra": 1}, array=x)
    )  # fmt: skip
    assert request == control.Data(run=RUN, uid=3, role="x", array=x)  # unknown fields are ignored
    assert control.Run.from_meta({"op": "run", "run": RUN, "uids": None}) == control.Run(run=RUN)


def test_non_finite_losses_travel_as_strings():
    meta = DIVERGED.to_meta()
    assert meta["loss_sum"] == "inf"
    nan = dataclasses.replace(REPORT, loss_sum=float("nan")).to_meta()
    assert nan["loss_sum"] == "nan" and math.isnan(control.PartitionReport.from_meta(nan).loss_sum)
    with pytest.raises(RequestError, match="must be a number"):
        control.PartitionReport.from_meta({**meta, "loss_sum": "NaN!"})


class FakeChannel:
    def __init__(self, answer: Frame):
        self.answer, self.sent = answer, []

    async def request(self, kind, **kwargs):
        self.sent.append((kind, kwargs))
        return self.answer


async def test_call_sends_the_request_and_decodes_its_reply():
    ch = FakeChannel(Frame(MessageKind.REPLY, meta={"keys": 3}))
    restore = control.Restore(run=RUN, name="s.npz")
    assert await control.call(ch, restore, timeout=2) == control.RestoreReply(3)
    kind, sent = ch.sent[0]
    assert kind == MessageKind.CONTROL
    assert sent == {
        "key": 0,
        "array": None,
        "meta": {"op": "restore", "run": RUN, "name": "s.npz"},
        "timeout": 2,
    }
    assert await control.call(ch, control.Stop(run=RUN, uids=(1,))) is None
    ch.answer = Frame(MessageKind.REPLY, meta={"keys": "three"})
    with pytest.raises(
        DBNodeError, match="malformed answer to restore: restore reply: field 'keys'"
    ):
        await control.call(ch, restore)


# -- docs/cluster.md -------------------------------------------------------------------

BEGIN = "<!-- control-ops: begin -->\n"
END = "<!-- control-ops: end -->"


def docs_table() -> str:
    text = DOCS.read_text()
    assert BEGIN in text and END in text, "docs/cluster.md lost its control-op table markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def test_docs_table_is_the_one_control_py_generates():
    assert docs_table() == control.markdown_table(), (
        "docs/cluster.md's control-op table is stale: paste dbnode.control.markdown_table()"
    )


def test_docs_table_lists_exactly_the_ops_and_their_fields():
    rows = [line for line in docs_table().splitlines() if line.startswith("| `")][1:]
    documented = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        documented[cells[0].strip("`")] = re.findall(r"`(\w+)`", cells[3])
    assert set(documented) == {op.value for op in Op}
    for op, schema in control.REQUESTS.items():
        meta = [f.name for f in dataclasses.fields(schema) if f.metadata.get("at") == "meta"]
        assert documented[op.value] == meta, op


# -- the ops on a real node ------------------------------------------------------------


async def start_node(nursery, **options):
    return await nursery.start(partial(run_node, "127.0.0.1", 0, SECRET, **options))


async def channel(nursery, address) -> Channel:
    ch = Channel(await open_connection(*address, SECRET))
    await nursery.start(ch.run)
    return ch


async def open_run(ch, run=RUN, lease=30.0, **kw):
    return await control.call(ch, control.Open(run=run, name=f"{run}-name", lease=lease, **kw))


def shard_meta(run=RUN, **more):
    return {"run": run, **more}


async def test_a_node_answers_every_node_and_shard_op(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, name="a", snapshot_dir=tmp_path)
        b = await start_node(nursery, name="b")
        cha, chb = await channel(nursery, a), await channel(nursery, b)

        info = await control.call(cha, control.Info())
        assert info.name == "a" and info.pid == os.getpid() and info.address == a
        assert info.node_id != (await control.call(chb, control.Info())).node_id
        assert (await open_run(cha)).created and not (await open_run(cha)).created
        await open_run(chb)

        sgd = {"name": "sgd", "learning_rate": 1.0}
        for key in (1, 2):
            meta = shard_meta(name=f"t{key}", optimizer=sgd)
            await cha.request(MessageKind.INIT, key=key, array=np.full(3, float(key)), meta=meta)
        await cha.request(MessageKind.PUSH, key=2, array=np.ones(3), meta=shard_meta())

        exported = await control.call(cha, control.Export(run=RUN, keys=(2,)))
        assert exported.keys == 1 and exported.data.dtype == np.uint8
        assert (await control.call(chb, control.Import(run=RUN, data=exported.data))).keys == 1
        pulled = await chb.request(MessageKind.PULL, key=2, meta=shard_meta())
        np.testing.assert_array_equal(pulled.array, np.full(3, 1.0))
        assert pulled.seq == 1  # the version came along
        with pytest.raises(RemoteError, match="already held") as refused:  # a ShardError, mapped
            await control.call(chb, control.Import(run=RUN, data=exported.data))
        assert refused.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(RemoteError) as unknown:
            await control.call(cha, control.Export(run=RUN, keys=(99,)))
        assert unknown.value.code == ErrorCode.UNKNOWN_KEY
        with pytest.raises(RemoteError, match="not valid|corrupt|truncated"):
            junk = np.frombuffer(b"junk", np.uint8)
            await control.call(chb, control.Import(run=RUN, data=junk))

        await cha.request(MessageKind.SNAPSHOT, meta=shard_meta(name="s.npz"))
        assert (await control.call(cha, control.Close(run=RUN))).keys == 2
        await open_run(cha)
        assert (await control.call(cha, control.Restore(run=RUN, name="s.npz"))).keys == 2
        pulled = await cha.request(MessageKind.PULL, key=1, meta=shard_meta())
        np.testing.assert_array_equal(pulled.array, np.ones(3))
        with pytest.raises(RemoteError, match="without --snapshot-dir"):
            await control.call(chb, control.Restore(run=RUN, name="s.npz"))
        with pytest.raises(RemoteError, match="plain file name"):
            await control.call(cha, control.Restore(run=RUN, name="../s.npz"))

        await control.call(chb, control.Close(run=RUN))
        await control.call(chb, control.Close(run=RUN))  # closing twice is harmless
        with pytest.raises(RemoteError) as gone:
            await chb.request(MessageKind.PULL, key=2, meta=shard_meta())
        assert gone.value.code == ErrorCode.UNKNOWN_RUN
        for ch in (cha, chb):
            await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_runs_on_one_node_never_see_each_other():
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, await start_node(nursery))
        sgd = {"name": "sgd", "learning_rate": 1.0}
        for run, value in (("one", 1.0), ("two", 2.0)):
            await open_run(ch, run)
            meta = shard_meta(run, name="w", optimizer=sgd)
            await ch.request(MessageKind.INIT, key=1, array=np.full(2, value), meta=meta)
        await ch.request(MessageKind.PUSH, key=1, array=np.ones(2), meta=shard_meta("one"))
        one = await ch.request(MessageKind.PULL, key=1, meta=shard_meta("one"))
        two = await ch.request(MessageKind.PULL, key=1, meta=shard_meta("two"))
        assert (one.array.tolist(), one.seq, two.array.tolist(), two.seq) == ([0, 0], 1, [2, 2], 0)
        await control.call(ch, control.Close(run="one"))  # closing one leaves the other
        assert (await ch.request(MessageKind.PULL, key=1, meta=shard_meta("two"))).seq == 0
        for meta in ({}, {"run": "one"}, {"run": 5}):
            with pytest.raises(RemoteError) as refused:
                await ch.request(MessageKind.PULL, key=1, meta=meta)
            assert refused.value.code == ErrorCode.UNKNOWN_RUN
        runs = (await control.call(ch, control.Status())).runs
        assert list(runs) == ["two"] and runs["two"].name == "two-name" and runs["two"].keys == 1
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_a_lapsed_lease_frees_the_run_and_a_heartbeat_keeps_it():
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, await start_node(nursery))
        await open_run(ch, "kept", lease=0.5)
        await open_run(ch, "lapsed", lease=0.5)
        partition = job(run="lapsed", shards=((await control.call(ch, control.Info())).address,))
        await control.call(ch, dataclasses.replace(partition, next=None, start_step=0))
        for _ in range(8):
            await trio.sleep(0.2)
            beat = await control.call(ch, control.Heartbeat(run="kept"))
            assert beat.partitions == {}
        assert list((await control.call(ch, control.Status())).runs) == ["kept"]
        with pytest.raises(RemoteError, match="no run 'lapsed'") as gone:
            await control.call(ch, control.Heartbeat(run="lapsed"))
        assert gone.value.code == ErrorCode.UNKNOWN_RUN
        assert (await control.call(ch, control.Info())).memory == 0  # its partition's share freed
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_epoch_is_refused_and_counted():
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, await start_node(nursery))
        await open_run(ch)
        sgd = {"name": "sgd", "learning_rate": 1.0}
        meta = shard_meta(name="w", optimizer=sgd, epoch=0)
        await ch.request(MessageKind.INIT, key=1, array=np.zeros(2), meta=meta)
        address = (await control.call(ch, control.Info())).address
        await control.call(ch, control.Remap(run=RUN, epoch=1, shards=(address,)))
        for epoch in (0, 2):
            with pytest.raises(RemoteError, match="epoch") as stale:
                await ch.request(
                    MessageKind.PUSH, key=1, array=np.ones(2), meta=shard_meta(epoch=epoch)
                )
            assert stale.value.code == ErrorCode.STALE_EPOCH
        await ch.request(MessageKind.PUSH, key=1, array=np.ones(2), meta=shard_meta(epoch=1))
        beat = await control.call(ch, control.Heartbeat(run=RUN))
        assert (beat.epoch, beat.fenced, beat.versions) == (1, 2, {"1": 1})
        # A late retry of an older remap cannot unfence what the newer fenced off,
        # and a map that does not fit the run's partitions changes nothing.
        with pytest.raises(RemoteError, match="older than") as late:
            await control.call(ch, control.Remap(run=RUN, epoch=0, shards=(address,)))
        assert late.value.code == ErrorCode.STALE_EPOCH
        await control.call(ch, dataclasses.replace(job(shards=(address,)), next=None, start_step=0))
        with pytest.raises(RemoteError, match="2 shard addresses for a plan of 1") as misfit:
            await control.call(ch, control.Remap(run=RUN, epoch=2, shards=(address, address)))
        assert misfit.value.code == ErrorCode.BAD_REQUEST
        assert (await control.call(ch, control.Heartbeat(run=RUN))).epoch == 1
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_the_memory_budget_refuses_before_allocating():
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, await start_node(nursery, max_memory=1 << 20))
        await open_run(ch)
        address = (await control.call(ch, control.Info())).address
        huge = ModelSpec((4096, 4096, 10), "relu", "softmax", "cross_entropy", "float32")
        with pytest.raises(RemoteError, match="budget") as refused:
            await control.call(ch, job(model=huge, shards=(address,), bounds=((0, 2),), next=None))
        assert refused.value.code == ErrorCode.UNAVAILABLE
        sgd = {"name": "sgd", "learning_rate": 1.0}
        with pytest.raises(RemoteError, match="budget"):
            meta = shard_meta(name="w", optimizer=sgd)
            await ch.request(MessageKind.INIT, key=1, array=np.zeros(1 << 18), meta=meta)
        assert (await control.call(ch, control.Info())).memory == 0
        # Data whose float64 copy would not fit is refused before it is made
        # (a 256 KiB payload of bytes, 2 MiB converted).
        n = 1 << 17
        await control.call(ch, job(shards=(address,), next=None, n_examples=n, uid=5))
        held = (await control.call(ch, control.Info())).memory
        tracemalloc.start()
        try:
            x = np.ones((n, 2), np.uint8)
            tracemalloc.reset_peak()
            with pytest.raises(RemoteError, match="data for partition 5 .* budget") as data:
                await control.call(ch, control.Data(run=RUN, uid=5, role="x", array=x))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert data.value.code == ErrorCode.UNAVAILABLE
        assert peak < 4 * x.nbytes, peak  # the payload's copies, never its conversion
        assert (await control.call(ch, control.Info())).memory == held
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_a_16_bit_push_that_fits_no_tensor_is_refused_before_it_is_widened():
    """Widened to float32 in a buffer the node keeps, it would hold twice
    its payload for good: for a key that does not exist, or a gradient of
    the wrong shape, nothing is allocated."""
    async with trio.open_nursery() as nursery:
        ch = await channel(nursery, await start_node(nursery))
        await open_run(ch)
        sgd = {"name": "sgd", "learning_rate": 1.0}
        meta = shard_meta(name="w", optimizer=sgd)
        await ch.request(MessageKind.INIT, key=1, array=np.zeros(4, np.float32), meta=meta)
        big = codecs.encode(np.ones(1 << 22, np.float32), "bf16")
        tracemalloc.start()
        try:
            for key, code in ((99, ErrorCode.UNKNOWN_KEY), (1, ErrorCode.SHAPE_MISMATCH)):
                before = tracemalloc.get_traced_memory()[0]
                with pytest.raises(RemoteError) as refused:
                    await ch.request(MessageKind.PUSH, key=key, array=big, meta=shard_meta())
                assert refused.value.code == code
                # At most the payload, in the receiving buffer the connection
                # reuses; widened, another twice that.
                kept = tracemalloc.get_traced_memory()[0] - before
                assert kept < big.nbytes * 3 // 2, kept
        finally:
            tracemalloc.stop()
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_frames_for_a_partition_not_running_never_stall_the_connection():
    """A peer that floods a partition not set running (it may never be)
    fills its inbox; the rest is refused at once, and the connection, which
    carries other runs' requests too, goes on answering them."""
    async with trio.open_nursery() as nursery:
        address = await start_node(nursery)
        ch = await channel(nursery, address)
        await open_run(ch, "one")
        await open_run(ch, "two")
        await control.call(ch, job(run="one", shards=(address,), next=None, start_step=0))
        meta = shard_meta("two", name="w", optimizer={"name": "sgd", "learning_rate": 1.0})
        await ch.request(MessageKind.INIT, key=1, array=np.zeros(2), meta=meta)
        for step in range(80):  # its inbox holds 4
            await ch.notify(MessageKind.FORWARD, key=7, seq=step, array=np.ones((1, 3)),
                            meta={"run": "one"})  # fmt: skip
        with trio.fail_after(5):
            assert (await ch.request(MessageKind.PULL, key=1, meta=shard_meta("two"))).seq == 0
        await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_a_node_answers_the_partition_ops_and_survives_their_misuse():
    async with trio.open_nursery() as nursery:
        address = await start_node(nursery)
        ch = await channel(nursery, address)
        partition = job(shards=(address,), next=None, start_step=0, uid=3)
        with pytest.raises(RemoteError) as no_run:
            await control.call(ch, partition)
        assert no_run.value.code == ErrorCode.UNKNOWN_RUN
        await open_run(ch)
        await control.call(ch, partition)
        await control.call(ch, partition)  # the same start again is harmless
        with pytest.raises(RemoteError, match="partition 3 already exists with another job"):
            await control.call(ch, dataclasses.replace(partition, seed=9))
        with pytest.raises(RemoteError, match="start: field 'bounds' is missing"):
            meta = {k: v for k, v in partition.to_meta().items() if k != "bounds"}
            await ch.request(MessageKind.CONTROL, meta=meta)
        with pytest.raises(RemoteError, match="start: "):  # fields that do not fit together
            await control.call(ch, job(uid=4, index=5, shards=(address,)))
        with pytest.raises(RemoteError) as unknown:
            await control.call(ch, control.Data(run=RUN, uid=99, role="x", array=np.zeros((4, 2))))
        assert unknown.value.code == ErrorCode.UNKNOWN_KEY
        with pytest.raises(RemoteError) as shape:
            await control.call(ch, control.Data(run=RUN, uid=3, role="x", array=np.zeros((4, 5))))
        assert shape.value.code == ErrorCode.SHAPE_MISMATCH
        x = np.zeros((4, 2))
        for _ in range(3):  # sent again: counted once against the budget
            await control.call(ch, control.Data(run=RUN, uid=3, role="x", array=x))
        with_data = (await control.call(ch, control.Info())).memory
        await control.call(ch, control.Data(run=RUN, uid=3, role="x", array=x))
        assert (await control.call(ch, control.Info())).memory == with_data
        with pytest.raises(RemoteError) as nan:
            bad = np.full((4, 2), np.nan)
            await control.call(ch, control.Data(run=RUN, uid=3, role="x", array=bad))
        assert nan.value.code == ErrorCode.NOT_FINITE
        with pytest.raises(RemoteError, match="no partition 99"):
            await control.call(ch, control.Run(run=RUN, uids=(3, 99)))
        beat = await control.call(ch, control.Heartbeat(run=RUN))
        assert beat.partitions["3"].step == 0  # not started

        # Inputs but no targets? A first-and-last partition needs both: it
        # fails, and says why.
        await control.call(ch, control.Run(run=RUN))
        await control.call(
            ch, control.Run(run=RUN)
        )  # a second run of the same partition is harmless
        with trio.fail_after(10):
            while (
                report := (await control.call(ch, control.Heartbeat(run=RUN))).partitions["3"]
            ).error is None:
                await trio.sleep(0.01)
        assert "targets not received" in report.error and not report.done
        assert (await control.call(ch, control.Info())).address == address  # still serving

        await control.call(ch, control.Stop(run=RUN, uids=(3, 42)))
        assert (await control.call(ch, control.Heartbeat(run=RUN))).partitions == {}
        # Activations still on their way to the stopped partition are dropped
        # (its neighbours may not have stopped yet); to one never started, an error.
        x = np.zeros((4, 2), np.float32)
        await ch.request(MessageKind.FORWARD, key=3, array=x, meta={"run": RUN}, timeout=10)
        with pytest.raises(RemoteError, match="no partition 99") as unknown:
            await ch.request(MessageKind.FORWARD, key=99, array=x, meta={"run": RUN}, timeout=10)
        assert unknown.value.code == ErrorCode.UNKNOWN_KEY
        await ch.aclose()
        nursery.cancel_scope.cancel()


def test_the_ready_line_is_written_and_read_in_one_place():
    line = ready_line(("127.0.0.1", 7070))
    assert line == "dbnode serve: listening on 127.0.0.1:7070" and line.startswith(READY_PREFIX)
    assert parse_ready_line(line + "\n") == ("127.0.0.1", 7070)
    assert parse_ready_line(ready_line(("::1", 80))) == ("::1", 80)
    assert parse_ready_line("dbnode serve: secret written to /tmp/x") is None


def test_the_vocabulary_imports_without_trio():
    code = "import sys, dbnode.control; assert 'trio' not in sys.modules, 'trio'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_fields_added_later_are_optional_when_decoding():
    """A node of the version before threads and wire bytes were reported:
    its info and partition reports still decode, with the defaults."""
    meta = REPORT.to_meta()
    del meta["sent"], meta["received"]
    old = control.PartitionReport.from_meta(meta)
    assert old.sent == {} and old.received == {} and old == REPORT
    info = next(e for e in EXAMPLES if isinstance(e, control.InfoReply))
    meta = info.to_meta()
    del meta["threads"], meta["machine"]
    old_info = control.InfoReply.from_meta(meta)
    assert old_info.threads == 0 and old_info.machine == ""
    # Each decoded report has its own dict: filling one leaves the others empty.
    old.sent["x:1"] = 5
    assert control.PartitionReport.from_meta(REPORT.to_meta()).sent == {}
