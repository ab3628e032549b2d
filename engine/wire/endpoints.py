"""Endpoints: connecting to a node (:func:`connect`, :func:`open_connection`)
and serving connections (:func:`serve`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import ConfigError, ConnectionClosedError
from .admission import LogLimiter, PreauthGate, source_of
from .channel import Channel
from .connection import Connection
from .frames import DEFAULT_LIMITS, ErrorCode, Limits, error_frame
from .handshake import SERVER_HANDSHAKE_TIMEOUT, client_handshake, server_handshake
from .reply import Handler, InlineHandler
from .secret import check_secret
from .shm import enabled as shm_enabled
from .shm import is_loopback
from .sockio import connect_tcp, listen_tcp

__all__ = ["connect", "open_connection", "serve"]

log = logging.getLogger("dbnode.wire")

# Seconds between two WARNING lines about the connections of one address.
_LOG_INTERVAL = 10.0
# Seconds a new connection may stay silent before it counts as idle
# (PreauthGate); a genuine client says HELLO within a round trip.
_IDLE_GRACE = 1.0


async def open_connection(
    host: str,
    port: int,
    secret: bytes,
    *,
    name: str | None = None,
    handshake_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    stall_timeout: float | None = None,
) -> Connection:
    """Connect over TCP and run the client handshake; returns an authenticated Connection.

    Args:
        host: the server's host name or address.
        port: its port.
        secret: the shared secret.
        name: our name, sent in HELLO for the server's logs.
        handshake_timeout: seconds for the handshake.
        limits: the Connection's limits.
        stall_timeout: the Connection's (None: wait forever inside a frame).

    A server on the loopback interface is offered shared memory for big
    payloads (:mod:`dbnode.wire.shm`; ``DBNODE_SHM=0`` turns that off).

    Returns:
        The authenticated connection; the caller owns it.

    Raises:
        ConfigError: the secret is missing or too short (before connecting).
        AuthenticationError, ConnectionClosedError: see :func:`client_handshake`;
            also when the TCP connection cannot be made.
    """
    secret = check_secret(secret)
    stream = await connect_tcp(host, port)
    conn = Connection(stream, limits=limits, stall_timeout=stall_timeout)
    shm = shm_enabled() and is_loopback(host)
    await client_handshake(conn, secret, name=name, timeout=handshake_timeout, shm=shm)
    return conn


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    secret: bytes,
    *,
    handler: Handler | None = None,
    inline: InlineHandler | None = None,
    name: str | None = None,
    handshake_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    stall_timeout: float | None = None,
    max_concurrent: int = 64,
    close_timeout: float = 5.0,
    spin: float = 0.0,
) -> AsyncIterator[Channel]:
    """``async with connect(host, port, secret) as channel:`` — a running client Channel.

    Connects, authenticates (:func:`open_connection`), and runs the
    channel's reader in a nursery that lives as long as the ``async with``
    block. On exit the channel is closed gracefully (:meth:`Channel.aclose`,
    bounded by ``close_timeout``). ``handler`` and ``inline`` answer
    requests the server sends on this connection, as in :class:`Channel`
    (neither: they get BAD_REQUEST).

    Args:
        host: the server's host name or address.
        port: its port.
        secret: the shared secret.
        handler: the Channel's ``handler``.
        inline: the Channel's ``inline``.
        name: our name, sent in HELLO for the server's logs.
        handshake_timeout: seconds for the handshake.
        limits: the Connection's limits.
        stall_timeout: the Connection's.
        max_concurrent: the Channel's.
        close_timeout: the Channel's; bounds the close on exit.
        spin: the Channel's.

    Returns:
        An async context manager that yields the running channel.

    Raises:
        ConfigError, AuthenticationError, ConnectionClosedError: as
            :func:`open_connection` (on entering), or bad Channel arguments.
    """
    conn = await open_connection(
        host, port, secret, name=name, handshake_timeout=handshake_timeout,
        limits=limits, stall_timeout=stall_timeout,
    )  # fmt: skip
    channel = Channel(
        conn, handler, inline=inline, max_concurrent=max_concurrent,
        close_timeout=close_timeout, spin=spin,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        try:
            yield channel
        finally:
            await channel.aclose()


# -- server ------------------------------------------------------------------------------


async def serve(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    secret: bytes,
    inline: InlineHandler | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    max_connections: int = 256,
    max_preauth: int = 64,
    max_preauth_per_source: int = 8,
    handshake_timeout: float = SERVER_HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = None,
    stall_timeout: float | None = 60.0,
    max_concurrent: int = 64,
    limits: Limits = DEFAULT_LIMITS,
    name: str | None = None,
    spin: float = 0.0,
) -> None:
    """Listen for dbnode connections and answer their requests with ``handler``.

    Binds ``host`` (loopback by default; None for every interface) and
    ``port`` (0: any free port), reports the bound ``(host, port)`` through
    ``task_status.started``, and serves until cancelled::

        host, port = await nursery.start(functools.partial(serve, handler, secret=key))

    Each connection is authenticated (:func:`server_handshake` within
    ``handshake_timeout``), then served by a :class:`Channel` with
    ``handler`` and ``inline`` (see there for how requests, errors and PING
    are answered, in the reader or in tasks, and ``max_concurrent``,
    ``idle_timeout`` and ``spin``). A frame that breaks the protocol costs
    its sender the connection (ERROR with the code first), never the server
    or the other connections; a peer whose first bytes are not the magic is
    answered BAD_MAGIC at once. A peer that stalls inside a frame for
    ``stall_timeout`` seconds gets TIMEOUT.

    Two caps, counted apart (docs/protocol.md section 16): at most
    ``max_connections`` authenticated connections (one more is answered
    ERROR UNAVAILABLE, on arrival or instead of AUTH_OK), and at most
    ``max_preauth`` connections still in their handshake, of which at most
    ``max_preauth_per_source`` idle ones (silent for a second, no HELLO)
    from one address (IPv6: one /64). Over those, the newcomer is let in
    and an older unauthenticated connection is closed instead (ERROR
    UNAVAILABLE, best effort): the oldest idle one of the same address, or
    the oldest silent one of the address with the most (see
    :class:`~dbnode.wire.admission.PreauthGate` for why). Failed handshakes
    and refused connections are logged at WARNING on ``dbnode.wire``, at
    most one line per address per 10 s with a count of the others.

    Args:
        handler: answers requests in tasks (see :class:`Channel`), or None.
        host: the address to bind; None: every interface.
        port: the port to bind; 0: any free one.
        secret: the shared secret.
        inline: answers requests in the reader (see :class:`Channel`), or None.
        task_status: receives the bound ``(host, port)``.
        max_connections: authenticated connections served at once.
        max_preauth: connections in their handshake at once.
        max_preauth_per_source: of those, idle ones from one address.
        handshake_timeout: seconds for each handshake (3 by default).
        idle_timeout: each Channel's.
        stall_timeout: each Connection's.
        max_concurrent: each Channel's.
        limits: each Connection's.
        name: our name, sent in each handshake.
        spin: each Channel's, in [0, 0.01] seconds.

    Raises:
        ConfigError: bad secret or arguments, or the address cannot be bound.
    """
    secret = check_secret(secret)
    for option, value in [("max_connections", max_connections), ("max_preauth", max_preauth),
                          ("max_preauth_per_source", max_preauth_per_source)]:  # fmt: skip
        if value < 1:
            raise ConfigError(option, value, "must be at least 1")
    if not handshake_timeout > 0:
        raise ConfigError("handshake_timeout", handshake_timeout, "must be more than 0 seconds")
    if not 0 <= spin <= 0.01:
        raise ConfigError("spin", spin, "must be in [0, 0.01] seconds")
    listeners, bound = await listen_tcp(host, port)
    gate = PreauthGate(max_preauth, max_preauth_per_source, grace=_IDLE_GRACE)
    report = _Warnings()
    shed: set[Connection] = set()
    authenticated = 0

    async def on_stream(stream: trio.SocketStream) -> None:
        nonlocal authenticated
        conn = Connection(stream, limits=limits, stall_timeout=stall_timeout)
        source = source_of(conn.peer)
        if authenticated >= max_connections:  # refused before it costs a handshake
            text = f"node is at its limit of {max_connections} connections"
            report.warn(source, "refusing %s: %s", conn.peer, text)
            await conn.close_with_error(ErrorCode.UNAVAILABLE, text)
            return
        # Over a pre-auth cap the newcomer stays and an older pending
        # connection goes (PreauthGate says which, and why not the newcomer).
        for victim in gate.admit(conn, source, trio.current_time()):
            _shed(victim, source_of(victim.peer))
        slot = False

        def admit() -> str | None:
            # Synchronous, right before AUTH_OK: the check and the count are
            # one step, so the cap holds however many handshakes end at once.
            nonlocal authenticated, slot
            gate.release(conn)
            if authenticated >= max_connections:
                return f"node is at its limit of {max_connections} connections"
            authenticated += 1
            slot = True
            return None

        try:
            try:
                await server_handshake(
                    conn, secret, name=name, timeout=handshake_timeout,
                    on_hello=lambda: gate.spoke(conn), admit=admit, shm=shm_enabled(),
                )  # fmt: skip
            except ConnectionClosedError as exc:
                if conn in shed and exc.code in (None, ErrorCode.UNAVAILABLE):
                    pass  # shed to make room: logged then
                elif exc.code is None:  # gone before or between frames: not an attack
                    log.debug("%s left during the handshake: %s", conn.peer, exc)
                else:
                    detail = str(exc).removeprefix(f"handshake with {conn.peer} failed: ")
                    report.warn(source, "handshake with %s failed: %s", conn.peer, detail)
                return
            finally:
                gate.release(conn)
            channel = Channel(
                conn, handler, inline=inline, max_concurrent=max_concurrent,
                idle_timeout=idle_timeout, spin=spin,
            )  # fmt: skip
            log.info("connection from %s (%s)", conn.peer, conn.peer_name or "unnamed")
            try:
                await channel.run()
            finally:
                log.info("connection from %s (%s) closed", conn.peer, conn.peer_name or "unnamed")
        except Exception:  # a bug here must not take the other connections down
            log.exception("connection from %s failed", conn.peer)
        finally:
            if slot:
                authenticated -= 1
            shed.discard(conn)
            await conn.aclose()

    def _shed(victim: Connection, victim_source: str) -> None:
        """Close a pending connection now to make room (its own task cleans up)."""
        text = (
            f"too many unauthenticated connections (at most {max_preauth}, "
            f"{max_preauth_per_source} idle per address)"
        )
        report.warn(victim_source, "closing %s, still in its handshake: %s", victim.peer, text)
        shed.add(victim)
        try:  # best effort, without waiting: an idle socket's buffer takes it whole
            victim.start_send(error_frame(ErrorCode.UNAVAILABLE, text))
        except ConnectionClosedError:
            pass
        victim.abort(f"shed: {text}", ErrorCode.UNAVAILABLE)

    task_status.started(bound)
    await trio.serve_listeners(on_stream, listeners)


class _Warnings:
    """WARNING lines on ``dbnode.wire``, at most one per source per 10 s."""

    def __init__(self) -> None:
        self._limiter = LogLimiter(interval=_LOG_INTERVAL)

    def warn(self, source: str, message: str, *args: object) -> None:
        suppressed = self._limiter.hit(source, trio.current_time())
        if suppressed is None:
            return
        if suppressed:
            message += " (and %d more from %s since the last line about it, not logged)"
            args += (suppressed, source)
        log.warning(message, *args)
