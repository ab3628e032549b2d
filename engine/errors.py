"""dbnode's error vocabulary: every error dbnode raises on purpose is here.

All of them derive from :class:`DBNodeError`, so one ``except DBNodeError``
catches dbnode's own failures and nothing else. Errors about bad input also
derive from :class:`ValueError`, as msgpack's do.

Protocol errors follow h11: :class:`LocalProtocolError` means *we* misused
the protocol (a bug on this side), :class:`RemoteProtocolError` means the
*peer* sent something invalid. Either kind poisons the object that raised it.
Their message names the offending field and its value.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

__all__ = [
    "ErrorCode",
    "DBNodeError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ConfigError",
]


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR frames and by :class:`ProtocolError`.

    The range says what happens to the connection: codes below 32 are fatal
    (the sender of the ERROR closes the connection right after it), codes
    from 32 up concern one request and the connection carries on.
    """

    # 1-15: framing; the frame could not be decoded.
    BAD_MAGIC = 1
    BAD_VERSION = 2
    BAD_KIND = 3
    BAD_DTYPE = 4
    BAD_SHAPE = 5
    TOO_LARGE = 6
    BAD_META = 7
    BAD_HEADER = 8  # a header field out of range (reserved != 0, ...)
    TRUNCATED = 9  # the stream ended inside a frame
    # 16-31: session.
    AUTH_FAILED = 16
    UNEXPECTED = 17  # a valid frame at the wrong moment (PULL before AUTH_OK)
    TIMEOUT = 18
    # 32-63: request errors.
    BAD_REQUEST = 32  # the request makes no sense to the service
    UNKNOWN_KEY = 33
    SHAPE_MISMATCH = 34
    DTYPE_MISMATCH = 35
    UNKNOWN_RUN = 36  # no such run on this node (never opened, closed, or its lease expired)
    STALE_EPOCH = 37  # the request's shard map is not the run's current one (fencing)
    NOT_FINITE = 38  # a gradient or value with NaN or infinity; nothing was applied
    TOO_STALE = 39  # a push computed from parameters older than its max_staleness; not applied
    # 64-: node errors.
    INTERNAL = 64  # a bug or failure on the side that sends the ERROR
    UNAVAILABLE = 65  # shutting down or overloaded; try elsewhere or later

    @property
    def fatal(self) -> bool:
        """Whether the connection is closed after an ERROR with this code."""
        return self < 32


class DBNodeError(Exception):
    """Base class of every error dbnode raises deliberately."""


class ProtocolError(DBNodeError, ValueError):
    """A frame or a message broke the wire protocol.

    Attributes:
        code: the numeric error code (an :class:`ErrorCode` member
            when raised by dbnode), suitable for an ERROR frame.
        field: name of the offending field, e.g. ``"magic"`` or ``"shape"``.
        value: the offending value as received or given.
        reason: what is wrong with it, in words.
    """

    def __init__(self, code: int, field: str, value: object, reason: str) -> None:
        self.code = code
        self.field = field
        self.value = value
        self.reason = reason
        name = getattr(code, "name", None) or str(int(code))
        super().__init__(f"{field}={value!r}: {reason} [{name}]")


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent data that violates the protocol."""


class ConfigError(DBNodeError, ValueError):
    """A configuration value is invalid.

    Attributes:
        key: the configuration key, e.g. ``"max_payload"``.
        value: the rejected value.
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}={value!r}: {reason}")


# -- the wire (dbnode.wire raises them) --------------------------------------------

__all__ += [
    "TransportError",
    "ConnectionClosedError",
    "AuthenticationError",
    "RequestTimeout",
    "RequestError",
    "RemoteError",
]


class TransportError(DBNodeError):
    """A connection failed, or a request on it did not complete."""


class ConnectionClosedError(TransportError):
    """The connection is gone (or going): lost, refused, closed, or poisoned.

    Every request still waiting for its answer on the connection fails with
    this error, and so does every later use of it.

    Attributes:
        code: the error code the connection ended with when there was one
            (an :class:`ErrorCode` when known, else the int): e.g.
            ``UNAVAILABLE`` from a node at its connection limit, ``TIMEOUT``
            for a handshake that took too long, the fatal code of a bad frame
            either side detected. None for a plain loss of the peer.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class AuthenticationError(ConnectionClosedError):
    """The handshake failed: one side could not prove it knows the shared secret.

    Raised on the side that detected the bad proof and on the side whose
    proof was rejected; ``code`` is ``AUTH_FAILED``.
    """


class RequestTimeout(TransportError, TimeoutError):
    """A request got no answer in time. The connection itself stays usable."""


class RequestError(DBNodeError):
    """A request failed with an error code that concerns only that request.

    A request handler raises it to answer with an ERROR frame of that code
    (``code`` should be 32 or more: request or node errors; see
    docs/protocol.md section 9); the connection carries on.

    Attributes:
        code: the error code (:class:`ErrorCode` when known).
        message: human-readable detail.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        name = getattr(code, "name", None) or str(int(code))
        super().__init__(f"{message} [{name}]")


class RemoteError(RequestError):
    """The peer answered our request with an ERROR frame (``code``, ``message``)."""


# -- parameter shards and checkpoints (dbnode.ps, dbnode.driver) ---------------------

__all__ += [
    "ShardError",
    "UnknownKeyError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "NotFiniteError",
    "TooStaleError",
    "KeyConflictError",
    "SnapshotError",
    "CheckpointError",
]


class ShardError(DBNodeError, ValueError):
    """A request the shard refuses; nothing was changed.

    Attributes:
        code: the :class:`ErrorCode` for the ERROR frame.
        key: the tensor key the request named (None if none applies).
    """

    code = ErrorCode.BAD_REQUEST

    def __init__(self, key: int | None, message: str) -> None:
        self.key = key
        super().__init__(message)


class UnknownKeyError(ShardError):
    """The request names a key this shard does not hold."""

    code = ErrorCode.UNKNOWN_KEY


class ShapeMismatchError(ShardError):
    """A pushed gradient (or an init value) has the wrong shape."""

    code = ErrorCode.SHAPE_MISMATCH


class DTypeMismatchError(ShardError):
    """A pushed gradient (or an init value) has the wrong dtype."""

    code = ErrorCode.DTYPE_MISMATCH


class NotFiniteError(ShardError):
    """A pushed gradient (or an init value) holds NaN or infinity."""

    code = ErrorCode.NOT_FINITE


class TooStaleError(ShardError):
    """A push whose parameters are more versions behind the shard's than its
    ``max_staleness`` allows: not applied (the pusher fetches, then pushes
    again)."""

    code = ErrorCode.TOO_STALE


class KeyConflictError(ShardError):
    """An init for an existing key disagrees with it (name, shape, dtype or
    optimizer)."""


class SnapshotError(DBNodeError, ValueError):
    """A snapshot file is missing, truncated, corrupt or not a snapshot.

    Attributes:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"snapshot {str(path)!r}: {reason}")


class CheckpointError(DBNodeError):
    """A checkpoint is missing, incomplete or does not verify."""


# -- runs (dbnode.partition, dbnode.driver) -----------------------------------------

__all__ += ["Diverged", "NodeRefused", "NodeUnreachable", "RunInterrupted", "StopTraining"]


class NodeUnreachable(DBNodeError):
    """A node of a run did not answer the driver (gone, frozen, or cut off).

    Attributes:
        host: the node's address.
    """

    def __init__(self, host, message: str) -> None:
        self.host = host
        super().__init__(message)


class NodeRefused(DBNodeError):
    """A node of a run refused to take a replica's partition or data (over
    its memory budget, say): another node may.

    Attributes:
        host: the node's address.
    """

    def __init__(self, host, message: str) -> None:
        self.host = host
        super().__init__(message)


class Diverged(DBNodeError):
    """A replica's loss stopped being finite: the learning rate is too high."""


class RunInterrupted(DBNodeError):
    """A run stopped by a signal (SIGINT, SIGTERM or SIGHUP) before its end.

    Its outputs were written as of the moment it stopped, and a final
    checkpoint taken when checkpointing was on.

    Attributes:
        signal: the signal's name.
        out_dir: where the outputs went (None: nowhere).
        checkpoint: the final checkpoint's directory, or None.
        summary: the run's summary as of the stop.
    """

    def __init__(self, signal: str, out_dir, checkpoint, summary) -> None:
        self.signal = signal
        self.out_dir = out_dir
        self.checkpoint = checkpoint
        self.summary = summary
        where = f"; outputs written to {out_dir}" if out_dir else ""
        super().__init__(f"stopped by {signal}{where}")


class StopTraining(Exception):
    """Raise it from a run's progress callback to end the run early and
    keep what it has: the replicas stop, the model and metrics are written,
    and :func:`dbnode.train` returns the summary (``stopped`` says why)."""
