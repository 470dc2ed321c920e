"""The ingress's and router's batching: a lone call leaves at once, calls that arrive while a
batch is in flight leave together in the next, a failure reaches every caller of its batch."""

from __future__ import annotations

import asyncio

import pytest

from cluster.batching import Batcher


class _Held:
    """A batch handler that records each batch and answers only when released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1
        if -1 in items:
            raise ValueError("item -1 cannot be answered")
        return [10 * i for i in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_calls_that_wait_for_a_batch_leave_together_up_to_the_most_a_batch_holds() -> None:
    async def scenario() -> None:
        held = _Held()
        batcher = Batcher(held, max_batch_size=3)
        first = asyncio.ensure_future(batcher(1))
        await _settle()
        assert held.batches == [[1]]  # alone: sent at once, no wait to fill
        later = [asyncio.ensure_future(batcher(i)) for i in (2, 3, 4, 5)]
        await _settle()
        assert held.batches == [[1]]  # one batch in flight at most
        held.release.set()
        assert await first == 10
        assert await asyncio.gather(*later) == [20, 30, 40, 50]
        assert held.batches == [[1], [2, 3, 4], [5]]

    asyncio.run(scenario())


def test_a_failed_batch_fails_its_callers_and_the_next_batch_is_answered() -> None:
    async def scenario() -> None:
        held = _Held()
        held.release.set()
        batcher = Batcher(held, max_batch_size=8)
        with pytest.raises(ValueError, match="item -1"):
            await batcher(-1)
        assert await batcher(7) == 70

    asyncio.run(scenario())


def test_batches_in_flight_are_bounded_by_the_slots() -> None:
    async def scenario() -> None:
        held = _Held()
        batcher = Batcher(held, max_batch_size=1, concurrent=2)
        calls = [asyncio.ensure_future(batcher(i)) for i in range(5)]
        await _settle()
        assert held.in_flight == 2
        held.release.set()
        assert await asyncio.gather(*calls) == [0, 10, 20, 30, 40]
        assert held.most_in_flight == 2

    asyncio.run(scenario())


def test_a_stopped_slot_cancels_its_callers_and_is_replaced() -> None:
    async def scenario() -> None:
        held = _Held()
        batcher = Batcher(held, max_batch_size=4)
        first = asyncio.ensure_future(batcher(1))
        await _settle()
        mine = {asyncio.current_task(), first}
        (slot,) = [task for task in asyncio.all_tasks() if task not in mine]  # the sender
        slot.cancel()  # as when its work is cancelled under it
        with pytest.raises(asyncio.CancelledError):  # not left waiting
            await asyncio.wait_for(first, 5)
        held.release.set()
        assert await asyncio.wait_for(batcher(2), 5) == 20  # a new slot answers the next call

    asyncio.run(scenario())


def test_a_batcher_that_could_send_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 item and at least 1 is in flight, not 0"):
        Batcher(_Held(), max_batch_size=0)
