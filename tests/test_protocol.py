"""The sans-IO wire protocol, driven with bytes alone."""

import hashlib
import hmac
import json
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dbnode.errors import ConfigError, DBNodeError, LocalProtocolError, RemoteProtocolError
from dbnode.wire import (
    BFLOAT16,
    DEFAULT_LIMITS,
    HANDSHAKE_LIMITS,
    HEADER_SIZE,
    MAGIC,
    MAX_ERROR_TEXT,
    MAX_NDIM,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TENSOR_KINDS,
    DType,
    ErrorCode,
    Frame,
    FrameDecoder,
    Header,
    Limits,
    MessageKind,
    auth_mac,
    decode_header,
    encode_frame,
    error_frame,
    parse_meta,
    payload_view,
)
from dbnode.wire.frames import _decode_fields  # the general path, against the fast one

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.float16, BFLOAT16]
TENSORLESS_KINDS = sorted(set(MessageKind) - TENSOR_KINDS)

# -- helpers -------------------------------------------------------------------


def wire(parts):
    """The bytes a transport would send for these parts."""
    assert all(isinstance(p, (bytes, memoryview)) for p in parts)
    return b"".join(parts)


def decode_all(data, chunks=None, limits=DEFAULT_LIMITS, eof=True):
    """Feed ``data`` (split into ``chunks`` if given) and collect every frame."""
    dec = FrameDecoder(limits)
    frames = []
    for chunk in chunks if chunks is not None else [data]:
        if not chunk:
            continue  # b"" would mean end of stream
        dec.receive_data(chunk)
        while (frame := dec.next_frame()) is not None:
            frames.append(frame)
    if eof:
        dec.receive_data(b"")
        assert dec.next_frame() is None
    return frames


def assert_same(a: Frame, b: Frame):
    assert (a.kind, a.request_id, a.key, a.seq, a.flags, a.meta) == (
        b.kind, b.request_id, b.key, b.seq, b.flags, b.meta,
    )  # fmt: skip
    if a.array is None:
        assert b.array is None
    else:
        assert b.array.dtype == a.array.dtype
        assert b.array.shape == a.array.shape
        assert b.array.tobytes() == a.array.tobytes()  # bitwise, NaNs included


def raw_header(**fields):
    """A header packed by hand, bypassing the encoder's checks."""
    f = dict(
        magic=MAGIC, version=PROTOCOL_VERSION, kind=int(MessageKind.PUSH), flags=0,
        dtype=int(DType.FLOAT32), ndim=1, key=0, request_id=0, seq=0,
        shape=(2,), meta_length=0, reserved=0, payload_length=8,
    )  # fmt: skip
    f.update(fields)
    shape = tuple(f["shape"]) + (0,) * (MAX_NDIM - len(f["shape"]))
    return struct.pack(
        "<4sHHHBBIQQ8QIIQ", f["magic"], f["version"], f["kind"], f["flags"], f["dtype"],
        f["ndim"], f["key"], f["request_id"], f["seq"], *shape,
        f["meta_length"], f["reserved"], f["payload_length"],
    )  # fmt: skip


SAMPLE_FRAMES = [
    Frame(MessageKind.PUSH, 1, 7, 3, 0, np.arange(6, dtype=np.float32).reshape(2, 3), {"lr": 0.5}),
    Frame(MessageKind.PULL, 2, 7),
    Frame(MessageKind.REPLY, 3, 0, 9, 0, np.array(2.5)),  # 0-d float64
    Frame(MessageKind.REPLY, 4, 0, 0, 0, np.zeros((0, 4), np.int64)),  # 0-size
    Frame(MessageKind.STATS, 5, meta={"text": "héllo ✓", "nested": {"a": [1, None, True]}}),
]


def sample_stream():
    return wire([p for f in SAMPLE_FRAMES for p in f.encode()])


# -- layout --------------------------------------------------------------------


def test_header_layout_matches_the_documented_offsets():
    arr = np.arange(6, dtype=np.int32).reshape(1, 2, 3)
    parts = encode_frame(
        MessageKind.PUSH_PULL, request_id=0x1122334455667788, key=0xA1B2C3D4,
        seq=0x0102030405060708, array=arr, meta={"k": 1}, flags=0x0F0E,
    )  # fmt: skip
    head = parts[0]
    assert HEADER_SIZE == 112 and len(head) == HEADER_SIZE + len(b'{"k":1}')
    u = lambda fmt, off: struct.unpack_from("<" + fmt, head, off)[0]  # noqa: E731
    assert head[0:4] == b"DBN1"
    assert u("H", 4) == PROTOCOL_VERSION == 2
    assert u("H", 6) == MessageKind.PUSH_PULL == 19
    assert u("H", 8) == 0x0F0E
    assert head[10] == DType.INT32 == 3
    assert head[11] == 3
    assert u("I", 12) == 0xA1B2C3D4
    assert u("Q", 16) == 0x1122334455667788
    assert u("Q", 24) == 0x0102030405060708
    assert struct.unpack_from("<8Q", head, 32) == (1, 2, 3, 0, 0, 0, 0, 0)
    assert u("I", 96) == 7
    assert u("I", 100) == 0
    assert u("Q", 104) == 24
    assert head[HEADER_SIZE:] == b'{"k":1}'
    assert bytes(parts[1]) == arr.tobytes()


def test_wire_values_are_pinned():
    # Changing any of these breaks every peer: they are in docs/protocol.md.
    assert {k.name: int(k) for k in MessageKind} == {
        "HELLO": 1, "CHALLENGE": 2, "AUTH": 3, "AUTH_OK": 4, "ERROR": 5, "PING": 6,
        "PONG": 7, "CLOSE": 8, "REPLY": 9, "INIT": 16, "PULL": 17, "PUSH": 18,
        "PUSH_PULL": 19, "STATS": 20, "SNAPSHOT": 21, "FORWARD": 32, "BACKWARD": 33,
        "CONTROL": 48,
    }  # fmt: skip
    assert [(d.name, int(d)) for d in DType] == [
        ("NONE", 0), ("FLOAT32", 1), ("FLOAT64", 2), ("INT32", 3), ("INT64", 4), ("UINT8", 5),
        ("FLOAT16", 6), ("BFLOAT16", 7),
    ]  # fmt: skip
    assert ErrorCode.BAD_MAGIC == 1 and ErrorCode.TRUNCATED == 9
    assert ErrorCode.AUTH_FAILED == 16 and ErrorCode.UNKNOWN_KEY == 33
    assert ErrorCode.INTERNAL == 64
    assert ErrorCode.BAD_META.fatal and ErrorCode.AUTH_FAILED.fatal
    assert not ErrorCode.UNKNOWN_KEY.fatal and not ErrorCode.INTERNAL.fatal


# -- round trips ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
metas = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def tensor_frames(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=MAX_NDIM, min_side=0, max_side=3))
    return Frame(
        kind=draw(st.sampled_from(sorted(TENSOR_KINDS))),
        request_id=draw(u64), key=draw(st.integers(0, 2**32 - 1)), seq=draw(u64),
        flags=draw(st.integers(0, 2**14 - 1)), array=draw(hnp.arrays(dtype, shape)),
        meta=draw(metas),
    )  # fmt: skip


@st.composite
def tensorless_frames(draw):
    kind = draw(st.sampled_from([k for k in TENSORLESS_KINDS if k != MessageKind.ERROR]))
    return Frame(kind, draw(u64), draw(st.integers(0, 2**32 - 1)), draw(u64), meta=draw(metas))


@settings(max_examples=150, deadline=None)
@given(tensor_frames() | tensorless_frames())
def test_round_trip(frame):
    parts = frame.encode()
    (got,) = decode_all(wire(parts))
    assert_same(frame, got)
    if frame.array is not None:
        # The exact dtype sent comes back, and the array is the frame's own.
        assert got.array.dtype == frame.array.dtype
        assert got.array.flags.c_contiguous and got.array.flags.writeable


@settings(max_examples=50, deadline=None)
@given(tensor_frames())
def test_pieces_give_the_same_frame_as_the_decoder(frame):
    # The path a transport takes: header, then meta, then recv_into the array.
    data = wire(frame.encode())
    header = decode_header(data[:HEADER_SIZE])
    assert header.body_length == len(data) - HEADER_SIZE
    meta_end = HEADER_SIZE + header.meta_length
    meta = parse_meta(data[HEADER_SIZE:meta_end], header.kind)
    array = header.allocate()
    view = payload_view(array)
    view[:] = data[meta_end:]  # stands in for sock.recv_into(view)
    assert_same(frame, Frame.from_header(header, meta, array))


def test_sample_frames_split_at_every_offset_give_the_same_frames():
    data = sample_stream()
    whole = decode_all(data)
    assert len(whole) == len(SAMPLE_FRAMES)
    for a, b in zip(SAMPLE_FRAMES, whole):
        assert_same(a, b)
    for cut in range(len(data) + 1):
        got = decode_all(data, [data[:cut], data[cut:]])
        assert len(got) == len(SAMPLE_FRAMES)
        for a, b in zip(SAMPLE_FRAMES, got):
            assert_same(a, b)


def test_sample_frames_fed_byte_by_byte():
    data = sample_stream()
    got = decode_all(data, [data[i : i + 1] for i in range(len(data))])
    assert len(got) == len(SAMPLE_FRAMES)
    for a, b in zip(SAMPLE_FRAMES, got):
        assert_same(a, b)


def test_decoder_copies_a_mutable_chunk_it_cannot_consume_yet():
    data = bytearray(wire(SAMPLE_FRAMES[0].encode()))
    dec = FrameDecoder()
    dec.receive_data(data)
    data[:] = bytes(len(data))  # the caller reuses its buffer
    assert_same(SAMPLE_FRAMES[0], dec.next_frame())


def test_frames_carry_the_dtype_sent():
    for dtype in DTYPES:
        (got,) = decode_all(wire(encode_frame(MessageKind.PUSH, array=np.ones(3, dtype))))
        assert got.array.dtype == dtype


@settings(max_examples=150, deadline=None)
@given(tensor_frames() | tensorless_frames())
def test_fast_paths_agree_with_the_general_ones(frame):
    """encode_frame and decode_header take a shortcut for common frames; it
    must produce and accept exactly what the general, check-by-check path does."""
    fast = wire(frame.encode())
    general = wire(encode_frame(
        frame.kind, request_id=np.uint64(frame.request_id), key=frame.key, seq=frame.seq,
        array=frame.array, meta=frame.meta, flags=frame.flags,
    ))  # fmt: skip  # a numpy integer is not an int: the general path
    assert fast == general
    fields = struct.unpack("<4sHHHBBIQQ8QIIQ", fast[:HEADER_SIZE])
    assert decode_header(fast[:HEADER_SIZE]) == _decode_fields(fields, DEFAULT_LIMITS)


def test_parsed_meta_is_the_callers_own():
    text = b'{"pusher":"r0p1","n":3}'
    first = parse_meta(text)
    first["pusher"] = "changed"
    assert parse_meta(text) == {"pusher": "r0p1", "n": 3}
    nested = b'{"a":{"b":[1]}}'
    parse_meta(nested)["a"]["b"].append(2)
    assert parse_meta(nested) == {"a": {"b": [1]}}
    with pytest.raises(RemoteProtocolError):  # cached or not, an ERROR still needs its keys
        parse_meta(text, MessageKind.ERROR)


# -- encoding ------------------------------------------------------------------


def test_contiguous_array_is_sent_without_copy():
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    head, payload = encode_frame(MessageKind.PUSH, array=arr)
    assert isinstance(payload, memoryview) and payload.format == "B"
    assert np.shares_memory(np.frombuffer(payload, np.uint8), arr)


def test_non_contiguous_array_is_copied_once_and_sent_in_c_order():
    base = np.arange(40, dtype=np.int32).reshape(5, 8)
    for arr in (base[:, ::2], base.T, np.asfortranarray(base)):
        parts = encode_frame(MessageKind.PUSH, array=arr)
        assert not np.shares_memory(np.frombuffer(parts[1], np.uint8), base)
        (got,) = decode_all(wire(parts))
        np.testing.assert_array_equal(got.array, arr)


def test_big_endian_array_goes_out_little_endian():
    arr = np.arange(4, dtype=">f8")
    (got,) = decode_all(wire(encode_frame(MessageKind.PUSH, array=arr)))
    assert got.array.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(got.array, arr)


def test_empty_array_sends_only_the_header():
    parts = encode_frame(MessageKind.REPLY, array=np.zeros((3, 0), np.uint8))
    assert len(parts) == 1 and len(parts[0]) == HEADER_SIZE


@pytest.mark.parametrize(
    "kwargs, code, field",
    [
        (dict(kind=99), ErrorCode.BAD_KIND, "kind"),
        (dict(array=np.ones(2, bool)), ErrorCode.BAD_DTYPE, "array.dtype"),
        (dict(array=np.ones(2, np.uint16)), ErrorCode.BAD_DTYPE, "array.dtype"),
        (dict(array=[1.0, 2.0]), ErrorCode.BAD_DTYPE, "array"),
        (dict(kind=MessageKind.PULL, array=np.ones(2)), ErrorCode.BAD_DTYPE, "dtype"),
        (dict(array=np.ones((1,) * 9)), ErrorCode.BAD_SHAPE, "ndim"),
        (dict(key=2**32), ErrorCode.BAD_HEADER, "key"),
        (dict(request_id=-1), ErrorCode.BAD_HEADER, "request_id"),
        (dict(seq=1.5), ErrorCode.BAD_HEADER, "seq"),
        (dict(flags=2**16), ErrorCode.BAD_HEADER, "flags"),
        (dict(flags=0x8000), ErrorCode.BAD_HEADER, "flags"),  # the transport's bits
        (dict(flags=0x4001), ErrorCode.BAD_HEADER, "flags"),
        (dict(meta=[1, 2]), ErrorCode.BAD_META, "meta"),
        (dict(meta={1: "x"}), ErrorCode.BAD_META, "meta key"),
        (dict(meta={"x": float("nan")}), ErrorCode.BAD_META, "meta"),
        (dict(meta={"x": object()}), ErrorCode.BAD_META, "meta"),
        (dict(meta={"x": "a" * 100}, limits=Limits(max_meta=50)),
         ErrorCode.TOO_LARGE, "meta_length"),
        (dict(array=np.ones(4), limits=Limits(max_payload=31)),
         ErrorCode.TOO_LARGE, "payload_length"),
        (dict(kind=MessageKind.ERROR, meta={"message": "no code"}),
         ErrorCode.BAD_META, "meta.code"),
    ],
)  # fmt: skip
def test_encoder_refuses_invalid_frames(kwargs, code, field):
    kwargs.setdefault("kind", MessageKind.PUSH)
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(**kwargs)
    assert info.value.code == code and info.value.field == field
    assert str(info.value).startswith(f"{field}=")


# -- rejection -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, code, field",
    [
        (dict(magic=b"DBN2"), ErrorCode.BAD_MAGIC, "magic"),
        (dict(magic=b"GET "), ErrorCode.BAD_MAGIC, "magic"),
        (dict(version=1), ErrorCode.BAD_VERSION, "version"),
        (dict(version=0), ErrorCode.BAD_VERSION, "version"),
        (dict(kind=0), ErrorCode.BAD_KIND, "kind"),
        (dict(kind=10), ErrorCode.BAD_KIND, "kind"),
        (dict(kind=0xFFFF), ErrorCode.BAD_KIND, "kind"),
        (dict(dtype=8), ErrorCode.BAD_DTYPE, "dtype"),
        (dict(dtype=255), ErrorCode.BAD_DTYPE, "dtype"),
        (dict(kind=int(MessageKind.PULL)), ErrorCode.BAD_DTYPE, "dtype"),
        (dict(ndim=9, shape=(1,) * 8), ErrorCode.BAD_SHAPE, "ndim"),
        (dict(ndim=255), ErrorCode.BAD_SHAPE, "ndim"),
        (dict(ndim=1, shape=(2, 0, 0, 5)), ErrorCode.BAD_SHAPE, "shape"),
        (dict(reserved=1), ErrorCode.BAD_HEADER, "reserved"),
        (dict(payload_length=12), ErrorCode.BAD_SHAPE, "payload_length"),
        (dict(payload_length=0), ErrorCode.BAD_SHAPE, "payload_length"),
        (dict(dtype=0, payload_length=8), ErrorCode.BAD_SHAPE, "ndim"),
        (dict(dtype=0, ndim=0, shape=(), payload_length=8), ErrorCode.BAD_SHAPE, "payload_length"),
        (dict(meta_length=DEFAULT_LIMITS.max_meta + 1), ErrorCode.TOO_LARGE, "meta_length"),
        (dict(meta_length=2**32 - 1), ErrorCode.TOO_LARGE, "meta_length"),
        (dict(shape=(2**58,), payload_length=2**60), ErrorCode.TOO_LARGE, "payload_length"),
        (dict(payload_length=2**64 - 1), ErrorCode.TOO_LARGE, "payload_length"),
        # prod(shape) overflows 64 bits but matches payload_length mod 2**64.
        (dict(ndim=2, shape=(2**62, 2**62), payload_length=0), ErrorCode.TOO_LARGE, "shape"),
        # Empty, yet with a dimension numpy could not even allocate.
        (dict(ndim=2, shape=(0, 2**63), payload_length=0), ErrorCode.TOO_LARGE, "shape"),
    ],
)  # fmt: skip
def test_nonsense_headers_are_rejected_from_the_header_alone(fields, code, field):
    head = raw_header(**fields)
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(head)
    assert info.value.code == code and info.value.field == field
    assert str(info.value).startswith(f"{field}={info.value.value!r}")
    # The decoder says the same as soon as it has the header: it never waits
    # for (or buffers) the body the header announces.
    dec = FrameDecoder()
    dec.receive_data(head)
    with pytest.raises(RemoteProtocolError) as info2:
        dec.next_frame()
    assert info2.value.code == code


def test_huge_payload_claim_allocates_nothing():
    head = raw_header(shape=(2**58,), payload_length=2**60)
    tracemalloc.start()
    try:
        dec = FrameDecoder()
        dec.receive_data(head)
        with pytest.raises(RemoteProtocolError) as info:
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == ErrorCode.TOO_LARGE
    assert peak < 64 * 1024


def test_valid_header_is_accepted_by_decode_header():
    h = decode_header(raw_header(key=5, request_id=6, seq=7))
    assert h == Header(MessageKind.PUSH, 6, 5, 7, 0, np.dtype("<f4"), (2,), 0, 8)
    assert h.allocate().dtype == np.float32 and h.allocate().shape == (2,)
    assert decode_header(raw_header(kind=int(MessageKind.PING), dtype=0, ndim=0, shape=(),
                                    payload_length=0)).allocate() is None  # fmt: skip
    with pytest.raises(LocalProtocolError):
        decode_header(raw_header()[:-1])


def test_payload_over_the_cap_is_rejected():
    data = wire(encode_frame(MessageKind.PUSH, array=np.ones(4, np.float32)))
    assert decode_all(data, limits=Limits(max_payload=16))
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, limits=Limits(max_payload=15))
    assert info.value.code == ErrorCode.TOO_LARGE and info.value.field == "payload_length"


def test_meta_over_the_cap_is_rejected():
    data = wire(encode_frame(MessageKind.STATS, meta={"x": "y" * 100}))
    limit = len(data) - HEADER_SIZE
    assert decode_all(data, limits=Limits(max_meta=limit))
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, limits=Limits(max_meta=limit - 1))
    assert info.value.code == ErrorCode.TOO_LARGE and info.value.field == "meta_length"


def test_handshake_limits_refuse_tensors():
    data = wire(encode_frame(MessageKind.PUSH, array=np.ones(1, np.uint8)))
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, limits=HANDSHAKE_LIMITS)
    assert info.value.code == ErrorCode.TOO_LARGE


def test_limits_can_change_between_frames():
    hello = wire(encode_frame(MessageKind.HELLO, meta={"nonce": "00" * NONCE_SIZE}))
    push = wire(encode_frame(MessageKind.PUSH, array=np.ones(3)))
    dec = FrameDecoder(HANDSHAKE_LIMITS)
    dec.receive_data(hello + push)
    assert dec.next_frame().kind == MessageKind.HELLO
    dec.limits = DEFAULT_LIMITS
    assert dec.next_frame().kind == MessageKind.PUSH


def test_truncated_frames_are_reported_at_end_of_stream():
    data = sample_stream()
    ends = set()
    for f in SAMPLE_FRAMES:
        ends.add(len(wire(f.encode())) + max(ends, default=0))
    for cut in range(len(data)):
        if cut in ends or cut == 0:
            continue  # a clean frame boundary: no error
        dec = FrameDecoder()
        dec.receive_data(data[:cut])
        while dec.next_frame() is not None:
            pass  # incomplete is not an error until the stream ends
        dec.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as info:
            dec.next_frame()
        assert info.value.code == ErrorCode.TRUNCATED


def test_empty_stream_is_clean():
    assert decode_all(b"") == []


@pytest.mark.parametrize(
    "meta",
    [b"[1]", b'"x"', b"1", b"null", b"{", b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1e999}',
     b'{"a":1,"a":2}', b'{"b":{"a":1,"a":2}}', b"\xff\xfe", b"\xef\xbb\xbf{}",
     b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000],
)  # fmt: skip
def test_bad_meta_is_rejected(meta):
    head = raw_header(kind=int(MessageKind.STATS), dtype=0, ndim=0, shape=(), payload_length=0,
                      meta_length=len(meta))  # fmt: skip
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(head + meta)
    assert info.value.code == ErrorCode.BAD_META and info.value.field == "meta"


def test_meta_is_parsed_strictly_but_accepts_any_object():
    assert parse_meta(b"") == {}
    assert parse_meta(b"{}") == {}
    assert parse_meta(memoryview(' {"é": [1, 2.5, null]} '.encode())) == {"é": [1, 2.5, None]}


def test_error_meta_must_have_code_and_message():
    for meta in ({}, {"code": "1", "message": "x"}, {"code": True, "message": "x"}, {"code": 1}):
        with pytest.raises(RemoteProtocolError) as info:
            parse_meta(json.dumps(meta).encode(), MessageKind.ERROR)
        assert info.value.code == ErrorCode.BAD_META


# -- poisoning -----------------------------------------------------------------


def test_poisoned_decoder_stays_poisoned():
    dec = FrameDecoder()
    dec.receive_data(raw_header(magic=b"XXXX"))
    with pytest.raises(RemoteProtocolError) as first:
        dec.next_frame()
    assert first.value.code == ErrorCode.BAD_MAGIC and "b'XXXX'" in str(first.value)
    for _ in range(2):
        with pytest.raises(LocalProtocolError) as again:
            dec.next_frame()
        assert again.value.code == ErrorCode.BAD_MAGIC and again.value.__cause__ is first.value
        # Valid data does not resynchronise it.
        with pytest.raises(LocalProtocolError):
            dec.receive_data(sample_stream())


def test_data_after_end_of_stream_is_a_local_error():
    dec = FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"x")


# -- corruption ----------------------------------------------------------------

FLIP_LIMITS = Limits(max_payload=4096, max_meta=1024)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(range(len(SAMPLE_FRAMES))), st.data())
def test_flipped_bit_gives_a_valid_frame_or_a_protocol_error(index, data):
    original = wire(SAMPLE_FRAMES[index].encode())
    header_bits = data.draw(st.booleans())  # the header matters most: weight it
    top = HEADER_SIZE * 8 if header_bits else len(original) * 8
    bit = data.draw(st.integers(0, top - 1))
    corrupted = bytearray(original)
    corrupted[bit // 8] ^= 1 << (bit % 8)
    try:
        frames = decode_all(bytes(corrupted), limits=FLIP_LIMITS)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.field
        return
    # A surviving frame can only describe bytes that were actually there.
    for f in frames:
        assert f.array is None or f.array.nbytes <= len(original)
        assert isinstance(f.meta, dict)


# -- errors and handshake ------------------------------------------------------


def test_error_frame_round_trip():
    (got,) = decode_all(wire(error_frame(ErrorCode.UNKNOWN_KEY, "no tensor 7", request_id=42)))
    assert got.kind == MessageKind.ERROR and got.request_id == 42 and got.array is None
    assert got.meta == {"code": 33, "message": "no tensor 7"}
    assert ErrorCode(got.meta["code"]) is ErrorCode.UNKNOWN_KEY


def test_error_frame_cuts_long_text():
    (got,) = decode_all(wire(error_frame(ErrorCode.INTERNAL, "x" * 10_000)))
    assert len(got.meta["message"]) == MAX_ERROR_TEXT and got.meta["message"].endswith("...")


def test_error_frame_from_a_remote_error():
    try:
        decode_header(raw_header(version=7))
    except RemoteProtocolError as exc:
        (got,) = decode_all(wire(error_frame(exc.code, str(exc))))
    assert got.meta["code"] == ErrorCode.BAD_VERSION and "version=7" in got.meta["message"]


def test_error_hierarchy():
    for cls in (LocalProtocolError, RemoteProtocolError, ConfigError):
        assert issubclass(cls, DBNodeError) and issubclass(cls, ValueError)
    with pytest.raises(ConfigError, match="max_meta"):
        Limits(max_meta=2**32)
    with pytest.raises(ConfigError, match="max_payload"):
        Limits(max_payload=-1)


def test_auth_mac_binds_role_and_both_nonces():
    secret, nc, ns = b"k" * 32, bytes(range(32)), bytes(range(32, 64))
    server = auth_mac(secret, "server", nc, ns)
    expected = hmac.new(secret, b"DBN1\x02\x00server" + nc + ns, hashlib.sha256).digest()
    assert server == expected and len(server) == 32
    assert auth_mac(secret, "client", nc, ns) != server  # a reflected MAC is useless
    assert auth_mac(secret, "server", ns, nc) != server
    assert auth_mac(b"j" * 32, "server", nc, ns) != server
    with pytest.raises(LocalProtocolError):
        auth_mac(secret, "proxy", nc, ns)
    with pytest.raises(LocalProtocolError):
        auth_mac(secret, "client", nc[:-1], ns)
    with pytest.raises(ConfigError) as info:
        auth_mac(b"short", "client", nc, ns)
    assert b"short".decode() not in str(info.value)  # the secret is never echoed


# -- the spec's worked examples ------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def doc_block(name):
    """The code block after ``<!-- example:name -->`` in docs/protocol.md."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example:{name} -->\n```\n(.*?)```", text, re.S)
    assert match, f"docs/protocol.md lost its {name} example"
    return match.group(1)


def doc_hex(name):
    rows = [line.split("  ", 1)[1] for line in doc_block(name).splitlines()]
    return bytes.fromhex("".join(rows))


def test_docs_examples_are_what_the_code_produces():
    push = encode_frame(
        MessageKind.PUSH, request_id=1, key=7, seq=3,
        array=np.array([[1.0, 2.0, -0.5]], np.float32),
    )  # fmt: skip
    assert doc_hex("push") == wire(push)
    assert doc_hex("error") == wire(error_frame(ErrorCode.UNKNOWN_KEY, "no tensor 9", 2))
    macs = dict(line.split(" = ") for line in doc_block("mac").splitlines())
    secret, nc, ns = bytes(range(32)), b"\xaa" * 32, b"\xbb" * 32
    assert macs["MACs"] == auth_mac(secret, "server", nc, ns).hex()
    assert macs["MACc"] == auth_mac(secret, "client", nc, ns).hex()
