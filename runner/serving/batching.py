"""Dynamic batching for /predict: concurrent requests merged into one ONNX Runtime run, results split back.

One worker task drains an asyncio queue: it takes the first waiting request, then keeps taking requests until the batch
holds `max_batch` texts or `max_wait_ms` have passed, runs the model once in a thread (the event loop keeps accepting
requests meanwhile) and resolves each request's future with its slice of the results. While one batch runs, the next one
fills up, so under load batches form without waiting at all.

The app uses it only for batch-invariant graphs (runner/serving/artifact.py): merging requests must never change an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Item = tuple[list[str], asyncio.Future]


class Batcher:
    def __init__(self, run: Callable[[list[str]], list[Any]], max_batch: int, max_wait_ms: float,
                 observe: Callable[[int], None]) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.observe = observe  # reports each run's batch size (the metric that shows batching works)
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.held: Item | None = None  # a request that did not fit the previous batch; it opens the next one
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def submit(self, texts: list[str]) -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future  # a timeout cancels this future; the worker then skips or discards it

    async def _collect(self) -> list[Item]:
        first = self.held or await self.queue.get()
        self.held = None
        batch, size = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if size + len(item[0]) > self.max_batch:
                self.held = item
                break
            batch.append(item)
            size += len(item[0])
        return [item for item in batch if not item[1].done()]  # drop requests that already timed out

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            texts = [text for item_texts, _ in batch for text in item_texts]
            self.observe(len(texts))
            try:
                results = await asyncio.to_thread(self.run, texts)
            except Exception as exc:  # noqa: BLE001 - the error belongs to the requests, not to the worker
                log.exception("batched inference failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for item_texts, future in batch:
                if not future.done():
                    future.set_result(results[start : start + len(item_texts)])
                start += len(item_texts)
