"""Leased portions and backups (dbnode.driver.leases): where a copy of a
replica's schedule starts and ends, and a real run on three nodes whose
one replica is slowed down by SIGSTOP/SIGCONT cycles of its node: the
others take over its later portions, and every step of every schedule is
still applied exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_cluster import DBNODE, EXAMPLES, embedded_node, node_with, wait_until_gone

from dbnode.config import ConfigError, RunConfig
from dbnode.control import pusher_name
from dbnode.driver.leases import AUTO_PORTIONS, backup_range, first_unapplied, portion_steps


@given(st.integers(0, 500), st.integers(1, 200), st.integers(1, 8))
def test_portions_are_whole_push_periods(configured, per_epoch, n_push):
    steps = portion_steps(configured, per_epoch, n_push)
    assert steps % n_push == 0 and steps >= max(1, configured)
    if configured == 0:
        assert steps < -(-per_epoch // AUTO_PORTIONS) + n_push


@given(
    st.integers(0, 4),
    st.integers(0, 60),
    st.integers(0, 60),
    st.dictionaries(st.integers(0, 30), st.integers(0, 80), max_size=8),
)
def test_first_unapplied_is_the_first_step_no_push_covers(portion, start, length, applied):
    """Against a brute force: a step is applied when its portion's pusher
    has a last seq at or past it (pushes come in order within a portion)."""
    end = start + length
    pusher = partial(pusher_name, 3, 1, portion)
    last_seq = {pusher(q * max(portion, 1)): s for q, s in applied.items()}
    if not portion:  # one name: the first entry's
        last_seq = {pusher(0): applied[min(applied)]} if applied else {}

    def done(step):
        return last_seq.get(pusher(step), -1) >= step

    expected = next((s for s in range(start, end) if not done(s)), end)
    assert first_unapplied(last_seq, pusher, start, end, portion) == expected


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 40), st.floats(0, 1))
def test_a_backup_takes_the_later_portions_from_a_boundary(step, length, portion, keep):
    end = step + length
    cut = backup_range(step, end, portion, keep)
    boundaries = [b for b in range(step + 1, end) if b % portion == 0]
    if not boundaries:
        assert cut is None
        return
    begin, stop = cut
    assert stop == end and begin in boundaries
    # Where the copy keeps `keep` of what is left, within a portion.
    assert abs(begin - (step + keep * (end - step))) <= portion


def test_portion_and_backup_keys_are_checked():
    base = {"model": {"layers": [2, 2, 1]}, "data": {"train": "xor"}}
    with pytest.raises(ConfigError, match="train.portion_steps"):
        RunConfig.from_dict({**base, "train": {"portion_steps": -1}})
    with pytest.raises(ConfigError, match="train.backups.*true or false"):
        RunConfig.from_dict({**base, "train": {"backups": 1}})


# Three nodes on their own, one replica each, the parameter shard on one of
# them: the slowed node holds a replica and nothing else.
SETS = ["--set", "cluster.nodes=3", "--set", "cluster.parameter_shards=1",
        "--set", "model.partitions=1", "--set", "train.replicas=3",
        "--set", "train.pipeline=1", "--set", "train.epochs=60"]  # fmt: skip


def _train(out, slow: bool, *extra: str) -> dict:
    sets = [*SETS, *extra]
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), *sets, "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim, nodes = embedded_node(proc, node_with("partitions", EXAMPLES / "digits.toml", sets))

    def cycle():  # running a fifth of the time: 5x slower
        while proc.poll() is None:
            try:
                os.kill(victim, signal.SIGSTOP)
                time.sleep(0.08)
                os.kill(victim, signal.SIGCONT)
                time.sleep(0.02)
            except ProcessLookupError:
                return

    if slow:
        threading.Thread(target=cycle, daemon=True).start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    wait_until_gone(nodes)
    return json.loads((out / "summary.json").read_text())


def test_a_slowed_replica_is_backed_up_and_every_step_is_applied_once(tmp_path):
    pytest.importorskip("sklearn")
    calm = _train(tmp_path / "calm", False, "--set", "train.backups=false")
    hit = _train(tmp_path / "hit", True)
    leased = [e for e in hit["events"] if e["event"] == "backup leased"]
    assert leased, hit["events"]
    assert any(e["event"] == "replica done by backups" for e in hit["events"]), hit["events"]
    # Whichever copy pushed a step first had it applied: as many piece
    # updates as an undisturbed run without backups, every example counted once.
    assert hit["pushes"]["applied"] == calm["pushes"]["applied"]
    assert hit["examples"] == calm["examples"]
    assert not hit["restarts"] and not hit["diverged"]
    assert hit["test_accuracy"] >= calm["test_accuracy"] - 0.03


def test_a_checkpoint_from_before_portions_still_resumes(tmp_path):
    """Keys added to [train] since a checkpoint was written (its identity
    lacks them) match at their defaults; backups may change on resume;
    portion_steps may not (pushes are named after their portion)."""
    from dbnode.driver import checkpoint
    from dbnode.driver.inputs import find_resume, identity_hash, run_identity

    config = RunConfig.from_dict({"model": {"layers": [2, 2, 1]}, "data": {"train": "xor"}})
    old = run_identity(config)
    for key in ("portion_steps", "max_replicas", "backups"):
        old["train"].pop(key, None)
    checkpoint.write(tmp_path, {0: b"x"}, identity_hash(config), {0: 3}, 2, "old", old)
    assert find_resume(config, tmp_path).replica_steps == {0: 3}
    no_backups = RunConfig.from_dict(
        {"model": {"layers": [2, 2, 1]}, "data": {"train": "xor"}, "train": {"backups": False}}
    )
    find_resume(no_backups, tmp_path)
    other = RunConfig.from_dict(
        {"model": {"layers": [2, 2, 1]}, "data": {"train": "xor"}, "train": {"portion_steps": 8}}
    )
    with pytest.raises(ConfigError, match="train.portion_steps"):
        find_resume(other, tmp_path)
