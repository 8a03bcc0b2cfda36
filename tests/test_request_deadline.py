"""A caller-facing request answers within its deadline even when AWS does not answer at all.

AWS is reached through a fault proxy that stalls: connections are accepted, requests read, and
nothing is answered until the test releases it. Each test gets a fresh app (fresh API key and company
caches), so its first AWS call is one the stall catches.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
from aiohttp.test_utils import TestClient

from local_stack.seed import DemoTenant
from service.config import Settings
from tests.conftest import initiate_body
from tests.fault_proxy import FaultProxy
from tests.support import api_client

DEADLINE_S = 0.5
# Without a deadline the request waits for botocore's read timeouts (minutes): fail fast instead.
GUARD_S = 15


@pytest.fixture
async def stalled_api(settings: Settings, tenant: DemoTenant) -> AsyncIterator[TestClient[Any, Any]]:
    moto = urlsplit(settings.aws_endpoint_url)
    assert moto.hostname and moto.port
    async with (
        FaultProxy(str(moto.hostname), moto.port) as aws,
        api_client(settings, aws_endpoint_url=aws.url, request_deadline_s=DEADLINE_S) as (client, _),
    ):
        aws.stall()
        try:
            yield client
        finally:
            aws.pass_through()  # before the clients close: nothing left waiting on a stalled connection


def _whatsapp_inbound() -> dict[str, str]:
    return {
        "From": "whatsapp:+447700900555",
        "To": "whatsapp:+447700900000",
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "Body": "hello",
    }


async def test_initiate_answers_503_service_unavailable_when_aws_does_not_answer(
    stalled_api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    async with asyncio.timeout(GUARD_S):
        response = await stalled_api.post(
            "/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key}
        )
        answer = await response.json()
    assert (response.status, answer["status"], answer["error_code"]) == (503, "error", "SERVICE_UNAVAILABLE")
    assert set(answer) == {"status", "error_code", "message", "request_id"}


async def test_deadline_answer_carries_retry_after_and_cors(
    stalled_api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    async with asyncio.timeout(GUARD_S):
        response = await stalled_api.post(
            "/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key}
        )
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_twilio_webhook_answers_503_service_unavailable_when_aws_does_not_answer(
    stalled_api: TestClient[Any, Any],
) -> None:
    async with asyncio.timeout(GUARD_S):
        response = await stalled_api.post(
            "/webhooks/twilio/whatsapp",
            data=_whatsapp_inbound(),
            # Any signature: checking it needs the tenant's token, looked up in DynamoDB (stalled).
            headers={"X-Twilio-Signature": "c2lnbmF0dXJl"},
        )
        answer = await response.json()
    assert (response.status, answer["error_code"]) == (503, "SERVICE_UNAVAILABLE")
    assert "Retry-After" in response.headers


async def test_a_request_cut_at_its_deadline_logs_no_unhandled_error(
    stalled_api: TestClient[Any, Any], tenant: DemoTenant, caplog: pytest.LogCaptureFixture
) -> None:
    with structlog.testing.capture_logs() as events, caplog.at_level(logging.ERROR):
        async with asyncio.timeout(GUARD_S):
            response = await stalled_api.post(
                "/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key}
            )
    assert response.status == 503
    assert [e["event"] for e in events if e["log_level"] in ("error", "critical")] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "request_deadline_exceeded" in [e["event"] for e in events]


async def test_healthz_has_no_deadline_and_answers_while_aws_is_stalled(stalled_api: TestClient[Any, Any]) -> None:
    async with asyncio.timeout(GUARD_S):
        response = await stalled_api.get("/healthz")
    assert response.status == 200
