"""The mutual HMAC handshake over a :class:`~dbnode.wire.connection.Connection`.

The messages and their checks are sans-IO (:mod:`dbnode.wire.session`);
this module sends and receives them under a timeout and decides, in one
place, what the peer is told and what our caller sees when it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import AuthenticationError, ConnectionClosedError, RemoteProtocolError
from .connection import Connection
from .frames import ErrorCode, MessageKind
from .session import BadProof, ClientHandshake, PeerError, ServerHandshake
from .shm import SharedRings

log = logging.getLogger("dbnode.wire")

__all__ = ["SERVER_HANDSHAKE_TIMEOUT", "client_handshake", "server_handshake"]

#: Seconds a server gives a client for the whole handshake by default: a
#: genuine client needs two round trips; a socket that says nothing is shed.
SERVER_HANDSHAKE_TIMEOUT = 3.0


class _Refused(Exception):
    """The server's ``admit`` hook turned an authenticated client away."""


async def _run_handshake(
    conn: Connection, steps: Callable[[], Awaitable[dict[str, Any]]], role: str, timeout: float
) -> dict[str, Any]:
    """Run the handshake ``steps``; on any failure tell the peer, close, raise.

    Maps every way a handshake can fail to what the peer is told and what
    our caller sees: this is the only place that decides either.
    """
    other = "server" if role == "client" else "client"
    tell: tuple[ErrorCode | int, str] | None = None
    try:
        with trio.fail_after(timeout):
            meta = await steps()
    except trio.TooSlowError:
        tell = (ErrorCode.TIMEOUT, f"handshake not completed within {timeout} s")
        error = ConnectionClosedError(f"{tell[1]} (peer {conn.peer})", ErrorCode.TIMEOUT)
    except _Refused as exc:
        tell = (ErrorCode.UNAVAILABLE, str(exc))
        error = ConnectionClosedError(f"refused {conn.peer}: {exc}", ErrorCode.UNAVAILABLE)
    except BadProof:
        tell = (ErrorCode.AUTH_FAILED, f"the {other}'s proof does not verify")
        error = AuthenticationError(
            f"the {other} at {conn.peer} does not share our secret (its proof does not "
            "verify): one of the two sides has another --secret-file or $DBNODE_SECRET",
            ErrorCode.AUTH_FAILED,
        )
    except PeerError as exc:
        if exc.code == ErrorCode.AUTH_FAILED:
            error = AuthenticationError(
                f"the {other} at {conn.peer} rejected our proof (different secret?): {exc}",
                ErrorCode.AUTH_FAILED,
            )
        else:
            error = ConnectionClosedError(
                f"the {other} at {conn.peer} refused the connection: {exc}", exc.code
            )
    except RemoteProtocolError as exc:
        if exc.code != ErrorCode.TRUNCATED:  # no one left to tell otherwise
            tell = (exc.code, str(exc))
        error = ConnectionClosedError(f"handshake with {conn.peer} failed: {exc}", exc.code)
        error.__cause__ = exc
    except ConnectionClosedError as exc:
        error = ConnectionClosedError(f"handshake with {conn.peer} failed: {exc}", exc.code)
    except BaseException:
        await conn.aclose()
        raise
    else:
        conn.authenticated = True
        name = meta.get("name")
        conn.peer_name = name if isinstance(name, str) else ""
        return meta
    if tell is not None:
        await conn.close_with_error(*tell)
    else:
        await conn.aclose()
    raise error


async def client_handshake(
    conn: Connection,
    secret: bytes,
    *,
    name: str | None = None,
    timeout: float = 10.0,
    shm: bool = False,
) -> dict[str, Any]:
    """Authenticate a fresh connection as the client (docs/protocol.md section 10).

    HELLO -> CHALLENGE -> AUTH -> AUTH_OK: both sides prove they know
    ``secret`` (HMAC-SHA256 over both fresh nonces, compared in constant
    time). On success the connection is authenticated. On failure the peer
    is told why when it can be (AUTH_FAILED, TIMEOUT, the code of a bad
    frame) and the connection is closed.

    Args:
        conn: a fresh connection; closed if the handshake fails.
        secret: the shared secret.
        name: our name, sent in HELLO for the server's logs.
        timeout: seconds for the whole handshake.
        shm: offer the server shared memory for big payloads (for a server
            on this host: :mod:`dbnode.wire.shm`); ``conn.rings`` is set if
            it accepts.

    Returns:
        The server's AUTH_OK meta.

    Raises:
        AuthenticationError: a proof failed, either way.
        ConnectionClosedError: with ``.code``: refused (e.g. UNAVAILABLE),
            timed out (TIMEOUT), a bad frame, or the connection was lost.
        ConfigError: the secret is too short (the connection stays open).
    """
    shake = ClientHandshake(secret, name)
    rings = None

    async def steps() -> dict[str, Any]:
        nonlocal rings
        await conn.send_frame(MessageKind.HELLO, meta=shake.hello())
        auth = shake.on_challenge(await conn.receive_frame())
        # Made only for a server that proved it knows the secret (the only
        # one that learns its name): a segment costs every page of it at once.
        if shm:
            try:
                rings = SharedRings.offer()
            except OSError as exc:
                log.debug("no shared memory for %s: %s", conn.peer, exc)
            else:
                auth = {**auth, "shm": {"path": rings.path, "size": rings.size}}
        await conn.send_frame(MessageKind.AUTH, meta=auth)
        return shake.on_auth_ok(await conn.receive_frame())

    try:
        meta = await _run_handshake(conn, steps, "client", timeout)
    except BaseException:
        if rings is not None:
            rings.close()
        raise
    if rings is not None:
        rings.unlink()  # mapped by both ends now (or refused): the name has served
        if meta.get("shm") is True:
            conn.rings = rings
        else:
            rings.close()
    return meta


async def server_handshake(
    conn: Connection,
    secret: bytes,
    *,
    name: str | None = None,
    timeout: float = SERVER_HANDSHAKE_TIMEOUT,
    on_hello: Callable[[], None] | None = None,
    admit: Callable[[], str | None] | None = None,
    shm: bool = True,
) -> dict[str, Any]:
    """Authenticate a fresh connection as the server; the mirror of client_handshake.

    Nothing but HELLO, then AUTH (or an ERROR) is accepted before AUTH_OK;
    anything else is UNEXPECTED. The bytes of a frame that cannot start
    with the magic are BAD_MAGIC as soon as they arrive.

    Args:
        conn: a fresh connection; closed if the handshake fails.
        secret: the shared secret.
        name: our name, sent in AUTH_OK for the client's logs.
        timeout: seconds for the whole handshake (3 by default; a client
            waits 10).
        on_hello: called once a valid HELLO has come (synchronously).
        admit: called once the client's proof verified, before AUTH_OK
            (synchronously): None lets the client in; a reason answers it
            ERROR UNAVAILABLE with that reason instead, and the handshake
            fails with ConnectionClosedError (code UNAVAILABLE).
        shm: map the shared memory a client offers, if it can
            (:mod:`dbnode.wire.shm`); ``conn.rings`` is set then.

    Returns:
        The client's HELLO meta.

    Raises:
        AuthenticationError, ConnectionClosedError, ConfigError: as
            :func:`client_handshake`.
    """
    shake = ServerHandshake(secret, name)
    attached: list[SharedRings] = []  # the segment mapped, if any

    async def steps() -> dict[str, Any]:
        challenge = shake.on_hello(await conn.receive_frame())
        if on_hello is not None:
            on_hello()
        await conn.send_frame(MessageKind.CHALLENGE, meta=challenge)
        auth = await conn.receive_frame()
        auth_ok = shake.on_auth(auth)
        if admit is not None and (reason := admit()) is not None:
            raise _Refused(reason)
        offer = auth.meta.get("shm")
        if offer is not None:  # the client proved it knows the secret
            if shm:
                try:
                    attached.append(SharedRings.attach(offer))
                except (ValueError, OSError) as exc:
                    log.debug("shared memory offered by %s not taken: %s", conn.peer, exc)
            auth_ok = {**auth_ok, "shm": bool(attached)}
        await conn.send_frame(MessageKind.AUTH_OK, meta=auth_ok)
        return shake.hello_meta

    try:
        meta = await _run_handshake(conn, steps, "server", timeout)
    except BaseException:
        for rings in attached:
            rings.close()
        raise
    if attached:
        conn.rings = attached[0]
    return meta
