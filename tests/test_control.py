"""The control vocabulary (dbnode.control): schemas, their wire form, the docs table, and
the node's control ops answered by a real node over TCP."""

import dataclasses
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio

from dbnode import control
from dbnode.control import Op
from dbnode.errors import DBNodeError, ErrorCode, RemoteError, RequestError
from dbnode.model import ModelSpec
from dbnode.node import READY_PREFIX, parse_ready_line, ready_line, run_node
from dbnode.wire import Channel, Frame, MessageKind, encode_frame, open_connection

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cluster.md"
SECRET = os.urandom(32)
SPEC = ModelSpec((2, 3, 1), "tanh", "sigmoid", "squared_error", "float64")


def job(**changes) -> control.PartitionJob:
    fields = dict(
        uid=7, replica=1, index=0, first=0, last=2, model=SPEC, learning_rate=0.5, n_fetch=1,
        n_push=2, batch_size=1, epochs=1, seed=3, n_examples=4, shards=(("127.0.0.1", 7070),),
        min_split_bytes=4096, bounds=((0, 2),), prev=None, next=("10.0.0.2", 7071, 8),
        start_step=5, incarnation=1,
    )  # fmt: skip
    fields.update(changes)
    return control.PartitionJob(**fields)


REPORT = control.PartitionReport(
    step=3, steps=10, examples=3, loss_sum=0.25, loss_count=3, seconds=0.5, done=False, error=None
)

#: One example of every schema, requests and replies.
EXAMPLES = [
    control.Info(),
    control.InfoReply(name="n", version="0.1.0", pid=12, cores=None, address=("::1", 7070)),
    control.Reset(),
    control.Reset(force=True),
    job(),
    control.Data(uid=7, role="y", array=np.arange(4.0)),
    control.Run(),
    control.Run(uids=(1, 2)),
    control.Stop(uids=(3,)),
    control.Status(),
    control.StatusReply(partitions={"7": REPORT, "8": dataclasses.replace(REPORT, error="boom")}),
    control.Restore(name="shard.npz"),
    control.RestoreReply(keys=2),
    control.Export(),
    control.Export(keys=(1, 5)),
    control.ExportReply(keys=2, data=np.frombuffer(b"snapshot", np.uint8)),
    control.Import(data=np.frombuffer(b"snapshot", np.uint8)),
    control.ImportReply(keys=2),
]


def payload(message):
    return message.encode()[2]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_schema_round_trips(message):
    key, meta, array = message.encode()
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


def test_requests_encode_to_the_metas_the_driver_always_sent():
    # The wire bytes stay what they were before the schemas existed.
    old = {
        "op": "start", "uid": 7, "replica": 1, "index": 0, "first": 0, "last": 2,
        "model": {"layers": [2, 3, 1], "activation": "tanh", "output": "sigmoid",
                  "loss": "squared_error", "dtype": "float64"},
        "learning_rate": 0.5, "n_fetch": 1, "n_push": 2, "batch_size": 1, "epochs": 1,
        "seed": 3, "n_examples": 4, "shards": [["127.0.0.1", 7070]], "min_split_bytes": 4096,
        "bounds": [[0, 2]], "prev": None, "next": ["10.0.0.2", 7071, 8], "start_step": 5,
        "incarnation": 1,
    }  # fmt: skip
    cases = [
        (job(), old),
        (control.Info(), {"op": "info"}),
        (control.Reset(force=True), {"op": "reset", "force": True}),
        (control.Run(), {"op": "run"}),
        (control.Run(uids=(4, 5)), {"op": "run", "uids": [4, 5]}),
        (control.Stop(uids=(4,)), {"op": "stop", "uids": [4]}),
        (control.Status(), {"op": "status"}),
        (control.Export(keys=(1, 2)), {"op": "export", "keys": [1, 2]}),
        (control.Import(data=np.zeros(3, np.uint8)), {"op": "import"}),
        (control.Data(uid=9, role="x", array=np.zeros((4, 2))), {"op": "data", "role": "x"}),
    ]
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
    assert control.Data(uid=9, role="x", array=np.zeros(1)).encode()[0] == 9


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
        control.Data.from_meta({"op": "data", "role": "z"}, key=1, array=x)
    with pytest.raises(RequestError, match=r"data: payload \(array\) is missing"):
        control.Data.from_meta({"op": "data", "role": "x"}, key=1)
    with pytest.raises(RequestError, match=r"import: payload \(data\) must be uint8, got float64"):
        control.Import.from_meta({"op": "import"}, array=x)
    with pytest.raises(
        RequestError,
        match=r"status reply: field 'partitions\[7\].done' must be true or false, got 1",
    ):
        control.StatusReply.from_meta({"partitions": {"7": {**REPORT.to_meta(), "done": 1}}})
    with pytest.raises(RequestError, match="meta must be an object"):
        control.Info.from_meta([])
    for op in ("nope", ["info"], None, 5):
        with pytest.raises(RequestError, match="unknown control op") as info:
            control.decode_request(Frame(MessageKind.CONTROL, meta={"op": op}))
        assert info.value.code == ErrorCode.BAD_REQUEST
    request = control.decode_request(
        Frame(MessageKind.CONTROL, key=3, meta={"op": "data", "role": "x", "extra": 1}, array=x)
    )
    assert request == control.Data(uid=3, role="x", array=x)  # unknown fields are ignored
    assert control.Run.from_meta({"op": "run", "uids": None}) == control.Run()


class FakeChannel:
    def __init__(self, answer: Frame):
        self.answer, self.sent = answer, []

    async def request(self, kind, **kwargs):
        self.sent.append((kind, kwargs))
        return self.answer


async def test_call_sends_the_request_and_decodes_its_reply():
    ch = FakeChannel(Frame(MessageKind.REPLY, meta={"keys": 3}))
    assert await control.call(ch, control.Restore(name="s.npz"), timeout=2) == control.RestoreReply(
        3
    )
    kind, sent = ch.sent[0]
    assert kind == MessageKind.CONTROL
    assert sent == {
        "key": 0,
        "array": None,
        "meta": {"op": "restore", "name": "s.npz"},
        "timeout": 2,
    }
    assert await control.call(ch, control.Stop(uids=(1,))) is None
    ch.answer = Frame(MessageKind.REPLY, meta={"keys": "three"})
    with pytest.raises(
        DBNodeError, match="malformed answer to restore: restore reply: field 'keys'"
    ):
        await control.call(ch, control.Restore(name="s.npz"))


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


async def test_a_node_answers_every_node_and_shard_op(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, name="a", snapshot_dir=tmp_path)
        b = await start_node(nursery, name="b")
        cha, chb = await channel(nursery, a), await channel(nursery, b)

        info = await control.call(cha, control.Info())
        assert info.name == "a" and info.pid == os.getpid() and info.address == a

        sgd = {"name": "sgd", "learning_rate": 1.0}
        for key in (1, 2):
            meta = {"name": f"t{key}", "optimizer": sgd}
            await cha.request(MessageKind.INIT, key=key, array=np.full(3, float(key)), meta=meta)
        await cha.request(MessageKind.PUSH, key=2, array=np.ones(3))

        exported = await control.call(cha, control.Export(keys=(2,)))
        assert exported.keys == 1 and exported.data.dtype == np.uint8
        assert (await control.call(chb, control.Import(data=exported.data))).keys == 1
        pulled = await chb.request(MessageKind.PULL, key=2)
        np.testing.assert_array_equal(pulled.array, np.full(3, 1.0))
        assert pulled.seq == 1  # the version came along
        with pytest.raises(RemoteError, match="already held") as refused:  # a ShardError, mapped
            await control.call(chb, control.Import(data=exported.data))
        assert refused.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(RemoteError) as unknown:
            await control.call(cha, control.Export(keys=(99,)))
        assert unknown.value.code == ErrorCode.UNKNOWN_KEY
        with pytest.raises(RemoteError, match="not valid|corrupt|truncated"):
            await control.call(chb, control.Import(data=np.frombuffer(b"junk", np.uint8)))

        await cha.request(MessageKind.SNAPSHOT, meta={"name": "s.npz"})
        await control.call(cha, control.Reset(force=True))
        assert (await control.call(cha, control.Restore(name="s.npz"))).keys == 2
        np.testing.assert_array_equal(
            (await cha.request(MessageKind.PULL, key=1)).array, np.ones(3)
        )
        with pytest.raises(RemoteError, match="without --snapshot-dir"):
            await control.call(chb, control.Restore(name="s.npz"))
        with pytest.raises(RemoteError, match="plain file name"):
            await control.call(cha, control.Restore(name="../s.npz"))

        await control.call(chb, control.Reset())
        with pytest.raises(RemoteError) as gone:
            await chb.request(MessageKind.PULL, key=2)
        assert gone.value.code == ErrorCode.UNKNOWN_KEY
        for ch in (cha, chb):
            await ch.aclose()
        nursery.cancel_scope.cancel()


async def test_a_node_answers_the_partition_ops_and_survives_their_misuse():
    async with trio.open_nursery() as nursery:
        address = await start_node(nursery)
        ch = await channel(nursery, address)
        partition = job(shards=(address,), next=None, start_step=0, uid=3)
        await control.call(ch, partition)
        with pytest.raises(RemoteError, match="partition 3 already exists"):
            await control.call(ch, partition)
        with pytest.raises(RemoteError, match="start: field 'bounds' is missing"):
            meta = {k: v for k, v in partition.to_meta().items() if k != "bounds"}
            await ch.request(MessageKind.CONTROL, meta=meta)
        with pytest.raises(RemoteError, match="start: "):  # fields that do not fit together
            await control.call(ch, job(uid=4, index=5, shards=(address,)))
        with pytest.raises(RemoteError) as unknown:
            await control.call(ch, control.Data(uid=99, role="x", array=np.zeros((4, 2))))
        assert unknown.value.code == ErrorCode.UNKNOWN_KEY
        with pytest.raises(RemoteError) as shape:
            await control.call(ch, control.Data(uid=3, role="x", array=np.zeros((4, 5))))
        assert shape.value.code == ErrorCode.SHAPE_MISMATCH
        with pytest.raises(RemoteError, match="no partition 99"):
            await control.call(ch, control.Run(uids=(3, 99)))
        assert (await control.call(ch, control.Status())).partitions["3"].step == 0  # not started

        # No data was given: the partition fails, and says why.
        await control.call(ch, control.Run())
        await control.call(ch, control.Run())  # a second run of the same partition is harmless
        with trio.fail_after(10):
            while (
                report := (await control.call(ch, control.Status())).partitions["3"]
            ).error is None:
                await trio.sleep(0.01)
        assert "inputs not received" in report.error and not report.done
        assert (await control.call(ch, control.Info())).address == address  # still serving

        await control.call(ch, control.Stop(uids=(3, 42)))
        assert (await control.call(ch, control.Status())).partitions == {}
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
