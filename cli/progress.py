"""How ``dbnode train`` shows a run going: one line that updates in place
on a terminal, a line every ``--log-interval`` seconds elsewhere (plain
text or JSON lines), and the run's events as they happen."""

from __future__ import annotations

import json
import shutil
from collections import Counter, deque

#: One replica's progress in one character, from none to done.
BARS = " ▁▂▃▄▅▆▇█"

# The current rate is measured over this many seconds of reports.
RATE_WINDOW = 5.0

#: A healthy run's load balancing and checkpoints: on a live terminal they are
#: counted (one line when the run ends) rather than a line each, which buried
#: the events worth reading (a 25-replica XOR run made ~35 of them in 9 s).
#: Logs off a terminal and summary.json keep every one.
ROUTINE = frozenset({"backup leased", "replica parked", "replica done by backups", "checkpoint"})


def duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``4000`` -> ``1:06:40``: what an ETA reads like."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def held_out(test: dict[str, float]) -> str:
    """The held-out figures worth a glance: loss, and accuracy or R²."""
    text = f"test loss {test['loss']:.4f}"
    if "accuracy" in test:
        text += f" acc {test['accuracy']:.3f}"
    elif "r2" in test:
        text += f" r2 {test['r2']:.3f} rmse {test['rmse']:.4g}"
    return text


def event_text(event: dict) -> str:
    """One event, in run time: ``12.3s  node dead  node=...``."""
    details = "  ".join(f"{k}={v}" for k, v in event.items()
                        if k not in ("time", "seconds", "event"))  # fmt: skip
    return f"{event.get('seconds', 0.0):7.1f}s  {event['event']}" + (
        f"  {details}" if details else ""
    )


class ProgressPrinter:
    """Called with each :class:`dbnode.driver.Progress`; writes to ``stream``.

    Args:
        stream: where to write (standard error).
        log_interval: seconds between lines off a terminal.
        log_format: ``text`` or ``jsonl`` (one JSON object per line; the
            terminal line then gives way to it too).
        quiet: write nothing but events.
    """

    def __init__(self, stream, log_interval: float = 10.0, log_format: str = "text",
                 quiet: bool = False):  # fmt: skip
        self.stream = stream
        self.live = stream.isatty() and log_format == "text" and not quiet
        self.log_interval = log_interval
        self.jsonl = log_format == "jsonl"
        self.quiet = quiet
        self.last_line = -float("inf")
        self.window: deque[tuple[float, int]] = deque()
        self.test: dict[str, float] | None = None  # the last held-out figures, kept
        self.drawn = False  # a live line is on screen
        self.routine: Counter[str] = Counter()  # ROUTINE events not shown, by kind

    def rates(self, p) -> tuple[float, float]:
        """The mean rate since the start, and the rate of the last few seconds."""
        self.window.append((p.seconds, p.examples))
        while len(self.window) > 2 and p.seconds - self.window[1][0] >= RATE_WINDOW:
            self.window.popleft()
        mean = (p.examples - p.start_examples) / p.seconds if p.seconds > 0 else 0.0
        (t0, e0), (t1, e1) = self.window[0], self.window[-1]
        current = (e1 - e0) / (t1 - t0) if t1 > t0 else mean
        return mean, current

    def line(self, p, mean: float, current: float) -> str:
        """The progress line (untruncated)."""
        per_epoch = p.total_examples / max(1, p.epochs)
        epoch = p.examples / per_epoch if per_epoch else 0.0
        left = p.total_examples - p.examples
        eta = duration(left / current) if current > 0 and left > 0 else "-"
        loss = "-" if p.train_loss is None else f"{p.train_loss:.4f}"
        text = (
            f"{p.seconds:7.1f}s  epoch {epoch:.2f}/{p.epochs}  {current:,.0f}/s "
            f"(mean {mean:,.0f})  ETA {eta}  loss {loss}"
        )
        if self.test:
            text += "  " + held_out(self.test)
        return text + f"  replicas done {p.replicas_done}/{p.replicas}"

    def __call__(self, p) -> None:
        if p.test:
            self.test = p.test
        mean, current = self.rates(p)
        for event in p.events:
            if self.live and event["event"] in ROUTINE:
                self.routine[event["event"]] += 1
            else:
                self._above(event)
        if self.quiet:
            return
        if self.live:
            width = shutil.get_terminal_size((80, 24)).columns
            text = self.line(p, mean, current)
            if p.per_replica:  # one character per replica (up to 64), filling up
                text += "  " + "".join(BARS[min(8, int(f * 8))] for f in p.per_replica[:64])
            # One character short of the width: writing the last column would
            # wrap on some terminals and leave a line behind at every refresh.
            self.stream.write("\r" + text[: width - 1] + "\x1b[K")
            self.stream.flush()
            self.drawn = True
        elif p.seconds - self.last_line >= self.log_interval or p.replicas_done == p.replicas:
            if self.jsonl:
                record = {"seconds": round(p.seconds, 3), "examples": p.examples,
                          "total_examples": p.total_examples,
                          "epoch": round(p.examples / max(1, p.total_examples) * p.epochs, 4),
                          "rate": round(current, 1), "mean_rate": round(mean, 1),
                          "train_loss": p.train_loss, "test": self.test,
                          "replicas_done": p.replicas_done, "replicas": p.replicas}  # fmt: skip
                self.stream.write(json.dumps(record) + "\n")
            else:
                self.stream.write(self.line(p, mean, current) + "\n")
            self.stream.flush()
            self.last_line = p.seconds

    def _above(self, event: dict) -> None:
        """An event on a line of its own, above the live line (which the
        next report redraws)."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        self.stream.write((json.dumps(event) if self.jsonl else event_text(event)) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line, so what follows starts on a line of its own,
        and say how many routine events it did not show."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        if self.routine:
            self.stream.write(f"events: {tally(self.routine)} (each in summary.json)\n")
            self.routine.clear()
        self.stream.flush()


def tally(kinds: Counter[str]) -> str:
    """``backup leased ×13, replica parked ×11``: events counted by kind."""
    return ", ".join(f"{kind} ×{n}" for kind, n in kinds.items())


def summary_text(summary: dict) -> str:
    """A finished run in a few lines, for a terminal: what it trained, how
    well, what went wrong, and where everything else is (summary.json)."""
    n_nodes, examples, rate = summary["nodes"], summary["examples"], summary["examples_per_second"]
    this_run = round(rate * summary["train_seconds"])  # a resumed run's total holds earlier ones
    trained = (
        f"trained {examples:,} examples in {summary['seconds']:.1f} s ({rate:,.0f}/s)"
        if this_run >= 0.99 * examples
        else f"trained to {examples:,} examples, {this_run:,} of them in this run's "
        f"{summary['seconds']:.1f} s ({rate:,.0f}/s)"
    )
    lines = [f"{trained}, {summary['replicas']} replicas on {n_nodes} node{'s' * (n_nodes != 1)}"]
    if summary.get("test"):
        lines.append(f"  held out: {held_out(summary['test'])}")
    if summary.get("stopped"):
        lines.append(f"  stopped: {summary['stopped']}")
    if summary.get("best"):
        best = summary["best"]
        lines.append(f"  best: {best['metric']} {best['value']:.4g} at epoch {best['epoch']:g} "
                     "(the model written)")  # fmt: skip
    pushes = summary.get("pushes") or {}
    if pushes:
        text = f"  pushes: {pushes.get('applied', 0):,} applied"
        if pushes.get("duplicates"):
            text += f", {pushes['duplicates']:,} duplicates dropped"
        staleness = summary.get("staleness") or {}
        if staleness.get("mean") is not None:  # None: no push said its version
            text += f"; staleness mean {staleness['mean']:.2f}, max {staleness['max']}"
        lines.append(text)
    trouble = [
        f"{label} {len(summary[key])}"
        for key, label in (
            ("dead_nodes", "dead nodes"),
            ("restarts", "replica restarts"),
            ("diverged", "replicas diverged"),
        )
        if summary.get(key)
    ]
    if summary.get("lost_updates"):
        trouble.append(f"updates lost {summary['lost_updates']:,}")
    if trouble:
        lines.append("  trouble: " + ", ".join(trouble))
    lines += [f"  warning: {w}" for w in summary.get("warnings") or ()]
    lines.append(
        f"  outputs: {summary['out_dir']} (summary.json has every figure; --json prints it)"
    )
    return "\n".join(lines)
