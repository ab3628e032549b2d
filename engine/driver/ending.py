"""How a run ends: why it stopped (:class:`Ending`), its evaluations'
rows, and the end itself (:func:`finish`): the final model, checkpoint,
summary and outputs, and the verdict on divergence or failure."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from .. import control
from ..aio import first_error
from ..errors import DBNodeError, RunInterrupted, StopTraining
from ..metrics import evaluate
from ..pipeline import depth_of
from .inputs import Inputs
from .outputs import Progress, Summary, write_outputs
from .state import RunState

__all__ = ["Ending", "evaluate_model", "figures_of", "finish", "metrics_row", "reporting"]

log = logging.getLogger("dbnode.driver")

# Weights beyond this size at the end of a run earn a warning: the run did
# not diverge to NaN, but its learning rate is almost surely too high.
HUGE_WEIGHT = 1e6


class Ending:
    """How the run's main loop ended: by itself, by a signal, by a callback's
    StopTraining, or by a failure. The first early end wins; once the loop
    is over (``scope`` None) a signal changes nothing, the outputs are on
    their way."""

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.signal: str | None = None  # SIGINT, SIGTERM, SIGHUP
        self.stopped: str | None = None  # a callback's reason
        self.error: str | None = None  # the failure's message
        self.failure: DBNodeError | None = None  # raised once the outputs are written

    @property
    def early(self) -> bool:
        return bool(self.signal or self.stopped)

    @property
    def why(self) -> str:
        return f"stopped by {self.signal}" if self.signal else f"stopped: {self.stopped}"

    def by_signal(self, signame: str) -> None:
        if self.scope is not None and not self.early:
            self.signal = signame
            self.scope.cancel()

    def by_request(self, reason: str) -> None:
        if self.scope is not None and not self.early:
            self.stopped = reason or "StopTraining"
            self.scope.cancel()


def reporting(progress, ended: Ending):
    """``progress`` with its StopTraining turned into the end of the run."""
    if progress is None:
        return None

    def report(p: Progress) -> None:
        try:
            progress(p)
        except StopTraining as stop:
            ended.by_request(str(stop))

    return report


def pipeline_figures(run: RunState) -> dict[str, Any]:
    """``summary.pipeline``: the replicas' depth and, per partition (over the
    replicas' last incarnations), the fraction of its training loop spent
    waiting for neighbours, and the most weight versions, bytes and lag it
    kept for minibatches in flight (:mod:`dbnode.pipeline`)."""
    depth = depth_of(run.config.train.pipeline, run.partitions)
    partitions = []
    for index in range(run.partitions):
        reports = [r.reports[index] for r in run.replicas if index in r.reports]
        busy = [r for r in reports if r.seconds > 0]
        partitions.append({
            "partition": index,
            "idle": round(sum(r.idle / r.seconds for r in busy) / len(busy), 4) if busy else None,
            "stashed": max((r.stashed for r in reports), default=0),
            "held_bytes": max((r.held_bytes for r in reports), default=0),
            "lag": max((r.lag for r in reports), default=0),
        })  # fmt: skip
    return {"depth": depth, "partitions": partitions}


def metrics_row(
    run: RunState, inputs: Inputs, at: float, examples: int, loss: float | None, figures: dict
) -> dict[str, Any]:
    """One row of ``metrics.csv`` (:func:`~dbnode.driver.outputs.metric_columns`)."""
    return {
        "epoch": round(examples / len(inputs.x), 4),
        "examples": examples,
        "seconds": round(run.history.offset + at, 3),
        "train_loss": loss,
        **figures,
    }


def figures_of(row: dict[str, Any], prefix: str) -> dict[str, float]:
    """A row's figures of one kind (``test_``, ``train_``), without the prefix."""
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}


async def evaluate_model(
    run: RunState, inputs: Inputs, params: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """The current model's figures: ``train_*`` on the training sample
    (loss aside: the replicas report it), ``test_*`` on the held-out set."""
    if params is None:
        params = await run.model()

    def score() -> dict[str, float]:
        from threadpoolctl import threadpool_limits  # slow to import: on first use

        figures = {}
        # One thread: the cores are the nodes'. Pools of the driver's own
        # spinning beside theirs slowed a one-node run tenfold when it
        # evaluated every 0.1 s (OpenMP and BLAS threads wait by spinning).
        with threadpool_limits(1), np.errstate(all="ignore"):  # overflows reported, not warned
            x, y = inputs.sample
            train = evaluate(run.spec, params, x, y, inputs.task)
            figures.update({f"train_{k}": v for k, v in train.items() if k != "loss"})
            if inputs.x_test is not None:
                test = evaluate(run.spec, params, inputs.x_test, inputs.y_test, inputs.task)
                figures.update({f"test_{k}": v for k, v in test.items()})
        return figures

    # In a worker thread: the event loop keeps the heartbeats going meanwhile.
    return await trio.to_thread.run_sync(score)


async def finish(run: RunState, inputs, out_dir, start, train_seconds, ended: Ending) -> Summary:
    """The final model, checkpoint, summary and outputs; the verdict on
    divergence. A failed run keeps what can still be read, then raises."""
    config = run.config
    final: dict[str, np.ndarray] | None = None
    duplicates = 0
    try:
        if not (ended.early or ended.error):
            await run.poll()  # the shards' final versions
        await run.fence()  # a shard node found dead since: read its copy's new home
        final = await run.model()
        duplicates = await run.duplicates()
        if run.checkpoint_dir is not None:
            await run.checkpoint()
    except (DBNodeError, trio.TooSlowError, BaseExceptionGroup) as exc:
        if ended.failure is None and not ended.early:
            raise
        log.warning("the final model could not be read: %s", first_error(exc))
    seconds = time.monotonic() - start
    trained = run.trained_examples()
    figures = await evaluate_model(run, inputs, final) if final is not None else {}
    run.history.append(metrics_row(run, inputs, seconds, trained, run.last_loss, figures))
    if run.stopper.on and final is not None:
        run.stopper.update(run.history.rows[-1], final)
        if run.stopper.best_params is not None:  # the model kept is the best one seen
            final = run.stopper.best_params
            figures = await evaluate_model(run, inputs, final)
    test = figures_of(figures, "test_")
    total = config.train.epochs * len(inputs.x)
    early = ended.early or ended.error is not None
    train_seconds = train_seconds or seconds
    diverged = [
        {"replica": r.index, "reason": r.diverged} for r in run.replicas if r.diverged is not None
    ]
    # Every example of every epoch, unless the run ended early or replicas
    # stopped short of their schedules (diverged): then what was trained.
    examples = min(trained, total) if early or diverged else total
    biggest = max((float(np.max(np.abs(p))) for p in (final or {}).values() if p.size), default=0)
    if biggest > HUGE_WEIGHT:
        run.warn(
            f"the model's largest weight is {biggest:.3g}: the learning rate "
            f"({config.optimizer.learning_rate:g}) is probably too high"
        )
    if diverged and len(diverged) < len(run.replicas):
        run.warn(
            f"{len(diverged)} of {len(run.replicas)} replicas diverged: {diverged[0]['reason']}"
        )
    fenced = sum(f for f, _ in run.counters.values())
    not_finite = sum(n for _, n in run.counters.values())
    links: dict[str, int] = {}
    for replica in run.replicas:
        for link, nbytes in replica.links.items():
            links[link] = links.get(link, 0) + nbytes
    summary = Summary(
        pipeline=pipeline_figures(run),
        staleness=control.StalenessReport.figures(run.staleness.values()),
        config=config.to_dict(),
        replicas=len(run.replicas),
        partitions=run.partitions,
        nodes=len(run.hosts),
        examples=examples,
        seconds=round(seconds, 3),
        train_seconds=round(train_seconds, 4),
        examples_per_second=round((examples - run.start_examples) / train_seconds, 1),
        final_train_loss=run.last_loss,
        task=inputs.task,
        test=test,
        test_loss=test.get("loss"),
        test_accuracy=test.get("accuracy"),
        history=run.history.rows,
        best=run.stopper.summary() if run.stopper.on else None,
        out_dir=str(out_dir) if out_dir else None,
        run_id=run.id,
        run_name=run.name,
        interrupted=ended.signal,
        stopped=ended.stopped,
        error=ended.error,
        dead_nodes=run.health.ever_dead,
        restarts=run.restarts,
        diverged=diverged,
        lost_updates=run.lost_updates,
        pushes={
            "acknowledged": sum(
                r.acknowledged + sum(b.acknowledged for b in r.backups) for r in run.replicas
            ),
            "applied": sum(run.versions.values()) - run.initial_versions,
            "duplicates": duplicates,
        },
        fenced_requests=fenced,
        refused_not_finite=not_finite,
        warnings=run.warnings,
        events=run.events,
        threads={node.name: node.threads for node in run.layout.nodes},
        wire_bytes=sum(links.values()),
        links=dict(sorted(links.items())),
        planned_bytes_per_step=round(run.layout.bytes_per_step),
    )
    if out_dir is not None:
        write_outputs(Path(out_dir), final, summary, config)
    if ended.failure is not None:
        raise ended.failure
    if ended.signal:
        last = run.last_checkpoint.path if run.last_checkpoint else None
        raise RunInterrupted(ended.signal, out_dir, last, summary)
    if diverged and len(diverged) == len(run.replicas):
        raise DBNodeError(
            f"{diverged[0]['reason']}: lower optimizer.learning_rate "
            f"(the last finite model was kept{f' in {out_dir}' if out_dir else ''})"
        )
    return summary
