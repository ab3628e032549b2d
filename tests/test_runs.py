"""A node's runs (dbnode.runs): leases, fencing and the memory budget, on a fake clock."""

import numpy as np
import pytest

from dbnode.errors import ErrorCode, RequestError
from dbnode.ps.shard import ParameterShard
from dbnode.runs import RunTable, default_max_memory, parse_bytes


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def table(max_memory=1 << 30):
    clock = Clock()
    return RunTable(max_memory, ParameterShard, clock=clock), clock


def test_a_run_lives_while_renewed_and_is_freed_when_its_lease_lapses():
    runs, clock = table()
    run, created = runs.open("a", "first", lease=2.0, epoch=0)
    assert created and runs.get("a") is run
    for _ in range(5):  # renewed every second: never expires
        clock.now += 1.0
        run.renew(clock.now)
        assert runs.sweep() == []
    clock.now += 2.5
    with pytest.raises(RequestError, match="lease of 2 s expired") as lapsed:
        runs.get("a")  # refused at once, before any sweep
    assert lapsed.value.code == ErrorCode.UNKNOWN_RUN
    assert runs.sweep() == [run] and len(runs) == 0 and run.scope.cancel_called


def test_opening_an_open_run_renews_it_and_keeps_its_state():
    runs, clock = table()
    run, _ = runs.open("a", "first", lease=2.0, epoch=3)
    run.shard.init(1, "w", np.zeros(2, np.float32), optimizer={"name": "sgd", "learning_rate": 1})
    clock.now += 1.5
    again, created = runs.open("a", "first", lease=5.0, epoch=1)
    assert again is run and not created and run.epoch == 3 and len(run.shard) == 1
    clock.now += 4.0
    assert runs.get("a") is run  # the new lease counts
    clock.now += 2.0
    fresh, created = runs.open("a", "first", lease=5.0, epoch=0)  # expired: a new, empty run
    assert created and fresh is not run and len(fresh.shard) == 0


def test_requests_name_their_run_and_epoch():
    runs, _ = table()
    run, _ = runs.open("a", "first", lease=9, epoch=2)
    assert runs.for_request({"run": "a", "epoch": 2}) is run
    assert runs.for_request({"run": "a"}) is run  # no epoch given: not fenced
    for meta, code in (
        ({"run": "a", "epoch": 1}, ErrorCode.STALE_EPOCH),
        ({"run": "a", "epoch": 3}, ErrorCode.STALE_EPOCH),
        ({"run": "b"}, ErrorCode.UNKNOWN_RUN),
        ({}, ErrorCode.UNKNOWN_RUN),
        ({"run": ["a"]}, ErrorCode.UNKNOWN_RUN),
    ):
        with pytest.raises(RequestError) as refused:
            runs.for_request(meta)
        assert refused.value.code == code, meta
    assert run.fenced == 2


def test_the_memory_budget_counts_every_run():
    runs, _ = table(max_memory=1000)
    a, _ = runs.open("a", "first", lease=9, epoch=0)
    b, _ = runs.open("b", "second", lease=9, epoch=0)
    a.reserved, b.reserved = 300, 300
    runs.reserve(400, "this")
    with pytest.raises(
        RequestError, match="needs 401 B, and this node has 400 B left of its 1000 B budget"
    ) as full:
        runs.reserve(401, "that")
    assert full.value.code == ErrorCode.UNAVAILABLE
    runs.close("b")
    runs.reserve(700, "now it fits")


def test_sizes():
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512m") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29 and parse_bytes("1000") == 1000
    for bad in ("", "lots", "-1G", "0", "nanG"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert 0 < default_max_memory(nodes=4) < default_max_memory(nodes=1)
