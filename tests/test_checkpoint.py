"""Driver checkpoints: atomic, verified, pruned; a crash mid-write loses nothing older."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dbnode.driver import checkpoint

WRITER = """
import sys
import numpy as np
from pathlib import Path
from dbnode.driver import checkpoint

directory, trial = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(trial)
while True:
    shards = {i: rng.bytes(300_000) for i in range(3)}
    written = checkpoint.write(directory, shards, "cfg", {0: trial}, keep=3, run_id="r")
    print(written.number, flush=True)
"""


def test_kill_9_during_checkpoint_writes_always_leaves_a_verified_newest(tmp_path):
    rng = np.random.default_rng(0)
    last_seen = 0
    for trial in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(trial + 1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = int(proc.stdout.readline())  # at least one checkpoint is complete
        time.sleep(float(rng.uniform(0, 0.05)))  # then die at a random point of a write
        proc.kill()
        proc.wait()
        proc.stdout.close()
        newest = checkpoint.newest(tmp_path)
        assert newest is not None and newest.number >= first > last_seen
        for i in range(3):
            assert len(newest.read_shard(i)) == 300_000  # verifies the checksum too
        assert newest.replica_steps == {0: trial + 1} and newest.run_id == "r"
        last_seen = newest.number
        assert len(checkpoint.complete(tmp_path)) <= 4  # keep=3, plus one mid-prune at most
        assert len(list(tmp_path.glob("*.tmp"))) <= 1  # only the write that was killed


def test_checkpoints_are_pruned_and_corrupt_ones_skipped(tmp_path):
    for n in range(1, 6):
        written = checkpoint.write(
            tmp_path, {0: bytes([n]) * 10, 2: b"x" * n}, "h", {0: n, 1: 2 * n}, keep=3, run_id="r"
        )
        assert written.number == n
    kept = checkpoint.complete(tmp_path)
    assert [c.number for c in kept] == [3, 4, 5]
    assert kept[-1].replica_steps == {0: 5, 1: 10} and kept[-1].config_hash == "h"
    (tmp_path / "ckpt-000005" / "shard2.npz").write_bytes(b"y" * 5)  # same size, other bytes
    assert checkpoint.newest(tmp_path).number == 4
    (tmp_path / "ckpt-000006.tmp").mkdir()  # a write that died
    assert checkpoint.newest(tmp_path).number == 4
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load(tmp_path / "ckpt-000005")
    (tmp_path / "ckpt-000004" / "manifest.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match="manifest"):
        checkpoint.load(tmp_path / "ckpt-000004")
    assert checkpoint.newest(tmp_path).number == 3
    assert checkpoint.newest(tmp_path / "absent") is None


def test_numbers_never_repeat_and_each_run_sees_its_own(tmp_path):
    first = checkpoint.write(tmp_path, {0: b"a"}, "h", {}, keep=1, run_id="one")
    second = checkpoint.write(tmp_path, {0: b"b"}, "h", {}, keep=1, run_id="two")
    third = checkpoint.write(tmp_path, {0: b"c"}, "h", {}, keep=1, run_id="one")
    assert (first.number, second.number, third.number) == (1, 2, 3)
    assert [c.number for c in checkpoint.complete(tmp_path)] == [2, 3]  # one keeps 1 of its own
    assert checkpoint.newest(tmp_path, runs={"two"}).read_shard(0) == b"b"
    assert checkpoint.newest(tmp_path, runs={"three"}) is None


def test_a_tampered_manifest_does_not_verify(tmp_path):
    written = checkpoint.write(tmp_path, {0: b"a"}, "h", {0: 5}, keep=1, run_id="r")
    manifest = written.path / "manifest.json"
    text = json.loads(manifest.read_text())
    text["replica_steps"]["0"] = 6  # a consistent edit: every file still checks out
    manifest.write_text(json.dumps(text))
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json: its checksum"):
        checkpoint.load(written.path)


def test_a_failed_write_leaves_nothing_and_the_next_one_works(tmp_path, monkeypatch):
    real = checkpoint.write_synced
    calls = []

    def disk_full(path, write):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(checkpoint, "write_synced", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.write(tmp_path, {0: b"a", 1: b"b"}, "h", {}, keep=2, run_id="r")
    assert list(tmp_path.iterdir()) == []
    assert checkpoint.write(tmp_path, {0: b"a", 1: b"b"}, "h", {}, keep=2, run_id="r").number == 1


def test_config_hash_is_stable_and_sensitive():
    a = {"model": {"layers": [2, 2, 1]}, "train": {"seed": 1}}
    b = json.loads(json.dumps(a))
    assert checkpoint.config_hash(a) == checkpoint.config_hash(b)
    b["train"]["seed"] = 2
    assert checkpoint.config_hash(a) != checkpoint.config_hash(b)


def test_a_checkpoint_from_before_runs_had_ids_still_loads(tmp_path):
    written = checkpoint.write(tmp_path, {0: b"a"}, "h", {0: 5}, keep=1, run_id="r")
    manifest = written.path / "manifest.json"
    text = json.loads(manifest.read_text())
    del text["run_id"], text["checksum"]
    manifest.write_text(json.dumps(text))
    old = checkpoint.load(written.path)
    assert (old.run_id, old.replica_steps) == ("", {0: 5})
