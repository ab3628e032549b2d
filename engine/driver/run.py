"""One Downpour SGD run across a set of nodes, as the driver sees it.

:func:`train` takes a :class:`~dbnode.config.RunConfig` and the addresses
of running ``dbnode serve`` nodes (or starts an embedded local cluster),
then:

1. loads the data, checks it against the model, splits off the test set
   and cuts the training set into one data shard per replica
   (:mod:`dbnode.driver.inputs`);
2. places parameter shards and every replica's layer partitions on the
   nodes (:func:`dbnode.placement.place`, :func:`~dbnode.placement.split_layers`);
3. initializes the parameter shards, ships each replica's inputs to its
   first partition and its targets to its last, and starts the partitions;
4. watches progress and health (:mod:`dbnode.driver.health`), restarting
   failed replicas, restoring lost shards from checkpoints, evaluating the
   parameter server's current model on the test set every
   ``train.eval_interval`` seconds;
5. when every partition has finished (and so every push has been applied),
   pulls the final model and writes ``model.npz``, ``metrics.csv`` and
   ``summary.json`` to the output directory.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import control, kernels
from ..aio import first_error
from ..blocks import block_views, blocks, pack_block
from ..config import RunConfig, format_address, parse_address
from ..errors import ConfigError, DBNodeError, TransportError
from ..model import evaluate, save_params
from ..placement import DEFAULT_MIN_SPLIT_BYTES, place, plan_shards, split_layers
from ..ps.client import ParameterClient
from ..wire import Address, Peers, load_secret
from . import checkpoint
from .cluster import LocalCluster
from .health import FailureDetector
from .inputs import Inputs, find_resume, prepare, run_identity

__all__ = ["Progress", "Summary", "train", "write_outputs"]

log = logging.getLogger("dbnode.driver")

# A replica whose partitions fail this many times fails the run.
MAX_RESTARTS = 3


@dataclass
class Progress:
    """What the driver knows about the run at one moment."""

    seconds: float
    examples: int
    total_examples: int
    train_loss: float | None
    replicas_done: int
    replicas: int
    per_replica: list[float] = field(default_factory=list)  # fraction done
    test: dict[str, float] | None = None


@dataclass
class Summary:
    """What a finished run did: its config, its size, its times and results.

    Written to ``summary.json`` (every field), and returned by :func:`train`.
    """

    config: dict[str, Any]
    replicas: int
    partitions: int
    nodes: int
    examples: int
    seconds: float  # wall time of the run, setup included
    train_seconds: float  # the replicas' training loops, to the last applied push
    examples_per_second: float  # examples / train_seconds
    final_train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    out_dir: str | None
    dead_nodes: list[str] = field(default_factory=list)  # declared dead during the run
    restarts: list[dict[str, Any]] = field(default_factory=list)  # replicas started again
    events: list[dict[str, Any]] = field(default_factory=list)  # node dead/rejoined, restarts


def train(
    config: RunConfig,
    hosts: list[Address] | None = None,
    out_dir: str | Path | None = None,
    secret: bytes | None = None,
    progress: Callable[[Progress], None] | None = None,
    resume: str | Path | None = None,
) -> Summary:
    """Run ``config`` on a cluster; blocks until the run ends.

    Args:
        config: the run.
        hosts: running nodes (default: ``config.cluster.hosts``, or an
            embedded local cluster when there are none).
        out_dir: where ``model.npz``, ``metrics.csv`` and ``summary.json``
            go (and checkpoints, unless ``checkpoint.dir`` says otherwise);
            None writes nothing.
        secret: the cluster's secret for ``hosts`` (default: from
            ``cluster.secret_file`` or ``$DBNODE_SECRET``).
        progress: called with a :class:`Progress` at every poll.
        resume: an earlier run's output directory: continue from its newest
            checkpoint.

    Returns:
        The run's :class:`Summary`.

    Raises:
        ConfigError: the config, data or initial model is unusable.
        DBNodeError: the run failed (a node refused or stayed unreachable,
            a replica failed too often, a shard was lost without a
            checkpoint, ...).
    """
    inputs = prepare(config)
    if resume is not None:
        inputs.resume = find_resume(config, resume)
    if config.checkpoint.interval and not (config.checkpoint.dir or out_dir):
        raise ConfigError(
            "checkpoint.dir", "", "checkpoints need a directory: set it or give --out"
        )
    hosts = list(hosts or [_address(h) for h in config.cluster.hosts])
    if hosts:
        if secret is None:
            secret = load_secret(config.cluster.secret_file or None)
        return trio.run(_run, config, hosts, secret, inputs, out_dir, progress)
    with LocalCluster(config.cluster.nodes or None) as cluster:
        return trio.run(
            _run,
            config,
            cluster.addresses,
            cluster.secret_file.read_bytes(),
            inputs,
            out_dir,
            progress,
        )


def _address(text: str) -> Address:
    return parse_address(text, key="cluster.hosts")


@dataclass
class _Replica:
    """One replica as the driver tracks it, across restarts."""

    index: int
    rows: slice  # its data shard: rows of the training set
    hosts: list[Address]  # the node of each partition
    uids: list[int]  # each partition's id on its node
    incarnation: int = 0
    start_step: int = 0  # where the current incarnation began
    base_examples: int = 0  # examples trained by earlier incarnations
    last: control.PartitionReport | None = None  # the last status of its last partition
    done: bool = False

    @property
    def n_examples(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def examples(self) -> int:
        return self.base_examples + (self.last.examples if self.last else 0)


class _Run:
    """The state of one run as the driver sees it."""

    def __init__(self, config: RunConfig, hosts: list[Address], peers: Peers, inputs: Inputs):
        self.config, self.hosts, self.peers = config, hosts, peers
        self.spec = config.spec()
        n_replicas = len(inputs.shards)
        self.partitions = config.model.partitions
        placement = place(len(hosts), config.cluster.parameter_shards, n_replicas, self.partitions)
        self.bounds = split_layers(self.spec.layers, self.partitions)
        self.plan = plan_shards(
            blocks(self.spec, self.bounds),
            config.cluster.parameter_shards,
            self.spec.np_dtype.itemsize,
        )
        self.shard_hosts = [hosts[h] for h in placement.shards]
        self.client = ParameterClient(self.plan, self.shard_hosts, peers)
        self._uids = iter(range(1, 2**32))
        self.replicas = [
            _Replica(r, rows, [hosts[h] for h in placement.partitions[r]], [])
            for r, rows in enumerate(inputs.shards)
        ]
        self.health = FailureDetector(hosts, 3 * config.cluster.heartbeat, self.event)
        self.checkpoint_dir: Path | None = None
        self.checkpoints_written = 0
        self.restarts: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # what happened to nodes and replicas, when

    @property
    def dead(self) -> set[Address]:
        return self.health.dead

    @property
    def ever_dead(self) -> list[str]:
        return self.health.ever_dead

    def event(self, what: str, **details) -> None:
        self.events.append({"time": round(time.time(), 3), "event": what, **details})

    def current_uids(self) -> set[int]:
        return {uid for r in self.replicas for uid in r.uids}

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
            DBNodeError: the node is gone or stopped answering (the message
                names it); RemoteError when it refused the request.
        """
        try:
            ch = await self.peers.get(host)
            return await control.call(ch, request, timeout=timeout)
        except (OSError, TransportError) as exc:
            raise DBNodeError(
                f"node {format_address(host)} is unreachable or stopped answering "
                f"({request.op}): {exc}"
            ) from None

    def job(self, replica: _Replica, index: int) -> control.PartitionJob:
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
            min_split_bytes=DEFAULT_MIN_SPLIT_BYTES,
            bounds=tuple(self.bounds),
            prev=neighbour(index - 1) if index > 0 else None,
            next=neighbour(index + 1) if index < self.partitions - 1 else None,
            start_step=replica.start_step,
            incarnation=replica.incarnation,
        )

    async def launch(self, replica: _Replica, inputs: Inputs, run: bool) -> None:
        """Create a replica's partitions on their nodes and give them its data."""
        replica.uids = [next(self._uids) for _ in range(self.partitions)]
        for p in range(self.partitions):
            await self.control(replica.hosts[p], self.job(replica, p))
        rows = replica.rows
        x = np.ascontiguousarray(inputs.x[rows], dtype=self.spec.np_dtype)
        await self.control(replica.hosts[0], control.Data(uid=replica.uids[0], role="x", array=x))
        y = np.ascontiguousarray(inputs.y[rows])
        await self.control(replica.hosts[-1], control.Data(uid=replica.uids[-1], role="y", array=y))
        if run:
            for host in dict.fromkeys(replica.hosts):
                uids = tuple(u for h, u in zip(replica.hosts, replica.uids) if h == host)
                await self.control(host, control.Run(uids=uids))

    async def restart(self, replica: _Replica, inputs: Inputs, reason: str) -> None:
        """Start a failed replica again on live nodes, from the step its
        last partition had reached: the other replicas never stop."""
        if replica.incarnation >= MAX_RESTARTS:
            raise DBNodeError(
                f"replica {replica.index} failed {replica.incarnation + 1} times; last: {reason}"
            )
        live = [h for h in self.hosts if h not in self.dead]
        if not live:
            raise DBNodeError(f"no node left to restart replica {replica.index} on ({reason})")
        for host, uid in zip(replica.hosts, replica.uids):
            if host not in self.dead:
                try:  # its surviving partitions wait for peers that are gone
                    await self.control(host, control.Stop(uids=(uid,)), timeout=5.0)
                except DBNodeError:
                    self.dead.add(host)
        load = {h: 0 for h in live}
        for other in self.replicas:
            if other is not replica and not other.done:
                for h in other.hosts:
                    if h in load:
                        load[h] += 1
        hosts = []
        for _ in range(self.partitions):
            host = min(live, key=lambda h: (load[h], live.index(h)))
            hosts.append(host)
            load[host] += 1
        if replica.last is not None:
            replica.base_examples += replica.last.examples
            replica.start_step = replica.last.step
        log.warning(
            "replica %d failed (%s); restarting it at step %d on %s",
            replica.index,
            reason,
            replica.start_step,
            ", ".join(format_address(h) for h in hosts),
        )
        self.restarts.append(
            {"replica": replica.index, "at_step": replica.start_step, "reason": reason}
        )
        self.event(
            "replica restarted",
            replica=replica.index,
            at_step=replica.start_step,
            on=[format_address(h) for h in hosts],
        )
        replica.hosts, replica.incarnation, replica.last = hosts, replica.incarnation + 1, None
        await self.launch(replica, inputs, run=True)

    async def checkpoint(self) -> None:
        """Export every plan shard's pieces and write them as one checkpoint."""
        snapshots = {}
        for i, host in enumerate(self.shard_hosts):
            keys = [piece.key for piece in self.plan.on_shard(i)]
            if not keys:
                continue
            try:
                ch = await self.peers.get(host)
                exported = await control.call(ch, control.Export(keys=tuple(keys)), timeout=60.0)
            except (OSError, TransportError) as exc:  # the poll will name the dead node
                log.warning("checkpoint skipped: node %s: %s", format_address(host), exc)
                return
            snapshots[i] = exported.data.tobytes()
        self.checkpoints_written += 1
        steps = {r.index: (r.last.step if r.last else r.start_step) for r in self.replicas}
        written = checkpoint.write(
            self.checkpoint_dir,
            self.checkpoints_written,
            snapshots,
            run_identity(self.config),
            steps,
            self.config.checkpoint.keep,
        )
        self.event("checkpoint", number=written.number)

    async def recover_shards(self) -> None:
        """Put the pieces of parameter shards whose node died back on live
        nodes, from the newest checkpoint. What the shards had learned since
        that checkpoint is lost; the events say how old it was."""
        lost = [i for i, host in enumerate(self.shard_hosts) if host in self.dead]
        newest = checkpoint.newest(self.checkpoint_dir) if self.checkpoint_dir else None
        dead_names = ", ".join(sorted({format_address(self.shard_hosts[i]) for i in lost}))
        if newest is None:
            raise DBNodeError(
                f"node {dead_names} died holding parameter shards and there is no "
                "checkpoint to restore them from (set checkpoint.interval)"
            )
        live = [h for h in self.hosts if h not in self.dead]
        if not live:
            raise DBNodeError(
                f"node {dead_names} died holding parameter shards, and no node is left"
            )
        for i in lost:
            target = min(live, key=lambda h: (self.shard_hosts.count(h), live.index(h)))
            data = np.frombuffer(newest.read_shard(i), np.uint8)
            await self.control(target, control.Import(data=data))
            self.shard_hosts[i] = target
        self.client.shards = list(self.shard_hosts)
        age = round(time.time() - newest.time, 3)
        log.warning(
            "parameter shards %s restored from checkpoint %d (%.1f s old)", lost, newest.number, age
        )
        self.event("shards restored", shards=lost, checkpoint=newest.number, seconds_lost=age)

    async def poll(self) -> dict[str, control.PartitionReport]:
        """One heartbeat round: the current partitions' statuses, by uid."""

        async def status(host: Address, timeout: float) -> dict[str, control.PartitionReport]:
            return (await self.control(host, control.Status(), timeout=timeout)).partitions

        async def stop(host: Address, uids: list[int], timeout: float) -> None:
            await self.control(host, control.Stop(uids=tuple(uids)), timeout=timeout)

        return await self.health.poll(status, stop, self.current_uids())

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


async def _run(
    config: RunConfig, hosts: list[Address], secret: bytes, inputs: Inputs, out_dir, progress
) -> Summary:
    try:
        return await _run_in_nursery(config, hosts, secret, inputs, out_dir, progress)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def _run_in_nursery(
    config: RunConfig, hosts: list[Address], secret: bytes, inputs: Inputs, out_dir, progress
) -> Summary:
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, secret, name="driver")
        run = _Run(config, hosts, peers, inputs)
        if config.checkpoint.interval:
            run.checkpoint_dir = Path(config.checkpoint.dir or Path(out_dir) / "checkpoints")
        try:
            summary = await _drive(run, inputs, out_dir, progress, start)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for host in hosts:
                    if host in run.dead:
                        continue
                    try:
                        await run.control(host, control.Reset(force=True), timeout=2.0)
                    except Exception:  # best effort: the node may be gone
                        pass
                await peers.aclose()
        nursery.cancel_scope.cancel()
    return summary


async def _drive(run: _Run, inputs: Inputs, out_dir, progress, start) -> Summary:
    config = run.config
    for host in run.hosts:
        await run.control(host, control.Info())
    for host in run.hosts:
        await run.control(host, control.Reset(force=True))
    if inputs.resume is None:
        await run.client.init(run.pack(inputs.params), config.optimizer.to_wire())
    else:
        # The shards as they were checkpointed, placed on this run's nodes;
        # each replica goes on from the step it had reached.
        for i, host in enumerate(run.shard_hosts):
            if run.plan.on_shard(i):
                data = np.frombuffer(inputs.resume.read_shard(i), np.uint8)
                await run.control(host, control.Import(data=data))
        for replica in run.replicas:
            replica.start_step = inputs.resume.replica_steps.get(replica.index, 0)
            replica.base_examples = min(
                replica.start_step * config.train.batch_size,
                replica.n_examples * config.train.epochs,
            )
        run.event("resumed", checkpoint=str(inputs.resume.path))
    for replica in run.replicas:
        await run.launch(replica, inputs, run=False)
    for host in run.hosts:
        await run.control(host, control.Run())

    total = config.train.epochs * len(inputs.x)
    metrics: list[dict[str, Any]] = []
    last_loss = None
    next_eval = time.monotonic() + config.train.eval_interval
    every = config.checkpoint.interval
    next_checkpoint = time.monotonic() + every
    while True:
        await trio.sleep(min(0.2, config.cluster.heartbeat))
        statuses = await run.poll()
        if set(run.shard_hosts) & run.dead:
            await run.recover_shards()
        window_sum = window_count = 0.0
        for replica in run.replicas:
            if replica.done:
                continue
            mine = [statuses.get(str(uid)) for uid in replica.uids]
            failure = next(
                (f"node {format_address(h)} is dead" for h in replica.hosts if h in run.dead), None
            )
            failure = failure or next((s.error for s in mine if s and s.error), None)
            if failure:
                await run.restart(replica, inputs, failure)
                continue
            if mine[-1] is not None:
                replica.last = mine[-1]
                window_sum += mine[-1].loss_sum
                window_count += mine[-1].loss_count
            replica.done = all(s is not None and s.done for s in mine)
        if window_count:
            last_loss = window_sum / window_count
        examples = sum(r.examples for r in run.replicas)
        finished = all(r.done for r in run.replicas)
        now = time.monotonic()
        if every and now >= next_checkpoint and not finished:
            await run.checkpoint()
            next_checkpoint = now + every
        test = None
        if inputs.x_test is not None and (now >= next_eval or finished):
            test = evaluate(run.spec, await run.model(), inputs.x_test, inputs.y_test)
            next_eval = now + config.train.eval_interval
        if test is not None or finished:
            metrics.append(
                {
                    "seconds": round(now - start, 3),
                    "examples": examples,
                    "train_loss": last_loss,
                    "test_loss": test and test["loss"],
                    "test_accuracy": test and test.get("accuracy"),
                }
            )
        if progress:
            progress(
                Progress(
                    now - start,
                    examples,
                    total,
                    last_loss,
                    sum(r.done for r in run.replicas),
                    len(run.replicas),
                    [r.last.step / max(1, r.last.steps) if r.last else 0.0 for r in run.replicas],
                    test,
                )
            )
        if finished:
            train_seconds = max(r.last.seconds for r in run.replicas)
            break

    seconds = time.monotonic() - start
    final = await run.model()
    test = (
        evaluate(run.spec, final, inputs.x_test, inputs.y_test)
        if inputs.x_test is not None
        else None
    )
    summary = Summary(
        config=config.to_dict(),
        replicas=len(run.replicas),
        partitions=run.partitions,
        nodes=len(run.hosts),
        examples=total,
        seconds=round(seconds, 3),
        train_seconds=round(train_seconds, 4),
        examples_per_second=round(total / train_seconds, 1),
        final_train_loss=last_loss,
        test_loss=test and test["loss"],
        test_accuracy=test and test.get("accuracy"),
        out_dir=str(out_dir) if out_dir else None,
        dead_nodes=run.ever_dead,
        restarts=run.restarts,
        events=run.events,
    )
    if out_dir is not None:
        write_outputs(Path(out_dir), final, metrics, summary)
    return summary


def write_outputs(out: Path, params, metrics: list[dict], summary: Summary) -> None:
    """Write a run's ``model.npz``, ``metrics.csv`` and ``summary.json``.

    Args:
        out: the output directory (created if need be).
        params: the final model, name -> array.
        metrics: one row per evaluation: seconds, examples, losses, accuracy.
        summary: the run's summary.

    Raises:
        OSError: a file could not be written.
    """
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "model.npz", params)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, ["seconds", "examples", "train_loss", "test_loss", "test_accuracy"]
        )
        writer.writeheader()
        writer.writerows(metrics)
    (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")
