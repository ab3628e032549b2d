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

__all__ = [
    "DBNodeError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ConfigError",
]


class DBNodeError(Exception):
    """Base class of every error dbnode raises deliberately."""


class ProtocolError(DBNodeError, ValueError):
    """A frame or a message broke the wire protocol.

    Attributes:
        code: the numeric error code (a ``dbnode.protocol.ErrorCode`` member
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
