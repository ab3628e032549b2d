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
number = trial * 1000
while True:
    number += 1
    shards = {i: rng.bytes(300_000) for i in range(3)}
    checkpoint.write(directory, number, shards, "cfg", {0: number}, keep=3)
    print(number, flush=True)
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
        assert newest.replica_steps == {0: newest.number}
        last_seen = newest.number
        assert len(checkpoint.complete(tmp_path)) <= 4  # keep=3, plus one mid-prune at most


def test_checkpoints_are_pruned_and_corrupt_ones_skipped(tmp_path):
    for n in range(1, 6):
        checkpoint.write(
            tmp_path, n, {0: bytes([n]) * 10, 2: b"x" * n}, "h", {0: n, 1: 2 * n}, keep=3
        )
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


def test_config_hash_is_stable_and_sensitive():
    a = {"model": {"layers": [2, 2, 1]}, "train": {"seed": 1}}
    b = json.loads(json.dumps(a))
    assert checkpoint.config_hash(a) == checkpoint.config_hash(b)
    b["train"]["seed"] = 2
    assert checkpoint.config_hash(a) != checkpoint.config_hash(b)
