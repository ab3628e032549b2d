"""Wire codecs: the compiled conversions against numpy, error feedback, and
tensors through a live node in bfloat16 and float16."""

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from serve_node import ServeNode

from dbnode import codecs, control, kernels, reference
from dbnode.errors import ErrorCode, RemoteError
from dbnode.placement import plan_shards
from dbnode.ps import ParameterClient, ParameterShard
from dbnode.wire import BFLOAT16, MessageKind, Peers

CODECS = ["bf16", "f16"]


def same_bits_or_both_nan(a: np.ndarray, b: np.ndarray, codec: str) -> None:
    """Equal words, NaN payloads aside (numpy keeps a NaN's payload bits)."""
    dtype = BFLOAT16 if codec == "bf16" else np.float16
    nan_a = np.isnan(codecs.decode(a.view(dtype)))
    nan_b = np.isnan(codecs.decode(b.view(dtype)))
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(a[~nan_a], b[~nan_b])


@pytest.mark.parametrize("codec", CODECS)
def test_every_word_decodes_as_numpy_does(codec):
    words = np.arange(1 << 16, dtype=np.uint16)
    ours = kernels.decode_wire(words, codec)
    ref = reference.decode_wire(words, codec)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


@pytest.mark.parametrize("codec", CODECS)
def test_encoding_matches_numpy_over_random_bit_patterns(codec):
    bits = np.random.default_rng(1).integers(0, 1 << 32, 2_000_000, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)  # every class: normal, subnormal, inf, NaN
    same_bits_or_both_nan(kernels.encode_wire(x, codec), reference.encode_wire(x, codec), codec)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(CODECS),
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=40), elements=st.floats(width=32)),
)
def test_encoding_matches_numpy_on_any_array(codec, x):
    same_bits_or_both_nan(kernels.encode_wire(x, codec), reference.encode_wire(x, codec), codec)


@pytest.mark.parametrize(
    "codec,value,expected",
    [
        ("bf16", 1.0 + 2**-8, 1.0),  # a tie: to the even neighbour
        ("bf16", 1.0 + 3 * 2**-8, 1.0 + 2**-6),  # the other tie: up, to even
        ("bf16", np.finfo(np.float32).max, 3.3895313892515355e38),  # saturates
        ("bf16", np.inf, np.inf),  # stays: a shard refuses it
        ("bf16", -np.inf, -np.inf),
        ("f16", np.inf, np.inf),
        ("f16", 65519.0, 65504.0),
        ("f16", 65520.0, 65504.0),  # IEEE would round to inf: saturates
        ("f16", 1e9, 65504.0),
        ("f16", -1e9, -65504.0),
        ("f16", 2.0**-24, 2.0**-24),  # the smallest subnormal
        ("f16", 2.0**-25, 0.0),  # a tie with zero: to even (zero)
        ("f16", 3 * 2.0**-26, 2.0**-24),
        ("f16", -0.0, -0.0),
    ],
)
def test_rounding_and_saturation(codec, value, expected):
    got = kernels.decode_wire(kernels.encode_wire(np.array([value], np.float32), codec), codec)
    assert got[0] == np.float32(expected) and np.signbit(got[0]) == np.signbit(expected)


@pytest.mark.parametrize("codec", CODECS)
def test_nan_stays_nan(codec):
    x = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(kernels.decode_wire(kernels.encode_wire(x, codec), codec)).all()


@pytest.mark.parametrize("codec", CODECS)
def test_threaded_pass_equals_the_serial_one(codec):
    x = np.random.default_rng(2).standard_normal((1 << 21) + 5).astype(np.float32)
    r1, r2 = np.full_like(x, 1e-3), np.full_like(x, 1e-3)
    big = kernels.encode_wire(x, codec, residual=r1)
    ref = reference.encode_wire(x, codec, residual=r2)
    np.testing.assert_array_equal(big, ref)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(
        kernels.decode_wire(big, codec), reference.decode_wire(big, codec)
    )


@pytest.mark.parametrize("codec", CODECS)
def test_error_feedback_loses_nothing_over_time(codec):
    """A gradient too small to survive rounding on its own: without feedback
    every push loses it, with feedback the pushes add up to the truth."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(1000).astype(np.float32)
    small = (base * np.float32(2**-12)).astype(np.float32)
    grads = [base + small for _ in range(256)]
    plain = sum(codecs.decode(codecs.encode(g, codec)).astype(np.float64) for g in grads)
    enc = codecs.Encoder(codec)
    fed = sum(codecs.decode(enc.encode(0, g)).astype(np.float64) for g in grads)
    truth = sum(g.astype(np.float64) for g in grads)
    fed_error = np.abs(fed + enc.residual(0) - truth).max()
    assert fed_error < 1e-4  # what is not sent yet is in the residual, exactly enough
    assert np.abs(fed - truth).max() < np.abs(base).max() * 2**-7  # one rounding, not 256
    assert np.abs(plain - truth).max() > 20 * np.abs(fed - truth).max()


def test_an_encoder_sends_a_retried_push_as_before():
    enc = codecs.Encoder("bf16")
    g = np.linspace(-1, 1, 7, dtype=np.float32) + np.float32(1e-3)
    first = enc.encode(5, g, tag=("p", 1)).copy()
    residual = enc.residual(5).copy()
    again = enc.encode(5, g * 3, tag=("p", 1))  # a retry: the same words, residual kept
    np.testing.assert_array_equal(again.view(np.uint16), first.view(np.uint16))
    np.testing.assert_array_equal(enc.residual(5), residual)
    # Sent where no codec applies, a retry is the value it was encoded as.
    np.testing.assert_array_equal(enc.sent(5, g, ("p", 1)), codecs.decode(first))
    assert enc.sent(5, g, ("p", 2)) is g
    assert codecs.Encoder("f32").encode(5, g) is g


def test_codec_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown wire codec 'f8'"):
        codecs.encode(np.ones(2, np.float32), "f8")
    with pytest.raises(TypeError, match="float32 tensors, not float64"):
        codecs.encode(np.ones(2), "bf16")
    with pytest.raises(ValueError, match="unknown wire codec"):
        codecs.Encoder("int8")
    with pytest.raises(TypeError, match="uint16"):
        kernels._k.encode(np.ones(2, np.float32), np.ones(2, np.int32), None, 1)
    with pytest.raises(ValueError, match="3 words for 2 values"):
        kernels._k.encode(np.ones(2, np.float32), np.ones(3, np.uint16), None, 1)
    with pytest.raises(ValueError, match="read-only"):
        out = np.ones(2, np.uint16)
        out.flags.writeable = False
        kernels.encode_wire(np.ones(2, np.float32), "bf16", out)
    # Arrays that were not encoded pass through decoding untouched.
    x = np.ones(3)
    assert codecs.decode(x) is x


def test_wire_sizes():
    x = np.ones((4, 5), np.float32)
    for codec in CODECS:
        wire = codecs.encode(x, codec)
        assert wire.nbytes == x.nbytes // 2 and codecs.codec_of(wire.dtype) == codec
        assert codecs.wire_ratio(codec, 4) == 0.5
    assert codecs.wire_ratio("f32", 8) == 1.0


@pytest.mark.parametrize("fetch,push", [("bf16", "bf16"), ("f16", "bf16"), ("f32", "f16")])
async def test_a_client_trains_through_a_live_node_in_16_bits(tmp_path, fetch, push):
    """Pushes in one codec, fetches in another, against a real node: the
    shard holds exactly what a local shard fed the decoded pushes holds, the
    fetched values are its rounding, and half the bytes travel."""
    node = ServeNode(tmp_path, "codec")
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((30, 20)).astype(np.float32)
    plan = plan_shards({"w": w0.shape}, 1, 4)
    (key,) = plan.cut("w", w0)
    sgd = {"name": "sgd", "learning_rate": 0.25}
    counted = []
    try:
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, node.secret.read_bytes(), name="test")
            address = ("127.0.0.1", node.port)
            ch = await peers.get(address)
            await control.call(ch, control.Open(run="c", name="codecs", lease=600.0))
            client = ParameterClient(
                plan, [address], peers, run="c", fetch=fetch, push=push,
                count=lambda a, sent, received: counted.append((sent, received)),
            )  # fmt: skip
            await client.init({"w": w0}, sgd)
            shadow, mirror = ParameterShard(), codecs.Encoder(push)
            shadow.init(key, "w", w0.copy(), optimizer=sgd)
            fetched = np.empty_like(w0)
            for step in range(12):
                g = rng.standard_normal(w0.shape).astype(np.float32)
                into = {"w": fetched} if step % 3 == 2 else None
                await client.push({"w": g}, pusher="p", seq=step, fetch_into=into)
                shadow.push(key, codecs.decode(mirror.encode(key, g).copy()), pusher="p", seq=step)
            await client.pull({"w": fetched})
            held = shadow.pull(key).value
            np.testing.assert_array_equal(fetched, codecs.decode(codecs.encode(held, fetch)))
            if fetch != "f32":
                assert not np.array_equal(fetched, held)  # it did travel in 16 bits
            await peers.aclose()
    finally:
        assert node.stop() == 0
    half = w0.nbytes // 2
    assert counted[0] == (w0.nbytes, 0)  # INIT: the model's own dtype
    pushes = [s for s, r in counted[1:] if s]
    assert pushes == [half if push != "f32" else w0.nbytes] * 12
    fetches = [r for s, r in counted[1:] if r]
    assert fetches == [half if fetch != "f32" else w0.nbytes] * 5  # 4 PUSH_PULL + 1 PULL


async def test_a_node_refuses_an_unknown_codec_and_keeps_serving(tmp_path):
    """Refused before anything is done: a PUSH_PULL whose reply cannot be
    encoded applies nothing (its sender would push again)."""
    node = ServeNode(tmp_path, "codec")
    try:
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, node.secret.read_bytes(), name="test")
            ch = await peers.get(("127.0.0.1", node.port))
            await control.call(ch, control.Open(run="c", name="codecs", lease=600.0))
            sgd = {"name": "sgd", "learning_rate": 0.5}
            value = np.arange(4, dtype=np.float32)
            meta = {"run": "c", "name": "w", "optimizer": sgd}
            await ch.request(MessageKind.INIT, key=0, array=value, meta=meta)
            with pytest.raises(RemoteError, match="codec 'f8' is not one of"):
                await ch.request(MessageKind.PULL, key=0, meta={"run": "c", "codec": "f8"})
            ones = np.ones(4, np.float32)
            with pytest.raises(RemoteError, match="codec 'f8' is not one of"):
                await ch.request(MessageKind.PUSH_PULL, key=0, array=ones,
                                 meta={"run": "c", "codec": "f8"})  # fmt: skip
            await ch.request(MessageKind.INIT, key=1, array=np.ones(4), meta={**meta, "name": "v"})
            with pytest.raises(RemoteError, match="codec bf16 needs a float32 tensor"):
                await ch.request(MessageKind.PUSH_PULL, key=1, array=np.ones(4),
                                 meta={"run": "c", "codec": "bf16"})  # fmt: skip
            for key, held in ((0, value), (1, np.ones(4))):
                reply = await ch.request(MessageKind.PULL, key=key, meta={"run": "c"})
                assert reply.seq == 0  # nothing applied
                np.testing.assert_array_equal(reply.array, held)
            # A 16-bit gradient for no tensor, or of the wrong shape, is
            # refused as such (tests/test_control.py: before it is widened).
            small = codecs.encode(np.ones(5, np.float32), "bf16")
            for key, code in ((99, ErrorCode.UNKNOWN_KEY), (0, ErrorCode.SHAPE_MISMATCH)):
                with pytest.raises(RemoteError) as refused:
                    await ch.request(MessageKind.PUSH, key=key, array=small, meta={"run": "c"})
                assert refused.value.code == code
            # A push in bf16 is applied as its float32 value.
            grad = codecs.encode(np.full(4, 1.5, np.float32), "bf16")
            await ch.request(MessageKind.PUSH, key=0, array=grad, meta={"run": "c"})
            reply = await ch.request(MessageKind.PULL, key=0, meta={"run": "c"})
            np.testing.assert_array_equal(reply.array, value - 0.75)
            await peers.aclose()
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize("codec", CODECS)
def test_a_non_finite_gradient_is_sent_as_such_and_not_carried(codec):
    """An infinity or NaN goes out as what it is (the shard refuses it as
    not finite) and leaves nothing in the residual to poison later pushes."""
    enc = codecs.Encoder(codec)
    bad = np.array([np.inf, -np.inf, np.nan, 1.0 + 2**-12], np.float32)
    sent = codecs.decode(enc.encode(0, bad))
    assert np.isposinf(sent[0]) and np.isneginf(sent[1]) and np.isnan(sent[2])
    assert np.isfinite(enc.residual(0)).all() and (enc.residual(0)[:3] == 0).all()
    good = codecs.decode(enc.encode(0, np.ones(4, np.float32)))
    assert np.isfinite(good).all()
