"""Endpoints: connecting to a node (:func:`connect`, :func:`open_connection`)
and serving connections (:func:`serve`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import ConfigError, ConnectionClosedError
from .channel import Channel
from .connection import Connection
from .frames import DEFAULT_LIMITS, ErrorCode, Limits
from .handshake import client_handshake, server_handshake
from .reply import Handler, InlineHandler
from .secret import check_secret
from .sockio import connect_tcp, listen_tcp

__all__ = ["connect", "open_connection", "serve"]

log = logging.getLogger("dbnode.wire")


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
    await client_handshake(conn, secret, name=name, timeout=handshake_timeout)
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
    handshake_timeout: float = 10.0,
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
    ``idle_timeout`` and ``spin``). A connection over
    ``max_connections`` gets an ERROR UNAVAILABLE and is closed. A frame
    that breaks the protocol costs its sender the connection (ERROR with the
    code first), never the server or the other connections. A peer that
    stalls inside a frame for ``stall_timeout`` seconds gets TIMEOUT.

    Args:
        handler: answers requests in tasks (see :class:`Channel`), or None.
        host: the address to bind; None: every interface.
        port: the port to bind; 0: any free one.
        secret: the shared secret.
        inline: answers requests in the reader (see :class:`Channel`), or None.
        task_status: receives the bound ``(host, port)``.
        max_connections: connections served at once.
        handshake_timeout: seconds for each handshake.
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
    if max_connections < 1:
        raise ConfigError("max_connections", max_connections, "must be at least 1")
    if not 0 <= spin <= 0.01:
        raise ConfigError("spin", spin, "must be in [0, 0.01] seconds")
    listeners, bound = await listen_tcp(host, port)
    active = 0

    async def on_stream(stream: trio.SocketStream) -> None:
        nonlocal active
        conn = Connection(stream, limits=limits, stall_timeout=stall_timeout)
        if active >= max_connections:
            log.warning("refusing %s: at the limit of %d connections", conn.peer, max_connections)
            await conn.close_with_error(
                ErrorCode.UNAVAILABLE, f"node is at its limit of {max_connections} connections"
            )
            return
        active += 1
        try:
            await _serve_connection(conn)
        except Exception:  # a bug here must not take the other connections down
            log.exception("connection from %s failed", conn.peer)
        finally:
            active -= 1
            await conn.aclose()

    async def _serve_connection(conn: Connection) -> None:
        try:
            await server_handshake(conn, secret, name=name, timeout=handshake_timeout)
        except ConnectionClosedError as exc:
            log.info("handshake with %s failed: %s", conn.peer, exc)
            return
        channel = Channel(
            conn, handler, inline=inline, max_concurrent=max_concurrent,
            idle_timeout=idle_timeout, spin=spin,
        )  # fmt: skip
        await channel.run()

    task_status.started(bound)
    await trio.serve_listeners(on_stream, listeners)
