"""What a run leaves behind, tried as a user would: real `dbnode train` runs
on the embedded cluster, then `dbnode eval`, `dbnode predict` and
`dbnode.load` on what they wrote."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dbnode
from dbnode import RunConfig, StopTraining
from dbnode.driver.run import poll_period
from dbnode.errors import ConfigError
from dbnode.model import read_description

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DBNODE = [sys.executable, "-m", "dbnode.cli"]
# A short XOR run that converges: 4 replicas of 3 000 examples, with four
# hidden units rather than the example's two (with two, about one such run in
# eight sticks at XOR's local minimum, 0.72-0.77 held out, as the replicas'
# pushes happen to interleave).
SHORT = ["--set", 'data.train="xor:12000"', "--set", "train.examples_per_replica=3000",
         "--set", "model.layers=[2, 4, 1]"]  # fmt: skip


def run_cli(*args, timeout=300):
    return subprocess.run([*DBNODE, *args], capture_output=True, text=True, timeout=timeout)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_without_out_keeps_its_outputs_in_a_new_runs_directory():
    first = run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    [run] = Path("runs").iterdir()
    assert run.name.startswith("xor-") and f"writing to {run}" in first.stderr
    assert {p.name for p in run.iterdir()} >= {"model.npz", "metrics.csv", "summary.json"}
    second = run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(list(Path("runs").iterdir())) == 2  # never the same directory twice


def test_an_out_that_holds_files_or_cannot_be_made_is_refused_before_anything_starts(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    out = run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT, "--out", str(taken), timeout=60)
    assert (
        out.returncode == 2 and "already holds files" in out.stderr and "--overwrite" in out.stderr
    )
    assert "Traceback" not in out.stderr and "examples/s" not in out.stderr
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "below"):
        out = run_cli("train", str(EXAMPLES / "xor.toml"), "--out", str(bad), timeout=60)
        assert out.returncode == 2 and "--out" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    # --overwrite replaces a run's outputs and nothing else.
    run = run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT, "--out", str(taken), "--overwrite")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (taken / "notes.txt").read_text() == "mine" and (taken / "model.npz").is_file()


def test_metrics_are_a_curve_with_a_row_per_epoch_flushed_as_the_run_goes(tmp_path):
    """100 short epochs and an interval longer than the run: rows come at
    the epochs' ends (those shorter than the driver's 0.2 s poll share one;
    the last row is the final model's), written while the run still trains."""
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), "--set", "train.epochs=100",
         "--set", "train.eval_interval=1000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    seen_early = []
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.csv").is_file() and not (out / "summary.json").exists():
            seen_early = rows(out / "metrics.csv")
            if len(seen_early) >= 2:
                break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen_early) >= 2  # rows were on disk before the end
    curve = rows(out / "metrics.csv")
    assert list(curve[0]) == ["epoch", "examples", "seconds", "train_loss", "train_accuracy",
                              "test_loss", "test_accuracy"]  # fmt: skip
    epochs = [float(r["epoch"]) for r in curve]
    assert epochs[-1] == 100.0 and len(curve) >= 10
    assert all(b > a for a, b in zip(epochs, epochs[1:]))
    assert all(float(r["seconds"]) >= 0 and r["test_accuracy"] for r in curve), curve
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["test"]["accuracy"] >= 0.95
    assert len(summary["history"]) == len(curve)


def regression_csv(path: Path, n: int = 600, seed: int = 0) -> None:
    """y = 2 x0 - x1 + 3: every target above 0.5, as the old accuracy rule
    would have scored at 100%."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 2))
    y = 2 * x[:, 0] - x[:, 1] + 3
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header="a,b,y", comments="")


def test_a_regression_run_reports_regression_figures_and_predicts_values(tmp_path):
    regression_csv(tmp_path / "line.csv")
    out = tmp_path / "run"
    config = tmp_path / "line.toml"
    config.write_text(
        '[model]\nlayers = [2, 8, 1]\nactivation = "tanh"\noutput = "linear"\ninit = "xavier"\n'
        '[data]\ntrain = "line.csv"\n[train]\nepochs = 30\nbatch_size = 8\n'
        "[optimizer]\nlearning_rate = 0.05\n"
    )
    run = run_cli("train", str(config), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["test_accuracy"] is None
    assert set(summary["test"]) == {"loss", "mse", "rmse", "mae", "r2"}
    assert summary["test"]["r2"] > 0.95, summary["test"]
    assert (
        "test_r2" in rows(out / "metrics.csv")[0]
        and "test_accuracy" not in rows(out / "metrics.csv")[0]
    )
    # The held-out split is 10% by default, and eval scores that same split.
    assert len(np.loadtxt(tmp_path / "line.csv", delimiter=",", skiprows=1)) == 600
    scored = run_cli("eval", str(out))
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["examples"] == 60 and report["r2"] == pytest.approx(summary["test"]["r2"])
    # predict takes inputs alone (two columns) and writes a value per row.
    np.savetxt(tmp_path / "new.csv", [[0.5, 0.0], [0.0, 0.5]], delimiter=",")
    predicted = run_cli("predict", str(out / "model.npz"), "--data", str(tmp_path / "new.csv"))
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert lines[0] == "prediction"
    np.testing.assert_allclose([float(v) for v in lines[1:]], [4.0, 2.5], atol=0.3)
    model = dbnode.load(out)
    assert model.score(*_line(200)) > 0.95
    with pytest.raises(ValueError, match="regression"):
        model.predict_proba([[0.0, 0.0]])


def _line(n):
    x = np.random.default_rng(5).uniform(-1, 1, (n, 2))
    return x, 2 * x[:, 0] - x[:, 1] + 3


def test_a_saved_model_stands_alone_and_predicts_classes_and_probabilities(tmp_path):
    out = tmp_path / "run"
    run = run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    alone = tmp_path / "elsewhere" / "xor-model.npz"
    alone.parent.mkdir()
    alone.write_bytes((out / "model.npz").read_bytes())  # no summary.json beside it
    written = tmp_path / "preds.csv"
    predicted = run_cli("predict", str(alone), "--data", "xor:8", "--out", str(written))
    assert predicted.returncode == 0, predicted.stderr
    table = rows(written)
    assert list(table[0]) == ["prediction", "p0", "p1"] and len(table) == 8
    for row in table:
        p0, p1 = float(row["p0"]), float(row["p1"])
        assert p0 + p1 == pytest.approx(1.0) and row["prediction"] == str(int(p1 > 0.5))
    scored = run_cli("eval", str(alone), "--data", "xor:500")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["accuracy"] == 1.0 and [c["class"] for c in report["per_class"]] == [0, 1]
    model = dbnode.load(alone)
    assert list(model.predict([[0, 0], [0, 1], [1, 0], [1, 1]])) == [0, 1, 1, 0]
    # The file names no host and no secret file of the cluster it came from.
    assert "cluster" not in read_description(alone)["config"]


def test_eval_and_predict_refuse_what_does_not_fit_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", str(EXAMPLES / "xor.toml"), *SHORT, "--out", str(out)).returncode == 0
    np.savetxt(tmp_path / "three.csv", np.zeros((4, 4)), delimiter=",")  # 3 features, a label
    np.savez(tmp_path / "weights.npz", **{"layer0.weight": np.zeros((3, 3))})
    for args, message in [
        (("eval", str(out), "--data", "blobs:20"), "8 features, the model takes 2"),
        (("predict", str(out), "--data", str(tmp_path / "three.csv")), "features"),
        (("eval", str(tmp_path / "nothing")), "no such file or run directory"),
        (("eval", str(tmp_path / "weights.npz")), "holds weights only"),
        (("eval", str(tmp_path)), "without model.npz"),
    ]:
        done = run_cli(*args, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_sigterm_keeps_the_model_and_the_curve_so_far(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "xor.toml"), "--set", "train.epochs=50",
         "--set", "train.eval_interval=0.5", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(rows_if(out / "metrics.csv")) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    curve = rows(out / "metrics.csv")
    assert summary["interrupted"] == "SIGTERM" and len(curve) >= 3  # two, then the final one
    assert int(curve[-1]["examples"]) == summary["examples"]
    assert dbnode.load(out).predict([[0, 1]]).shape == (1,)


def rows_if(path: Path) -> list[dict[str, str]]:
    return rows(path) if path.is_file() else []


def test_the_driver_looks_at_a_run_as_often_as_it_asks_for_evaluations():
    """Every 0.2 s, or sooner when evaluations (or heartbeats) are asked
    for more often: ``train.eval_interval = 0.1`` means ten rows a second,
    not five."""
    assert poll_period(RunConfig.load(EXAMPLES / "xor.toml")) == 0.2
    often = RunConfig.load(EXAMPLES / "xor.toml", ["train.eval_interval=0.1"])
    assert poll_period(often) == 0.1
    beating = RunConfig.load(EXAMPLES / "xor.toml", ["cluster.heartbeat=0.05"])
    assert poll_period(beating) == 0.05


def test_a_callback_that_raises_stop_training_ends_the_run_and_keeps_everything(tmp_path):
    config = RunConfig.load(EXAMPLES / "xor.toml", ["train.epochs=50", "train.eval_interval=0.3"])
    seen = []

    def progress(p):
        seen.append(p)
        if p.test is not None:
            raise StopTraining("good enough")

    summary = dbnode.train(config, out_dir=tmp_path / "run", progress=progress)
    assert summary.stopped == "good enough" and summary.interrupted is None
    assert 0 < summary.examples < 50 * 50_000
    assert (tmp_path / "run" / "model.npz").is_file()
    assert summary.history and summary.history[-1]["examples"] == summary.examples
    assert seen[-1].epochs == 50


def test_the_python_api_refuses_a_used_directory_unless_told(tmp_path):
    config = RunConfig.load(EXAMPLES / "xor.toml", SHORT[1::2])
    (tmp_path / "keep.txt").write_text("")
    with pytest.raises(ConfigError, match="already holds files"):
        dbnode.train(config, out_dir=tmp_path)
    summary = dbnode.train(config, out_dir=tmp_path, overwrite=True)
    assert summary.out_dir == str(tmp_path) and (tmp_path / "keep.txt").exists()
    assert os.path.exists(tmp_path / "summary.json")


def test_early_stopping_ends_a_run_that_stopped_improving_and_keeps_its_best_model(tmp_path):
    """XOR's held-out accuracy reaches 1.0 within a few epochs and cannot
    improve on it: with patience 3 of 30 epochs the run ends early, and the
    model kept is the first one that scored 1.0."""
    config = RunConfig.load(EXAMPLES / "xor.toml", [*SHORT[1::2], "train.epochs=30",
                            "train.eval_interval=1000",
                            'train.early_stopping={patience = 3, metric = "test_accuracy"}'])  # fmt: skip
    summary = dbnode.train(config, out_dir=tmp_path / "run")
    assert summary.stopped.startswith("early stopping: test_accuracy has not improved for")
    assert summary.examples < 30 * 12_000
    best = summary.best
    assert best["metric"] == "test_accuracy" and best["value"] == 1.0
    first = next(r for r in summary.history if r["test_accuracy"] == 1.0)
    assert best["epoch"] == first["epoch"] and summary.history[-1]["epoch"] - best["epoch"] >= 3
    kept = dbnode.load(tmp_path / "run")
    assert summary.test["accuracy"] == 1.0 and kept.score(*XOR_SET) == 1.0
    with pytest.raises(ConfigError, match="train.early_stopping.metric.*test_accuracy"):
        dbnode.train(RunConfig.load(EXAMPLES / "xor.toml", [
            'train.early_stopping={patience = 3, metric = "test_r2"}']))  # fmt: skip


XOR_SET = ([[0, 0], [0, 1], [1, 0], [1, 1]], [0, 1, 1, 0])


def test_resume_goes_on_in_the_same_directory_with_more_epochs_and_names_what_differs(tmp_path):
    pytest.importorskip("sklearn")
    run, digits = tmp_path / "run", str(EXAMPLES / "digits.toml")
    common = ["--set", "checkpoint.interval=60", "--set", "train.epochs=10", "-q"]
    first = run_cli("train", digits, *common, "--out", str(run))
    assert first.returncode == 0, first.stderr[-3000:]
    before = rows(run / "metrics.csv")
    # More epochs: the run goes on from its final checkpoint, in place.
    more = run_cli("train", digits, *common, "--set", "train.epochs=20", "--resume", str(run))
    assert more.returncode == 0, more.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    after = rows(run / "metrics.csv")
    assert after[: len(before)] == before and len(after) > len(before)  # the curve goes on
    assert float(after[-1]["epoch"]) == 20.0 and summary["examples"] == 20 * 1438
    assert int(after[-1]["examples"]) == summary["examples"]
    seconds = [float(r["seconds"]) for r in after]
    assert seconds == sorted(seconds)
    assert [e["event"] for e in summary["events"]][0] == "resumed"
    assert summary["test_accuracy"] >= 0.9
    # A change that is not a longer schedule is refused, naming the key and both values.
    other = run_cli("train", digits, *common, "--set", "train.batch_size=8", "--resume", str(run),
                    timeout=60)  # fmt: skip
    assert other.returncode == 2
    assert "train.batch_size=8: differs from the checkpoint's (16" in other.stderr


def test_plot_draws_one_run_or_several_and_refuses_what_it_cannot_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from dbnode.driver.outputs import MetricsLog, metric_columns

    for name, rate in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        log = MetricsLog(tmp_path / name / "metrics.csv", metric_columns("classification"))
        for k in range(1, 6):
            log.append({"epoch": k, "examples": 100 * k, "seconds": k / rate,
                        "train_loss": 1 / k, "test_loss": 1.2 / k, "test_accuracy": 1 - 0.5 / k})  # fmt: skip
        log.close()
    one = run_cli("plot", str(tmp_path / "a"), timeout=120)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == str(tmp_path / "a" / "run.png")
    both = tmp_path / "both.png"
    two = run_cli("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(both))
    assert two.returncode == 0, two.stderr
    for png in (tmp_path / "a" / "run.png", both):
        head = png.read_bytes()
        assert head.startswith(b"\x89PNG") and len(head) > 20_000
    bad = run_cli("plot", str(tmp_path / "a"), "--metric", "test_r2", timeout=120)
    assert bad.returncode == 2 and "test_r2" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("plot", str(tmp_path / "none"), timeout=120)
    assert missing.returncode == 2 and "no readable metrics.csv" in missing.stderr


def test_reduce_on_plateau_lowers_the_shards_learning_rate(tmp_path):
    pytest.importorskip("sklearn")
    from dbnode.driver import checkpoint
    from dbnode.ps import ParameterShard

    config = RunConfig.load(EXAMPLES / "digits.toml", [
        "train.epochs=40", "train.eval_interval=1000", "checkpoint.interval=600",
        "optimizer.learning_rate=1e-9",  # the model stands still: every evaluation is a plateau
        'schedule.name="plateau"', "schedule.patience=1", "schedule.factor=0.5",
        'schedule.metric="test_accuracy"'])  # fmt: skip
    summary = dbnode.train(config, out_dir=tmp_path / "run")
    lowered = [e for e in summary.events if e["event"] == "learning rate lowered"]
    assert lowered and [e["scale"] for e in lowered] == [0.5**k for k in range(1, len(lowered) + 1)]
    final = checkpoint.newest(tmp_path / "run" / "checkpoints")
    scales = {t["scale"] for i in range(2)
              for t in ParameterShard.from_bytes(final.read_shard(i)).stats()["tensors"]}  # fmt: skip
    assert scales == {lowered[-1]["scale"]}  # every piece on every shard node got it
    with pytest.raises(ConfigError, match="schedule.metric"):
        dbnode.train(RunConfig.load(EXAMPLES / "digits.toml", [
            'schedule.name="plateau"', 'schedule.metric="test_r2"']))  # fmt: skip


def test_a_sigmoid_with_log_loss_trains_and_is_a_classifier(tmp_path):
    config = RunConfig.load(
        EXAMPLES / "xor.toml",
        [*SHORT[1::2], 'model.loss="cross_entropy"'],
    )
    summary = dbnode.train(config, out_dir=tmp_path / "run")
    assert summary.task == "classification" and summary.test["accuracy"] == 1.0
    bad = RunConfig.load(EXAMPLES / "xor.toml", ['model.loss="cross_entropy"',
                                                 'data.train="blobs:30"', "model.layers=[8, 2, 1]"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"targets in \[0, 1\]"):
        dbnode.train(bad)


def test_ctrl_c_at_a_terminal_reaches_the_driver_alone_and_the_outputs_are_kept(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: the
    embedded nodes must not die with it before the driver has the model."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "xor.toml"), "--set", "train.epochs=50",
         "--set", "train.eval_interval=0.5", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(rows_if(out / "metrics.csv")) < 1:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert (out / "model.npz").is_file() and (out / "summary.json").is_file(), err[-3000:]
    assert json.loads((out / "summary.json").read_text())["interrupted"] == "SIGINT"


def test_resuming_a_cosine_run_with_more_epochs_goes_on_learning(tmp_path):
    pytest.importorskip("sklearn")
    run, digits = tmp_path / "run", str(EXAMPLES / "digits.toml")
    common = ["--set", "checkpoint.interval=60", "--set", 'schedule.name="cosine"', "-q"]
    first = run_cli("train", digits, *common, "--set", "train.epochs=4", "--out", str(run))
    assert first.returncode == 0, first.stderr[-3000:]
    before = dbnode.load(run).params
    more = run_cli("train", digits, *common, "--set", "train.epochs=8", "--resume", str(run))
    assert more.returncode == 0, more.stderr[-3000:]
    after = dbnode.load(run).params
    # The shards took the longer schedule: the rate is not stuck at cosine's end (0).
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_a_model_of_one_feature_predicts_from_a_flat_array():
    config = RunConfig.from_dict({"model": {"layers": [1, 3, 1], "output": "linear"}})
    model = dbnode.TrainedModel(config, dbnode.init_params(config.spec()), "regression")
    assert model.predict(np.linspace(-1, 1, 7)).shape == (7,)
    wide = RunConfig.from_dict({"model": {"layers": [3, 2]}})
    one = dbnode.TrainedModel(wide, dbnode.init_params(wide.spec()), "classification")
    assert one.predict([0.1, 0.2, 0.3]).shape == (1,)  # one example


def test_a_dump_fits_in_a_control_reply():
    from dbnode.dump import MAX_DUMP, dump_text

    text = dump_text()
    assert "== thread MainThread" in text and len(text) <= MAX_DUMP + 20
    assert len(json.dumps(text)) < 64 * 1024
