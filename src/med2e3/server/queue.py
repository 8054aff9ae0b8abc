"""One model, one worker thread, a bounded waiting line (batched where asked) and a deadline per request."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
ItemT = TypeVar("ItemT")  # an item of a batch

#: Runs a batch of items as one model call: one result per item, or the exception for that item alone.
BatchFn = Callable[[list[Any]], Sequence[Any]]


class QueueFull(RuntimeError):
    """The waiting line is full: answer 503."""


class QueueTimeout(TimeoutError):
    """A request waited and ran longer than its deadline: answer 504."""


@dataclass
class _Waiting:
    run: BatchFn
    item: Any
    future: Future


class ModelQueue:
    """Run model calls one at a time in a worker thread, with at most ``max_waiting`` waiting.

    Items submitted with `submit_batched` that wait together are run as one call, up to
    ``max_batch`` at a time. A request that times out is dropped if it has not started; one already
    running finishes in the background and keeps its place in the count, so the bound holds for real
    work, not just for waiting clients.
    """

    def __init__(self, max_waiting: int, timeout_s: float, max_batch: int = 1):
        self.capacity = 1 + max_waiting
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="med2e3-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._batchable: deque[_Waiting] = deque()

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        return self._pending

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` now.

        Raises:
            QueueFull: ``capacity`` requests are already running or waiting.
        """
        with self._lock:
            self.check_room()
            self._pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def submit_batched(
        self, run: Callable[[list[ItemT]], Sequence[T | BaseException]], item: ItemT
    ) -> Future[T]:
        """Queue ``item`` for ``run``, which answers it together with the other items waiting for ``run``
        when the worker gets to them (at most ``max_batch`` per call, in order of arrival).

        ``run(items)`` returns one result per item; an exception in its place fails that item alone.

        Raises:
            QueueFull: ``capacity`` requests are already running or waiting.
        """
        future: Future[T] = Future()
        with self._lock:
            self.check_room()
            self._pending += 1
            self._batchable.append(_Waiting(run, item, future))
        future.add_done_callback(self._release)
        self._executor.submit(self._run_batch)
        return future

    def _run_batch(self) -> None:
        """Run the waiting items that share the first one's function (none left: an earlier batch took them)."""
        batch: list[_Waiting] = []
        while len(batch) < self.max_batch:
            with self._lock:
                if not self._batchable or (batch and self._batchable[0].run != batch[0].run):
                    break
                job = self._batchable.popleft()
            if job.future.set_running_or_notify_cancel():  # False: its client gave up while it waited
                batch.append(job)
        if not batch:
            return
        try:
            results = batch[0].run([job.item for job in batch])
        except BaseException as err:  # a failure of the whole call is every item's
            results = [err] * len(batch)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def check_room(self) -> None:
        """Raise QueueFull if a request submitted now would be refused (to refuse before costly work)."""
        if self._pending >= self.capacity:
            raise QueueFull(
                f"the model is busy ({self._pending - 1} requests waiting, the limit is "
                f"{self.capacity - 1}); try again shortly"
            )

    def _release(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    async def wait(self, future: Future[T], timeout_s: float | None = None) -> T:
        """The result of a submitted call, waiting at most ``timeout_s`` (default: the queue's).

        Raises:
            QueueTimeout: the deadline passed (a call not yet started is dropped).
        """
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout_s or self.timeout_s
            )
        except TimeoutError:
            future.cancel()
            raise QueueTimeout(f"the model did not answer within {timeout_s or self.timeout_s:g} s") from None
        except asyncio.CancelledError:  # the client went away
            future.cancel()
            raise

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`submit` then `wait`."""
        return await self.wait(self.submit(fn, *args))

    def shutdown(self) -> None:
        """Drop waiting calls; a running one finishes in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            waiting, self._batchable = list(self._batchable), deque()
        for job in waiting:
            job.future.cancel()
