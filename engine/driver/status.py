"""``dbnode status``: what each node says about itself."""

from __future__ import annotations

from typing import Any

import trio

from ..config import format_address
from ..errors import TransportError
from ..wire import Address, MessageKind, Peers

__all__ = ["status"]


def status(hosts: list[Address], secret: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """What each node says about itself: identity, partitions, shard totals.
    A node that cannot be reached gets an ``error`` entry instead."""
    return trio.run(_status, hosts, secret, timeout)


async def _status(hosts: list[Address], secret: bytes, timeout: float) -> list[dict[str, Any]]:
    out = []
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, secret, name="status", connect_timeout=timeout)
        for host in hosts:
            entry: dict[str, Any] = {"address": format_address(host)}
            try:
                with trio.fail_after(timeout):
                    ch = await peers.get(host)
                    entry["node"] = (await ch.request(MessageKind.CONTROL, meta={"op": "info"})).meta
                    entry["partitions"] = (await ch.request(MessageKind.CONTROL,
                                                            meta={"op": "status"})).meta["partitions"]
                    entry["shard"] = (await ch.request(MessageKind.STATS)).meta.get("totals", {})
            except (OSError, TransportError, trio.TooSlowError) as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
            out.append(entry)
        await peers.aclose()
        nursery.cancel_scope.cancel()
    return out
