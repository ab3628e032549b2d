"""Frames, sans-IO: the frame format, its encoder and header decoder, validation.

Nothing here touches a socket or trio: bytes go in, frames come out, and the
tests drive it with bytes alone. ``docs/protocol.md`` is the specification;
this module is its reference implementation.

A frame is three parts, back to back::

    header (HEADER_SIZE bytes) | meta (meta_length bytes) | payload (payload_length bytes)

*meta* is an optional UTF-8 JSON object carrying control information (never
tensor data); *payload* is the raw bytes of one little-endian, C-ordered
tensor. The header is little-endian and every field is naturally aligned:

    ======  ====  ======  ===============  ====================================
    offset  size  type    field            meaning
    ======  ====  ======  ===============  ====================================
         0     4  bytes   magic            ``MAGIC`` (b"DBN1")
         4     2  u16     version          ``PROTOCOL_VERSION``
         6     2  u16     kind             :class:`MessageKind`
         8     2  u16     flags            per-kind bits, opaque to the codec
        10     1  u8      dtype            :class:`DType` code, 0 = no tensor
        11     1  u8      ndim             0..``MAX_NDIM``
        12     4  u32     key              tensor / partition id
        16     8  u64     request_id       0 = no reply wanted
        24     8  u64     seq              sequence / version number
        32    64  u64[8]  shape            dims; entries at index >= ndim are 0
        96     4  u32     meta_length      bytes of meta after the header
       100     4  u32     reserved         must be 0
       104     8  u64     payload_length   bytes of tensor after the meta
       112                                 = ``HEADER_SIZE``
    ======  ====  ======  ===============  ====================================

Decoding can go two ways. :class:`~dbnode.wire.decoder.FrameDecoder` takes bytes as they come and
returns whole :class:`Frame` objects. A transport that wants to ``recv_into``
the destination buffer uses the pieces it is built on instead:
:func:`decode_header` (validates the header alone), :func:`parse_meta`,
:meth:`Header.allocate` and :func:`payload_view`. Either way every check runs
on the header before anything is allocated for the frame.
"""

from __future__ import annotations

import enum
import json
import math
import operator
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "MAX_NDIM",
    "NONCE_SIZE",
    "MAX_ERROR_TEXT",
    "MessageKind",
    "TENSOR_KINDS",
    "DType",
    "BFLOAT16",
    "ErrorCode",
    "Limits",
    "DEFAULT_LIMITS",
    "HANDSHAKE_LIMITS",
    "Header",
    "Frame",
    "check_magic",
    "decode_header",
    "parse_meta",
    "payload_view",
    "encode_frame",
    "error_frame",
]

MAGIC = b"DBN1"
PROTOCOL_VERSION = 2  # 2: the FLOAT16 and BFLOAT16 dtypes
MAX_NDIM = 8
NONCE_SIZE = 32  # bytes of each handshake nonce
MAX_ERROR_TEXT = 1024  # characters of text kept by error_frame

_HEADER = struct.Struct(f"<4sHHHBBIQQ{MAX_NDIM}QIIQ")
HEADER_SIZE = _HEADER.size  # 112
assert HEADER_SIZE == 112

# numpy cannot index more than 2**63 - 1 bytes; 2**62 leaves room for that.
_MAX_PAYLOAD_CAP = 1 << 62


class MessageKind(enum.IntEnum):
    """What a frame is. Values are wire values; see docs/protocol.md."""

    # Handshake, in this order (see docs/protocol.md, "Handshake").
    HELLO = 1  # client -> server: version (in the header) and client nonce
    CHALLENGE = 2  # server -> client: server nonce and server's proof
    AUTH = 3  # client -> server: client's proof
    AUTH_OK = 4  # server -> client: handshake complete
    # Session.
    ERROR = 5  # a request (or the connection) failed: meta {code, message}
    PING = 6  # liveness probe; answered by PONG
    PONG = 7  # echoes the PING's request_id and seq
    CLOSE = 8  # the sender will send no more requests
    REPLY = 9  # success answer to a request, with or without tensor/meta
    # Parameter shard requests.
    INIT = 16  # create tensor `key` with the payload as initial value
    PULL = 17  # fetch tensor `key`
    PUSH = 18  # apply the payload as a gradient to tensor `key`
    PUSH_PULL = 19  # PUSH, and reply with the updated tensor
    STATS = 20  # ask for statistics (reply meta)
    SNAPSHOT = 21  # ask a shard to snapshot its state
    # Layer partitions (model-parallel traffic of one replica).
    FORWARD = 32  # activations, sent to the next partition
    BACKWARD = 33  # deltas, sent back to the previous partition
    # Driver <-> node commands, named by meta["op"].
    CONTROL = 48


# The kinds that may carry a tensor. All others must have dtype NONE and no
# payload; a tensor kind may still go without one (dtype NONE).
TENSOR_KINDS = frozenset(
    {
        MessageKind.REPLY,
        MessageKind.INIT,
        MessageKind.PUSH,
        MessageKind.PUSH_PULL,
        MessageKind.FORWARD,
        MessageKind.BACKWARD,
        MessageKind.CONTROL,
    }
)


class DType(enum.IntEnum):
    """Tensor element type codes; the wire byte order is always little-endian."""

    NONE = 0  # no tensor
    FLOAT32 = 1
    FLOAT64 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    FLOAT16 = 6  # IEEE binary16
    BFLOAT16 = 7  # the upper half of a binary32


# Header flag bits of the transport on every kind (docs/protocol.md section
# 18): the payload is in the sender's shared ring, not on the stream; and it
# is at the ring's start. Set by the connection itself, never by a caller.
FLAG_SHM = 0x8000
FLAG_SHM_RESTART = 0x4000
TRANSPORT_FLAGS = FLAG_SHM | FLAG_SHM_RESTART

# numpy has no bfloat16: its 16-bit words travel as this one-field record
# dtype, which no other dtype equals (``.view(np.uint16)`` gives the words).
BFLOAT16 = np.dtype([("bf16", "<u2")])

_WIRE_DTYPES = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.UINT8: np.dtype("u1"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.BFLOAT16: BFLOAT16,
}

# Lookups for the fast paths of encode_frame and decode_header. A small frame
# must encode and decode in a microsecond or two, and building an enum member
# from an int or a dtype's .str costs a good part of that. Keyed by the
# np.dtype itself: "=f4" equals "<f4" on a little-endian host, and a
# big-endian dtype finds nothing here and takes the converting slow path.
_KIND_OF = {int(k): k for k in MessageKind}
_WIRE_DTYPE_OF = {int(code): dt for code, dt in _WIRE_DTYPES.items()}
_CODE_OF_DTYPE = {dt: int(code) for code, dt in _WIRE_DTYPES.items()}
_ZERO_DIMS = tuple((0,) * (MAX_NDIM - n) for n in range(MAX_NDIM + 1))
_U16, _U32, _U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """Size caps a decoder enforces, from the header, before allocating.

    Attributes:
        max_payload: largest tensor payload accepted, in bytes (default 1 GiB).
        max_meta: largest metadata block accepted, in bytes (default 64 KiB).

    Raises:
        ConfigError: a cap that is not an int in range.
    """

    max_payload: int = 1 << 30
    max_meta: int = 64 << 10

    def __post_init__(self) -> None:
        for key, value, top in (
            ("max_payload", self.max_payload, _MAX_PAYLOAD_CAP),
            ("max_meta", self.max_meta, 2**32 - 1),  # meta_length is a u32
        ):
            if not isinstance(value, int) or not 0 <= value <= top:
                raise ConfigError(key, value, f"must be an int in [0, {top}]")


DEFAULT_LIMITS = Limits()
# Until the peer is authenticated it gets no tensors and little meta.
HANDSHAKE_LIMITS = Limits(max_payload=0, max_meta=1024)


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded (and validated) frame header.

    ``dtype`` is the wire dtype (little-endian) or None when the frame has no
    tensor; ``shape`` has ``ndim`` entries. The version is always
    ``PROTOCOL_VERSION``: :func:`decode_header` rejects any other.
    """

    kind: MessageKind
    request_id: int = 0
    key: int = 0
    seq: int = 0
    flags: int = 0
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()
    meta_length: int = 0
    payload_length: int = 0

    @property
    def body_length(self) -> int:
        """Bytes that follow the header: meta, then payload."""
        return self.meta_length + self.payload_length

    def allocate(self) -> np.ndarray | None:
        """An uninitialised array to receive the payload into, or None.

        Safe to call on any header :func:`decode_header` returned: its size
        has been checked against the limits. A transport may use any other
        C-contiguous array of this dtype and shape instead (a pooled one).

        Returns:
            A new array of ``dtype`` and ``shape``, or None without a tensor.
        """
        if self.dtype is None:
            return None
        return np.empty(self.shape, self.dtype)

    def pack(self) -> bytes:
        """The HEADER_SIZE bytes of this header (no validation: see encode_frame).

        Returns:
            The packed header.
        """
        code = DType.NONE if self.dtype is None else _CODE_OF_DTYPE[self.dtype]
        dims = self.shape + (0,) * (MAX_NDIM - len(self.shape))
        return _HEADER.pack(
            MAGIC, PROTOCOL_VERSION, self.kind, self.flags, code, len(self.shape),
            self.key, self.request_id, self.seq, *dims,
            self.meta_length, 0, self.payload_length,
        )  # fmt: skip


@dataclass(frozen=True, eq=False, slots=True)
class Frame:
    """One decoded message.

    ``array`` has exactly the dtype the sender sent (as little-endian) and is
    owned by the frame; ``meta`` is ``{}`` when the frame had none.
    """

    kind: MessageKind
    request_id: int = 0
    key: int = 0
    seq: int = 0
    flags: int = 0
    array: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: Header, meta: dict[str, Any], array: np.ndarray | None) -> Frame:
        """Assemble a frame from a header, its parsed meta and its filled array.

        Args:
            header: the frame's decoded header.
            meta: its parsed meta.
            array: its payload, of the header's dtype and shape; None without one.

        Returns:
            The frame.

        Raises:
            LocalProtocolError: INTERNAL, ``array`` does not fit the header.
        """
        if header.dtype is None:
            if array is not None:
                raise LocalProtocolError(
                    ErrorCode.INTERNAL, "array", type(array).__name__, "the header says no tensor"
                )
        elif array is None or array.dtype != header.dtype or array.shape != header.shape:
            got = None if array is None else (array.dtype.str, array.shape)
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "array", got,
                f"the header says {header.dtype.str} {header.shape}",
            )  # fmt: skip
        return cls(
            header.kind, header.request_id, header.key, header.seq, header.flags, array, meta
        )

    def encode(self, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
        """Encode this frame again; see :func:`encode_frame`.

        Args:
            limits: the limits the encoded frame is checked against.

        Returns:
            The buffers to send, as :func:`encode_frame` returns them.

        Raises:
            LocalProtocolError: the frame breaks the protocol or ``limits``.
        """
        return encode_frame(
            self.kind, request_id=self.request_id, key=self.key, seq=self.seq,
            array=self.array, meta=self.meta, flags=self.flags, limits=limits,
        )  # fmt: skip


# -- validation, shared by both directions ------------------------------------


def _check(h: Header, limits: Limits, err: type[ProtocolError]) -> None:
    """Check a header's consistency and sizes.

    The encoder raises LocalProtocolError through it, the decoder
    RemoteProtocolError: one rule set for what we send and what we accept.
    """
    if h.dtype is None:
        if h.shape:
            raise err(
                ErrorCode.BAD_SHAPE, "ndim", len(h.shape), "a frame without a tensor has ndim 0"
            )
        if h.payload_length:
            raise err(
                ErrorCode.BAD_SHAPE, "payload_length", h.payload_length,
                "a frame without a tensor has no payload",
            )  # fmt: skip
    elif h.kind not in TENSOR_KINDS:
        raise err(
            ErrorCode.BAD_DTYPE, "dtype", h.dtype.name, f"{h.kind.name} frames carry no tensor"
        )
    if len(h.shape) > MAX_NDIM:
        raise err(ErrorCode.BAD_SHAPE, "ndim", len(h.shape), f"at most {MAX_NDIM}")
    if h.meta_length > limits.max_meta:
        raise err(ErrorCode.TOO_LARGE, "meta_length", h.meta_length, f"limit is {limits.max_meta}")
    if h.payload_length > limits.max_payload:
        raise err(
            ErrorCode.TOO_LARGE, "payload_length", h.payload_length,
            f"limit is {limits.max_payload}",
        )  # fmt: skip
    if h.dtype is not None:
        itemsize = h.dtype.itemsize
        # Python ints: no overflow. An empty tensor may not claim dimensions a
        # non-empty one could not have (numpy could not even allocate it).
        if math.prod(max(d, 1) for d in h.shape) * itemsize > limits.max_payload:
            raise err(ErrorCode.TOO_LARGE, "shape", h.shape, f"limit is {limits.max_payload} bytes")
        needed = math.prod(h.shape) * itemsize
        if needed != h.payload_length:
            raise err(
                ErrorCode.BAD_SHAPE, "payload_length", h.payload_length,
                f"shape {h.shape} of {h.dtype.name} needs {needed} bytes",
            )  # fmt: skip


def _check_error_meta(meta: dict[str, Any], err: type[ProtocolError]) -> None:
    """ERROR frames must say what went wrong: {"code": int, "message": str}."""
    code = meta.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise err(ErrorCode.BAD_META, "meta.code", code, "an ERROR frame needs an integer code")
    message = meta.get("message")
    if not isinstance(message, str):
        raise err(ErrorCode.BAD_META, "meta.message", message, "an ERROR frame needs a text")


def _transport_free(flags: int) -> int:
    if flags & TRANSPORT_FLAGS:
        raise LocalProtocolError(
            ErrorCode.BAD_HEADER, "flags", flags, "bits 14 and 15 belong to the transport"
        )
    return flags


def _uint(name: str, value: Any, bits: int) -> int:
    """An encoder argument as an int that fits its unsigned header field."""
    try:
        value = operator.index(value)
    except TypeError:
        raise LocalProtocolError(ErrorCode.BAD_HEADER, name, value, "must be an integer") from None
    if not 0 <= value < 1 << bits:
        raise LocalProtocolError(ErrorCode.BAD_HEADER, name, value, f"must fit in u{bits}")
    return value


# -- decoding ------------------------------------------------------------------


def check_magic(prefix: bytes | bytearray | memoryview) -> None:
    """Reject a frame as soon as its first bytes cannot start the magic.

    Both parsers call it on the first bytes of a frame (up to 4) as they
    arrive, so that a peer that speaks something else (``GET / HTTP/1.1``)
    is answered at once, not after a whole header's worth of bytes.

    Args:
        prefix: the frame's first bytes received so far (0 to 4 of them).

    Raises:
        RemoteProtocolError: BAD_MAGIC, when ``prefix`` is not a prefix of MAGIC.
    """
    if not MAGIC.startswith(prefix):
        raise RemoteProtocolError(
            ErrorCode.BAD_MAGIC, "magic", bytes(prefix), f"expected {MAGIC!r}"
        )


def decode_header(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate and decode exactly HEADER_SIZE bytes of header.

    Everything about the frame is checked here, from the header alone:
    magic, version, kind, dtype code, ndim, unused shape entries, reserved
    field, limits, and ``prod(shape) * itemsize == payload_length``. After it
    returns, ``header.allocate()`` and a buffer of ``meta_length`` bytes are
    safe to allocate.

    Args:
        buf: exactly HEADER_SIZE bytes.
        limits: the size caps to enforce.

    Returns:
        The validated header.

    Raises:
        RemoteProtocolError: the header is invalid; ``.code`` says why.
        LocalProtocolError: ``buf`` is not HEADER_SIZE bytes long.
    """
    if len(buf) != HEADER_SIZE:
        raise LocalProtocolError(
            ErrorCode.INTERNAL, "len(buf)", len(buf), f"need exactly {HEADER_SIZE}"
        )
    fields = _HEADER.unpack(buf)
    # Fast path: a well-formed header of a non-empty tensor or of no tensor
    # passes every check below in one pass. Anything else (an error, or an
    # empty tensor, whose check 12 needs the full rule) goes through the
    # checks one by one, which raise the documented first failing code.
    kind = _KIND_OF.get(fields[2])
    ndim = fields[5]
    if (
        fields[0] == MAGIC and fields[1] == PROTOCOL_VERSION and kind is not None
        and ndim <= MAX_NDIM and not fields[18] and fields[17] <= limits.max_meta
    ):  # fmt: skip
        dims = fields[9 : 9 + ndim]
        payload_length = fields[19]
        if not any(fields[9 + ndim : 17]):
            code = fields[4]
            if code == 0:
                if not ndim and not payload_length:
                    return Header(
                        kind, fields[7], fields[6], fields[8], fields[3], None, (), fields[17], 0
                    )
            elif kind in TENSOR_KINDS and payload_length <= limits.max_payload:
                dtype = _WIRE_DTYPE_OF.get(code)
                if dtype is not None:
                    needed = dtype.itemsize
                    for d in dims:
                        needed *= d
                    if needed == payload_length and needed:
                        return Header(
                            kind, fields[7], fields[6], fields[8], fields[3], dtype, dims,
                            fields[17], payload_length,
                        )  # fmt: skip
    return _decode_fields(fields, limits)


def _decode_fields(fields: tuple[Any, ...], limits: Limits) -> Header:
    """decode_header's checks one at a time, in the documented order."""
    magic, version, kind, flags, dtype_code, ndim, key, request_id, seq, *rest = fields
    dims, (meta_length, reserved, payload_length) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    err = RemoteProtocolError
    if magic != MAGIC:
        raise err(ErrorCode.BAD_MAGIC, "magic", magic, f"expected {MAGIC!r}")
    # Magic and version keep their place in every version, so this check
    # (and the peer's report of it) works across versions.
    if version != PROTOCOL_VERSION:
        raise err(ErrorCode.BAD_VERSION, "version", version, f"this node speaks {PROTOCOL_VERSION}")
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise err(ErrorCode.BAD_KIND, "kind", kind, "unknown message kind") from None
    try:
        dtype = _WIRE_DTYPES.get(DType(dtype_code))  # None for DType.NONE
    except ValueError:
        known = list(map(int, DType))
        raise err(ErrorCode.BAD_DTYPE, "dtype", dtype_code, f"known codes: {known}") from None
    if ndim > MAX_NDIM:
        raise err(ErrorCode.BAD_SHAPE, "ndim", ndim, f"at most {MAX_NDIM}")
    if any(dims[ndim:]):
        raise err(ErrorCode.BAD_SHAPE, "shape", tuple(dims), f"entries past ndim={ndim} must be 0")
    if reserved:
        raise err(ErrorCode.BAD_HEADER, "reserved", reserved, "must be 0")
    header = Header(
        kind, request_id, key, seq, flags, dtype, tuple(dims[:ndim]), meta_length, payload_length
    )
    _check(header, limits, err)
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, but no peer can send it back
        raise ValueError(f"{text} overflows a double")
    return value


# The hot path sends the same small metas over and over (a PUSH's
# {"pusher": "r0p1"}): remember what they parse to. Only flat objects of
# immutable values are kept, so a shallow copy is a private copy.
_META_CACHE: dict[bytes, dict[str, Any]] = {}
_META_CACHE_TEXT = 256  # bytes of meta text at most
_META_CACHE_SIZE = 1024  # entries; then it starts over
_SCALARS = frozenset({str, int, float, bool, type(None)})


def parse_meta(
    data: bytes | bytearray | memoryview, kind: MessageKind | None = None
) -> dict[str, Any]:
    """Parse a metadata block: UTF-8 JSON text of one object, or empty.

    Strict JSON: no NaN/Infinity (nor numbers that overflow to them), no
    duplicate keys. With ``kind=ERROR`` the
    object must also hold an integer ``code`` and a string ``message``.

    Args:
        data: the meta bytes (empty for none).
        kind: the frame's kind; ERROR adds the checks above.

    Returns:
        The object, a dict the caller owns (``{}`` for empty data).

    Raises:
        RemoteProtocolError: with code BAD_META.
    """
    if not data:
        meta: Any = {}
    elif len(data) <= _META_CACHE_TEXT and (cached := _META_CACHE.get(bytes(data))) is not None:
        meta = dict(cached)  # a fresh dict each time: the caller owns it
    else:
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(
                ErrorCode.BAD_META, "meta", f"byte {exc.start}", "not valid UTF-8"
            ) from None
        try:
            meta = json.loads(
                text,
                object_pairs_hook=_unique_keys,
                parse_constant=_no_constant,
                parse_float=_finite_float,
            )
        except (ValueError, RecursionError) as exc:  # deep nesting: RecursionError
            raise RemoteProtocolError(
                ErrorCode.BAD_META, "meta", text[:40], f"not valid JSON ({exc})"
            ) from None
        if not isinstance(meta, dict):
            raise RemoteProtocolError(
                ErrorCode.BAD_META, "meta", type(meta).__name__, "must be a JSON object"
            )
        if len(data) <= _META_CACHE_TEXT and all(type(v) in _SCALARS for v in meta.values()):
            if len(_META_CACHE) >= _META_CACHE_SIZE:
                _META_CACHE.clear()
            _META_CACHE[bytes(data)] = dict(meta)
    if kind == MessageKind.ERROR:
        _check_error_meta(meta, RemoteProtocolError)
    return meta


def payload_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat ``"B"`` memoryview, no copy.

    Use it to send the array, or to ``recv_into`` it (the view is writable
    when the array is). Unlike ``memoryview(array).cast("B")`` it also works
    for empty arrays.

    Args:
        array: a C-contiguous array.

    Returns:
        The view of its bytes.

    Raises:
        LocalProtocolError: INTERNAL, the array is not C-contiguous.
    """
    if not array.flags.c_contiguous:
        # reshape(-1) would silently copy, and a recv_into would fill the copy.
        raise LocalProtocolError(ErrorCode.INTERNAL, "array", "non-contiguous", "need C order")
    return memoryview(array.reshape(-1).view(np.uint8))


# -- encoding ------------------------------------------------------------------


# Built once: json.dumps with options builds a new encoder on every call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _dump_meta(meta: dict[str, Any] | None) -> bytes:
    if not meta:
        return b""
    if not isinstance(meta, dict):
        raise LocalProtocolError(ErrorCode.BAD_META, "meta", type(meta).__name__, "must be a dict")
    for k in meta:
        if not isinstance(k, str):
            # json.dumps would turn it into a str and the peer would see another key.
            raise LocalProtocolError(ErrorCode.BAD_META, "meta key", k, "must be a str")
    try:
        return _JSON_ENCODER.encode(meta).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(
            ErrorCode.BAD_META, "meta", type(meta).__name__, str(exc)
        ) from None


def _wire_array(array: Any) -> np.ndarray:
    """The array as the wire needs it: whitelisted dtype, little-endian, C order."""
    if not isinstance(array, np.ndarray):
        raise LocalProtocolError(
            ErrorCode.BAD_DTYPE, "array", type(array).__name__, "need a numpy.ndarray"
        )
    code = _CODE_OF_DTYPE.get(array.dtype.newbyteorder("<"))
    if code is None:
        names = [code.name.lower() for code in _WIRE_DTYPES]
        raise LocalProtocolError(
            ErrorCode.BAD_DTYPE, "array.dtype", str(array.dtype), f"not one of {names}"
        )
    # No copy for a C-contiguous little-endian array (the common case). A
    # non-contiguous or big-endian one is copied once: the wire needs both.
    return np.asarray(array).astype(_WIRE_DTYPES[code], order="C", copy=False)


def encode_frame(
    kind: MessageKind | int,
    *,
    request_id: int = 0,
    key: int = 0,
    seq: int = 0,
    array: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    flags: int = 0,
    limits: Limits = DEFAULT_LIMITS,
) -> list[bytes | memoryview]:
    """Encode one frame as the buffers to send, in order.

    The payload part is the array's memory itself, not a copy (unless it
    had to be made C-contiguous or little-endian), so it must not change
    until the send completes. Send the parts in one scatter-gather call,
    or one after the other.

    Args:
        kind: the frame's kind.
        request_id: u64; 0 wants no reply.
        key: u32 tensor / partition id.
        seq: u64 sequence or version number.
        array: the tensor to carry (a tensor kind only), or None.
        meta: a JSON-serialisable dict with str keys, or None.
        flags: u16 per-kind bits.
        limits: those the peer's decoder applies, checked here so that we
            fail and not the connection.

    Returns:
        ``[header + meta]`` or, with a non-empty array,
        ``[header + meta, payload_view(array)]``.

    Raises:
        LocalProtocolError: the arguments do not make a valid frame.
    """
    # Fast path for the common frame: int fields in range, no meta or a
    # plain one, no tensor or a non-empty C-contiguous little-endian one.
    # It packs exactly the bytes the general path below would, which
    # handles (and reports) everything else.
    try:
        kind_member = _KIND_OF[kind]
    except (KeyError, TypeError):
        kind_member = None
    if (
        kind_member is not None and kind_member is not MessageKind.ERROR
        and type(request_id) is int and 0 <= request_id <= _U64
        and type(key) is int and 0 <= key <= _U32
        and type(seq) is int and 0 <= seq <= _U64
        and type(flags) is int and 0 <= flags <= _U16 and not flags & TRANSPORT_FLAGS
    ):  # fmt: skip
        meta_bytes = _dump_meta(meta) if meta else b""
        meta_length = len(meta_bytes)
        if meta_length <= limits.max_meta:
            if array is None:
                return [
                    _HEADER.pack(
                        MAGIC, PROTOCOL_VERSION, kind_member, flags, 0, 0, key, request_id, seq,
                        0, 0, 0, 0, 0, 0, 0, 0, meta_length, 0, 0,
                    ) + meta_bytes
                ]  # fmt: skip
            if type(array) is np.ndarray:
                code = _CODE_OF_DTYPE.get(array.dtype)
                ndim = array.ndim
                nbytes = array.nbytes
                if (
                    code is not None and kind_member in TENSOR_KINDS and ndim <= MAX_NDIM
                    and 0 < nbytes <= limits.max_payload and array.flags.c_contiguous
                ):  # fmt: skip
                    head = _HEADER.pack(
                        MAGIC, PROTOCOL_VERSION, kind_member, flags, code, ndim, key, request_id,
                        seq, *array.shape, *_ZERO_DIMS[ndim], meta_length, 0, nbytes,
                    )  # fmt: skip
                    return [head + meta_bytes, memoryview(array).cast("B")]
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise LocalProtocolError(ErrorCode.BAD_KIND, "kind", kind, "unknown message kind") from None
    meta_bytes = _dump_meta(meta)
    if kind == MessageKind.ERROR:
        _check_error_meta(meta or {}, LocalProtocolError)
    if array is not None:
        array = _wire_array(array)
    header = Header(
        kind,
        request_id=_uint("request_id", request_id, 64),
        key=_uint("key", key, 32),
        seq=_uint("seq", seq, 64),
        flags=_transport_free(_uint("flags", flags, 16)),
        dtype=None if array is None else array.dtype,
        shape=() if array is None else array.shape,
        meta_length=len(meta_bytes),
        payload_length=0 if array is None else array.nbytes,
    )
    _check(header, limits, LocalProtocolError)
    head = header.pack() + meta_bytes  # meta is small: joining it costs nothing
    if array is None or array.nbytes == 0:
        return [head]
    return [head, payload_view(array)]


def error_frame(code: ErrorCode | int, text: str, request_id: int = 0) -> list[bytes | memoryview]:
    """Encode an ERROR frame: ``meta = {"code": code, "message": text}``.

    ``request_id`` is that of the failed request, or 0 for an error about
    the connection itself. Text longer than MAX_ERROR_TEXT is cut.

    Args:
        code: the error code.
        text: what went wrong.
        request_id: see above.

    Returns:
        The buffers to send, as :func:`encode_frame` returns them.

    Raises:
        LocalProtocolError: ``request_id`` does not fit a u64.
    """
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return encode_frame(
        MessageKind.ERROR, request_id=request_id, meta={"code": int(code), "message": text}
    )
