"""Admission of unauthenticated connections, sans-IO: who may wait for a handshake.

No sockets, no trio: :func:`~dbnode.wire.endpoints.serve` asks these
objects what to do and does it. :class:`PreauthGate` caps the connections
that have not finished the handshake (docs/protocol.md section 16,
"Connection cap"), in all and per source address, apart from the
authenticated ones; :class:`LogLimiter` keeps a flood of failed handshakes
to one log line per source per interval; :func:`source_of` says which
source a peer address counts against.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["LogLimiter", "PreauthGate", "source_of"]

# An IPv6 host usually has a whole /64 to pick addresses from: the prefix,
# not the address, is one source.
_IPV6_SOURCE_PREFIX = 64


def source_of(peer: str) -> str:
    """The source a peer counts against: its IP address (IPv6: its /64).

    Args:
        peer: ``host:port`` as :attr:`Connection.peer` gives it (IPv6 hosts
            unbracketed), or any other label (an in-memory stream's).

    Returns:
        The IPv4 address (also of an IPv4-mapped IPv6 address), the IPv6
        /64 network, or ``peer`` itself when it holds no address.
    """
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


@dataclass
class _Pending:
    source: str
    since: float  # when it was accepted
    spoke: bool = False  # it has sent a valid HELLO


class PreauthGate:
    """Caps the connections that are accepted but not yet authenticated.

    A pending connection is *idle* once it has been open ``grace`` seconds
    without sending a valid HELLO (a genuine client sends HELLO as soon as
    it is connected). At most ``max_per_source`` idle connections from one
    source (:func:`source_of`), and at most ``max_total`` pending ones in
    all, idle or not; authenticated connections are not counted here, so
    sockets that never authenticate cannot take their places.

    Over a cap the *newcomer is admitted and an older pending connection
    is shed* (:meth:`admit` says which), rather than the newcomer refused.
    Refusing the newest would let whoever opened sockets first lock a node:
    a few idle sockets from a driver's own address (a NAT, a shared host,
    loopback in every test) and that driver could never connect again, each
    idle socket replaced by another as its handshake timeout ends. Shedding
    an old one costs a genuine client nothing, since its handshake is over
    within a few round trips; and young connections and those that said
    HELLO go last, so a burst of genuine clients from one address (a local
    cluster's nodes all connecting at once) is not mistaken for a flood:

    - the newcomer's source holds ``max_per_source`` idle connections: its
      oldest idle ones go, until it holds one fewer;
    - ``max_total`` are pending: one goes from the source with the most
      pending (the flood, not a lone driver), its oldest that has not sent
      HELLO, or its oldest if all of them have.

    To keep a client out an attacker must open connections faster than the
    client's handshake runs, for as long as it wants the client out, rather
    than hold a few idle ones.

    Keys are any hashable objects (the endpoint uses its Connection);
    times are the caller's clock, in seconds.

    Args:
        max_total: pending connections at once, at least 1.
        max_per_source: idle pending connections from one source, at least 1.
        grace: seconds a connection may stay silent before it counts as idle.
    """

    def __init__(self, max_total: int = 64, max_per_source: int = 8, grace: float = 1.0) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError(f"caps must be at least 1: {max_total=}, {max_per_source=}")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.grace = grace
        self._entries: dict[Hashable, _Pending] = {}  # oldest first (dicts keep order)
        self._sources: dict[str, dict[Hashable, _Pending]] = {}  # the same, by source

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def count(self, source: str) -> int:
        """Pending connections from ``source``.

        Args:
            source: as :func:`source_of` gives it.

        Returns:
            How many are pending.
        """
        return len(self._sources.get(source, ()))

    def admit(self, key: Hashable, source: str, now: float) -> list[Hashable]:
        """Count a new connection as pending; the ones to shed to make room.

        Args:
            key: the new connection (must not be pending already).
            source: its source, as :func:`source_of` gives it.
            now: the current time, in seconds.

        Returns:
            The pending connections to shed; they are no longer counted
            here, the caller closes them.
        """
        if key in self._entries:
            raise ValueError(f"{key!r} is pending already")
        shed: list[Hashable] = []
        idle = [
            k for k, e in self._sources.get(source, {}).items()
            if not e.spoke and now - e.since >= self.grace
        ]  # fmt: skip
        while len(idle) >= self.max_per_source:
            shed.append(self._drop(idle.pop(0)))
        while len(self._entries) >= self.max_total:
            pending = max(
                self._sources.values(),
                # the most pending; of equals, the one pending the longest
                key=lambda p: (len(p), -next(iter(p.values())).since),
            )
            silent = (k for k, e in pending.items() if not e.spoke)
            shed.append(self._drop(next(silent, next(iter(pending)))))
        entry = _Pending(source, now)
        self._entries[key] = entry
        self._sources.setdefault(source, {})[key] = entry
        return shed

    def spoke(self, key: Hashable) -> None:
        """Note that ``key`` sent a valid HELLO: it is never idle, and shed last.

        Args:
            key: a pending connection; others are ignored.
        """
        entry = self._entries.get(key)
        if entry is not None:
            entry.spoke = True

    def release(self, key: Hashable) -> None:
        """Stop counting ``key``: authenticated, failed or closed. Idempotent.

        Args:
            key: a connection, pending or not.
        """
        if key in self._entries:
            self._drop(key)

    def _drop(self, key: Hashable) -> Hashable:
        entry = self._entries.pop(key)
        pending = self._sources[entry.source]
        del pending[key]
        if not pending:
            del self._sources[entry.source]
        return key


class LogLimiter:
    """At most one log line per source per ``interval``, and a count of the rest.

    Time is given by the caller (any monotonic clock in seconds). At most
    ``max_sources`` sources are remembered; past that, those quiet for an
    interval are forgotten first, then the least recently heard of.

    Args:
        interval: seconds between two lines about one source.
        max_sources: sources remembered at once.
    """

    def __init__(self, interval: float = 10.0, max_sources: int = 1024) -> None:
        self.interval = interval
        self.max_sources = max_sources
        # source -> [time of its last line, events not logged since]
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def hit(self, source: str, now: float) -> int | None:
        """An event from ``source``: None to suppress it, else log it.

        Args:
            source: who caused it.
            now: the current time, in seconds.

        Returns:
            None: do not log it (it is counted). Otherwise log it, saying
            how many events from ``source`` were not logged since its last
            line (the returned number, often 0).
        """
        state = self._seen.get(source)
        if state is not None:
            self._seen.move_to_end(source)
            if now - state[0] < self.interval:
                state[1] += 1
                return None
            suppressed = int(state[1])
            state[0], state[1] = now, 0
            return suppressed
        if len(self._seen) >= self.max_sources:
            for old in [s for s, (t, _) in self._seen.items() if now - t >= self.interval]:
                del self._seen[old]
            while len(self._seen) >= self.max_sources:
                self._seen.popitem(last=False)
        self._seen[source] = [now, 0]
        return 0
