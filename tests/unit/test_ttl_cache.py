"""The read-through cache's single-flight load, as concurrent requests see it."""

from __future__ import annotations

import asyncio

import pytest

from service.adapters.ttl_cache import TtlCache


async def test_concurrent_misses_share_one_load() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    release = asyncio.Event()
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        return 7

    callers = [asyncio.create_task(cache.get("k", load)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*callers) == [7] * 5
    assert loads == 1


async def test_a_cancelled_first_caller_does_not_cancel_the_others_waiting_on_its_load() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    release = asyncio.Event()

    async def load() -> int:
        await release.wait()
        return 7

    first = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get("k", load)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()  # e.g. its request hit its deadline
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await asyncio.gather(*others) == [7, 7, 7]


async def test_a_failed_load_fails_every_waiter_and_the_next_get_loads_again() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    attempts = 0

    async def load() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise RuntimeError("dynamodb down")
        return 3

    waiters = [asyncio.create_task(cache.get("k", load)) for _ in range(2)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert await cache.get("k", load) == 3
    assert attempts == 2


async def test_a_loaded_value_is_served_from_the_cache_until_it_expires() -> None:
    now = [0.0]
    cache: TtlCache[str, int] = TtlCache(ttl_s=10, clock=lambda: now[0])
    values = iter([1, 2])

    async def load() -> int:
        return next(values)

    assert await cache.get("k", load) == 1
    now[0] = 9.9
    assert await cache.get("k", load) == 1
    now[0] = 10.0
    assert await cache.get("k", load) == 2
