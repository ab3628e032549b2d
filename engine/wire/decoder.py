"""The incremental frame decoder, sans-IO (h11 style): bytes in, frames out.

No sockets, no trio. The transport's :class:`~dbnode.wire.connection.Connection`
parses with the same pieces (:func:`~dbnode.wire.frames.decode_header`,
:func:`~dbnode.wire.frames.parse_meta`) but receives payloads straight into
their destination; tests/test_frame_parsers.py holds the two to the same frames and
the same errors for every byte stream (docs/architecture.md says why two remain).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    MAGIC,
    ErrorCode,
    Frame,
    Header,
    Limits,
    check_magic,
    decode_header,
    parse_meta,
    payload_view,
)

__all__ = ["FrameDecoder"]


class FrameDecoder:
    """Turns received bytes into :class:`Frame` objects (sans-IO, h11 style).

    Feed bytes with :meth:`receive_data` and call :meth:`next_frame` until it
    returns None (more data needed). Each received byte is copied once, into
    its destination: the header buffer, the meta buffer or the frame's array.
    Nothing is allocated for a frame before its header has been validated,
    so the bytes held for an incomplete frame are capped by ``limits``.

    Any error poisons the decoder: the connection must be closed (after
    telling the peer with :func:`error_frame`), never resynchronised.

    ``limits`` may be replaced between frames, e.g. from HANDSHAKE_LIMITS to
    the normal limits once the peer is authenticated.

    Args:
        limits: the size caps to enforce (the :attr:`limits` attribute).
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._chunks: deque[memoryview] = deque()  # received, not yet consumed
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._eof = False
        self._error: ProtocolError | None = None
        self._header_buf = bytearray(HEADER_SIZE)
        self._start_frame()

    def _start_frame(self) -> None:
        self._header: Header | None = None
        self._meta: dict[str, Any] | None = None
        self._array: np.ndarray | None = None
        self._dest = memoryview(self._header_buf)  # what is being filled now
        self._filled = 0

    def _check_usable(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(
                self._error.code, "decoder", "poisoned",
                f"an earlier error poisoned it: {self._error}",
            ) from self._error  # fmt: skip

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; ``b""`` means the stream ended.

        Args:
            data: the received bytes (copied unless they are ``bytes``).

        Raises:
            LocalProtocolError: the decoder is poisoned, or data came after
                the end of the stream.
        """
        self._check_usable()
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "data", len(data), "received after end of stream"
            )
        if not isinstance(data, bytes):
            data = bytes(data)  # copy: the caller may reuse its mutable buffer
        self._chunks.append(memoryview(data))

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more data is received.

        Returns:
            The frame, or None.

        Raises:
            RemoteProtocolError: the peer sent an invalid frame, or the stream
                ended inside one (TRUNCATED). The decoder is then poisoned.
            LocalProtocolError: the decoder was already poisoned.
        """
        self._check_usable()
        try:
            return self._advance()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _advance(self) -> Frame | None:
        while True:
            self._fill()
            if self._header is None and self._filled:
                # A stranger is turned away on its first bytes (as Connection does).
                check_magic(self._header_buf[: min(self._filled, len(MAGIC))])
            if self._filled < len(self._dest):
                if self._eof and (self._header is not None or self._filled):
                    part = (
                        "header" if self._header is None
                        else "meta" if self._meta is None
                        else "payload"
                    )  # fmt: skip
                    raise RemoteProtocolError(
                        ErrorCode.TRUNCATED, part, f"{self._filled} of {len(self._dest)} bytes",
                        "the stream ended inside a frame",
                    )  # fmt: skip
                return None
            if self._header is None:
                header = self._header = decode_header(self._header_buf, self.limits)
                self._dest, self._filled = memoryview(bytearray(header.meta_length)), 0
            elif self._meta is None:
                self._meta = parse_meta(self._dest, self._header.kind)
                self._array = self._header.allocate()
                empty = memoryview(b"")
                self._dest = empty if self._array is None else payload_view(self._array)
                self._filled = 0
            else:
                frame = Frame.from_header(self._header, self._meta, self._array)
                self._start_frame()
                return frame

    def _fill(self) -> None:
        """Move received bytes into the current destination."""
        dest, chunks = self._dest, self._chunks
        while self._filled < len(dest) and chunks:
            chunk = chunks[0]
            n = min(len(dest) - self._filled, len(chunk) - self._offset)
            dest[self._filled : self._filled + n] = chunk[self._offset : self._offset + n]
            self._filled += n
            self._offset += n
            if self._offset == len(chunk):
                chunks.popleft()
                self._offset = 0
