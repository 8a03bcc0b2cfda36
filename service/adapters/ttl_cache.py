"""An async read-through cache with a TTL and single-flight loads.

Concurrent misses for one key share one load, so a burst of requests for a cold
company costs one DynamoDB read, not one per request. The load runs as its own task
that every caller awaits through a shield: a caller that is cancelled (its request hit
its deadline, the client went away) leaves the load running for the others instead of
handing its cancellation to every request waiting on the same key.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._loading: dict[K, asyncio.Task[V]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, load))
            self._loading[key] = task
            task.add_done_callback(_retrieve_exception)
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await load()
        finally:
            self._loading.pop(key, None)
        self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        if self._ttl_s <= 0:
            return
        self._entries[key] = (self._clock() + self._ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, key: K) -> None:
        self._entries.pop(key, None)


def _retrieve_exception(task: asyncio.Task[object]) -> None:
    """Mark a failed load's exception retrieved: when every caller was cancelled, nobody else reads it."""
    if not task.cancelled():
        task.exception()
