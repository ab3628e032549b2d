"""Wire codecs: the form tensors take between processes.

A run's ``[wire]`` config names one codec for each kind of traffic —
``fetch`` (parameters from the shards), ``push`` (gradients to them) and
``activations`` (activations and deltas between layer partitions):

- ``"f32"``: the model's own dtype, as computed (the default; exact).
- ``"bf16"``: bfloat16, 2 bytes, float32's range with 8 bits of mantissa.
- ``"f16"``: IEEE half precision, 2 bytes, 11 bits of mantissa, values
  saturate at +-65504.

A 16-bit tensor travels as the frame dtype BFLOAT16 or FLOAT16, so every
frame says its own codec and a receiver needs no configuration to read it.
Whatever travels is computed on in float32 at both ends: the receiver
decodes it first. Tensors that stay in one process never go through a codec.

Gradients lose precision in every push; :class:`Encoder` keeps what the
rounding lost (error feedback, as in 1-bit SGD and EF-SGD) and adds it to
the next push of the same piece, so nothing is lost over time. Fetched
parameters and activations need none: each is a fresh value, not a
contribution to a sum.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .wire.frames import BFLOAT16

__all__ = ["CODECS", "Encoder", "codec_of", "decode", "empty", "encode", "wire_ratio"]

CODECS = ("f32", *kernels.WIRE_CODECS)

_WIRE_DTYPE = {"bf16": BFLOAT16, "f16": np.dtype("<f2")}
_CODEC_OF = {dt: codec for codec, dt in _WIRE_DTYPE.items()}


def wire_ratio(codec: str, itemsize: int) -> float:
    """Bytes that travel per byte computed.

    Args:
        codec: one of :data:`CODECS`.
        itemsize: bytes per element as computed.

    Returns:
        1 for ``"f32"`` (as computed); else 2 / ``itemsize``.
    """
    return 1.0 if codec == "f32" else 2 / itemsize


def codec_of(dtype: np.dtype) -> str:
    """The codec of a received tensor, from its dtype.

    Args:
        dtype: a frame array's dtype.

    Returns:
        ``"bf16"`` or ``"f16"`` for those wire dtypes, else ``"f32"`` (the
        tensor is as computed).
    """
    return _CODEC_OF.get(dtype, "f32")


def empty(shape: tuple[int, ...], codec: str) -> np.ndarray:
    """An uninitialised array for a tensor of ``shape`` encoded in ``codec``,
    to receive one into.

    Args:
        shape: the tensor's shape.
        codec: ``"bf16"`` or ``"f16"``.

    Returns:
        The array, of the codec's frame dtype.
    """
    return kernels.empty(shape, np.uint16).view(_WIRE_DTYPE[codec])


def encode(
    x: np.ndarray, codec: str, out: np.ndarray | None = None, residual: np.ndarray | None = None
) -> np.ndarray:
    """``x`` as it travels under ``codec``.

    Args:
        x: the tensor (float32 for a 16-bit codec).
        codec: one of :data:`CODECS`.
        out: an array :func:`encode` returned before for a tensor of this
            shape and codec, to reuse; None allocates one.
        residual: error feedback (see
            :func:`dbnode.kernels.encode_wire`); None: none.

    Returns:
        ``x`` itself for ``"f32"``; else its 16-bit form, of the codec's
        frame dtype.

    Raises:
        ValueError, TypeError: an unknown codec; a 16-bit codec and an
            ``x`` that is not float32.
    """
    if codec == "f32":
        return x
    try:
        dtype = _WIRE_DTYPE[codec]
    except KeyError:
        raise ValueError(f"unknown wire codec {codec!r}; expected one of {CODECS}") from None
    if x.dtype != np.float32:
        raise TypeError(f"the {codec} codec encodes float32 tensors, not {x.dtype}")
    words = None if out is None else out.view(np.uint16)
    return kernels.encode_wire(x, codec, words, residual).view(dtype)


def decode(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A received tensor in the form computed on.

    Args:
        array: a frame's array, in whatever codec it came.
        out: a float32 array of its shape to decode a 16-bit tensor into;
            None allocates one.

    Returns:
        ``array`` itself if it was not encoded (``out`` is then unused);
        else its float32 values, in ``out`` when given.
    """
    codec = _CODEC_OF.get(array.dtype)
    if codec is None:
        return array
    return kernels.decode_wire(array.view(np.uint16), codec, out)


class Encoder:
    """Encodes a stream of gradients per piece, with error feedback.

    For each piece key it keeps one reusable output buffer and the float32
    residual of what rounding has lost so far; ``encode(key, g)`` sends
    ``g + residual`` rounded, and keeps the new remainder.

    Args:
        codec: one of :data:`CODECS`; ``"f32"`` passes tensors through.
    """

    def __init__(self, codec: str) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown wire codec {codec!r}; expected one of {CODECS}")
        self.codec = codec
        self._out: dict[int, np.ndarray] = {}
        self._residual: dict[int, np.ndarray] = {}
        self._tag: dict[int, object] = {}

    def encode(self, key: int, x: np.ndarray, tag: object = None) -> np.ndarray:
        """The next gradient of piece ``key``, as it travels.

        Args:
            key: the piece.
            x: its gradient (float32 for a 16-bit codec); not changed.
            tag: what identifies this gradient (e.g. its push's sequence
                number): the same ``tag`` again is a retry, and gets the
                same encoding back, the residual unchanged.

        Returns:
            ``x`` for ``"f32"``; else the encoded tensor, in a buffer reused
            by the next call for the same key.

        Raises:
            ValueError, TypeError: as :func:`encode`.
        """
        if self.codec == "f32":
            return x
        if tag is not None and self._tag.get(key) == tag:
            return self._out[key]
        residual = self._residual.get(key)
        if residual is None or residual.shape != x.shape:
            residual = self._residual[key] = kernels.zeros(x.shape, np.float32)
            self._out.pop(key, None)
        out = self._out[key] = encode(x, self.codec, self._out.get(key), residual)
        self._tag[key] = tag
        return out

    def sent(self, key: int, x: np.ndarray, tag: object) -> np.ndarray:
        """What a gradient of piece ``key`` amounts to once decoded: for a
        push that was encoded under ``tag`` and now goes where no codec
        applies (its shard moved into this process), the encoded value, so
        that the residual stays exact; else ``x``.

        Args:
            key: the piece.
            x: its gradient.
            tag: as for :meth:`encode`.

        Returns:
            A float32 array to apply.
        """
        if self.codec == "f32" or tag is None or self._tag.get(key) != tag:
            return x
        return decode(self._out[key])

    def residual(self, key: int) -> np.ndarray | None:
        """What rounding has lost from piece ``key`` so far (not yet sent).

        Args:
            key: the piece.

        Returns:
            The residual, or None before the first encoding (or for ``"f32"``).
        """
        return self._residual.get(key)
