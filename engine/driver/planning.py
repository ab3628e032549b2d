"""Where a run's roles go, and what the placement predicts: the one place
the driver turns a config and its nodes into a :class:`~dbnode.traffic.RunPlan`,
for a run (:class:`~dbnode.driver.state.RunState`) and for
``dbnode train --plan``, which prints it without training."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import trio

from .. import control
from ..blocks import blocks
from ..codecs import wire_ratio
from ..config import RunConfig, format_address
from ..errors import DBNodeError, TransportError
from ..placement import DEFAULT_MIN_SPLIT_BYTES, ShardPlan, plan_shards, split_layers
from ..threads import machine_id
from ..traffic import NodeShape, RunPlan, Workload, plan_run
from ..wire import Address, Peers
from .cluster import embedded_nodes, embedded_threads
from .inputs import load_data

__all__ = [
    "Layout",
    "distinct_nodes",
    "embedded_shapes",
    "layout",
    "node_shapes",
    "oversubscribed",
    "plan",
]

log = logging.getLogger("dbnode.driver")


@dataclass(frozen=True)
class Layout:
    """A run's layout.

    Attributes:
        bounds: each partition's layers ``(first, last)``.
        shards: which parameter shard owns which rows of which block.
        plan: which node runs which shard and partition, and its costs.
        min_split_bytes: what the shard plan was made with (a partition
            makes the same plan from it).
    """

    bounds: tuple[tuple[int, int], ...]
    shards: ShardPlan
    plan: RunPlan
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES


def layout(config: RunConfig, replicas: int, nodes: list[NodeShape]) -> Layout:
    """Cut the model into partitions and shards, and place them on ``nodes``.

    Args:
        config: the run config.
        replicas: model replicas.
        nodes: the run's nodes, in order.

    Returns:
        The layout.

    Raises:
        ConfigError: more partitions than layers, no nodes, ...
    """
    spec = config.spec()
    bounds = split_layers(spec.layers, config.model.partitions)
    parts = blocks(spec, bounds)
    n_shards, min_split = config.cluster.parameter_shards, DEFAULT_MIN_SPLIT_BYTES
    if n_shards == 0:
        # One shard per partition, none split: each partition's parameters
        # whole on one shard, which the placement puts beside it. A lone
        # layer-split replica then fetches and pushes inside each node's own
        # process, and each node's shard work follows its own compute.
        n_shards = len(bounds)
        min_split = sum(math.prod(shape) for shape in parts.values()) * spec.np_dtype.itemsize
    shards = plan_shards(parts, n_shards, spec.np_dtype.itemsize, min_split_bytes=min_split)
    work = Workload.of(
        spec.layers,
        bounds,
        shards,
        replicas=replicas,
        batch=config.train.batch_size,
        n_fetch=config.train.n_fetch,
        n_push=config.train.n_push,
        wire=tuple(
            wire_ratio(codec, spec.np_dtype.itemsize)
            for codec in (config.wire.fetch, config.wire.push, config.wire.activations)
        ),
    )
    return Layout(bounds, shards, plan_run(nodes, work), min_split)


def node_shapes(nodes: dict[Address, control.InfoReply]) -> list[NodeShape]:
    """What the placement needs to know of each node, from its ``info``.

    Args:
        nodes: address -> the node's info.

    Returns:
        One shape per node, in order, named by address.
    """
    return [
        NodeShape(threads=_threads(info), machine=info.machine, name=format_address(address))
        for address, info in nodes.items()
    ]


def embedded_shapes(config: RunConfig, replicas: int) -> list[NodeShape]:
    """The nodes the embedded cluster starts for a run of ``config``.

    Args:
        config: the run config.
        replicas: the run's replicas.

    Returns:
        One shape per node, named ``local-0``, ``local-1``, ... as they are.
    """
    n = config.cluster.nodes or embedded_nodes(replicas * config.model.partitions)
    return [
        NodeShape(threads=t, machine=machine_id(), name=f"local-{i}")
        for i, t in enumerate(embedded_threads(n))
    ]


def plan(
    config: RunConfig, hosts: list[Address] | None = None, secret: bytes | None = None
) -> RunPlan:
    """The placement a run of ``config`` would get, without training.

    Args:
        config: the run config.
        hosts: running nodes (asked who they are); None: the embedded cluster
            the run would start.
        secret: the cluster's secret (needed with ``hosts``).

    Returns:
        The plan.

    Raises:
        DBNodeError: a node is unreachable.
        ConfigError: the config cannot be placed.
    """
    n_examples = 0
    if config.train.examples_per_replica and not config.train.replicas:
        n_examples = len(load_data(config)[0])  # the replicas follow from the data's size
    replicas = config.replicas_for(n_examples)
    if not hosts:
        return layout(config, replicas, embedded_shapes(config, replicas)).plan

    async def ask() -> dict[Address, control.InfoReply]:
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, secret or b"", name="driver")
            try:
                return await distinct_nodes(peers, hosts)
            finally:
                await peers.aclose()

    nodes = trio.run(ask)
    return layout(config, replicas, node_shapes(nodes)).plan


async def distinct_nodes(peers: Peers, hosts: list[Address]) -> dict[Address, control.InfoReply]:
    """``hosts`` with each node once, and what each says it is.

    One node may be named by several addresses (``A,A`` or
    ``127.0.0.1:P,localhost:P``); its id tells, and it is used once.

    Args:
        peers: where channels come from.
        hosts: the nodes' addresses.

    Returns:
        Address -> the node's ``info``, in the order of ``hosts``.

    Raises:
        DBNodeError: a node is unreachable.
    """
    seen: dict[str, tuple[Address, control.InfoReply]] = {}
    for host in hosts:
        try:
            ch = await peers.get(host)
            info = await control.call(ch, control.Info(), timeout=30.0)
        except (OSError, TransportError) as exc:
            raise DBNodeError(f"node {format_address(host)} is unreachable: {exc}") from None
        if info.node_id in seen:
            log.warning(
                "%s is the node %s again: used once",
                format_address(host),
                format_address(seen[info.node_id][0]),
            )
            continue
        seen[info.node_id] = (host, info)
    return dict(seen.values())


def oversubscribed(nodes: dict[Address, control.InfoReply]) -> list[str]:
    """Warnings for machines whose nodes run more compute threads than it has
    cores (they would take turns on the cores, several times slower).

    Args:
        nodes: address -> the node's info.

    Returns:
        One warning per such machine.
    """
    machines: dict[str, list[tuple[Address, control.InfoReply]]] = {}
    for address, info in nodes.items():
        if info.machine:  # a node too old to say which machine it is on: unknown
            machines.setdefault(info.machine, []).append((address, info))
    out = []
    for members in machines.values():
        threads = sum(_threads(info) for _, info in members)
        cores = max(info.cores or 1 for _, info in members)
        if threads > cores:
            names = ", ".join(format_address(a) for a, _ in members)
            out.append(
                f"nodes {names} share one machine and run {threads} compute threads on its "
                f"{cores} cores: start each with `dbnode serve --threads N`, N its share"
            )
    return out


def _threads(info: control.InfoReply) -> int:
    """A node's compute threads (a node too old to report them: its cores)."""
    return info.threads or info.cores or 1
