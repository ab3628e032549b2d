"""Placement that knows traffic: a pure cost model of a run on its nodes.

A Downpour step moves bytes between processes — each partition's gradients
to the shards that own its parameters every ``n_push`` steps, their values
back every ``n_fetch`` steps, activations and deltas between neighbouring
partitions every step — and computes on each node with that node's threads.
:func:`plan_run` places a run's roles so that both are small:

1. **Partitions** go, replica by replica, to the node whose compute per
   thread is lowest after taking them, never two partitions of one replica
   on a node while another node holds none of it (a layer-split replica is
   split to use several machines). Equal nodes thus get equal shares, and
   a node with twice the threads takes twice the work.
2. **Shards** go, largest first, to the node whose partitions exchange the
   most bytes with them: a parameter shard lives beside the partitions that
   use it, so a lone replica fetches and pushes inside its own process.
   When several nodes use a shard equally, the one holding the fewest shard
   bytes takes it, which spreads the shards of equal replicas.

The result, a :class:`RunPlan`, carries the placement and what it predicts:
bytes per step over each link (a step of every replica), and floating-point
operations per step on each node. Nothing here does I/O; the same inputs
always give the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .placement import Placement, ShardPlan

__all__ = ["NodeShape", "RunPlan", "Workload", "plan_run"]


@dataclass(frozen=True)
class NodeShape:
    """What the plan needs to know of a node.

    Attributes:
        threads: its compute threads.
        machine: its machine (nodes with one machine share its cores and
            its memory bus; links between them never leave it).
        name: how the plan's description names it.
    """

    threads: int = 1
    machine: str = ""
    name: str = ""


@dataclass(frozen=True)
class Workload:
    """One step of one replica, in bytes and operations.

    Attributes:
        replicas: model replicas.
        flops: floating-point operations of each partition's step.
        boundary: bytes of the activations partition ``k`` sends to ``k + 1``
            (the deltas coming back are as large).
        shard_use: ``shard_use[s][k]``: bytes of partition ``k``'s
            parameters that shard ``s`` owns.
        n_fetch, n_push: steps between fetches, between pushes.
        wire: the bytes that travel per byte computed, for fetched values,
            pushed gradients and activations (1: as computed; 0.5: a 16-bit
            codec for float32).
    """

    replicas: int
    flops: tuple[float, ...]
    boundary: tuple[int, ...]
    shard_use: tuple[tuple[int, ...], ...]
    n_fetch: int = 1
    n_push: int = 1
    wire: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def of(
        cls,
        layers: tuple[int, ...],
        bounds: tuple[tuple[int, int], ...],
        plan: ShardPlan,
        *,
        replicas: int,
        batch: int,
        n_fetch: int = 1,
        n_push: int = 1,
        wire: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> Workload:
        """The workload of a dense network.

        Args:
            layers: the layer sizes, input first.
            bounds: each partition's layers ``(first, last)``, in order.
            plan: the shard plan of the partitions' parameter blocks (tensors
                ``"block0"``, ``"block1"``, ... as :func:`dbnode.blocks.blocks`
                names them).
            replicas: model replicas.
            batch: examples per step.
            n_fetch, n_push: steps between fetches, between pushes.
            wire: as the attribute.

        Returns:
            The workload.
        """
        weights = [layers[i] * layers[i + 1] for i in range(len(layers) - 1)]
        # A dense layer's step: 2 operations per weight and example forward,
        # 4 backward (the delta and the gradient).
        flops = tuple(6.0 * batch * sum(weights[a:b]) for a, b in bounds)
        boundary = tuple(batch * layers[b] * plan.itemsize for _, b in bounds[:-1])
        use = [[0] * len(bounds) for _ in range(plan.n_shards)]
        for piece in plan.slices:
            use[piece.shard][int(piece.tensor.removeprefix("block"))] += piece.nbytes
        return cls(
            replicas,
            flops,
            boundary,
            tuple(map(tuple, use)),
            max(1, n_fetch),
            max(1, n_push),
            wire,
        )

    @property
    def partitions(self) -> int:
        """Partitions per replica."""
        return len(self.flops)


@dataclass(frozen=True)
class RunPlan:
    """A placement and what it costs per step (a step of every replica).

    Attributes:
        placement: which node runs which shard and partition.
        nodes: the nodes, in placement order.
        links: ``(source, destination)`` node indices -> bytes sent per
            step; only pairs of distinct nodes that exchange anything.
        flops: floating-point operations per step on each node.
    """

    placement: Placement
    nodes: tuple[NodeShape, ...]
    links: dict[tuple[int, int], float]
    flops: tuple[float, ...]

    @property
    def bytes_per_step(self) -> float:
        """Bytes between processes per step, over every link."""
        return sum(self.links.values())

    def describe(self) -> str:
        """The plan as ``dbnode train --plan`` prints it.

        Returns:
            Several lines: each node with its threads and roles, each link,
            and the total bytes per step.
        """
        names = [n.name or f"node {i}" for i, n in enumerate(self.nodes)]
        lines = []
        for i, node in enumerate(self.nodes):
            roles = self.placement.on_host(i)
            parts = ", ".join(f"r{r}.p{p}" for r, p in roles["partitions"]) or "-"
            shards = ", ".join(str(s) for s in roles["shards"]) or "-"
            lines.append(
                f"{names[i]}: {node.threads} thread(s); partitions {parts}; shards {shards}; "
                f"{self.flops[i] / 1e6:,.1f} MFLOP per step"
            )
        for (a, b), nbytes in sorted(self.links.items()):
            lines.append(f"link {names[a]} -> {names[b]}: {nbytes / 1e6:,.3f} MB per step")
        lines.append(
            f"between processes: {self.bytes_per_step / 1e6:,.3f} MB per step "
            "(one step of every replica)"
        )
        return "\n".join(lines)


def plan_run(nodes: list[NodeShape], work: Workload) -> RunPlan:
    """Place a run's shards and partitions on ``nodes`` (see the module's
    docstring for the rules).

    Args:
        nodes: the nodes (at least one).
        work: what one step of a replica computes and moves.

    Returns:
        The plan.

    Raises:
        ConfigError: no nodes, or a node with fewer than one thread.
    """
    if not nodes:
        raise ConfigError("cluster.hosts", [], "a run needs at least one node")
    for node in nodes:
        if node.threads < 1:
            raise ConfigError("threads", node.threads, "a node needs at least one thread")
    n = len(nodes)
    flops = [0.0] * n

    def cost(i: int, extra: float) -> tuple[float, int]:
        return ((flops[i] + extra) / nodes[i].threads, i)

    partitions = []
    for _ in range(work.replicas):
        hosts: list[int] = []
        for f in work.flops:
            fresh = [i for i in range(n) if i not in hosts] or list(range(n))
            best = min(fresh, key=lambda i: cost(i, f))
            flops[best] += f
            hosts.append(best)
        partitions.append(tuple(hosts))

    fetch, push, activations = work.wire
    per_step = (fetch / work.n_fetch, push / work.n_push)
    held = [0] * n
    shard_host = [0] * len(work.shard_use)
    by_size = sorted(range(len(work.shard_use)), key=lambda s: (-sum(work.shard_use[s]), s))
    for s in by_size:
        use = [0.0] * n
        for hosts in partitions:
            for k, i in enumerate(hosts):
                use[i] += work.shard_use[s][k]
        best = min(range(n), key=lambda i: (-use[i], held[i], i))
        shard_host[s] = best
        held[best] += sum(work.shard_use[s])

    links: dict[tuple[int, int], float] = {}

    def send(a: int, b: int, nbytes: float) -> None:
        if a != b and nbytes:
            links[(a, b)] = links.get((a, b), 0.0) + nbytes

    for hosts in partitions:
        for k, i in enumerate(hosts):
            for s, owner in enumerate(shard_host):
                send(i, owner, work.shard_use[s][k] * per_step[1])  # gradients
                send(owner, i, work.shard_use[s][k] * per_step[0])  # values
            if k + 1 < len(hosts):
                send(i, hosts[k + 1], work.boundary[k] * activations)
                send(hosts[k + 1], i, work.boundary[k] * activations)  # deltas
    placement = Placement(n, tuple(shard_host), tuple(partitions))
    return RunPlan(placement, tuple(nodes), links, tuple(flops))
