"""Shared fixtures: a moto server on a random loopback port, provisioned once, and the API over real HTTP."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from local_stack.moto_server import LOCAL_CREDENTIALS, MotoServer, start_moto_server
from local_stack.seed import DemoTenant, seed_demo_tenant
from service.adapters.aws.provisioning import provision_resources
from service.api.app import create_app, make_runner
from service.bootstrap import Dependencies, build
from service.config import Settings
from tests.bodies import initiate_body

__all__ = ["initiate_body"]  # tests import it from here too

for _name, _value in LOCAL_CREDENTIALS.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def settings(moto_server: MotoServer) -> Settings:
    # A short long poll: every in-process consumer's stop waits for its open poll to end.
    base = Settings(aws_endpoint_url=moto_server.url, aws_max_attempts=2, consumer_concurrency=8, poll_wait_s=1)
    return await provision_resources(base)


@pytest.fixture(scope="session")
async def deps(settings: Settings) -> AsyncIterator[Dependencies]:
    async with build(settings) as wired:
        yield wired


@pytest.fixture(scope="session")
async def tenant(deps: Dependencies) -> DemoTenant:
    return await seed_demo_tenant(deps.aws, deps.settings)


@asynccontextmanager
async def serving(deps: Dependencies) -> AsyncIterator[tuple[str, int]]:
    """The app behind the server the service runs (`make_runner`: its answers to malformed requests, its idle
    timeout), on 127.0.0.1: (host, port) for raw-socket clients."""
    runner = make_runner(create_app(deps))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
async def served(deps: Dependencies, tenant: DemoTenant) -> AsyncIterator[tuple[str, int]]:
    async with serving(deps) as address:
        yield address


@pytest.fixture(scope="session")
async def api(deps: Dependencies, tenant: DemoTenant) -> AsyncIterator[TestClient[Any, Any]]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(deps)))
    await client.start_server()
    yield client
    await client.close()
