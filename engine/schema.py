"""Typed message schemas over a frame's meta, key and payload, sans-IO.

A schema is a frozen dataclass whose fields say where each value travels
(:func:`in_meta`, :func:`in_key`, :func:`in_payload`) and, for meta fields,
with which :class:`Codec`: the codec checks a received JSON value and turns
it into the field's Python value, and back. :class:`Message` encodes a
schema to a frame's parts and decodes one from a received frame, checking
every field: a missing or malformed one is a ``RequestError(BAD_REQUEST)``
whose message names it (``start: field 'shards[1][1]' must be an integer,
got '7070'``). The control vocabulary (:mod:`dbnode.control`) is written
with these.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from .errors import ErrorCode, RequestError
from .wire.frames import Frame

__all__ = [
    "Bad",
    "Codec",
    "Message",
    "REQUIRED",
    "is_required",
    "Request",
    "boolean",
    "in_key",
    "in_meta",
    "in_payload",
    "integer",
    "list_of",
    "mapping_of",
    "nested",
    "number",
    "optional",
    "positive",
    "string",
    "tuple_of",
]

# -- field codecs ------------------------------------------------------------------
#
# A codec turns one JSON value into the schema's Python value (checking it)
# and back. Containers decode to tuples, so that schemas stay immutable.


class Bad(Exception):
    """A value that does not fit its field: why, and where below the field."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(reason)


@dataclass(frozen=True)
class Codec:
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any] = lambda value: value
    schema: type[Message] | None = None  # the nested schema, for the docs table
    keys: str = ""  # what a mapping's keys are, for the docs table


def integer(minimum: int | None = None) -> Codec:
    def decode(value: Any) -> int:
        # bool is an int to Python, never to the protocol.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise Bad(f"must be >= {minimum}, got {value}")
        return value

    return Codec(decode, int)


# JSON has no NaN or infinity (and the meta is strict JSON): a diverged loss
# travels as one of these strings.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def number() -> Codec:
    def decode(value: Any) -> float:
        if isinstance(value, str) and value in _NON_FINITE:
            return _NON_FINITE[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Bad(f"must be a number, got {value!r}")
        return float(value)

    def encode(value: Any) -> Any:
        # As given when finite: an int stays an int on the wire.
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if value != value else ("inf" if value > 0 else "-inf")
        return value

    return Codec(decode, encode)


def positive() -> Codec:
    plain = number()

    def decode(value: Any) -> float:
        out = plain.decode(value)
        if not (math.isfinite(out) and out > 0):
            raise Bad(f"must be a finite number > 0, got {value!r}")
        return out

    return Codec(decode, plain.encode)


def boolean() -> Codec:
    def decode(value: Any) -> bool:
        if not isinstance(value, bool):
            raise Bad(f"must be true or false, got {value!r}")
        return value

    return Codec(decode)


def string(choices: tuple[str, ...] | None = None) -> Codec:
    def decode(value: Any) -> str:
        if not isinstance(value, str):
            raise Bad(f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise Bad(f"must be one of {list(choices)}, got {value!r}")
        return value

    return Codec(decode)


def optional(codec: Codec) -> Codec:
    return Codec(
        lambda value: None if value is None else codec.decode(value),
        lambda value: None if value is None else codec.encode(value),
    )


def _items(values: Any, codecs: list[Codec]) -> tuple:
    out = []
    for i, (value, codec) in enumerate(zip(values, codecs)):
        try:
            out.append(codec.decode(value))
        except Bad as exc:
            raise Bad(exc.reason, f"[{i}]{exc.path}") from None
    return tuple(out)


def list_of(codec: Codec) -> Codec:
    def decode(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise Bad(f"must be a list, got {value!r}")
        return _items(value, [codec] * len(value))

    return Codec(decode, lambda value: [codec.encode(v) for v in value])


def tuple_of(name: str, *codecs: Codec) -> Codec:
    def decode(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(codecs):
            raise Bad(f"must be {name}, got {value!r}")
        return _items(value, list(codecs))

    return Codec(decode, lambda value: [c.encode(v) for c, v in zip(codecs, value)])


def mapping_of(codec: Codec, keys: str = "uid") -> Codec:
    """An object of ``codec`` values; ``keys`` says what its keys are (docs)."""

    def decode(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Bad(f"must be an object, got {value!r}")
        out = {}
        for k, v in value.items():
            try:
                out[k] = codec.decode(v)
            except Bad as exc:
                raise Bad(exc.reason, f"[{k}]{exc.path}") from None
        return out

    return Codec(
        decode,
        lambda value: {str(k): codec.encode(v) for k, v in value.items()},
        codec.schema,
        keys,
    )


def nested(cls: type[Message]) -> Codec:
    """A nested schema (one partition's report inside the status reply)."""

    def decode(value: Any) -> Message:
        if not isinstance(value, dict):
            raise Bad(f"must be an object, got {value!r}")
        try:
            return cls._decode_fields(value, 0, None)
        except Bad as exc:
            raise Bad(exc.reason, f".{exc.path}") from None

    return Codec(decode, lambda value: value.to_meta(), cls)


# -- schemas -----------------------------------------------------------------------

REQUIRED = dataclasses.MISSING


def is_required(f: dataclasses.Field) -> bool:
    """Whether a schema field must be present (it has no default of any kind).

    Args:
        f: a field of a schema.

    Returns:
        True when a message without it is refused.
    """
    return f.default is REQUIRED and f.default_factory is dataclasses.MISSING


def in_meta(codec: Codec, default: Any = REQUIRED, *, omit_default: bool = False) -> Any:
    """A field carried in the frame's meta. With ``omit_default`` it is left
    out of the meta when it has its default value (what the driver always did
    for that field: the bytes on the wire stay the same)."""
    metadata = {"at": "meta", "codec": codec, "omit": omit_default}
    if isinstance(default, dict):  # mutable: each message gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def in_key(doc: str) -> Any:
    """A field carried in the frame header's ``key``."""
    return field(metadata={"at": "key", "doc": doc})


def in_payload(doc: str, dtype: type | None = None) -> Any:
    """A field carried as the frame's tensor payload (compared by identity:
    arrays have no single truth value)."""
    return field(compare=False, metadata={"at": "payload", "doc": doc, "dtype": dtype})


class Message:
    """What control schemas share: encoding to a frame's parts and decoding
    from a received frame's, field by field. Subclasses are frozen
    dataclasses whose fields are declared with ``in_meta``, ``in_key`` or
    ``in_payload``; ``label`` names the message in errors."""

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
        except Bad as exc:
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
        """The schema from checked fields; a bad meta field is a :class:`Bad`
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
                    if is_required(f):
                        raise Bad("is missing", f.name)
                    continue
                try:
                    args[f.name] = f.metadata["codec"].decode(meta[f.name])
                except Bad as exc:
                    raise Bad(exc.reason, f.name + exc.path) from None
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

    op: ClassVar[enum.Enum]
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
