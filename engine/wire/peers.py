"""A pool of channels: one authenticated :class:`~dbnode.wire.channel.Channel`
per remote node, opened on first use, shared by every task of the process."""

from __future__ import annotations

import trio

from .channel import Channel
from .endpoints import open_connection

__all__ = ["Address", "Peers"]

Address = tuple[str, int]


class Peers:
    """One channel per remote address, opened on first use and kept.

    The channels' reader tasks run in ``nursery``, which the owner of this
    object owns; a channel whose connection ended is replaced on the next
    :meth:`get`.

    Args:
        nursery: runs the channels' reader tasks.
        secret: the shared secret.
        name: our name, sent in each handshake.
        handler: answers requests the peers send on these channels, as in
            :class:`Channel`; None: they get BAD_REQUEST.
        connect_timeout: seconds for each handshake.
        spin: each Channel's ``spin``.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        secret: bytes,
        name: str = "",
        handler=None,
        connect_timeout: float = 10.0,
        spin: float = 0.0,
    ):
        self._spin = spin
        self._nursery = nursery
        self._secret = secret
        self._name = name
        self._handler = handler
        self._timeout = connect_timeout
        self._channels: dict[Address, Channel] = {}
        self._locks: dict[Address, trio.Lock] = {}

    async def get(self, address: Address) -> Channel:
        """The open channel to ``address``, connecting if needed.

        Args:
            address: ``(host, port)``.

        Returns:
            The channel, running in the pool's nursery.

        Raises:
            AuthenticationError, ConnectionClosedError: connecting failed
                (see :func:`open_connection`).
            ConfigError: the secret is too short.
        """
        address = (address[0], int(address[1]))
        ch = self._channels.get(address)
        if ch is not None and not ch.closed:
            return ch
        lock = self._locks.setdefault(address, trio.Lock())
        async with lock:
            ch = self._channels.get(address)
            if ch is None or ch.closed:
                conn = await open_connection(
                    address[0],
                    address[1],
                    self._secret,
                    name=self._name,
                    handshake_timeout=self._timeout,
                )
                ch = Channel(conn, self._handler, spin=self._spin)
                await self._nursery.start(ch.run)
                self._channels[address] = ch
            return ch

    async def aclose(self) -> None:
        """Close every channel gracefully."""
        channels, self._channels = list(self._channels.values()), {}
        async with trio.open_nursery() as nursery:
            for ch in channels:
                nursery.start_soon(ch.aclose)
