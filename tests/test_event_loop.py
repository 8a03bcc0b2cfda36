"""`comms serve` and `comms local` run on uvloop's event loop unless COMMS_EVENT_LOOP=asyncio, and the service
behaves the same on it: aiohttp serves, aiobotocore answers, SIGTERM stops it.

These tests are synchronous: each runs the service on a loop of its own, as the CLI does.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import uvloop
from structlog.testing import capture_logs

from local_stack.moto_server import free_port
from service.config import ConfigurationError, Settings, load_settings
from service.runner import run_on, run_service


@pytest.fixture(autouse=True)
def signal_handling_restored() -> Iterator[None]:
    """A closed uvloop loop leaves its SIGTERM handler and wakeup fd installed (a served process exits next);
    the test process gets its own back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup_fd)


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_the_service_loop_is_uvloops_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMMS_EVENT_LOOP", raising=False)
    assert isinstance(run_on(load_settings().event_loop, running_loop()), uvloop.Loop)


def test_comms_event_loop_asyncio_falls_back_to_the_standard_librarys_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_EVENT_LOOP", "asyncio")
    loop = run_on(load_settings().event_loop, running_loop())
    assert not isinstance(loop, uvloop.Loop)
    assert type(loop).__module__.startswith("asyncio.")


def test_an_unknown_event_loop_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_EVENT_LOOP", "trio")
    with pytest.raises(ConfigurationError, match="COMMS_EVENT_LOOP"):
        load_settings()


def test_on_uvloop_the_service_answers_readiness_and_stops_on_sigterm(settings: Settings) -> None:
    api = settings.model_copy(
        update={"host": "127.0.0.1", "port": free_port(), "metrics_port": free_port(), "webhooks_enabled": False}
    )
    statuses: list[int] = []
    probes: list[asyncio.Task[None]] = []

    async def probe_then_terminate() -> None:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{api.port}/readyz") as answer:
            statuses.append(answer.status)  # readiness asks DynamoDB: aiobotocore on this loop
        os.kill(os.getpid(), signal.SIGTERM)  # run_service's own handler takes it

    def on_ready(_: Any) -> None:
        probes.append(asyncio.get_running_loop().create_task(probe_then_terminate()))

    with capture_logs() as logs:
        run_on("uvloop", run_service(api, "api", on_ready=on_ready))  # returns: stopped by the signal
    assert statuses == [200]
    assert [e["event_loop"] for e in logs if e["event"] == "service_started"] == ["uvloop"]
    assert [e["role"] for e in logs if e["event"] == "service_stopped"] == ["api"]
