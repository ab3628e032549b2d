"""One run as the driver sees it, and what the driver asks of its nodes.

:class:`RunState` holds the run's placement (which node hosts each plan
shard and each replica's partitions), its shard map epoch, what the last
heartbeats said, and its incidents; its methods are the driver's moves:
launch and restart replicas, back up and checkpoint shards, restore lost
ones under a new epoch, poll. :mod:`dbnode.driver.run` drives them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import control, kernels
from ..blocks import block_views, blocks, pack_block
from ..config import RunConfig, format_address
from ..data import examples_after, steps_per_run
from ..errors import DBNodeError, NodeRefused, NodeUnreachable, RemoteError, TransportError
from ..pipeline import depth_of
from ..ps.client import ParameterClient
from ..traffic import NodeShape
from ..wire import Address, Peers
from . import checkpoint
from .health import FailureDetector
from .inputs import Inputs, identity_hash, run_identity
from .leases import first_unapplied, portion_steps
from .outputs import MetricsLog, metric_columns
from .planning import layout
from .recovery import ShardBackups, Source, lost_updates
from .stopping import EarlyStopper, Plateau

__all__ = ["MAX_RESTARTS", "Replica", "RunState"]

log = logging.getLogger("dbnode.driver")

# A replica whose partitions fail this many times fails the run.
MAX_RESTARTS = 3


@dataclass
class Replica:
    """One replica as the driver tracks it, across restarts."""

    index: int
    rows: slice  # its data shard: rows of the training set
    hosts: list[Address]  # the node of each partition
    uids: list[int]  # each partition's id in the run
    incarnation: int = 0
    start_step: int = 0  # where the current incarnation began
    base_examples: int = 0  # examples trained by earlier incarnations
    last: control.PartitionReport | None = None  # the last report of its last partition
    seen_loss: tuple[float, int] = (0.0, 0)  # its loss sum and count already counted
    done: bool = False
    diverged: str | None = None
    failures: int = 0  # restarts it caused itself (not a node's death)
    acked_before: int = 0  # piece updates acknowledged to earlier incarnations
    acked: dict[int, int] = field(default_factory=dict)  # partition -> to this incarnation
    # "source -> destination" -> payload bytes: of earlier incarnations, and
    # of this one's partitions as last reported.
    links_before: dict[str, int] = field(default_factory=dict)
    links_now: dict[int, dict[str, int]] = field(default_factory=dict)
    reports: dict[int, control.PartitionReport] = field(default_factory=dict)  # latest, by index
    held: bool = False  # created, waiting for the warmstart to end before it runs
    offset: float = 0.0  # seconds into training when it was set running
    # Leases (dbnode.driver.leases): where its job stops (0: its schedule's
    # end), where its own share ends now that backups took the rest, the
    # backups of its schedule, and the backup it runs for another.
    end_step: int = 0
    share_end: int | None = None
    backups: list[Replica] = field(default_factory=list)
    helping: Replica | None = None
    launched: float = 0.0  # when its current job was launched (time.monotonic)
    parked: bool = False  # its share applied, its partitions stopped, backups on the rest

    @property
    def links(self) -> dict[str, int]:
        """Payload bytes this replica's partitions moved between processes,
        by ``"source -> destination"``."""
        out = dict(self.links_before)
        for partition in self.links_now.values():
            for link, nbytes in partition.items():
                out[link] = out.get(link, 0) + nbytes
        return out

    @property
    def acknowledged(self) -> int:
        """Piece updates the shards acknowledged to this replica, as far as seen."""
        return self.acked_before + sum(self.acked.values())

    def saw(self, reports: list[control.PartitionReport | None]) -> None:
        """Take in its partitions' latest reports (None: not heard)."""
        for i, report in enumerate(reports):
            if report is not None:
                self.reports[i] = report
                self.acked[i] = max(self.acked.get(i, 0), report.pushes)
                me = format_address(self.hosts[i])
                links = {f"{me} -> {peer}": n for peer, n in report.sent.items()}
                for peer, n in report.received.items():
                    links[f"{peer} -> {me}"] = links.get(f"{peer} -> {me}", 0) + n
                self.links_now[i] = links

    @property
    def n_examples(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def examples(self) -> int:
        return self.base_examples + (self.last.examples if self.last else 0)

    def speed(self, now: float) -> float:
        """Steps per second its current job has shown (0: none yet)."""
        last = self.last
        if last is not None and last.done and last.seconds > 0:
            return (last.step - self.start_step) / last.seconds
        return (self.progress - self.start_step) / max(1e-3, now - self.launched)

    @property
    def progress(self) -> int:
        """The step all its partitions have passed, as last reported."""
        steps = [r.step for r in self.reports.values()]
        return min(steps) if steps and len(steps) == len(self.uids) else self.start_step

    @property
    def over(self) -> bool:
        """Finished, or stopped for good (diverged)."""
        return self.done or self.diverged is not None


class RunState:
    """The state of one run as the driver sees it (see the module's docstring)."""

    def __init__(
        self,
        config: RunConfig,
        hosts: list[Address],
        peers: Peers,
        inputs: Inputs,
        run_id: str,
        name: str,
        nodes: list[NodeShape] | None = None,
        history: MetricsLog | None = None,
        stopper: EarlyStopper | None = None,
        plateau: Plateau | None = None,
    ):
        self.config, self.hosts, self.peers = config, hosts, peers
        self.started = time.monotonic()
        self.id, self.name = run_id, name
        self.spec = config.spec()
        n_replicas = len(inputs.shards)
        self.partitions = config.model.partitions
        nodes = nodes or [NodeShape(name=format_address(h)) for h in hosts]
        cut = layout(config, n_replicas, list(nodes))
        self.bounds, self.plan, self.layout = cut.bounds, cut.shards, cut.plan
        self.min_split_bytes = cut.min_split_bytes
        placement = self.layout.placement
        self.epoch = 0
        self.shard_hosts = [hosts[h] for h in placement.shards]
        self.client = ParameterClient(self.plan, self.shard_hosts, peers, run=run_id)
        t = config.train
        longest = max(s.stop - s.start for s in inputs.shards)
        self.helpers: list[Replica] = []  # of nodes that joined (dbnode.driver.elastic)
        self.node_ids: dict[Address, str] = {}  # each node's own id (one node, one place)
        self.fixed_hosts: list[Address] = []  # given, not from cluster.hosts_file
        self.draining: set[Address] = set()  # leaving: nothing new is placed there
        self.portion = portion_steps(t.portion_steps, -(-longest // t.batch_size), t.n_push)
        self._uids = iter(range(1, 2**32))
        self.replicas = [
            Replica(r, rows, [hosts[h] for h in placement.partitions[r]], [])
            for r, rows in enumerate(inputs.shards)
        ]
        self.health = FailureDetector(hosts, 3 * config.cluster.heartbeat, self.event)
        self.fenced: set[Address] = set()  # the dead nodes :meth:`fence` has dealt with
        self.backups = ShardBackups(config.cluster.backup_interval)
        self.checkpoint_dir: Path | None = None
        self.lineage = {run_id}  # the runs whose checkpoints are this run's
        self.last_checkpoint: checkpoint.Checkpoint | None = None
        self.versions: dict[int, int] = {}  # piece key -> last version seen
        self.counters: dict[Address, tuple[int, int]] = {}  # host -> (fenced, not finite)
        # host -> its shard's staleness counts (kept when it dies: they happened)
        self.staleness: dict[Address, control.StalenessReport] = {}
        self.lost_updates = 0
        self.initial_versions = 0  # the shards' versions at the start (a resumed run's)
        self.start_examples = 0  # examples trained before this run (a resumed run's)
        self.restarts: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # what happened to nodes and replicas, when
        self.warnings: list[str] = []
        # The learning curve: one row per evaluation (metrics.csv).
        self.history = history or MetricsLog(None, metric_columns(inputs.task))
        # train.early_stopping: the best model so far and when to end.
        self.stopper = stopper or EarlyStopper(
            config.train.early_stopping, self.history.columns, inputs.x_test is not None
        )
        self.plateau = plateau  # schedule.name = "plateau": the shards' learning-rate scale
        # Ops a live node answers at once: waiting longer for one stalls the run.
        self.op_timeout = max(5.0, 3 * config.cluster.heartbeat)
        self.last_loss: float | None = None  # the mean training loss of the last window

    @property
    def dead(self) -> set[Address]:
        return self.health.dead

    @property
    def placeable(self) -> list[Address]:
        """The live nodes new partitions and shards may go to (not draining)."""
        return [h for h in self.health.live if h not in self.draining]

    def event(self, what: str, **details) -> None:
        # Wall time to line up with other logs, run time to read the run by.
        self.events.append({"time": round(time.time(), 3),
                            "seconds": round(time.monotonic() - self.started, 3),
                            "event": what, **details})  # fmt: skip

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    async def control(
        self, host: Address, request: control.Request, *, timeout: float = 60.0
    ) -> Any:
        """Send a control request to a node.

        Args:
            host: the node.
            request: the op and its arguments.
            timeout: seconds to wait for the answer.

        Returns:
            The op's reply schema, or None for an op whose answer carries nothing.

        Raises:
            NodeUnreachable: the node is gone or stopped answering (the
                message names it); RemoteError when it refused the request.
        """
        try:
            with trio.fail_after(timeout + 1):  # connecting included
                ch = await self.peers.get(host)
                return await control.call(ch, request, timeout=timeout)
        except (OSError, TransportError, trio.TooSlowError) as exc:
            raise NodeUnreachable(
                host,
                f"node {format_address(host)} is unreachable or stopped answering "
                f"({request.op}): {exc or 'no answer in time'}",
            ) from None

    def open_request(self) -> control.Open:
        """The ``open`` that opens (or renews) the run on a node."""
        return control.Open(
            run=self.id, name=self.name, lease=self.config.cluster.lease, epoch=self.epoch
        )

    def job(self, replica: Replica, index: int) -> control.PartitionJob:
        """The ``start`` request of a replica's ``index``-th partition.

        Args:
            replica: the replica, its hosts and uids assigned.
            index: which of its partitions.

        Returns:
            The partition's job, as its node gets it.
        """
        c = self.config
        first, last = self.bounds[index]
        neighbour = lambda i: (*replica.hosts[i], replica.uids[i])  # noqa: E731
        return control.PartitionJob(
            run=self.id,
            uid=replica.uids[index],
            replica=replica.index,
            index=index,
            first=first,
            last=last,
            model=self.spec,
            learning_rate=c.optimizer.learning_rate,
            n_fetch=c.train.n_fetch,
            n_push=c.train.n_push,
            batch_size=c.train.batch_size,
            epochs=c.train.epochs,
            seed=c.train.seed,
            n_examples=replica.n_examples,
            shards=tuple(self.shard_hosts),
            min_split_bytes=self.min_split_bytes,
            bounds=tuple(self.bounds),
            prev=neighbour(index - 1) if index > 0 else None,
            next=neighbour(index + 1) if index < self.partitions - 1 else None,
            start_step=replica.start_step,
            incarnation=replica.incarnation,
            epoch=self.epoch,
            wire_fetch=c.wire.fetch,
            wire_push=c.wire.push,
            wire_activations=c.wire.activations,
            pipeline=depth_of(c.train.pipeline, self.partitions),
            max_staleness=None if c.train.max_staleness < 0 else c.train.max_staleness,
            end_step=replica.end_step,
            portion_steps=self.portion,
        )

    async def set_running(self, replicas: list[Replica], at: float) -> None:
        """Set the (created, held) partitions of ``replicas`` running. A node
        found gone meanwhile is declared dead: its replicas are restarted
        elsewhere as those of any node lost, the others go.

        Args:
            replicas: the replicas.
            at: seconds into training (their :attr:`Replica.offset`).
        """
        for host in dict.fromkeys(h for r in replicas for h in r.hosts):
            if host in self.dead:
                continue
            uids = tuple(u for r in replicas for h, u in zip(r.hosts, r.uids) if h == host)
            try:
                await self.control(
                    host, control.Run(run=self.id, uids=uids), timeout=self.op_timeout
                )
            except NodeUnreachable as exc:
                self.health.declare_dead(exc.host, exc)
        for replica in replicas:
            replica.held, replica.offset = False, at
            replica.launched = time.monotonic()

    async def launch(self, replica: Replica, inputs: Inputs, run: bool) -> None:
        """Create a replica's partitions on their nodes and give them its data.

        Raises:
            NodeUnreachable: one of its nodes is gone (or was declared dead
                already: it is not tried again); its uids are set, so the
                watch loop finds it failed and restarts it elsewhere.
            NodeRefused: one of its nodes refused a partition or its data.
        """
        replica.uids = [next(self._uids) for _ in range(self.partitions)]
        replica.launched = time.monotonic()
        dead = next((h for h in replica.hosts if h in self.dead), None)
        if dead is not None:
            raise NodeUnreachable(dead, f"node {format_address(dead)} is dead")

        async def place(host: Address, request: control.Request) -> None:
            try:
                await self.control(host, request, timeout=self.op_timeout)
            except RemoteError as exc:
                raise NodeRefused(
                    host, f"node {format_address(host)} refused ({request.op}): {exc.message}"
                ) from None

        for p in range(self.partitions):
            await place(replica.hosts[p], self.job(replica, p))
        rows = replica.rows
        x = np.ascontiguousarray(inputs.x[rows], dtype=self.spec.np_dtype)
        first, last = replica.hosts[0], replica.hosts[-1]
        await place(first, control.Data(run=self.id, uid=replica.uids[0], role="x", array=x))
        y = np.ascontiguousarray(inputs.y[rows])
        await place(last, control.Data(run=self.id, uid=replica.uids[-1], role="y", array=y))
        if run:
            for host in dict.fromkeys(replica.hosts):
                uids = tuple(u for h, u in zip(replica.hosts, replica.uids) if h == host)
                await self.control(
                    host, control.Run(run=self.id, uids=uids), timeout=self.op_timeout
                )

    def steps_of(self, replica: Replica) -> int:
        """Where ``replica``'s job ends: its ``end_step``, or its schedule's end."""
        t = self.config.train
        return replica.end_step or steps_per_run(replica.n_examples, t.batch_size, t.epochs)

    async def applied_through(self, replica: Replica) -> int | None:
        """Where a restarted (or backed-up) replica goes on: the first step
        of its job whose gradients some partition of it has not had applied,
        as the shards say (each piece's last applied ``seq`` from the
        schedule's pushers). Its last report may be late by a heartbeat, and
        its partitions are at different steps: going on there, every step is
        applied exactly once (pushes already applied are dropped as
        retries). None when a shard cannot tell."""
        stats = None
        with trio.move_on_after(self.op_timeout):  # a frozen shard node must not stall the run
            try:
                stats = await self.client.stats(pushers=control.pusher_prefix(replica.index))
            except DBNodeError as exc:
                log.warning("replica %d: the shards' last pushes unknown (%s)", replica.index, exc)
        if stats is None:
            return None
        last_seq = {t["key"]: t["last_seq"] for node in stats for t in node["tensors"]}
        end = self.steps_of(replica)
        steps = []
        for index in range(self.partitions):
            pusher = partial(control.pusher_name, replica.index, index, self.portion)
            for piece in self.plan.pieces(f"block{index}"):
                if piece.key not in last_seq:
                    return None
                seqs = last_seq[piece.key]
                steps.append(first_unapplied(seqs, pusher, replica.start_step, end, self.portion))
        return min(steps)

    async def restart(
        self, replica: Replica, inputs: Inputs, reason: str, node_failure: bool
    ) -> None:
        """Start a failed replica again on live nodes, from the step its last
        partition had reached: the other replicas never stop.

        Args:
            replica: the replica.
            inputs: the run's data.
            reason: why it failed.
            node_failure: it failed because a node did (not counted against
                :data:`MAX_RESTARTS`, which catches replicas that fail by themselves).

        Raises:
            DBNodeError: it failed too often by itself, or no node is left.
        """
        if not node_failure:
            replica.failures += 1
            if replica.failures > MAX_RESTARTS:
                raise DBNodeError(
                    f"replica {replica.index} failed {replica.failures} times; last: {reason}"
                )
        await self.stop_partitions(replica)  # the survivors wait for peers that are gone
        applied = await self.applied_through(replica)
        if applied is None and replica.last is not None:
            # The shards cannot tell: from the step every partition reported,
            # at the start of its push period (a period pushed already is
            # dropped as a retry; partial ones would lose their first steps).
            applied = replica.progress - replica.progress % self.config.train.n_push
        if applied is not None:
            replica.start_step = applied
            replica.base_examples = examples_after(
                replica.n_examples, self.config.train.batch_size, applied
            )
        replica.last, replica.reports = None, {}
        if replica.share_end is not None and replica.start_step >= replica.share_end:
            replica.share_end = None  # its share is behind it: backups may cut anew
        if replica.start_step >= self.steps_of(replica):  # backups did the rest
            replica.done, replica.parked = True, False
            self.event("replica done by backups", replica=replica.index)
            return
        replica.incarnation = replica.incarnation + 1
        replica.seen_loss = (0.0, 0)
        replica.acked_before, replica.acked = replica.acknowledged, {}
        replica.links_before, replica.links_now = replica.links, {}
        refused: dict[Address, str] = {}
        while True:
            replica.hosts = self.least_loaded(replica, reason, refused)
            log.warning(
                "replica %d failed (%s); restarting it at step %d on %s",
                replica.index,
                reason,
                replica.start_step,
                ", ".join(format_address(h) for h in replica.hosts),
            )
            try:
                await self.launch(replica, inputs, run=not replica.held)
                break
            except NodeUnreachable as exc:  # one of its new nodes failed meanwhile
                self.health.declare_dead(exc.host, exc)
                await self.stop_partitions(replica)
                reason = str(exc)
            except NodeRefused as exc:  # over its memory budget, say: the next node may take it
                log.warning("replica %d: %s; trying the other nodes", replica.index, exc)
                refused[exc.host] = str(exc)
                await self.stop_partitions(replica)
        self.restarts.append(
            {"replica": replica.index, "at_step": replica.start_step, "reason": reason}
        )
        self.event(
            "replica restarted",
            replica=replica.index,
            at_step=replica.start_step,
            on=[format_address(h) for h in replica.hosts],
        )

    @property
    def live_helpers(self) -> list[Replica]:
        """The helper replicas of nodes that joined and are still in the run."""
        return [h for h in self.helpers if h.diverged is None]

    @property
    def running_backups(self) -> list[Replica]:
        """The backups still training (:mod:`dbnode.driver.leases`)."""
        return [b for r in self.replicas for b in r.backups if not b.over]

    def trained_examples(self) -> int:
        """Examples trained so far: the replicas', and those of the backups of
        schedules not yet all applied (a copy's may count a step twice)."""
        total = sum(r.examples for r in self.replicas)
        return total + sum(b.examples for r in self.replicas if not r.over for b in r.backups)

    async def duplicates(self) -> int:
        """Pushes the live shards dropped as copies of pushes already applied
        (a backup's, or a retry's); 0 when a shard cannot tell."""
        try:
            stats = await self.client.stats(pushers="-")  # no name: the totals only
        except DBNodeError:
            return 0
        return sum(node["totals"]["duplicates"] for node in stats)

    async def stop_partitions(self, replica: Replica) -> None:
        """Stop a replica's partitions on the nodes that still answer (and
        are still in the run: one that left was closed)."""
        for host, uid in zip(replica.hosts, replica.uids):
            if host not in self.dead and host in self.hosts:
                try:
                    stop = control.Stop(run=self.id, uids=(uid,))
                    await self.control(host, stop, timeout=self.op_timeout)
                except NodeUnreachable as exc:
                    self.health.declare_dead(host, exc)
                except DBNodeError:
                    pass

    def least_loaded(
        self, replica: Replica, reason: str, refused: dict[Address, str] | None = None
    ) -> list[Address]:
        """The nodes for ``replica``'s partitions: the placeable ones
        running the fewest other partitions (none that ``refused`` it: node
        -> what it said)."""
        refused = refused or {}
        live = [h for h in self.placeable if h not in refused]
        if not live:
            why = "; ".join([reason, *refused.values()])
            raise DBNodeError(f"no node left to restart replica {replica.index} on ({why})")
        load = {h: 0 for h in live}
        for other in self.replicas:
            if other is not replica and not (other.over or other.parked):
                for h in other.hosts:
                    if h in load:
                        load[h] += 1
        hosts = []
        for _ in range(self.partitions):
            host = min(live, key=lambda h: (load[h], live.index(h)))
            hosts.append(host)
            load[host] += 1
        return hosts

    async def export(self, index: int, timeout: float = 60.0) -> bytes:
        """Plan shard ``index``'s pieces as snapshot bytes, from the node holding them.

        Raises:
            DBNodeError: the node is gone or refused.
        """
        keys = tuple(piece.key for piece in self.plan.on_shard(index))
        request = control.Export(run=self.id, keys=keys)
        return (
            await self.control(self.shard_hosts[index], request, timeout=timeout)
        ).data.tobytes()

    def _shard_indices(self) -> list[int]:
        return [i for i in range(self.plan.n_shards) if self.plan.on_shard(i)]

    async def backup(self) -> None:
        """A backup round: copy every plan shard into the driver's memory."""
        start = time.monotonic()
        for i in self._shard_indices():
            if self.shard_hosts[i] in self.dead:
                continue
            try:
                self.backups.store(i, await self.export(i))
            except DBNodeError as exc:  # the heartbeat will name a dead node
                log.info("backup of shard %d skipped: %s", i, exc)
        self.backups.done(time.monotonic(), time.monotonic() - start)

    async def checkpoint(self) -> None:
        """Export every plan shard and write them as one checkpoint. A
        checkpoint that cannot be written is a warning and an event; the
        run goes on."""
        assert self.checkpoint_dir is not None
        snapshots = {}
        for i in self._shard_indices():
            try:
                snapshots[i] = await self.export(i)
            except DBNodeError as exc:  # the heartbeat will name the dead node
                log.warning("checkpoint skipped: %s", exc)
                return
        steps = {r.index: (r.last.step if r.last else r.start_step) for r in self.replicas}
        try:
            written = await trio.to_thread.run_sync(
                lambda: checkpoint.write(
                    self.checkpoint_dir,
                    snapshots,
                    identity_hash(self.config),
                    steps,
                    self.config.checkpoint.keep,
                    self.id,
                    run_identity(self.config),
                )
            )
        except OSError as exc:
            self.warn(f"checkpoint failed ({exc}); the run goes on")
            self.event("checkpoint failed", error=str(exc))
            return
        self.last_checkpoint = written
        self.event("checkpoint", number=written.number)

    async def fence(self) -> None:
        """Move the run past the nodes declared dead since the last call:
        restore the parameter shards they held on live nodes, and advance
        the shard map's epoch everywhere, so that nothing they (or
        partitions not told yet) still send is applied.

        Raises:
            DBNodeError: shards were lost with no copy or no node to take them.
        """
        seen = self.fenced
        seen.intersection_update(self.dead)  # rejoined nodes may die again
        newly = self.dead - seen
        lost = [
            i
            for i, host in enumerate(self.shard_hosts)
            if host in self.dead and self.plan.on_shard(i)
        ]
        if not newly and not lost:
            return
        restored = await self._restore_shards(lost) if lost else []
        await self.advance_epoch()
        seen.update(newly)  # only now: cut off before, the next call does it again
        for i, source, lost_now in restored:
            age = round(time.time() - source.time, 3)
            log.warning(
                "parameter shard %d restored on %s from its %s (%.1f s old, %d updates lost)",
                i,
                format_address(self.shard_hosts[i]),
                source.origin,
                age,
                lost_now,
            )
            self.event(
                "shards restored",
                shards=[i],
                source=source.origin,
                seconds_lost=age,
                lost_updates=lost_now,
                on=format_address(self.shard_hosts[i]),
                epoch=self.epoch,
            )

    async def _restore_shards(self, lost: list[int]) -> list[tuple[int, Source, int]]:
        """Import each lost plan shard into a live node, from the newer of
        the driver's backup and the newest checkpoint."""
        dead_names = ", ".join(sorted({format_address(self.shard_hosts[i]) for i in lost}))
        restored = []
        for i in lost:
            # Off the event loop: it may read and verify checkpoints from disk.
            source = await trio.to_thread.run_sync(
                self.backups.source, i, self.checkpoint_dir, self.lineage
            )
            if source is None:
                why = (
                    "it died before the first backup" if self.backups.interval
                    else "cluster.backup_interval is 0 and no checkpoint"
                )  # fmt: skip
                raise DBNodeError(
                    f"node {dead_names} died holding parameter shards and there is no copy "
                    f"to restore them from ({why})"
                )
            data = np.frombuffer(source.data, np.uint8)
            refused: dict[Address, str] = {}
            while True:  # a node may fail or refuse while it takes them: then the next one
                live = [h for h in self.placeable if h not in refused]
                if not live:
                    why = "; ".join(refused.values()) or "no node is left"
                    raise DBNodeError(f"node {dead_names} died holding parameter shards: {why}")
                target = min(live, key=lambda h: (self.shard_hosts.count(h), live.index(h)))
                try:
                    await self.control(target, control.Import(run=self.id, data=data))
                    break
                except NodeUnreachable as exc:
                    self.health.declare_dead(target, exc)
                except RemoteError as exc:  # e.g. over its memory budget
                    refused[target] = f"{format_address(target)} refused: {exc.message}"
            self.shard_hosts[i] = target
            lost_now = lost_updates(source, self.versions)
            self.lost_updates += lost_now
            restored.append((i, source, lost_now))
        return restored

    async def advance_epoch(self) -> None:
        """A new shard map epoch on every live node (and this driver's client)."""
        self.epoch += 1
        remap = control.Remap(run=self.id, epoch=self.epoch, shards=tuple(self.shard_hosts))
        for host in self.health.live:
            try:
                await self.control(host, remap, timeout=self.op_timeout)
            except NodeUnreachable as exc:  # its partitions fail over; its shards next round
                self.health.declare_dead(host, exc)
        self.client.remap(self.epoch, self.shard_hosts)

    async def poll(self) -> dict[Address, control.HeartbeatReply]:
        """One heartbeat round: renews the run's leases and answers its state,
        by node (live nodes only)."""

        async def heartbeat(host: Address, timeout: float) -> control.HeartbeatReply:
            return await self.control(host, control.Heartbeat(run=self.id), timeout=timeout)

        async def rejoin(host: Address, timeout: float) -> dict[str, Any]:
            # It was replaced meanwhile: drop what it still runs and holds of
            # the run, then take it back, empty, at the current epoch. Never
            # while the map still points at it: its shards must come back first.
            if any(h == host and self.plan.on_shard(i) for i, h in enumerate(self.shard_hosts)):
                raise DBNodeError("its shards are not restored yet")
            closed = await self.control(host, control.Close(run=self.id), timeout=timeout)
            await self.control(host, self.open_request(), timeout=timeout)
            return {"stale_partitions": closed.partitions, "stale_keys": closed.keys}

        answers = await self.health.poll(heartbeat, rejoin)
        for host, answer in answers.items():
            self.counters[host] = (answer.fenced, answer.not_finite)
            self.staleness[host] = answer.staleness
            for key, version in answer.versions.items():
                piece = int(key)
                if self.shard_hosts[self.plan.slice(piece).shard] == host:
                    self.versions[piece] = version
        return answers

    def pack(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A model as the parameter server holds it: one flat block per partition."""
        return {
            f"block{k}": pack_block(self.spec, params, a, b) for k, (a, b) in enumerate(self.bounds)
        }

    async def model(self) -> dict[str, np.ndarray]:
        """The parameter server's current model."""
        flat = {
            name: kernels.empty(shape, self.spec.np_dtype)
            for name, shape in blocks(self.spec, self.bounds).items()
        }
        await self.client.pull(flat)
        params = {}
        for k, (a, b) in enumerate(self.bounds):
            params.update(block_views(self.spec, flat[f"block{k}"], a, b))
        return params
