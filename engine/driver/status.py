"""``dbnode status``: what each node says about itself."""

from __future__ import annotations

from typing import Any

import trio

from .. import control
from ..config import format_address
from ..errors import DBNodeError
from ..wire import Address, Peers

__all__ = ["dumps", "status"]


def status(hosts: list[Address], secret: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """What each node says about itself: identity, and the runs it holds.

    Read-only: asking changes nothing on the nodes (no lease is renewed, no
    figure reset), so a monitor may ask at any rate.

    Args:
        hosts: the nodes to ask.
        secret: the cluster's shared secret.
        timeout: seconds each node has to answer both questions.

    Returns:
        One JSON-able entry per host, in order: ``address``, ``node`` (the
        ``info`` answer) and ``runs`` (by run id: name, lease left, epoch,
        partitions by uid, the run's shard size and pushes); a node that
        cannot be reached gets an ``error`` entry instead of the last two.
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
                    runs = (await control.call(ch, control.Status())).runs
                    entry["runs"] = {run_id: r.to_meta() for run_id, r in runs.items()}
            # DBNodeError: the transport failed, or the node refused or garbled an answer.
            except (OSError, DBNodeError, trio.TooSlowError) as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
            out.append(entry)
        await peers.aclose()
        nursery.cancel_scope.cancel()
    return out


def dumps(hosts: list[Address], secret: bytes, timeout: float = 10.0) -> list[str]:
    """Each node's task tree and thread stacks (:mod:`dbnode.dump`).

    Args:
        hosts: the nodes to ask.
        secret: the cluster's shared secret.
        timeout: seconds each node has to answer.

    Returns:
        One text per host, in order; ``"error: ..."`` for a node that could
        not be reached.
    """
    return trio.run(_dumps, hosts, secret, timeout)


async def _dumps(hosts: list[Address], secret: bytes, timeout: float) -> list[str]:
    out = []
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, secret, name="status", connect_timeout=timeout)
        for host in hosts:
            try:
                with trio.fail_after(timeout):
                    ch = await peers.get(host)
                    out.append((await control.call(ch, control.Dump())).text)
            except (OSError, DBNodeError, trio.TooSlowError) as exc:
                out.append(f"error: {type(exc).__name__}: {exc}")
        await peers.aclose()
        nursery.cancel_scope.cancel()
    return out
