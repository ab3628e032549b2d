"""Replies, sans-IO: what request handlers return, and how their failures are answered.

A service (a parameter shard, a node's control ops) is a set of handlers
``frame -> Reply | None``; :class:`~dbnode.wire.channel.Channel` sends what
they return. This module is the whole contract between the two.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtocolError, RequestError
from .frames import ErrorCode, Frame

__all__ = ["DEFER", "Handler", "InlineHandler", "Reply", "error_reply"]

log = logging.getLogger("dbnode.wire")


@dataclass
class Reply:
    """What a request handler answers with; the transport sends it as a REPLY.

    Attributes:
        array: the tensor to send back, or None. Sent zero-copy: it must not
            change until the reply has gone out (see ``release``).
        meta: control information (a JSON-able dict), or None.
        seq: the reply's ``seq`` (e.g. the tensor's version).
        key: the reply's ``key``; None echoes the request's.
        flags: the reply's flags (this version defines none).
        release: called once the reply has left or failed to, e.g. to give
            a pooled buffer back or release a lock that kept ``array``
            from being updated while it was on its way out.
    """

    array: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    seq: int = 0
    key: int | None = None
    flags: int = 0
    release: Callable[[], None] | None = None


class _Defer:
    """The type of :data:`DEFER`."""

    _instance: _Defer | None = None

    def __new__(cls) -> _Defer:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFER"


#: What an inline handler returns for a request it leaves to the (async) handler.
DEFER = _Defer()

Handler = Callable[[Frame], Awaitable["Reply | None"]]
InlineHandler = Callable[[Frame], "Reply | None | _Defer"]


def error_reply(exc: Exception) -> tuple[ErrorCode | int, str]:
    """The ERROR code and text that answer a request whose handler raised ``exc``.

    A RequestError or ProtocolError with a request-level code (32 and up)
    is answered as it is; anything else is INTERNAL, and logged.

    Args:
        exc: what the handler raised.

    Returns:
        ``(code, text)``.
    """
    code = getattr(exc, "code", None)
    if isinstance(exc, (RequestError, ProtocolError)) and isinstance(code, int) and code >= 32:
        return code, exc.message if isinstance(exc, RequestError) else str(exc)
    # Anything else is a bug or failure on this side: the peer learns that
    # much; the traceback goes to our log.
    log.error("request handler failed", exc_info=exc)
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
