"""``dbnode status``: what each node says about itself."""

from __future__ import annotations

from typing import Any

import trio

from .. import control
from ..config import format_address
from ..errors import DBNodeError
from ..wire import Address, MessageKind, Peers

__all__ = ["status"]


def status(hosts: list[Address], secret: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """What each node says about itself: identity, partitions, shard totals.

    Args:
        hosts: the nodes to ask.
        secret: the cluster's shared secret.
        timeout: seconds each node has to answer all three questions.

    Returns:
        One JSON-able entry per host, in order: ``address``, ``node`` (the
        ``info`` answer), ``partitions`` (the ``status`` answer, by uid) and
        ``shard`` (the STATS totals); a node that cannot be reached gets an
        ``error`` entry instead of the last three.
    """
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
                    entry["node"] = (await control.call(ch, control.Info())).to_meta()
                    partitions = (await control.call(ch, control.Status())).partitions
                    entry["partitions"] = {uid: r.to_meta() for uid, r in partitions.items()}
                    entry["shard"] = (await ch.request(MessageKind.STATS)).meta.get("totals", {})
            # DBNodeError: the transport failed, or the node refused or garbled an answer.
            except (OSError, DBNodeError, trio.TooSlowError) as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
            out.append(entry)
        await peers.aclose()
        nursery.cancel_scope.cancel()
    return out
