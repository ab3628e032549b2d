"""Nodes that join and leave a running run: ``cluster.hosts_file``.

The driver reads the file again whenever it changes (it looks at every
poll). A node that appears is opened into the run and gets a *helper*
replica (up to ``train.max_replicas`` replicas in all): a replica with no
data shard of its own, which at once takes backups of the slowest
replicas' portions (:mod:`dbnode.driver.leases`), so the run goes faster
without anything starting again. A node that disappears is drained: its
parameter shards move to the other nodes with nothing lost (its copy is
fenced off first, so a push refused there is sent again to the new one),
the replicas with partitions on it go on elsewhere from the first step the
shards have not applied, its backups give their steps back, and the run is
closed on it. Joins and leaves are summary events.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import control
from ..config import format_address, parse_address
from ..errors import ConfigError, DBNodeError
from ..wire import Address
from .inputs import Inputs
from .planning import distinct_nodes
from .state import Replica, RunState
from .stragglers import backup_failed

__all__ = ["HostsFile", "follow", "join", "leave", "read_hosts"]

log = logging.getLogger("dbnode.driver")


def read_hosts(path: str | os.PathLike) -> list[Address]:
    """The nodes a hosts file lists: one ``host:port`` per line; blank
    lines and ``#`` comments are skipped.

    Raises:
        ConfigError: a line is not an address (the line says which).
        OSError: the file cannot be read.
    """
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            hosts.append(parse_address(text, key=f"cluster.hosts_file line {number}"))
    return list(dict.fromkeys(hosts))


class HostsFile:
    """``cluster.hosts_file``, read again when it changes.

    Args:
        path: the file.
        nodes: the run's nodes now; those the file does not list (given
            as ``cluster.hosts`` or ``--hosts``) are never drained.
    """

    def __init__(self, path: str | os.PathLike, nodes: list[Address] = ()) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._complained = False
        try:
            listed = read_hosts(self.path)
        except (OSError, ConfigError):
            listed = []
        self.fixed = [h for h in nodes if h not in listed]

    def changed(self) -> list[Address] | None:
        """The hosts it lists now, if it changed since the last look (None:
        unchanged, or unreadable: the run goes on with the nodes it has,
        and says so once)."""
        try:
            stat = self.path.stat()
            mark = (stat.st_mtime_ns, stat.st_size)
            if mark == self._seen:
                return None
            hosts = read_hosts(self.path)
        except (OSError, ConfigError) as exc:
            if not self._complained:
                log.warning("cluster.hosts_file %s not read (%s); the nodes stay", self.path, exc)
                self._complained = True
            return None
        self._seen, self._complained = mark, False
        return hosts


async def follow(run: RunState, hosts_file: HostsFile, inputs: Inputs) -> None:
    """Join the nodes the hosts file added and drain those it dropped."""
    listed = hosts_file.changed()
    if listed is None or not listed:  # an empty file is a mistake, not "drain all"
        return
    for host in listed:
        if host not in run.hosts and host not in run.dead:
            await join(run, host)
    for host in list(run.hosts):
        if host not in listed and host not in hosts_file.fixed:
            await leave(run, host, inputs)


async def join(run: RunState, host: Address) -> None:
    """Open the run on a new node and give it a helper replica."""
    name = format_address(host)
    try:
        distinct = await distinct_nodes(run.peers, [*run.health.live, host])
        if host not in distinct:
            run.event("host not joined", node=name, why="the same node as one in the run")
            return
        await run.control(host, run.open_request(), timeout=run.op_timeout)
    except DBNodeError as exc:
        run.event("host not joined", node=name, why=str(exc)[:200])
        log.warning("node %s not joined: %s", name, exc)
        return
    run.hosts.append(host)  # the failure detector's list too: it is heartbeaten now
    cap = run.config.train.max_replicas
    helpers = 0
    if not cap or len(run.replicas) + len(run.live_helpers) < cap:
        index = len(run.replicas) + len(run.helpers)
        helper = Replica(index, slice(0, 0), [host] * run.partitions, [], done=True)
        run.helpers.append(helper)
        helpers = 1
    log.info("node %s joined the run (%d helper replica)", name, helpers)
    run.event("host joined", node=name, replicas=helpers)


async def leave(run: RunState, host: Address, inputs: Inputs) -> None:
    """Drain a node the hosts file no longer lists."""
    name = format_address(host)
    others = [h for h in run.health.live if h != host]
    if not others:
        run.warn(f"node {name} left the hosts file but is the run's last node: it stays")
        return
    run.hosts.remove(host)
    moved = await _move_shards(run, host) if host not in run.dead else []
    for helper in run.helpers:
        if host in helper.hosts:
            helper.diverged = f"node {name} left"  # over: never leased again
    for backup in run.running_backups:
        if host in backup.hosts:
            await backup_failed(run, backup, f"node {name} left")
    for replica in run.replicas:
        if not (replica.over or replica.parked) and host in replica.hosts:
            await run.restart(replica, inputs, f"node {name} left", node_failure=True)
    try:
        await run.control(host, control.Close(run=run.id), timeout=run.op_timeout)
    except DBNodeError:
        pass  # gone already: its lease frees the run there
    log.info("node %s left the run", name)
    run.event("host left", node=name, shards=moved)


async def _move_shards(run: RunState, host: Address) -> list[int]:
    """Move the plan shards on ``host`` to the least loaded other nodes,
    losing nothing: the node's shard map epoch moves on alone first, so it
    refuses every later push (the pushers send it again after the remap)."""
    moving = [i for i, h in enumerate(run.shard_hosts) if h == host and run.plan.on_shard(i)]
    if not moving:
        return []
    fence = control.Remap(run=run.id, epoch=run.epoch + 1, shards=tuple(run.shard_hosts))
    try:
        await run.control(host, fence, timeout=run.op_timeout)
        run.epoch += 1  # the map that follows is one past the fence
        for i in moving:
            data = np.frombuffer(await run.export(i), np.uint8)
            live = run.health.live
            target = min(live, key=lambda h: (run.shard_hosts.count(h), live.index(h)))
            await run.control(target, control.Import(run=run.id, data=data))
            run.shard_hosts[i] = target
    except DBNodeError as exc:  # it died meanwhile: its shards are restored as a dead node's
        run.health.declare_dead(host, exc)
        return []
    await run.advance_epoch()
    return moving
