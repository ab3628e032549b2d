"""A node's compute taken in turns: never more at once than its threads, in
arrival order, each partition's fetch one turn ahead of its compute."""

import pytest
import trio
import trio.testing

from dbnode.turns import PATIENCE, Turns


async def _take(turns: Turns, name: str, log: list, prepare=None, hold: float = 0.01):
    async with turns.turn(prepare=prepare):
        log.append(("in", name))
        await trio.sleep(hold)
        log.append(("out", name))


def _most_inside(log: list) -> int:
    inside = most = 0
    for what, _ in log:
        inside += 1 if what == "in" else -1
        most = max(most, inside)
    return most


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_never_more_at_once_than_the_slots_and_first_come_first_served(slots):
    async def main():
        turns, log = Turns(slots), []
        async with trio.open_nursery() as nursery:
            for i in range(7):  # each holds its turn a different time: one leaves at a time
                nursery.start_soon(_take, turns, i, log, None, 0.01 * (7 - i))
                await trio.testing.wait_all_tasks_blocked()  # i arrives before i + 1
        assert _most_inside(log) == slots
        assert [name for what, name in log if what == "in"] == list(range(7))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_next_in_line_prepares_while_the_one_before_computes():
    """``prepare`` (the fetch) runs in the lobby: the second partition's
    starts while the first computes, the third's only once the second has
    its turn (one turn ahead, not as far ahead as the queue is long)."""

    async def main():
        turns, log = Turns(1), []

        def prepare(name):
            async def fetch():
                log.append(("fetch", name))

            return fetch

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(_take, turns, i, log, prepare(i))
                await trio.testing.wait_all_tasks_blocked()
        assert log == [
            ("fetch", 0), ("in", 0), ("fetch", 1), ("out", 0),
            ("in", 1), ("fetch", 2), ("out", 1), ("in", 2), ("out", 2),
        ]  # fmt: skip

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_crowded_says_whether_a_turn_asked_for_now_would_wait():
    async def main():
        one, two = Turns(1), Turns(2)
        assert not one.crowded and not two.crowded
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_take, one, "a", [], None, 1.0)
            nursery.start_soon(_take, two, "a", [], None, 1.0)
            await trio.testing.wait_all_tasks_blocked()
            assert one.crowded  # its only turn is taken
            assert not two.crowded  # one of two: a turn is free
            nursery.start_soon(_take, two, "b", [], None, 1.0)
            await trio.testing.wait_all_tasks_blocked()
            assert two.crowded
        assert not one.crowded and not two.crowded

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_crowded_after_turn_says_whether_the_turn_asked_for_next_would_wait():
    """Asked from inside a turn (a step choosing whether to leave its fetch
    for its next turn), the turn it holds does not count."""

    async def main():
        turns = Turns(1)
        async with turns.turn():
            assert turns.crowded and not turns.crowded_after_turn  # alone on the node
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_take, turns, "b", [], None, 1.0)
                await trio.testing.wait_all_tasks_blocked()
                assert turns.crowded_after_turn  # "b" would go first
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failed_turn_gives_its_slot_back():
    async def main():
        turns = Turns(1)
        with pytest.raises(ValueError):
            async with turns.turn():
                raise ValueError("the step failed")
        assert not turns.crowded
        async with turns.turn():
            pass

    trio.run(main)


def test_a_slow_preparation_holds_back_only_its_own_partition():
    """A fetch stuck on a frozen shard is finished outside the lobby after
    PATIENCE: the partitions queued behind it compute meanwhile."""

    async def main():
        turns, log = Turns(1), []
        calls = []

        async def stuck():  # like a fetch: done once, then nothing left to do
            calls.append(trio.current_time())
            if len(calls) <= 2:
                await trio.sleep(10 * PATIENCE)  # cancelled in the lobby, finished outside

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_take, turns, "stuck", log, stuck)
            await trio.testing.wait_all_tasks_blocked()
            for name in ("a", "b"):
                nursery.start_soon(_take, turns, name, log)
                await trio.testing.wait_all_tasks_blocked()
        assert [name for what, name in log if what == "in"] == ["a", "b", "stuck"]
        # asked again once it stepped out, and once more in the lobby (done by then)
        assert calls == [0.0, PATIENCE, 11 * PATIENCE]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_nothing_to_prepare_does_not_wait_behind_a_preparation():
    """A pipelined pass (nothing to prepare) takes the free turn while a
    whole-model replica is still fetching in the lobby."""

    async def main():
        turns, log = Turns(1), []

        async def fetch():
            await trio.sleep(PATIENCE / 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_take, turns, "a", log, None, 0.1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_take, turns, "fetching", log, fetch)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_take, turns, "pass", log)
        assert [name for what, name in log if what == "in"] == ["a", "pass", "fetching"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
