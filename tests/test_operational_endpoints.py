"""Liveness, readiness, metrics and the OpenAPI document; the webhooks switch and its start-up rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from consumers.template_sender import TemplateSender
from local_stack.moto_server import free_port
from local_stack.seed import DemoTenant
from service.api.app import create_metrics_app
from service.bootstrap import Dependencies, build
from service.config import Settings
from service.domain.errors import ErrorCode
from tests.conftest import initiate_body
from tests.support import api_client


async def test_healthz_answers_ok(api: TestClient[Any, Any]) -> None:
    response = await api.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_readyz_is_ready_when_aws_answers(api: TestClient[Any, Any]) -> None:
    response = await api.get("/readyz")
    assert (response.status, (await response.json())["status"]) == (200, "ready")


async def test_readyz_is_not_ready_when_dynamodb_is_unreachable(settings: Settings) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with api_client(settings, dynamodb_endpoint_url=dead, aws_max_attempts=1) as (client, _):
        response = await client.get("/readyz")
        answer = await response.json()
    assert response.status == 503
    assert any(problem.startswith("dynamodb") for problem in answer["problems"])


async def test_readyz_is_not_ready_while_draining(settings: Settings) -> None:
    async with api_client(settings) as (client, deps):
        deps.readiness.draining = True
        response = await client.get("/readyz")
        answer = await response.json()
    assert response.status == 503
    assert "draining" in answer["problems"]


async def test_readyz_is_not_ready_when_expected_consumers_are_not_running(settings: Settings) -> None:
    async with api_client(settings) as (client, deps):
        deps.readiness.expects_consumers = True
        answer = await (await client.get("/readyz")).json()
    assert "consumers not running" in answer["problems"]


async def test_metrics_count_requests_by_route_and_status_and_queue_sends(
    api: TestClient[Any, Any], deps: Dependencies, tenant: DemoTenant
) -> None:
    await api.post("/initiate-conversation", json=initiate_body("sms"), headers={"x-api-key": tenant.api_key})
    async with TestClient(TestServer(create_metrics_app(deps))) as scraper:
        text = await (await scraper.get("/metrics")).text()
    assert 'comms_http_requests_total{route="/initiate-conversation",status="200"}' in text
    assert 'comms_http_request_duration_seconds_bucket{le="0.005",route="/initiate-conversation"}' in text
    assert 'comms_queue_sends_total{channel="sms",outcome="queued"}' in text


async def test_openapi_documents_every_error_code_of_the_endpoint(api: TestClient[Any, Any]) -> None:
    document = await (await api.get("/openapi.json")).json()
    responses = document["paths"]["/initiate-conversation"]["post"]["responses"]
    documented = set(document["components"]["schemas"]["ErrorBody"]["properties"]["error_code"]["enum"])
    assert documented == {code.value for code in ErrorCode}
    # 405 is the router's answer to another method on the path, never the POST operation's.
    answered_by_post = {code for code in ErrorCode if code is not ErrorCode.METHOD_NOT_ALLOWED}
    assert {str(code.http_status) for code in answered_by_post} <= set(responses)


async def test_the_public_app_does_not_serve_metrics(api: TestClient[Any, Any]) -> None:
    assert (await api.get("/metrics")).status == 404


async def test_without_webhooks_no_route_is_mounted_and_no_status_callback_is_asked_for(settings: Settings) -> None:
    async with api_client(settings, webhooks_enabled=False) as (client, _):
        for path in ("/webhooks/twilio/status", "/webhooks/twilio/whatsapp", "/webhooks/twilio/sms"):
            assert (await client.post(path, data={"Body": "hi"})).status == 404, path
    disabled = settings.model_copy(update={"webhooks_enabled": False, "public_base_url": "https://comms.example.com"})
    for current, callback in ((disabled, None), (disabled.model_copy(update={"webhooks_enabled": True}), True)):
        async with build(current.model_copy(update={"consumer_queues": "sms"}), expects_consumers=True) as wired:
            [consumer] = wired.consumers
            processor = consumer._processor
            assert isinstance(processor, TemplateSender)
            url = processor._config.status_callback_url
            assert (url == "https://comms.example.com/webhooks/twilio/status") if callback else url is None


def test_serving_the_api_with_webhooks_but_no_public_base_url_exits_2_naming_the_setting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMS_")}
    env.update({"COMMS_HOST": "127.0.0.1", "COMMS_PORT": str(free_port()), "COMMS_METRICS_PORT": str(free_port())})
    for role in ("api", "all"):
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--role", role],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, (role, result.stderr[-2000:])
        assert "COMMS_PUBLIC_BASE_URL" in result.stderr
