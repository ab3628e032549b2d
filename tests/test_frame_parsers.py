"""One set of rules, two buffering strategies: ``Connection.receive_frame`` (the
hot path, payloads received in place) and the sans-IO ``FrameDecoder`` must
give the same frames and the same errors for the same bytes."""

import struct

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbnode.errors import ConnectionClosedError, ProtocolError
from dbnode.wire import (
    HEADER_SIZE,
    TENSOR_KINDS,
    Connection,
    FrameDecoder,
    MessageKind,
    encode_frame,
)

REQUESTS = sorted(TENSOR_KINDS - {MessageKind.REPLY})
DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8]


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(REQUESTS + [MessageKind.PING, MessageKind.STATS]))
    array = None
    if kind in TENSOR_KINDS and draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        array = np.arange(int(np.prod(shape)), dtype=draw(st.sampled_from(DTYPES))).reshape(shape)
    meta = draw(
        st.none()
        | st.dictionaries(
            st.text(min_size=1, max_size=5), st.integers(-5, 5) | st.text(max_size=8), max_size=3
        )
    )
    parts = encode_frame(kind, request_id=draw(st.integers(0, 2**64 - 1)),
                         key=draw(st.integers(0, 2**32 - 1)), seq=draw(st.integers(0, 2**64 - 1)),
                         array=array, meta=meta)  # fmt: skip
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def corrupt(data: bytes, how: str, where: int) -> bytes:
    if how == "truncate":
        return data[: where % len(data)]
    if how == "magic":
        return b"XXXX" + data[4:]
    if how == "version":
        return data[:4] + struct.pack("<H", 9) + data[6:]
    if how == "kind":
        return data[:6] + struct.pack("<H", 999) + data[8:]
    if how == "dtype":
        return data[:10] + bytes([77]) + data[11:]
    if how == "reserved":
        return data[:100] + struct.pack("<I", 1) + data[104:]
    if how == "meta":  # a meta block that is not JSON
        header = bytearray(data[:HEADER_SIZE])
        header[96:100] = struct.pack("<I", 3)
        header[104:112] = struct.pack("<Q", 0)
        header[10] = header[11] = 0
        header[32:96] = bytes(64)
        return bytes(header) + b"{x}"
    raise AssertionError(how)


def with_decoder(data: bytes, cuts: list[int]):
    """Frames (as comparable tuples) and the error, via FrameDecoder fed in pieces."""
    decoder = FrameDecoder()
    out, bounds = [], sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in zip(bounds, bounds[1:]):
            decoder.receive_data(data[a:b])
            while (frame := decoder.next_frame()) is not None:
                out.append(summary(frame))
        decoder.receive_data(b"")
        while (frame := decoder.next_frame()) is not None:
            out.append(summary(frame))
    except ProtocolError as exc:
        return out, (type(exc), exc.code)
    return out, None


async def with_connection(data: bytes, cuts: list[int]):
    """The same through a Connection over an in-memory stream, sent in pieces."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    conn = Connection(receive)
    conn.authenticated = True
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    out = []

    async def sender():
        for a, b in zip(bounds, bounds[1:]):
            await send.send_all(data[a:b])
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        try:
            while True:
                out.append(summary(await conn.receive_frame()))
        except ConnectionClosedError:
            return out, None
        except ProtocolError as exc:
            nursery.cancel_scope.cancel()
            return out, (type(exc), exc.code)


def summary(frame):
    array = None
    if frame.array is not None:
        array = (frame.array.dtype.str, frame.array.shape, frame.array.tobytes())
    return (frame.kind, frame.request_id, frame.key, frame.seq, frame.flags, frame.meta, array)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@SETTINGS
@given(st.lists(frames(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=6))
def test_valid_streams_give_the_same_frames(stream, cuts):
    data = b"".join(stream)
    expected = with_decoder(data, cuts)
    assert expected[1] is None and len(expected[0]) == len(stream)
    assert trio.run(with_connection, data, cuts) == expected


@SETTINGS
@given(st.lists(frames(), min_size=1, max_size=3),
       st.sampled_from(["truncate", "magic", "version", "kind", "dtype", "reserved", "meta"]),
       st.integers(0, 10**6), st.lists(st.integers(0, 10**6), max_size=4))  # fmt: skip
def test_broken_streams_give_the_same_error(stream, how, where, cuts):
    data = b"".join(stream[:-1]) + corrupt(stream[-1], how, where)
    expected = with_decoder(data, cuts)
    assert trio.run(with_connection, data, cuts) == expected
    if how != "truncate":
        assert expected[1] is not None and expected[1][1].name.startswith("BAD_")


@pytest.mark.parametrize("n", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5])
def test_every_truncation_of_a_tensor_frame_is_truncated_in_both(n):
    data = b"".join(bytes(memoryview(p).cast("B")) for p in encode_frame(
        MessageKind.PUSH, request_id=1, array=np.ones(64, np.float32), meta={"a": 1}))  # fmt: skip
    cut = data[:n]
    expected = with_decoder(cut, [])
    assert trio.run(with_connection, cut, []) == expected
    if n:
        assert expected[1] is not None and expected[1][1].name == "TRUNCATED"
