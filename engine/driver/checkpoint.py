"""Checkpoints of the parameter server, as the driver keeps them.

A checkpoint is a directory ``ckpt-NNNNNN`` holding one shard snapshot per
plan shard (``shard{i}.npz``, the format of
:meth:`dbnode.ps.shard.ParameterShard.snapshot`: values, optimizer state,
versions, dedup table) and ``manifest.json`` (its number, time, the run
that wrote it, the run config's hash, each replica's step, the SHA-256 of
every file, and a SHA-256 of the manifest itself).

Written atomically: everything goes into ``ckpt-NNNNNN.tmp``, each file
fsynced, the manifest last, then the directory is renamed and its parent
fsynced. A crash at any point leaves the previous checkpoints intact and at
worst a ``.tmp`` directory, which is ignored and cleaned up by the next
write; a write that fails (disk full) removes its own. Only the newest
``keep`` checkpoints of the writing run are kept. Numbers never repeat in a
directory: a run (or a resumed one) numbers on from the highest there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import replace_dir, write_synced
from ..errors import CheckpointError

MANIFEST = "manifest.json"
PREFIX = "ckpt-"


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint directory, as its manifest describes it.

    Attributes:
        path: the directory.
        number: its number (``ckpt-NNNNNN``).
        time: when it was written (seconds since the epoch).
        config_hash: the hash of the run config's model, data, optimizer and
            schedule (:func:`dbnode.driver.inputs.run_identity`).
        replica_steps: replica -> the step it had reached.
        files: file name -> its SHA-256.
        run_id: the run that wrote it.
        identity: what :attr:`config_hash` hashes, section -> key -> value
            (None in checkpoints written before they carried it).
    """

    path: Path
    number: int
    time: float
    config_hash: str
    replica_steps: dict[int, int]
    files: dict[str, str]
    run_id: str = ""
    identity: dict[str, Any] | None = None

    def read_shard(self, index: int) -> bytes:
        """The snapshot bytes of plan shard ``index``, checked against the manifest."""
        name = f"shard{index}.npz"
        data = (self.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files.get(name):
            raise CheckpointError(f"{self.path / name}: checksum does not match the manifest")
        return data


def config_hash(config: dict[str, Any]) -> str:
    """A stable digest of a run config (the parts that define the model)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def next_number(directory: Path) -> int:
    """The number the next checkpoint in ``directory`` takes: one above the
    highest there, whichever run wrote it (complete or not)."""
    highest = 0
    for path in directory.glob(f"{PREFIX}[0-9]*") if directory.is_dir() else ():
        digits = path.name[len(PREFIX) :].removesuffix(".tmp")
        if digits.isdigit():
            highest = max(highest, int(digits))
    return highest + 1


def write(
    directory: Path,
    shards: dict[int, bytes],
    config_hash: str,
    replica_steps: dict[int, int],
    keep: int,
    run_id: str,
    identity: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write the next checkpoint atomically, then keep only the run's newest ``keep``.

    Args:
        directory: where checkpoints go (created if need be).
        shards: plan shard index -> its exported snapshot bytes.
        config_hash: the run's identity (:func:`config_hash`).
        replica_steps: replica -> the step it had reached.
        keep: how many of this run's checkpoints to keep.
        run_id: the run writing it.
        identity: what ``config_hash`` hashes (so a refusal to resume can
            name the key that differs).

    Returns:
        The checkpoint written, verified.

    Raises:
        OSError: it could not be written (disk full, permissions); nothing
            of it is left behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    number = next_number(directory)
    final = directory / f"{PREFIX}{number:06d}"
    tmp = directory / f"{PREFIX}{number:06d}.tmp"
    try:
        tmp.mkdir()
        files = {}
        for index, data in sorted(shards.items()):
            name = f"shard{index}.npz"
            write_synced(tmp / name, lambda f, data=data: f.write(data))
            files[name] = hashlib.sha256(data).hexdigest()
        manifest: dict[str, Any] = {
            "number": number,
            "time": time.time(),
            "run_id": run_id,
            "config_hash": config_hash,
            "replica_steps": {str(r): s for r, s in replica_steps.items()},
            "files": files,
        }
        if identity is not None:
            manifest["identity"] = identity
        manifest["checksum"] = _digest(manifest)
        text = json.dumps(manifest, indent=1).encode()
        write_synced(tmp / MANIFEST, lambda f: f.write(text))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete(directory, runs={run_id})[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in directory.glob(f"{PREFIX}*.tmp"):  # writes that died before ours began
        digits = stale.name[len(PREFIX) : -len(".tmp")]
        if digits.isdigit() and int(digits) < number:
            shutil.rmtree(stale, ignore_errors=True)
    return load(final)


def load(path: Path) -> Checkpoint:
    """A checkpoint directory, verified: manifest readable, every file present
    with the checksum the manifest gives."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        checkpoint = Checkpoint(
            path,
            int(manifest["number"]),
            float(manifest["time"]),
            str(manifest["config_hash"]),
            {int(r): int(s) for r, s in manifest["replica_steps"].items()},
            dict(manifest["files"]),
            # Checkpoints written before runs had ids carry neither of these.
            str(manifest.get("run_id", "")),
            manifest.get("identity"),
        )
        checksum = manifest.get("checksum")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: no readable manifest ({exc})") from None
    if checksum is not None and checksum != _digest(manifest):
        raise CheckpointError(f"{path / MANIFEST}: its checksum does not match its content")
    for name, digest in checkpoint.files.items():
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path / name}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path / name}: checksum does not match the manifest")
    return checkpoint


def complete(directory: Path, runs: set[str] | None = None) -> list[Checkpoint]:
    """Every checkpoint in ``directory`` that verifies, oldest first.

    Args:
        directory: where to look.
        runs: only those written by these run ids (default: any run's).

    Returns:
        The checkpoints, by number.
    """
    found = []
    for path in sorted(directory.glob(f"{PREFIX}[0-9]*")):
        if path.is_dir() and not path.name.endswith(".tmp"):
            try:
                checkpoint = load(path)
            except CheckpointError:
                continue
            if runs is None or checkpoint.run_id in runs:
                found.append(checkpoint)
    return sorted(found, key=lambda c: c.number)


def newest(directory: Path, runs: set[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies (of ``runs``, when given), or None."""
    found = complete(directory, runs) if directory.is_dir() else []
    return found[-1] if found else None
