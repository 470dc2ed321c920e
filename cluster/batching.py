"""Opportunistic batching: calls that arrive while earlier batches are in flight go together.

A batch leaves as soon as a slot is free, with every call that waited for it (up to the most
a batch may hold): one call alone is sent at once, and under load the batches grow by
themselves, so no fixed wait is paid for the latency of a quiet service. Unlike
``serve.batch``, which waits a set time to fill a batch and then, when its batches in flight
are at their limit, queues that batch as it is, a batch here takes everything that queued."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Batcher"]

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class Batcher(Generic[Item, Answer]):
    """``await batcher(item)`` answers ``item`` through ``answer_batch(items)`` (a list of
    answers, one per item, in order), with at most ``concurrent`` batches in flight."""

    def __init__(
        self,
        answer_batch: Callable[[list[Item]], Awaitable[list[Answer]]],
        *,
        max_batch_size: int,
        concurrent: int = 1,
    ) -> None:
        if max_batch_size < 1 or concurrent < 1:
            raise ValueError(
                f"a batch holds at least 1 item and at least 1 is in flight, "
                f"not {max_batch_size} and {concurrent}"
            )
        self._answer_batch = answer_batch
        self._max_batch_size, self._concurrent = max_batch_size, concurrent
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Answer]]] | None = None
        self._slots: list[asyncio.Task[None]] = []

    async def __call__(self, item: Item) -> Answer:
        loop = asyncio.get_running_loop()
        if self._queue is None:  # the loop the calls run on, known at the first call
            self._queue = asyncio.Queue()
        # a slot that ended (cancelled with its loop's work) is replaced: queued calls never
        # wait for a sender that is gone
        self._slots = [slot for slot in self._slots if not slot.done()]
        while len(self._slots) < self._concurrent:
            self._slots.append(loop.create_task(self._send(self._queue)))
        answer: asyncio.Future[Answer] = loop.create_future()
        self._queue.put_nowait((item, answer))
        return await answer

    async def _send(self, queue: asyncio.Queue[tuple[Item, asyncio.Future[Answer]]]) -> None:
        while True:
            waiting = [await queue.get()]
            while len(waiting) < self._max_batch_size and not queue.empty():
                waiting.append(queue.get_nowait())
            waiting = [(item, answer) for item, answer in waiting if not answer.done()]
            if not waiting:
                continue  # every caller gave up (cancelled)
            try:
                answers = await self._answer_batch([item for item, _ in waiting])
            except Exception as err:  # each caller gets the batch's failure as its own
                for _, answer in waiting:
                    if not answer.done():
                        answer.set_exception(err)
                continue
            except BaseException:  # the slot itself is stopped: its callers with it
                for _, answer in waiting:
                    answer.cancel()
                raise
            for (_, answer), result in zip(waiting, answers, strict=True):
                if not answer.done():
                    answer.set_result(result)
