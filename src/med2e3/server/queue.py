"""One model, one worker thread, a bounded waiting line and a deadline per request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(RuntimeError):
    """The waiting line is full: answer 503."""


class QueueTimeout(TimeoutError):
    """A request waited and ran longer than its deadline: answer 504."""


class ModelQueue:
    """Run model calls one at a time in a worker thread, with at most ``max_waiting`` waiting.

    A request that times out is dropped if it has not started; one already running finishes in
    the background and keeps its place in the count, so the bound holds for real work, not just
    for waiting clients.
    """

    def __init__(self, max_waiting: int, timeout_s: float):
        self.capacity = 1 + max_waiting
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="med2e3-model")
        self._lock = threading.Lock()
        self._pending = 0

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
