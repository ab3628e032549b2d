"""A dbnode node: what one ``dbnode serve`` process hosts.

A node serves authenticated connections (:func:`dbnode.wire.serve`) and
composes its services from their handler tables:

- the parameter shards (:class:`~dbnode.ps.service.ShardService`): INIT,
  PULL, PUSH, PUSH_PULL, STATS answered inline; SNAPSHOT; the control ops
  ``restore``, ``export``, ``import``;
- the layer partitions (:class:`~dbnode.partition.PartitionService`):
  FORWARD, BACKWARD into the inbox of the partition the key names; the
  control ops ``start``, ``data``, ``run``, ``stop``;
- the node itself: the runs it holds for its drivers (:mod:`dbnode.runs`)
  and the control ops ``info``, ``open``, ``close``, ``heartbeat``,
  ``status`` and ``remap``. A sweep frees the runs whose lease expired.

A request is dispatched by its MessageKind, a CONTROL one by its
:class:`~dbnode.control.Op`, decoded and checked by its schema
(:mod:`dbnode.control`) before any handler sees it. A handler answers or
raises RequestError; the transport turns anything else into an INTERNAL
ERROR for that request alone: no message, however wrong, ends the node.

Everything runs in one trio event loop; shard requests are synchronous
calls, so pushes are applied one at a time, exactly. Partitions compute in
the loop too (heavy steps in a worker thread, with the BLAS and kernel
threads the process was given: :mod:`dbnode.threads`); the node process is
the unit of parallelism, sized to its share of the host's cores.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio

from . import control
from .config import format_address, parse_address
from .control import Op
from .dump import dump_text
from .errors import ErrorCode, RequestError
from .partition import PartitionService
from .ps.service import ShardService
from .ps.shard import ParameterShard
from .runs import NodeRun, RunTable, default_max_memory
from .threads import available_cores, machine_id
from .wire import DEFER, Address, Frame, MessageKind, Peers, Reply, serve

__all__ = ["READY_PREFIX", "Node", "parse_ready_line", "ready_line", "run_node"]

log = logging.getLogger("dbnode.node")

#: What ``dbnode serve`` prints on stdout once it listens, before the address:
#: the embedded cluster (and any supervisor) waits for this line.
READY_PREFIX = "dbnode serve: listening on "


def ready_line(address: Address) -> str:
    """The line ``dbnode serve`` prints once it listens.

    Args:
        address: where the node listens.

    Returns:
        ``READY_PREFIX`` and ``host:port`` (no newline).
    """
    return READY_PREFIX + format_address(address)


def parse_ready_line(line: str) -> Address | None:
    """The address a :func:`ready_line` announces.

    Args:
        line: a line of a node's standard output.

    Returns:
        ``(host, port)``, or None when ``line`` is not the ready line.

    Raises:
        ConfigError: it is, but its address does not parse.
    """
    if not line.startswith(READY_PREFIX):
        return None
    return parse_address(line[len(READY_PREFIX) :], key="ready line")


class Node:
    """The services of one node process, and the dispatch of requests to them.

    Args:
        secret: the cluster's shared secret (for channels to other nodes).
        nursery: runs the node's background tasks (runs, outgoing channels).
        name: the node's name in logs and in ``info``.
        address: where the node is reachable (set again once it listens).
        snapshot_dir: where SNAPSHOT writes and ``restore`` reads (None:
            refused).
        spin: seconds its channels to other nodes busy-poll before sleeping.
        max_memory: the memory budget of all runs, in bytes (default:
            :func:`~dbnode.runs.default_max_memory`).
        threads: the compute threads the process was given (``info``
            reports them; ``dbnode serve --threads`` sets them).

    Attributes:
        node_id: random, new at every start: what tells two nodes apart
            (one node reached at two addresses has one id).
        runs: the runs the node holds.

    Raises:
        RuntimeError: two services claim the same control op, or an op has
            no handler (a programming error: any test that starts a node
            catches it).
    """

    def __init__(
        self,
        secret: bytes,
        nursery: trio.Nursery,
        name: str = "",
        address: Address = ("127.0.0.1", 0),
        snapshot_dir: str | Path | None = None,
        spin: float = 0.0,
        max_memory: int | None = None,
        threads: int | None = None,
    ):
        self.secret = secret
        self.threads = threads or available_cores()
        self.name = name
        self.address = address
        self.nursery = nursery
        self.node_id = secrets.token_hex(8)
        self.runs = RunTable(max_memory or default_max_memory(), ParameterShard)
        # A channel carries requests both ways: what arrives on the node's
        # own outgoing channels is served like anything else.
        self.peers = Peers(nursery, secret, name=name, handler=self.handle, spin=spin)
        self.shards = ShardService(self.runs, snapshot_dir)
        self.partitions = PartitionService(self.runs, self.peers, address=lambda: self.address)
        self._inline = self.shards.inline
        self._handlers: dict[MessageKind, Callable[[Frame], Awaitable[Reply | None]]] = {
            **self.shards.handlers,
            **self.partitions.handlers,
            MessageKind.CONTROL: self._control,
        }
        self._ops = _compose(
            self.shards.ops,
            self.partitions.ops,
            {
                Op.INFO: self._info,
                Op.OPEN: self._open,
                Op.CLOSE: self._close,
                Op.HEARTBEAT: self._heartbeat,
                Op.STATUS: self._status,
                Op.REMAP: self._remap,
                Op.DUMP: self._dump,
            },
        )

    def handle_inline(self, frame: Frame) -> Reply | None | object:
        """Answer a parameter shard request at once (the transport's inline
        handler: synchronous, in arrival order).

        Args:
            frame: a request.

        Returns:
            The reply, or ``DEFER`` for a request :meth:`handle` answers.

        Raises:
            RequestError: the shard refused the request.
        """
        handler = self._inline.get(frame.kind)
        if handler is None:
            return DEFER
        return handler(frame)

    async def handle(self, frame: Frame) -> Reply | None:
        """Answer one request frame (the transport's handler).

        Args:
            frame: a request.

        Returns:
            The reply, or None for a request that gets none (FORWARD, BACKWARD).

        Raises:
            RequestError: the request is refused; the transport answers it
                with an ERROR of that code.
        """
        reply = self.handle_inline(frame)
        if reply is not DEFER:
            return reply
        handler = self._handlers.get(frame.kind)
        if handler is None:
            raise RequestError(ErrorCode.BAD_REQUEST, f"{frame.kind}: not a request a node serves")
        return await handler(frame)

    async def sweep_leases(self, period: float = 0.25) -> None:
        """Free the runs whose lease expired, every ``period`` seconds, forever."""
        while True:
            self.runs.sweep()
            await trio.sleep(period)

    async def _control(self, frame: Frame) -> Reply:
        request = control.decode_request(frame)
        answer = await self._ops[request.op](request)
        if answer is None:
            return Reply()
        _, meta, array = answer.encode()
        return Reply(array=array, meta=meta)

    async def _dump(self, request: control.Dump) -> control.DumpReply:
        return control.DumpReply(text=dump_text())

    async def _info(self, request: control.Info) -> control.InfoReply:
        return control.InfoReply(
            node_id=self.node_id,
            name=self.name,
            version=version("dbnode"),
            pid=os.getpid(),
            cores=available_cores(),
            threads=self.threads,
            machine=machine_id(),
            address=self.address,
            max_memory=self.runs.max_memory,
            memory=self.runs.memory,
            runs=len(self.runs),
        )

    async def _open(self, request: control.Open) -> control.OpenReply:
        run, created = self.runs.open(request.run, request.name, request.lease, request.epoch)
        if created:
            await self.nursery.start(self._host, run)
        return control.OpenReply(created=created, epoch=run.epoch)

    async def _host(self, run: NodeRun, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the run's partitions compute in, until the run is
        freed (its scope cancelled)."""
        try:
            # The guard outside the scope: what the scope lets through once it
            # has taken its own cancellation out of a group is what is caught.
            with run.scope:
                async with trio.open_nursery() as nursery:
                    run.nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        except Exception:  # partitions catch their own; this is a last guard
            log.exception("run %s (%s) failed", run.id, run.name)
            if self.runs.runs.get(run.id) is run:
                self.runs.close(run.id, "it failed")

    async def _close(self, request: control.Close) -> control.CloseReply:
        run = self.runs.close(request.run)
        if run is None:
            return control.CloseReply(partitions=0, keys=0)
        return control.CloseReply(partitions=len(run.partitions), keys=len(run.shard))

    async def _heartbeat(self, request: control.Heartbeat) -> control.HeartbeatReply:
        run = self.runs.get(request.run)
        run.renew(trio.current_time())
        return control.HeartbeatReply(
            epoch=run.epoch,
            partitions={str(uid): r.status.report() for uid, r in run.partitions.items()},
            versions={str(k): v for k, v in run.shard.versions().items()},
            fenced=run.fenced,
            not_finite=run.not_finite,
            staleness=control.StalenessReport.of(run.shard.staleness),
        )

    async def _status(self, request: control.Status) -> control.StatusReply:
        now = trio.current_time()
        return control.StatusReply(
            runs={
                run.id: control.RunReport(
                    name=run.name,
                    lease_left=round(run.lease_left(now), 3),
                    epoch=run.epoch,
                    partitions={str(uid): r.status.report() for uid, r in run.partitions.items()},
                    keys=len(run.shard),
                    bytes=run.memory,
                    pushes=run.shard.pushes,
                    staleness=control.StalenessReport.of(run.shard.staleness),
                )
                for run in self.runs.runs.values()
            }
        )

    async def _remap(self, request: control.Remap) -> None:
        run = self.runs.get(request.run)
        # Checked before anything changes. An older map (a late retry of a
        # remap) would unfence what a newer one fenced off.
        if request.epoch < run.epoch:
            raise RequestError(
                ErrorCode.STALE_EPOCH,
                f"run {run.id}: remap to epoch {request.epoch}, older than its {run.epoch}",
            )
        for runner in run.partitions.values():
            if len(request.shards) != runner.plan.n_shards:
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    f"run {run.id}: {len(request.shards)} shard addresses for a plan of "
                    f"{runner.plan.n_shards}",
                )
        run.epoch = request.epoch
        for runner in run.partitions.values():
            runner.remap(request.epoch, request.shards)


OpHandler = Callable[[Any], Awaitable[Any]]


def _compose(*tables: dict[Op, OpHandler]) -> dict[Op, OpHandler]:
    """The services' op tables as one: each op served by exactly one."""
    ops: dict[Op, OpHandler] = {}
    for table in tables:
        if twice := set(table) & set(ops):
            raise RuntimeError(f"control ops {sorted(twice)} are served twice")
        ops.update(table)
    if missing := set(control.REQUESTS) - set(ops):
        raise RuntimeError(f"control ops {sorted(missing)} have no handler")
    return ops


async def run_node(
    host: str,
    port: int,
    secret: bytes,
    *,
    name: str = "",
    snapshot_dir: str | Path | None = None,
    spin: float = 0.0,
    max_memory: int | None = None,
    threads: int | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
    **serve_options: Any,
) -> None:
    """Serve a node until cancelled.

    Args:
        host, port: where to listen (port 0 picks one).
        secret: the cluster's shared secret.
        name: the node's name (default ``node-<pid>``).
        snapshot_dir: where SNAPSHOT writes and ``restore`` reads.
        spin: seconds to busy-poll sockets before sleeping, on the server
            side and on the channels to other nodes (the transport's
            latency option).
        max_memory: the memory budget of all runs, in bytes (default: a
            share of the machine's RAM).
        threads: the compute threads the process runs with, as ``info``
            reports them (the caller sizes the pools: see
            :func:`dbnode.threads.limit_threads`).
        task_status: reports the bound ``(host, port)`` once listening.
        serve_options: more options of :func:`dbnode.wire.serve`.

    Raises:
        OSError: the address cannot be listened on.
    """
    async with trio.open_nursery() as nursery:
        node = Node(
            secret,
            nursery,
            name=name or f"node-{os.getpid()}",
            snapshot_dir=snapshot_dir,
            spin=spin,
            max_memory=max_memory,
            threads=threads,
        )
        bound = await nursery.start(
            partial(
                serve,
                node.handle,
                host,
                port,
                secret=secret,
                inline=node.handle_inline,
                name=node.name,
                spin=spin,
                **serve_options,
            )
        )
        node.address = (bound[0], int(bound[1]))
        nursery.start_soon(node.sweep_leases)
        task_status.started(node.address)
