"""Session rules, sans-IO: the handshake's messages and which kinds may come when.

No sockets, no trio: every rule of docs/protocol.md sections 10 and 11 that
is not about bytes on the wire lives here, as plain functions and small
state objects that the trio side (:mod:`dbnode.wire.handshake`,
:mod:`dbnode.wire.channel`) drives and the tests drive with frames alone:

* what each kind is (handshake, answer, request, CLOSE) and what may be
  received before and after AUTH_OK (:func:`check_received`);
* the handshake itself (:class:`ClientHandshake`, :class:`ServerHandshake`):
  the metas of HELLO, CHALLENGE, AUTH and AUTH_OK, and the check of each
  proof (:func:`auth_mac`);
* the CLOSE exchange (:class:`CloseExchange`): no request after either side's
  CLOSE, and when the exchange is complete;
* which request flags are understood (:func:`check_flags`; this version: none).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from typing import Any

from ..errors import LocalProtocolError, RemoteProtocolError, RequestError
from .frames import (
    HANDSHAKE_LIMITS,
    MAGIC,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    MessageKind,
)
from .secret import check_secret

__all__ = [
    "HANDSHAKE_KINDS",
    "ANSWER_KINDS",
    "NOT_REQUESTS",
    "HANDSHAKE_ERROR_TEXT",
    "BadProof",
    "PeerError",
    "ClientHandshake",
    "ServerHandshake",
    "CloseExchange",
    "as_code",
    "auth_mac",
    "check_flags",
    "check_received",
    "expect",
    "request_kind",
]

HANDSHAKE_KINDS = frozenset(
    {MessageKind.HELLO, MessageKind.CHALLENGE, MessageKind.AUTH, MessageKind.AUTH_OK}
)
# Kinds that answer a request; everything else after the handshake (except
# CLOSE) is a request.
ANSWER_KINDS = frozenset({MessageKind.REPLY, MessageKind.ERROR, MessageKind.PONG})
NOT_REQUESTS = HANDSHAKE_KINDS | ANSWER_KINDS | {MessageKind.CLOSE}
# Request kinds by wire value: the fast path of request_kind().
_REQUEST_KIND_OF = {int(k): k for k in MessageKind if k not in NOT_REQUESTS}
_HEX_NONCE = re.compile(f"[0-9a-fA-F]{{{2 * NONCE_SIZE}}}")

# ERROR text sent before AUTH_OK: its JSON must fit HANDSHAKE_LIMITS.max_meta
# even if every character takes 6 bytes (a \uXXXX escape).
HANDSHAKE_ERROR_TEXT = (HANDSHAKE_LIMITS.max_meta - 64) // 6


# -- kinds -------------------------------------------------------------------------


def check_flags(frame: Frame) -> None:
    """A request's flags must be ones its kind defines; this version defines none.

    Args:
        frame: the received request.

    Raises:
        RequestError: BAD_REQUEST (the connection carries on).
    """
    if frame.flags:
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f"{frame.kind.name} with flags {frame.flags:#06x}: protocol version {PROTOCOL_VERSION} defines none",
        )


def request_kind(kind: MessageKind | int) -> MessageKind:
    """``kind`` as a request kind.

    Args:
        kind: a kind, or its wire value.

    Returns:
        The MessageKind.

    Raises:
        LocalProtocolError: BAD_KIND for an unknown kind, UNEXPECTED for a
            kind that is not a request (handshake, answer, CLOSE).
    """
    try:
        return _REQUEST_KIND_OF[kind]
    except (KeyError, TypeError):
        pass
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise LocalProtocolError(ErrorCode.BAD_KIND, "kind", kind, "unknown kind") from None
    raise LocalProtocolError(ErrorCode.UNEXPECTED, "kind", kind.name, "not a request kind")


def check_received(kind: MessageKind, authenticated: bool) -> None:
    """A received frame's kind must fit the session's state.

    Before AUTH_OK the header limits already keep tensors out, and the
    handshake accepts only its next step (:func:`expect`); after it, a
    handshake kind is UNEXPECTED.

    Args:
        kind: the received frame's kind.
        authenticated: whether the handshake is over.

    Raises:
        RemoteProtocolError: UNEXPECTED.
    """
    if authenticated and kind in HANDSHAKE_KINDS:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED, "kind", kind.name, "handshake is over")


def as_code(value: int) -> ErrorCode | int:
    """An ERROR frame's code as an ErrorCode; unknown codes stay ints (judged by range).

    Args:
        value: the code's wire value.

    Returns:
        The ErrorCode, or ``value`` itself.
    """
    try:
        return ErrorCode(value)
    except ValueError:
        return value


class PeerError(Exception):
    """The peer sent an ERROR frame where we expected something else.

    Args:
        frame: the ERROR frame (its meta already checked).

    Attributes:
        code: its code (an ErrorCode, or an int if unknown).
        message: its text.
    """

    def __init__(self, frame: Frame) -> None:
        self.code = as_code(frame.meta["code"])
        self.message = frame.meta["message"]
        super().__init__(f"{self.message} [{getattr(self.code, 'name', self.code)}]")


def expect(frame: Frame, kind: MessageKind) -> Frame:
    """The handshake's next frame must be ``kind``.

    Args:
        frame: the received frame.
        kind: the kind the handshake expects next.

    Returns:
        ``frame``.

    Raises:
        PeerError: it is an ERROR (the peer gave up).
        RemoteProtocolError: UNEXPECTED, any other kind.
    """
    if frame.kind == MessageKind.ERROR:
        raise PeerError(frame)
    if frame.kind != kind:
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED, "kind", frame.kind.name, f"expected {kind.name} in the handshake"
        )
    return frame


# -- the handshake -------------------------------------------------------------------


class BadProof(Exception):
    """The peer's handshake MAC did not verify."""


def auth_mac(secret: bytes, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The handshake proof that ``role`` knows the shared secret.

    ``HMAC-SHA256(secret, MAGIC | u16 version | role | client_nonce |
    server_nonce)`` where role is ``b"client"`` or ``b"server"``, the side
    that computes the MAC. The role label makes a MAC useless when reflected
    back at its maker; both fresh nonces make it useless when replayed on
    another connection. See docs/protocol.md, "Handshake".

    Args:
        secret: the shared secret.
        role: ``"client"`` or ``"server"``.
        client_nonce: the client's NONCE_SIZE bytes.
        server_nonce: the server's NONCE_SIZE bytes.

    Returns:
        The 32-byte MAC.

    Raises:
        LocalProtocolError: a role other than client/server, or a nonce of
            the wrong size.
        ConfigError: the secret is too short (the message never shows it).
    """
    if role not in ("client", "server"):
        raise LocalProtocolError(ErrorCode.INTERNAL, "role", role, 'must be "client" or "server"')
    for name, nonce in (("client_nonce", client_nonce), ("server_nonce", server_nonce)):
        if len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, name, len(nonce), f"need {NONCE_SIZE} bytes"
            )
    secret = check_secret(secret)
    message = MAGIC + struct.pack("<H", PROTOCOL_VERSION) + role.encode("ascii")
    return hmac.new(secret, message + client_nonce + server_nonce, hashlib.sha256).digest()


def _hex_field(meta: dict[str, Any], key: str) -> bytes:
    value = meta.get(key)
    if not isinstance(value, str) or not _HEX_NONCE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise RemoteProtocolError(
            ErrorCode.BAD_META, f"meta.{key}", shown, f"need {2 * NONCE_SIZE} hex digits"
        )
    return bytes.fromhex(value)


def _named(meta: dict[str, Any], name: str | None) -> dict[str, Any]:
    return meta if not name else {**meta, "name": name}


class ClientHandshake:
    """The client's side: HELLO -> (CHALLENGE) -> AUTH -> (AUTH_OK).

    Call :meth:`hello` for HELLO's meta, :meth:`on_challenge` with the
    received frame for AUTH's meta, :meth:`on_auth_ok` with the last frame
    for the server's AUTH_OK meta.

    Args:
        secret: the shared secret (ConfigError if too short).
        name: our name, sent in HELLO for the server's logs.
        nonce: our nonce; a fresh random one by default (tests pin it).
    """

    def __init__(self, secret: bytes, name: str | None = None, nonce: bytes | None = None):
        self._secret = check_secret(secret)
        self._name = name
        self._nc = os.urandom(NONCE_SIZE) if nonce is None else nonce

    def hello(self) -> dict[str, Any]:
        """HELLO's meta.

        Returns:
            ``{"nonce": ...}``, and our ``name`` if we have one.
        """
        return _named({"nonce": self._nc.hex()}, self._name)

    def on_challenge(self, frame: Frame) -> dict[str, Any]:
        """Check the server's proof in CHALLENGE; AUTH's meta.

        Args:
            frame: the frame received after HELLO.

        Returns:
            AUTH's meta, ``{"mac": ...}``.

        Raises:
            BadProof: the server does not know the secret.
            PeerError, RemoteProtocolError: see :func:`expect`; BAD_META.
        """
        meta = expect(frame, MessageKind.CHALLENGE).meta
        ns = _hex_field(meta, "nonce")
        mac = _hex_field(meta, "mac")
        if not hmac.compare_digest(mac, auth_mac(self._secret, "server", self._nc, ns)):
            raise BadProof
        return {"mac": auth_mac(self._secret, "client", self._nc, ns).hex()}

    def on_auth_ok(self, frame: Frame) -> dict[str, Any]:
        """AUTH_OK's meta: the handshake is complete.

        Args:
            frame: the frame received after AUTH.

        Returns:
            The server's AUTH_OK meta.

        Raises:
            PeerError, RemoteProtocolError: see :func:`expect`.
        """
        return expect(frame, MessageKind.AUTH_OK).meta


class ServerHandshake:
    """The server's side: (HELLO) -> CHALLENGE -> (AUTH) -> AUTH_OK.

    :meth:`on_hello` gives CHALLENGE's meta, :meth:`on_auth` AUTH_OK's;
    :attr:`hello_meta` is the client's HELLO meta once received.

    Args:
        secret: the shared secret (ConfigError if too short).
        name: our name, sent in AUTH_OK for the client's logs.
        nonce: our nonce; a fresh random one by default (tests pin it).
    """

    def __init__(self, secret: bytes, name: str | None = None, nonce: bytes | None = None):
        self._secret = check_secret(secret)
        self._name = name
        self._ns = os.urandom(NONCE_SIZE) if nonce is None else nonce
        self._nc: bytes | None = None
        self.hello_meta: dict[str, Any] = {}

    def on_hello(self, frame: Frame) -> dict[str, Any]:
        """CHALLENGE's meta, with our proof.

        Args:
            frame: the first frame received.

        Returns:
            CHALLENGE's meta, ``{"nonce": ..., "mac": ...}``.

        Raises:
            PeerError, RemoteProtocolError: see :func:`expect`; BAD_META.
        """
        self.hello_meta = expect(frame, MessageKind.HELLO).meta
        self._nc = _hex_field(self.hello_meta, "nonce")
        mac_s = auth_mac(self._secret, "server", self._nc, self._ns)
        return {"nonce": self._ns.hex(), "mac": mac_s.hex()}

    def on_auth(self, frame: Frame) -> dict[str, Any]:
        """Check the client's proof in AUTH; AUTH_OK's meta.

        Args:
            frame: the frame received after CHALLENGE.

        Returns:
            AUTH_OK's meta (our ``name``, if we have one).

        Raises:
            BadProof: the client does not know the secret.
            PeerError, RemoteProtocolError: see :func:`expect`; BAD_META.
            LocalProtocolError: INTERNAL, called before :meth:`on_hello`.
        """
        if self._nc is None:
            raise LocalProtocolError(ErrorCode.INTERNAL, "handshake", "AUTH", "before HELLO")
        mac = _hex_field(expect(frame, MessageKind.AUTH).meta, "mac")
        if not hmac.compare_digest(mac, auth_mac(self._secret, "client", self._nc, self._ns)):
            raise BadProof
        return _named({}, self._name)


# -- closing --------------------------------------------------------------------------


class CloseExchange:
    """The CLOSE exchange of section 11, as state.

    Either side may send CLOSE: it sends no request after it; the other
    side answers what it already received, then sends its own CLOSE; the
    exchange is complete when both have.
    """

    __slots__ = ("sent", "received")

    def __init__(self) -> None:
        self.sent = False  # we sent CLOSE: no more requests from us
        self.received = False  # the peer sent CLOSE: no more requests from it

    @property
    def closing(self) -> bool:
        """Whether either side has sent CLOSE: no new requests either way."""
        return self.sent or self.received

    def on_close(self) -> bool:
        """The peer's CLOSE arrived; whether that completes the exchange
        (we had sent ours). Otherwise we must answer with CLOSE when quiet.

        Returns:
            Whether the exchange is complete.
        """
        if self.sent:
            return True
        self.received = True
        return False

    def check_request(self, frame: Frame) -> None:
        """A request from the peer; it may not come after its CLOSE.

        Args:
            frame: the request.

        Raises:
            RemoteProtocolError: UNEXPECTED.
        """
        if self.received:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED, "kind", frame.kind.name, "a request after CLOSE"
            )
