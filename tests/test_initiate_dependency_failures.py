"""DynamoDB or SQS unavailable: 503 with the right code, nothing half-written, a retry queues exactly once."""

from __future__ import annotations

from typing import Any

from local_stack.moto_server import free_port
from tests.conftest import initiate_body
from tests.support import api_client, queued_messages

DEAD = {"aws_max_attempts": 1, "sqs_send_attempts": 1, "aws_connect_timeout_s": 0.5}


async def test_dynamodb_unavailable_is_503_database_error_and_queues_nothing(settings, deps, tenant):
    body = initiate_body()
    dead = f"http://127.0.0.1:{free_port()}"
    async with api_client(settings, dynamodb_endpoint_url=dead, **DEAD) as (client, _):
        response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        answer = await response.json()
    assert (response.status, answer["error_code"]) == (503, "DATABASE_ERROR")
    assert "Retry-After" in response.headers
    conversation_id = f"ci-demo-001#pi-demo-001#{body['request_data']['request_id']}#447700900001"
    assert await queued_messages(deps, settings.whatsapp_queue_url, conversation_id) == []


async def test_sqs_unavailable_is_503_queue_error_and_a_retry_queues_exactly_once(settings, deps, api, tenant):
    body = initiate_body()
    dead = f"http://127.0.0.1:{free_port()}"
    async with api_client(settings, sqs_endpoint_url=dead, **DEAD) as (client, _):
        failed = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        assert (failed.status, (await failed.json())["error_code"]) == (503, "QUEUE_ERROR")

    retried = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    answer = await retried.json()
    assert retried.status == 200
    assert len(await queued_messages(deps, settings.whatsapp_queue_url, answer["conversation_id"])) == 1


class _ExplodingPublisher:
    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        raise RuntimeError("boom: secret internals")


async def test_unexpected_failure_is_500_internal_error_without_a_stack_trace(settings, tenant):
    async with api_client(settings, {"publisher": _ExplodingPublisher()}) as (client, _):
        response = await client.post(
            "/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key}
        )
        answer: dict[str, Any] = await response.json()
    assert (response.status, answer["error_code"]) == (500, "INTERNAL_ERROR")
    assert "boom" not in answer["message"]
    assert "Traceback" not in str(answer)
