"""A schemathesis run generated from /openapi.json: no input makes the API answer a 5xx or break its contract.

The API runs on its own thread and event loop (schemathesis calls it synchronously),
against the session's moto server; the project's rate limit is lifted for the run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from local_stack.sandbox_http import serve
from service.api.app import create_app
from service.bootstrap import build
from service.config import Settings
from tests.support import add_tenant


class _ApiThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.url = ""
        self.api_key = ""
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with build(self.settings) as deps:
            self.api_key = await add_tenant(
                deps, "ci-fuzz-001", "pi-fuzz-001", rate_limits={"requests_per_second": 10_000, "burst": 10_000}
            )
            server = await serve(create_app(deps))
            self.url = server.url
            self.started.set()
            await self._stop.wait()
            await server.close()

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_api(settings: Settings) -> Iterator[_ApiThread]:
    api = _ApiThread(settings)
    api.thread.start()
    assert api.started.wait(timeout=30), "API thread did not start"
    yield api
    api.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _aim_at_own_tenant(case: Any) -> None:
    """Point generated string ids at the key's tenant, so bodies get past authorisation to validation."""
    company = case.body.get("company_data") if isinstance(case.body, dict) else None
    if isinstance(company, dict):
        for field, own in (("company_id", "ci-fuzz-001"), ("project_id", "pi-fuzz-001")):
            if isinstance(company.get(field), str):
                company[field] = own


def test_no_generated_request_gets_a_server_error_or_breaks_the_schema(live_api: _ApiThread) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/initiate-conversation", "/healthz", "/readyz"}
    seen: dict[str, set[int]] = {}
    runs = [(op, GenerationMode.POSITIVE) for op in operations]
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case: Any) -> None:
            _aim_at_own_tenant(case)
            response = case.call_and_validate(headers={"x-api-key": live_api.api_key}, checks=CHECKS)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        exercise()
    initiate = seen["POST /initiate-conversation"]
    assert {200, 400} <= initiate, f"the run never reached both outcomes: {initiate}"
