"""What `dbnode train` shows while it runs: the live line on a real
terminal (tmux), and the lines it logs elsewhere."""

import io
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dbnode.cli.progress import ProgressPrinter, duration, summary_text
from dbnode.driver import Progress

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def report(seconds, examples, test=None, events=(), done=0):
    return Progress(seconds, examples, 30_000, 0.25, done, 2, [examples / 30_000] * 2, test,
                    epochs=3, events=list(events))  # fmt: skip


def test_the_live_line_shows_epoch_rate_eta_and_keeps_the_held_out_figure(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = Terminal()
    show = ProgressPrinter(out)
    show(report(1.0, 1000))
    show(report(2.0, 3000, test={"loss": 0.5, "accuracy": 0.9}))
    show(report(3.0, 5000))  # no new evaluation: the last one stays on the line
    last = out.getvalue().split("\r")[-1]
    assert "epoch 0.50/3" in last and "2,000/s" in last and "ETA 0:12" in last
    assert "test loss 0.5000 acc 0.900" in last and "\n" not in out.getvalue()
    show.close()
    assert out.getvalue().endswith("\n")


def test_the_live_line_never_reaches_the_last_column(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = Terminal()
    ProgressPrinter(out)(report(1.0, 1000, test={"loss": 0.5, "r2": 0.8, "rmse": 0.3}))
    line = out.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert len(line) == 59


def test_off_a_terminal_a_line_per_interval_and_events_in_run_time():
    out = io.StringIO()
    show = ProgressPrinter(out, log_interval=10)
    dead = {"time": 1e9, "seconds": 4.25, "event": "node dead", "node": "10.0.0.5:7070"}
    for t in range(0, 25):
        show(report(float(t), 1000 * t, events=[dead] if t == 4 else []))
    show(report(25.0, 30_000, done=2))
    lines = out.getvalue().splitlines()
    assert "    4.2s  node dead  node=10.0.0.5:7070" in lines
    progress = [line for line in lines if "epoch" in line]
    assert [line.split("s")[0].strip() for line in progress] == ["0.0", "10.0", "20.0", "25.0"]


def test_on_a_terminal_routine_events_are_counted_and_the_others_shown(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    events = [{"seconds": 8.0, "event": "backup leased", "replica": 0, "of": 9},
              {"seconds": 8.1, "event": "backup leased", "replica": 2, "of": 3},
              {"seconds": 9.0, "event": "node dead", "node": "10.0.0.5:7070"},
              {"seconds": 9.9, "event": "replica parked", "replica": 1}]  # fmt: skip
    live = Terminal()
    show = ProgressPrinter(live)
    show(report(10.0, 10_000, events=events))
    assert "node dead  node=10.0.0.5:7070" in live.getvalue()
    assert "backup" not in live.getvalue() and "parked" not in live.getvalue()
    show.close()
    assert live.getvalue().endswith(
        "events: backup leased ×2, replica parked ×1 (each in summary.json)\n"
    )
    logged = io.StringIO()  # off a terminal, a log: every event on its own line
    show = ProgressPrinter(logged)
    show(report(10.0, 10_000, events=events))
    show.close()
    assert [line.split()[1] for line in logged.getvalue().splitlines()[:4]] == [
        "backup", "backup", "node", "replica"]  # fmt: skip
    assert "events:" not in logged.getvalue()


def test_the_summary_on_a_terminal_is_a_few_lines_that_name_what_went_wrong():
    summary = {"run_name": "digits-1", "examples": 43_000, "seconds": 12.34,
               "train_seconds": 12.284, "examples_per_second": 3_500.4, "replicas": 4, "nodes": 1,
               "test": {"loss": 0.1, "accuracy": 0.97}, "stopped": None, "best": None,
               "pushes": {"applied": 1_344, "duplicates": 0, "acknowledged": 1_344},
               "staleness": {"mean": 1.25, "max": 6, "histogram": {}},
               "dead_nodes": [], "restarts": [], "diverged": [], "lost_updates": 0,
               "warnings": [], "out_dir": "runs/digits-1"}  # fmt: skip
    calm = summary_text(summary).splitlines()
    assert calm == [
        "trained 43,000 examples in 12.3 s (3,500/s), 4 replicas on 1 node",
        "  held out: test loss 0.1000 acc 0.970",
        "  pushes: 1,344 applied; staleness mean 1.25, max 6",
        "  outputs: runs/digits-1 (summary.json has every figure; --json prints it)",
    ]
    hit = summary | {"dead_nodes": ["a:1"], "restarts": [{}, {}], "lost_updates": 12,
                     "warnings": ["node a:1 asks for 4 threads"],
                     "best": {"metric": "test_loss", "value": 0.08, "epoch": 7.0},
                     "stopped": "early stopping: test_loss did not improve"}  # fmt: skip
    # A resumed run: its total holds the earlier runs' examples, its rate
    # only its own; and with no push that said its version, no staleness.
    resumed = summary | {"examples": 86_000, "staleness": {"mean": None, "max": None}}
    assert summary_text(resumed).splitlines()[0] == (
        "trained to 86,000 examples, 42,999 of them in this run's 12.3 s (3,500/s), "
        "4 replicas on 1 node"
    )
    assert "staleness" not in summary_text(resumed)
    text = summary_text(hit)
    assert "  trouble: dead nodes 1, replica restarts 2, updates lost 12" in text
    assert "  warning: node a:1 asks for 4 threads" in text
    assert "  best: test_loss 0.08 at epoch 7 (the model written)" in text
    assert "  stopped: early stopping: test_loss did not improve" in text


def test_jsonl_lines_and_quiet():
    out = io.StringIO()
    show = ProgressPrinter(out, log_interval=1, log_format="jsonl")
    show(report(1.0, 1000, test={"loss": 0.5, "accuracy": 0.9}))
    record = json.loads(out.getvalue())
    assert record["examples"] == 1000 and record["test"]["accuracy"] == 0.9
    quiet = io.StringIO()
    ProgressPrinter(quiet, quiet=True)(report(1.0, 1000))
    assert quiet.getvalue() == ""
    assert duration(75) == "1:15" and duration(4000) == "1:06:40"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_on_an_80_column_terminal_the_run_keeps_one_updating_line(tmp_path):
    """The old line wrapped at 80 columns and left a line behind at each refresh."""
    server = f"dbnode-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", server]
    command = (f"{sys.executable} -m dbnode.cli train {ROOT / 'examples' / 'digits.toml'} "
               f"--set train.epochs=60 --out {tmp_path / 'run'}; sleep 60")  # fmt: skip
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "30", command], check=True)
    try:
        screens = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "run" / "summary.json").exists():
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                    text=True).stdout  # fmt: skip
            screens.append([line for line in screen.splitlines() if line.strip()])
            time.sleep(0.2)
        live = [s for s in screens if any("epoch" in line for line in s)]
        assert len(live) >= 3, screens[-3:]
        for lines in live:
            assert len([line for line in lines if "epoch" in line]) == 1, lines
            assert all(len(line) <= 80 for line in lines), lines
        # Then a few lines of summary, not the JSON (that is for pipes and --json).
        while time.monotonic() < deadline + 10 and "outputs:" not in screen:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True,
                                    text=True).stdout  # fmt: skip
            time.sleep(0.2)
        assert "held out: test loss" in screen and '"examples"' not in screen, screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
