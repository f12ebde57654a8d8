"""Request-rate buckets and the bounded inference queue of the API process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from medai.api.errors import ApiError


class RateLimiter:
    """A token bucket per key: ``per_min`` requests at once, refilled at ``per_min`` a minute."""

    def __init__(self, per_min: float):
        self.capacity, self.rate = per_min, per_min / 60.0
        self._buckets: dict[Any, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _level(self, key: Any, now: float) -> float:
        level, since = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, level + (now - since) * self.rate)

    def acquire(self, key: Any, now: float | None = None) -> float:
        """0 when the request may go ahead, otherwise the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            level = self._level(key, now)
            if level >= 1:
                self._buckets[key] = (level - 1, now)
                return 0.0
            self._buckets[key] = (level, now)
            return (1 - level) / self.rate

    def wait(self, key: Any, now: float | None = None) -> float:
        """The seconds until ``key`` may go ahead, without using up anything (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate


class InferenceQueue:
    """A fixed pool of worker threads with at most ``max_queue`` analyses waiting or running; one more is a
    503 with Retry-After, so a flood never grows memory or blocks ``/health``."""

    def __init__(self, workers: int, max_queue: int):
        self.workers, self.max_queue = workers, max_queue
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="medai-infer")
        self.pending = 0
        self._lock = threading.Lock()

    async def run(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self.pending >= self.max_queue:
                raise ApiError(503, "busy", f"{self.pending} analyses are already queued; retry shortly",
                               {"Retry-After": "2"})
            self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, job)
        finally:
            with self._lock:
                self.pending -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
