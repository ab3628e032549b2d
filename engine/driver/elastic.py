"""Nodes that join and leave a running run: ``cluster.hosts_file``.

The driver reads the file again whenever it changes (it looks at every
poll). A node that appears is opened into the run and gets a *helper*
replica (up to ``train.max_replicas`` replicas in all): a replica with no
data shard of its own, which at once takes backups of the slowest
replicas' portions (:mod:`dbnode.driver.leases`), so the run goes faster
without anything starting again. A node that disappears is drained: its
parameter shards move to the other nodes with nothing lost (its copy is
fenced off first, so a push refused there is sent again to the new one),
the replicas with partitions on it train to the end of their current
portion while backups elsewhere take the rest, its own backups give their
steps back, and the run is closed on it once nothing runs there. Joins and
leaves are summary events.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import trio

from .. import control
from ..config import format_address, parse_address
from ..errors import DBNodeError, NodeUnreachable
from ..wire import Address
from .inputs import Inputs
from .leases import backup_range
from .planning import distinct_nodes
from .state import Replica, RunState
from .stragglers import backup_failed

__all__ = ["HostsFile", "drained", "follow", "join", "leave", "read_hosts"]

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
        fixed: nodes the run was given otherwise (``cluster.hosts``,
            ``--hosts``): never drained, whatever the file says.
    """

    def __init__(self, path: str | os.PathLike, fixed: list[Address] = ()) -> None:
        self.path = Path(path)
        self.fixed = list(fixed)
        self.listed: list[Address] = []  # as last read
        self.unjoined: set[Address] = set()  # listed, tried, not joined (yet)
        self.retry_at = 0.0  # when those are tried again (time.monotonic)
        self.backoff = JOIN_RETRY[0]  # seconds to the retry after that
        self._seen: tuple[int, int] | None = None
        self._complained = False

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
        except (OSError, ValueError) as exc:  # ConfigError, or not text
            if not self._complained:
                log.warning("cluster.hosts_file %s not read (%s); the nodes stay", self.path, exc)
                self._complained = True
            return None
        self._seen, self._complained = mark, False
        self.listed = hosts
        return hosts


# Seconds before the first retry to join a listed node that did not answer
# (it may be starting; each retry waits twice as long, up to the last), and
# how long a retry waits for its answer.
JOIN_RETRY = (1.0, 30.0)
RETRY_WAIT = 0.5


async def follow(run: RunState, hosts_file: HostsFile, inputs: Inputs) -> None:
    """Join the nodes the hosts file added and drain those it dropped; try
    again, now and then, the listed nodes that could not join."""
    await drained(run, inputs)
    listed = hosts_file.changed()
    now = time.monotonic()
    if listed is not None:
        hosts_file.backoff = JOIN_RETRY[0]
    elif not (hosts_file.unjoined and now >= hosts_file.retry_at):
        return
    listed = hosts_file.listed
    if not listed:  # an empty file is a mistake, not "drain all"
        return
    for host in listed:
        if host not in run.hosts and host not in run.dead:
            quiet = host in hosts_file.unjoined  # said once already
            if await join(run, host, quiet):
                hosts_file.unjoined.discard(host)
            else:
                hosts_file.unjoined.add(host)
    hosts_file.unjoined &= set(listed)
    hosts_file.retry_at = now + hosts_file.backoff
    hosts_file.backoff = min(2 * hosts_file.backoff, JOIN_RETRY[1])
    dropped = [h for h in run.hosts
               if h not in listed and h not in hosts_file.fixed and h not in run.draining]  # fmt: skip
    run.draining.update(dropped)  # first: nothing of one goes to another
    for host in dropped:
        await leave(run, host, inputs)


async def join(run: RunState, host: Address, quiet: bool = False) -> bool:
    """Open the run on a new node and give it a helper replica.

    Returns:
        Whether it joined (else an event says why, unless ``quiet``).
    """
    name = format_address(host)
    # A retry waits briefly: the watch loop waits with it, every JOIN_RETRY.
    wait = RETRY_WAIT if quiet else run.op_timeout
    why = f"no answer within {wait:g} s"
    with trio.move_on_after(wait):  # an unroutable host must not stall the run
        try:
            (info,) = (await distinct_nodes(run.peers, [host])).values()
            if info.node_id in run.node_ids.values():
                why = "the same node as one in the run"
            else:
                await run.control(host, run.open_request(), timeout=run.op_timeout)
                why = ""
        except DBNodeError as exc:
            why = str(exc)[:200]
    if why:
        if not quiet:
            run.event("host not joined", node=name, why=why)
            log.warning("node %s not joined (it will be tried again): %s", name, why)
        return False
    run.node_ids[host] = info.node_id
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
    return True


async def leave(run: RunState, host: Address, inputs: Inputs) -> None:
    """Start draining a node the hosts file no longer lists (already in
    ``run.draining``): its shards move at once; each replica with a
    partition there trains on to the end of its current portion, and a
    backup on other nodes takes the rest (:func:`drained` sees it through
    and closes the node once nothing runs there)."""
    name = format_address(host)
    if not run.placeable:
        run.draining.discard(host)
        run.warn(f"node {name} left the hosts file but is the run's last node: it stays")
        return
    if host in run.dead:  # its replicas restart on failure as ever
        run.event("host draining", node=name, shards=[])
        return
    moved = await _move_shards(run, host)
    if moved is None:
        run.draining.discard(host)
        run.warn(f"node {name} left the hosts file but its shards could not move: it stays")
        return
    for helper in run.helpers:
        if host in helper.hosts:
            helper.diverged = f"node {name} left"  # over: never leased again
    log.info("node %s is leaving the run", name)
    run.event("host draining", node=name, shards=moved)
    await _drain(run, host, inputs)


async def _drain(run: RunState, host: Address, inputs: Inputs) -> None:
    """Hand over what still trains on a leaving node and is not handed over
    yet (again, if a backup that took over failed); its backups give their
    steps back."""
    reason = f"node {format_address(host)} left"
    for backup in run.running_backups:
        if host in backup.hosts:
            await backup_failed(run, backup, reason)
    for replica in run.replicas:  # a no-op for those already cut at their portion's end
        if not (replica.over or replica.parked) and host in replica.hosts:
            await _hand_over(run, replica, inputs, reason)


async def _hand_over(run: RunState, replica: Replica, inputs: Inputs, reason: str) -> None:
    """Let ``replica`` train to the end of its current portion, and a backup
    on other nodes the rest of its share (it is then parked); with less
    than a portion left it simply finishes. A held one moves at once."""
    if replica.held:
        try:
            await run.restart(replica, inputs, reason, node_failure=True)
        except DBNodeError as exc:  # tried again at the next poll
            log.info("replica %d not moved yet: %s", replica.index, exc)
        return
    end = replica.share_end or run.steps_of(replica)
    cut = backup_range(replica.progress, end, run.portion, keep=0.0)
    if cut is None:
        return
    backup = Replica(replica.index, replica.rows, run.least_loaded(replica, reason), [],
                     start_step=cut[0], end_step=cut[1])  # fmt: skip
    try:
        await run.launch(backup, inputs, run=True)
    except DBNodeError as exc:  # no taker now: it trains on there, and is tried again
        log.info("replica %d not handed over yet: %s", replica.index, exc)
        await run.stop_partitions(backup)
        return
    replica.share_end = cut[0]
    replica.backups.append(backup)
    run.event("replica handed over", replica=replica.index, at_step=cut[0],
              on=[format_address(h) for h in backup.hosts])  # fmt: skip


async def drained(run: RunState, inputs: Inputs) -> None:
    """See the drains through: hand over again what a failed backup gave
    back, and close the run on the leaving nodes where nothing of it runs
    and no parameter shard is left."""
    for host in list(run.draining):
        if host not in run.dead:
            await _drain(run, host, inputs)
        running = [r for r in run.replicas if not (r.over or r.parked)] + run.running_backups
        busy = any(host in r.hosts for r in running) and host not in run.dead
        if busy or host in run.shard_hosts:  # a dead one's shards are restored first
            continue
        run.draining.discard(host)
        run.hosts.remove(host)
        run.node_ids.pop(host, None)  # it may join again, listed again
        if host not in run.dead:
            try:
                await run.control(host, control.Close(run=run.id), timeout=run.op_timeout)
            except DBNodeError:
                pass  # gone already: its lease frees the run there
        log.info("node %s left the run", format_address(host))
        run.event("host left", node=format_address(host))


async def _move_shards(run: RunState, host: Address) -> list[int] | None:
    """Move the plan shards on ``host`` (draining) to the least loaded
    other nodes, losing nothing: the node's shard map epoch moves on alone
    first, so it refuses every later push (the pushers send it again after
    the remap, which the node gets too: its partitions train on).

    Returns:
        The plan shards moved; None when one could not be (no other node
        took it): the node keeps what is left.
    """
    mine = [i for i, h in enumerate(run.shard_hosts) if h == host]
    if not mine:
        return []
    moving = [i for i in mine if run.plan.on_shard(i)]
    # The fence's map already points the moving shards elsewhere: the node's
    # own partitions (which get the fence's epoch too) must not push to its
    # copy either once it is exported. Empty plan shards move with the map
    # alone (nothing to export), or the node would never be done.
    planned = list(run.shard_hosts)
    for i in mine:
        live = run.placeable
        planned[i] = min(live, key=lambda h: (planned.count(h), live.index(h)))
    fence = control.Remap(run=run.id, epoch=run.epoch + 1, shards=tuple(planned))
    try:
        await run.control(host, fence, timeout=run.op_timeout)
    except NodeUnreachable as exc:  # gone: its shards are restored as a dead node's
        run.health.declare_dead(host, exc)
        return []
    except DBNodeError as exc:  # refused: it keeps them
        log.warning("node %s refused the fence: %s", format_address(host), exc)
        return None
    run.epoch += 1  # the map that follows is one past the fence
    for i in mine:
        if i not in moving:
            run.shard_hosts[i] = planned[i]
    moved: list[int] | None = []
    for i in moving:
        try:
            data = np.frombuffer(await run.export(i), np.uint8)
        except NodeUnreachable as exc:
            run.health.declare_dead(host, exc)  # the rest are restored as a dead node's
            break
        except DBNodeError as exc:  # refused: it keeps what is left
            log.warning("node %s did not export shard %d: %s", format_address(host), i, exc)
            moved = None
            break
        target = await _import(run, data, planned[i])
        if target is None:  # it keeps what is left
            moved = None
            break
        run.shard_hosts[i] = target
        moved.append(i)
    await run.advance_epoch()
    return moved


async def _import(run: RunState, data: np.ndarray, first: Address) -> Address | None:
    """Import a plan shard's snapshot into ``first``, or else the least
    loaded live node that takes it (None: none did)."""
    refused: set[Address] = set()
    target = first
    while True:
        live = [h for h in run.placeable if h not in refused]
        if not live:
            return None
        if target not in live:
            target = min(live, key=lambda h: (run.shard_hosts.count(h), live.index(h)))
        try:
            await run.control(target, control.Import(run=run.id, data=data))
            return target
        except NodeUnreachable as exc:
            run.health.declare_dead(target, exc)
        except DBNodeError as exc:  # e.g. over its memory budget
            log.warning("node %s did not take a shard: %s", format_address(target), exc)
            refused.add(target)
