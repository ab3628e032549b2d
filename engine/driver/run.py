"""One Downpour SGD run across a set of nodes, as the driver sees it.

:func:`train` takes a :class:`~dbnode.config.RunConfig` and the addresses
of running ``dbnode serve`` nodes (or starts an embedded local cluster),
then:

1. loads the data, checks it against the model, splits off the test set
   and cuts the training set into one data shard per replica
   (:mod:`dbnode.driver.inputs`);
2. asks every node who it is (one node named twice is used once) and opens
   the run on each: a random run id that scopes everything the run does
   there, and a lease its heartbeats renew (:mod:`dbnode.runs`);
3. places parameter shards and every replica's layer partitions on the
   nodes (:mod:`dbnode.traffic`, :func:`~dbnode.placement.split_layers`),
   initializes the shards, ships each replica's data, starts the partitions;
4. watches progress and health (:mod:`dbnode.driver.health`): restarts
   failed replicas, restores lost shards from its backups or checkpoints
   under a new shard map epoch (:mod:`dbnode.driver.recovery`), evaluates
   the current model on the test set every ``train.eval_interval`` seconds;
5. when every partition has finished (every push applied), or a signal
   stops the run, pulls the model and writes ``model.npz``, ``metrics.csv``
   and ``summary.json`` (:mod:`dbnode.driver.ending`,
   :mod:`dbnode.driver.outputs`); then closes the run
   on every node, whatever happened.
"""

from __future__ import annotations

import logging
import math
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import control
from ..aio import first_error
from ..config import RunConfig, format_address, parse_address
from ..data import examples_after
from ..errors import ConfigError, DBNodeError, NodeUnreachable
from ..ps.shard import ParameterShard
from ..wire import Address, Peers, load_secret
from .cluster import LocalCluster, embedded_nodes
from .elastic import HostsFile, follow, read_hosts
from .ending import Ending, evaluate_model, figures_of, finish, metrics_row, reporting
from .inputs import Arrays, Inputs, find_resume, prepare, shard_optimizer
from .outputs import MetricsLog, Progress, Summary, metric_columns, prepare_out_dir, write_outputs
from .planning import distinct_nodes, node_shapes, oversubscribed
from .state import Replica, RunState
from .stopping import EarlyStopper, Plateau
from .stragglers import backup_done, backup_failed, lease_backups, settle

__all__ = ["Progress", "Summary", "train", "write_outputs"]

log = logging.getLogger("dbnode.driver")


def train(
    config: RunConfig,
    hosts: list[Address] | None = None,
    out_dir: str | Path | None = None,
    secret: bytes | None = None,
    progress: Callable[[Progress], None] | None = None,
    resume: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    *,
    x=None,
    y=None,
    x_test=None,
    y_test=None,
) -> Summary:
    """Run ``config`` on a cluster; blocks until the run ends.

    SIGINT, SIGTERM and SIGHUP (when called from the main thread) stop the
    run cleanly: the outputs are written as of that moment, a final
    checkpoint is taken when checkpointing is on, and
    :class:`~dbnode.errors.RunInterrupted` is raised.

    Args:
        config: the run.
        hosts: running nodes (default: ``config.cluster.hosts``, or an
            embedded local cluster when there are none).
        out_dir: where ``model.npz``, ``metrics.csv`` and ``summary.json``
            go (and checkpoints, unless ``checkpoint.dir`` says otherwise);
            None writes nothing. Made if need be; one that already holds
            files is refused (unless ``overwrite``, or it is ``resume``).
        secret: the cluster's secret for ``hosts`` (default: from
            ``cluster.secret_file`` or ``$DBNODE_SECRET``).
        progress: called with a :class:`Progress` at every poll; it may
            raise :class:`~dbnode.errors.StopTraining` to end the run there
            (outputs written, the summary returned).
        resume: an earlier run's output directory: continue from its newest
            checkpoint (and its ``metrics.csv``).
        name: the run's name on the nodes (``dbnode status``, logs).
        overwrite: replace an earlier run's outputs in ``out_dir``.
        x, y: in-memory training data, instead of ``data.train``
            (``(examples, features)`` inputs; labels or target rows).
        x_test, y_test: an in-memory test set, instead of ``data.test``
            (without one, ``data.test_fraction`` of ``x`` is held out).

    Returns:
        The run's :class:`Summary`.

    Raises:
        ConfigError: the config, data, initial model or ``out_dir`` is
            unusable (found before anything starts).
        RunInterrupted: a signal stopped the run (outputs written).
        DBNodeError: the run failed (a node refused or stayed unreachable,
            a replica failed too often, a shard was lost with no copy to
            restore it from, every replica diverged, ...); the outputs are
            written as far as the model could still be read.
    """
    arrays = None
    if x is not None or y is not None:
        if x is None or y is None or (x_test is None) != (y_test is None):
            raise ConfigError("x, y", "", "give inputs and targets together (x with y, "
                              "x_test with y_test)")  # fmt: skip
        arrays = Arrays(x, y, x_test, y_test)
    elif x_test is not None or y_test is not None:
        raise ConfigError("x_test", "", "a test set in memory needs training arrays too (x, y)")
    inputs = prepare(config, arrays)
    if resume is not None:
        inputs.resume = find_resume(config, resume)
        inputs.resume_dir = Path(resume)
    # Checked now, before anything starts: the figure it watches must exist.
    columns, held_out = metric_columns(inputs.task), inputs.x_test is not None
    watchers = (
        EarlyStopper(config.train.early_stopping, columns, held_out),
        Plateau(config.schedule, columns, held_out) if config.schedule.name == "plateau" else None,
    )
    if out_dir is not None:
        out_dir = prepare_out_dir(out_dir, overwrite, resume)
    if config.checkpoint.interval and not (config.checkpoint.dir or out_dir):
        raise ConfigError(
            "checkpoint.dir", "", "checkpoints need a directory: set it or give --out"
        )
    name = name or "run"
    hosts = list(hosts or [_address(h) for h in config.cluster.hosts])
    fixed = tuple(hosts)  # never drained through the hosts file
    if config.cluster.hosts_file:
        try:
            hosts += [h for h in read_hosts(config.cluster.hosts_file) if h not in hosts]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("cluster.hosts_file", config.cluster.hosts_file, str(exc)) from None
        if not hosts:
            raise ConfigError("cluster.hosts_file", config.cluster.hosts_file, "lists no node")
    if hosts:
        if secret is None:
            secret = load_secret(config.cluster.secret_file or None)
        return trio.run(
            _run, config, hosts, secret, inputs, out_dir, progress, name, watchers, fixed
        )
    roles = len(inputs.shards) * config.model.partitions
    with LocalCluster(config.cluster.nodes or embedded_nodes(roles)) as cluster:
        secret = cluster.secret_file.read_bytes()
        return trio.run(
            _run, config, cluster.addresses, secret, inputs, out_dir, progress, name, watchers
        )


def _address(text: str) -> Address:
    return parse_address(text, key="cluster.hosts")


async def _run(
    config: RunConfig,
    hosts: list[Address],
    secret: bytes,
    inputs: Inputs,
    out_dir,
    progress,
    name: str,
    watchers: tuple[EarlyStopper, Plateau | None],
    fixed: tuple[Address, ...] = (),
) -> Summary:
    try:
        return await _run_in_nursery(
            config, hosts, secret, inputs, out_dir, progress, name, watchers, fixed
        )
    except BaseExceptionGroup as group:  # what a user meets is the error inside
        raise first_error(group) from None


async def _run_in_nursery(
    config, hosts, secret, inputs, out_dir, progress, name, watchers, fixed
) -> Summary:
    """:func:`_run`'s body: the run's nursery (its channels, its side tasks)."""
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, secret, name="driver")
        run: RunState | None = None
        earlier = inputs.resume_dir and inputs.resume_dir / "metrics.csv"
        history = MetricsLog(
            Path(out_dir) / "metrics.csv" if out_dir else None,
            metric_columns(inputs.task),
            resume=earlier,
        )
        try:
            distinct = await distinct_nodes(peers, hosts)
            run = RunState(
                config,
                list(distinct),
                peers,
                inputs,
                secrets.token_hex(8),
                name,
                nodes=node_shapes(distinct),
                history=history,
                stopper=watchers[0],
                plateau=watchers[1],
            )
            run.node_ids = {host: info.node_id for host, info in distinct.items()}
            run.fixed_hosts = [h for h in distinct if h in fixed]
            if len(distinct) < len(hosts):
                run.event("duplicate hosts", given=len(hosts), nodes=len(distinct))
            for text in (*oversubscribed(distinct), *inputs.warnings):
                run.warn(text)
            if config.checkpoint.interval:
                run.checkpoint_dir = Path(config.checkpoint.dir or Path(out_dir) / "checkpoints")
            summary = await _drive(run, inputs, out_dir, progress, start, nursery)
        finally:
            history.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                if run is not None:
                    await _close_everywhere(run)
                await peers.aclose()
        nursery.cancel_scope.cancel()
    return summary


async def _warmed(run: RunState, first: Replica, steps: int) -> bool:
    """Whether the warm replica ``first`` has taken ``steps`` steps (or can
    tell none: a node of it lost leaves the warm-up to the watch loop),
    recorded as the warm-up's end."""
    taken = []
    for host, uid in zip(first.hosts, first.uids):
        if host in run.dead:
            return False
        try:
            reply = await run.control(host, control.Heartbeat(run=run.id), timeout=run.op_timeout)
        except NodeUnreachable as exc:
            run.health.declare_dead(exc.host, exc)
            return False
        report = reply.partitions.get(str(uid))
        taken.append(report.step if report is not None else 0)
    if min(taken, default=0) < steps:
        return False
    run.event("warmstart done", replica=first.index, steps=min(taken))
    return True


async def _close_everywhere(run: RunState) -> None:
    """Free the run on every node that still answers (best effort: the
    leases free it on the others)."""

    async def close(host: Address) -> None:
        try:
            await run.control(host, control.Close(run=run.id), timeout=2.0)
        except Exception:  # the node may be gone
            pass

    async with trio.open_nursery() as nursery:
        for host in run.hosts:
            if host not in run.dead:
                nursery.start_soon(close, host)


async def _watch_signals(stop: Callable[[str], None]) -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into a clean stop of the run (a second
    one is not caught: it ends the driver at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            stop(signal.Signals(signum).name)
            return


async def _drive(run: RunState, inputs: Inputs, out_dir, progress, start, nursery) -> Summary:
    for host in run.hosts:
        await run.control(host, run.open_request())
    # From the first open to the last request: setup (a big data set, a
    # resume's import) and the final outputs may take longer than a lease.
    renewing = trio.CancelScope()
    nursery.start_soon(_renew_leases_in, run, renewing)
    try:
        return await _train(run, inputs, out_dir, progress, start, nursery)
    finally:
        renewing.cancel()


async def _train(run: RunState, inputs: Inputs, out_dir, progress, start, nursery) -> Summary:
    config = run.config
    if inputs.resume is None:
        await run.client.init(run.pack(inputs.params), shard_optimizer(config, inputs.shards))
    else:
        # The shards as they were checkpointed, placed on this run's nodes;
        # each replica goes on from the step it had reached.
        for i, host in enumerate(run.shard_hosts):
            if run.plan.on_shard(i):
                pieces = ParameterShard.from_bytes(inputs.resume.read_shard(i))
                run.initial_versions += sum(pieces.versions().values())
                # This run's schedule (its epochs may have changed) and the
                # plateau's scale as it was, or none without a plateau.
                pieces.set_schedule(shard_optimizer(config, inputs.shards).get("schedule"))
                if run.plateau is not None:
                    run.plateau.scale = min([pieces.scale(), run.plateau.scale])
                else:
                    pieces.set_scale(1.0)
                data = pieces.snapshot_bytes()
                await run.control(
                    host, control.Import(run=run.id, data=np.frombuffer(data, np.uint8))
                )
        for replica in run.replicas:
            replica.start_step = inputs.resume.replica_steps.get(replica.index, 0)
            replica.base_examples = examples_after(
                replica.n_examples, config.train.batch_size, replica.start_step
            )
        run.start_examples = sum(r.base_examples for r in run.replicas)
        run.lineage.add(inputs.resume.run_id)
        run.event("resumed", checkpoint=str(inputs.resume.path))
    if config.cluster.backup_interval:
        # A first copy before any replica is made: a shard's node lost while
        # they are (shipping a big data set takes a while) is restored from it.
        await run.backup()
    # Warmstart: the first replica alone, the others created but held
    # (a resumed run was warmed already). It starts before they are made:
    # shipping their data takes a core it leaves free. Once it has warmed,
    # those made go and the rest go as they are made, not after the last.
    warm = config.train.warmstart_steps if inputs.resume is None else 0
    first, warming = run.replicas[0], bool(warm)
    for replica in run.replicas:
        replica.held = warming and replica is not first
        try:
            await run.launch(replica, inputs, run=False)
            if warm and (replica is first or not warming):
                await run.set_running([replica], 0.0 if replica is first else
                                      time.monotonic() - start)  # fmt: skip
        except NodeUnreachable as exc:
            # A node lost while the run is set up is dealt with as one lost
            # later: its shards restored (below), its replicas restarted on
            # the others by the watch loop. This one's partitions made
            # already must not start without their data.
            run.health.declare_dead(exc.host, exc)
            await run.stop_partitions(replica)
        if warming and replica is not first and await _warmed(run, first, warm):
            warming = False
            made = [r for r in run.replicas if r.held and r.uids and not set(r.hosts) & run.dead]
            await run.set_running(made, time.monotonic() - start)
    # Before anything runs: the partitions' first fetches go to the shards'
    # new nodes instead of failing on the dead one.
    await run.fence()
    if not warm:
        for host in run.health.live:
            try:
                await run.control(host, control.Run(run=run.id))
            except NodeUnreachable as exc:
                run.health.declare_dead(exc.host, exc)

    ended = Ending()
    with trio.CancelScope() as loop_scope:
        ended.scope = loop_scope
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(_watch_signals, ended.by_signal)
        try:
            report = reporting(progress, ended)
            train_seconds = await _watch(run, inputs, report, start, ended.by_request)
        except (DBNodeError, BaseExceptionGroup) as exc:
            failure = first_error(exc)
            if not isinstance(failure, DBNodeError):
                raise
            # The run failed: stop it, keep what can still be kept, then raise.
            ended.error, ended.failure = str(failure), failure
            train_seconds = None
            log.error("the run failed (%s): writing what can be kept", failure)
    ended.scope = None
    if ended.early:
        train_seconds = None
        log.warning("%s: writing the outputs as of now", ended.why)
    if ended.early or ended.error:
        for replica in run.replicas:
            for host, uid in zip(replica.hosts, replica.uids):
                if host not in run.dead:
                    stop_request = control.Stop(run=run.id, uids=(uid,))
                    with trio.move_on_after(5):
                        try:
                            await run.control(host, stop_request, timeout=5.0)
                        except DBNodeError:
                            pass
    return await finish(run, inputs, out_dir, start, train_seconds, ended)


class _SideJobs:
    """The driver's work besides polling (backups, checkpoints, evaluations),
    each in a task of its own, one of a kind at a time: a slow or frozen
    node holds up that job, never the heartbeats and failovers."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.busy: set[str] = set()
        self._idle = trio.Event()
        self._idle.set()

    def start(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        if name in self.busy:
            return
        self.busy.add(name)
        self._idle = trio.Event()
        self.nursery.start_soon(self._run, name, job)

    async def _run(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except Exception as exc:  # ExceptionGroups too: a side job never ends the run
            cause = first_error(exc)
            if isinstance(cause, (DBNodeError, trio.TooSlowError, OSError)):
                log.info("%s skipped: %s", name, cause)  # a node failed: the poll will tell
            else:
                log.warning("%s failed", name, exc_info=exc)
        finally:
            self.busy.discard(name)
            if not self.busy:
                self._idle.set()

    async def wait(self) -> None:
        """Until every job has ended."""
        await self._idle.wait()


async def _renew_leases(run: RunState) -> None:
    """Renew the run's lease on every live node every heartbeat, whatever the
    main loop is busy with (a restart waiting on a frozen node, say). A
    heartbeat renews an open run and never opens one: a node that lost the
    run stays without it until the failure detector has dealt with it."""

    async def renew(host: Address) -> None:
        beat = control.Heartbeat(run=run.id)
        try:
            await run.control(host, beat, timeout=run.config.cluster.heartbeat * 2)
        except DBNodeError:
            pass  # the failure detector decides what a silent node is

    while True:
        async with trio.open_nursery() as nursery:
            for host in run.health.live:
                nursery.start_soon(renew, host)
        await trio.sleep(run.config.cluster.heartbeat)


def poll_period(config: RunConfig) -> float:
    """Seconds between the driver's looks at a run (its nodes' reports, due
    evaluations, the warm-up's end): 0.2, or less when the run asks for
    heartbeats or evaluations more often."""
    return min(0.2, config.cluster.heartbeat, config.train.eval_interval)


async def _watch(run: RunState, inputs: Inputs, progress, start, stop) -> float:
    async with trio.open_nursery() as side:
        return await _watch_in(run, inputs, progress, start, stop, _SideJobs(side))


async def _watch_in(
    run: RunState, inputs: Inputs, progress, start, stop: Callable[[str], None], jobs: _SideJobs
) -> float:
    """Poll until every replica is over: restart failed replicas, restore
    lost shards, and have backups, checkpoints and evaluations made; report
    progress. Returns the replicas' training time.

    Evaluations (a row of ``metrics.csv`` each) come at the end of every
    epoch -- each time the replicas together have trained another
    training set's worth of examples -- and every ``train.eval_interval``
    seconds between them; early stopping (``stop``) looks at each."""
    config = run.config
    n = len(inputs.x)
    total = config.train.epochs * n
    rows: list[tuple[dict[str, Any], dict]] = []  # evaluations done, in order, with their model

    async def evaluation(at: float, examples: int, loss: float | None) -> None:
        params = await run.model()
        figures = await evaluate_model(run, inputs, params)
        rows.append((metrics_row(run, inputs, at, examples, loss, figures), params))

    reported_events = 0
    start_examples = sum(r.examples for r in run.replicas)  # a resumed run's earlier ones
    next_eval = time.monotonic() + config.train.eval_interval
    next_epoch = sum(r.examples for r in run.replicas) // n + 1  # a resumed run's too
    every = config.checkpoint.interval
    next_checkpoint = time.monotonic() + every
    path = config.cluster.hosts_file
    hosts_file = HostsFile(path, run.fixed_hosts) if path else None
    while True:
        await trio.sleep(poll_period(config))
        if hosts_file is not None:
            await follow(run, hosts_file, inputs)
        await run.fence()  # a node declared dead meanwhile (a restart's, say)
        answers = await run.poll()
        await run.fence()
        window_sum = window_count = 0.0
        for replica in run.replicas:
            if replica.over or replica.parked:  # parked: its partitions were stopped
                continue
            failure, by_node, mine = _replica_state(run, replica, answers)
            replica.saw(mine)
            window_sum, window_count = _count_loss(replica, mine, window_sum, window_count)
            diverged = next(
                (s.error.removeprefix("Diverged: ") for s in mine if s and s.diverged), None
            )
            if diverged:
                replica.diverged = diverged
                run.event("replica diverged", replica=replica.index, reason=diverged)
                log.warning("replica %d stopped: %s", replica.index, diverged)
                await _stop_replica(run, replica)
                continue
            if failure:
                await run.restart(replica, inputs, failure, node_failure=by_node)
                continue
            replica.done = all(s is not None and s.done for s in mine)
        for backup in run.running_backups:
            failure, _, mine = _replica_state(run, backup, answers)
            backup.saw(mine)
            window_sum, window_count = _count_loss(backup, mine, window_sum, window_count)
            failure = failure or next((s.error for s in mine if s and s.diverged), None)
            if failure:
                await backup_failed(run, backup, failure)
            elif all(s is not None and s.done for s in mine):
                await backup_done(run, backup)
        await settle(run, inputs)
        await lease_backups(run, inputs)
        if window_count:
            run.last_loss = window_sum / window_count
        held = [r for r in run.replicas if r.held]
        if held:
            first = run.replicas[0]
            steps = first.last.step if first.last is not None else 0
            if steps >= config.train.warmstart_steps or first.over or first.parked:
                # From here the others fetch the shards' parameters: the warm model.
                await run.set_running(held, time.monotonic() - start)
                run.event("warmstart done", replica=first.index, steps=steps)
        examples = min(run.trained_examples(), total)  # copies racing count twice
        finished = all(r.over for r in run.replicas)
        now = time.monotonic()
        if not finished:
            if run.backups.due(now):
                jobs.start("backup", run.backup)
            if every and now >= next_checkpoint:
                jobs.start("checkpoint", run.checkpoint)
                next_checkpoint = now + every
            # Once every example is trained, the final row (the model after
            # every push) is the last epoch's: no second row at that epoch.
            due = now >= next_eval or examples >= next_epoch * n
            if due and examples < total:
                if "evaluation" not in jobs.busy:
                    jobs.start("evaluation", partial(evaluation, now - start, examples,
                                                     run.last_loss))  # fmt: skip
                    next_eval = now + config.train.eval_interval
                    next_epoch = examples // n + 1
        else:
            await jobs.wait()
        test = None
        while rows:  # what the evaluations found, each as of when it was asked
            row, params = rows.pop(0)
            run.history.append(row)
            test = figures_of(row, "test_") or None
            if run.stopper.on and (why := run.stopper.update(row, params)):
                stop(why)
            if run.plateau is not None and (scale := run.plateau.update(row)) is not None:
                run.event("learning rate lowered", scale=scale, epoch=row["epoch"])
                run.plateau.sent_epoch = -1
        # A restored shard (a new shard map epoch) is told the scale again;
        # while a send is on its way, once it is over (it may predate the map).
        plateau = run.plateau
        if plateau is not None and plateau.sent_epoch != run.epoch and "scale" not in jobs.busy:
            plateau.sent_epoch = run.epoch
            if plateau.scale < 1.0:
                jobs.start("scale", partial(_send_scale, run))
        if progress:
            progress(
                Progress(
                    now - start,
                    examples,
                    total,
                    run.last_loss,
                    sum(r.over for r in run.replicas),
                    len(run.replicas),
                    [r.last.step / max(1, r.last.steps) if r.last else 0.0 for r in run.replicas],
                    test,
                    config.train.epochs,
                    run.events[reported_events:],
                    start_examples,
                )
            )
            reported_events = len(run.events)
        if finished:
            if any(r.backups for r in run.replicas):  # it waited for them all
                return now - start
            seconds = [r.offset + r.last.seconds for r in run.replicas if r.done and r.last]
            return max(seconds, default=now - start)


def _count_loss(replica: Replica, mine: list, window_sum: float, window_count: float):
    """Take a replica's last partition's report (if it came) as its last,
    adding the loss it reports since the last look to the window's."""
    last = mine[-1]
    if last is not None:
        replica.last = last
        seen_sum, seen_count = replica.seen_loss
        if math.isfinite(last.loss_sum):
            window_sum += last.loss_sum - seen_sum
            window_count += last.loss_count - seen_count
            replica.seen_loss = (last.loss_sum, last.loss_count)
    return window_sum, window_count


async def _send_scale(run: RunState) -> None:
    """Tell every live shard node the plateau's current learning-rate scale
    (again, if it was lowered once more meanwhile); a node that fails to
    take it is told again at the next shard map epoch."""
    sent = None
    while sent != run.plateau.scale:
        sent = run.plateau.scale
        for host in dict.fromkeys(run.shard_hosts):
            if host not in run.dead:
                try:
                    await run.control(host, control.Scale(run=run.id, scale=sent), timeout=5.0)
                except DBNodeError as exc:
                    log.info("learning-rate scale not taken by %s: %s", host, exc)
                    run.plateau.sent_epoch = -1


async def _renew_leases_in(run: RunState, scope: trio.CancelScope) -> None:
    with scope:
        await _renew_leases(run)


# A partition's failures of these kinds come from a node's, not its own.
_NODE_FAILURES = ("ConnectionClosedError", "RequestTimeout", "TooSlowError",
                  "AuthenticationError", "NodeUnreachable")  # fmt: skip
_NODE_CODES = ("[UNKNOWN_RUN]", "[STALE_EPOCH]")


def _replica_state(
    run: RunState, replica: Replica, answers: dict[Address, control.HeartbeatReply]
) -> tuple[str | None, bool, list[control.PartitionReport | None]]:
    """Why a replica has failed (or None), whether a node's failure caused
    it, and its partitions' reports (None where none came)."""
    mine: list[control.PartitionReport | None] = []
    dead = next((h for h in replica.hosts if h in run.dead), None)
    # A dead node is the reason, whatever its partners reported meanwhile
    # (waiting for a peer that is gone, say).
    failure, by_node = (f"node {format_address(dead)} is dead" if dead else None), True
    for host, uid in zip(replica.hosts, replica.uids):
        if host in run.dead:
            mine.append(None)
            continue
        answer = answers.get(host)
        report = answer.partitions.get(str(uid)) if answer is not None else None
        if answer is not None and report is None:
            # The node answers but no longer has it: never wait for it.
            failure = failure or f"partition {uid} vanished from {format_address(host)}"
        if report is not None and report.error and not report.diverged and not failure:
            failure = report.error
            by_node = report.error.startswith(_NODE_FAILURES) or report.error.endswith(_NODE_CODES)
        mine.append(report)
    return failure, by_node, mine


async def _stop_replica(run: RunState, replica: Replica) -> None:
    for host, uid in zip(replica.hosts, replica.uids):
        if host not in run.dead:
            try:
                await run.control(host, control.Stop(run=run.id, uids=(uid,)), timeout=5.0)
            except DBNodeError:
                pass
