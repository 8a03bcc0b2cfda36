"""The template sender end to end, in this process: HTTP endpoint -> SQS -> consumer -> OpenAI -> Twilio/SendGrid
-> conversation record, against the moto server and the provider sandboxes over real HTTP (SPEC §4-§6).

Each test has its own queues, sandboxes, tenant and recipients (`tests.e2e_support`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from local_stack.seed import DEMO_TEMPLATE_SID
from service.config import Settings
from service.operator.dlq import QueuePair as DlqPair
from service.operator.dlq import redrive
from service.operator.output import Context, Output
from tests.e2e_support import (
    STATUS_CALLBACK_URL,
    DynamoGate,
    E2EEnv,
    Tenant,
    e2e_env,
    eventually,
    in_process_service,
    new_tenant,
    recipient_of,
)

SENT = "initial_message_sent"


@pytest.fixture
async def e2e_tenant(deps, tenant) -> Tenant:
    # `tenant` seeds the demo provider secrets the new company's channel config names.
    return await new_tenant(deps)


@pytest.fixture
async def env(settings, deps) -> AsyncIterator[E2EEnv]:
    async with e2e_env(settings, deps.aws) as world:
        yield world


def assert_initial_message_recorded(
    record: dict[str, Any], body: dict[str, Any], provider_id: str, content: str
) -> None:
    """SPEC §5/§6.7: the final record of a conversation whose first message went out once."""
    channel = body["request_data"]["channel_method"]
    assert record["conversation_status"] == SENT
    assert record["send_state"] == "sent"
    assert record["provider_message_id"] == provider_id
    [message] = record["messages"]
    assert message["message_id"] == provider_id
    assert message["role"] == "assistant"
    assert message["content"] == content
    assert message["timestamp"].endswith("Z")
    assert message["prompt_tokens"] > 0
    assert message["completion_tokens"] > 0
    assert message["total_tokens"] == message["prompt_tokens"] + message["completion_tokens"]
    assert record["thread_id"].startswith("resp_")  # the continuation a reply chains from: the template's response
    assert record["task_complete"] == 0
    assert record["hand_off_to_human"] is False
    assert isinstance(record["processing_time_ms"], int)
    assert record["processing_time_ms"] > 0
    assert record["request_id"] == body["request_data"]["request_id"]
    assert record["channel_method"] == channel
    assert record["company_id"] == body["company_data"]["company_id"]
    assert record["company_name"] == "Demo Homes Ltd"
    assert record["recipient_first_name"] == "Lee"
    assert record["created_at"].endswith("Z")
    assert record["updated_at"].endswith("Z")


async def assert_one_ai_call_stored_as_the_thread(env: E2EEnv, record: dict[str, Any]) -> None:
    """One OpenAI call per conversation (no Conversations API object), stored so that a reply can chain from it."""
    assert [r["path"] for r in await env.sandboxes.ai_requests("POST", "/v1/conversations")] == []
    assert len(await env.sandboxes.ai_requests()) == 1
    stored = await env.sandboxes.ai_response(record["thread_id"])
    assert (stored["status"], stored["store"]) == ("completed", True)
    assert stored["metadata"]["conversation_id"] == record["conversation_id"]


# -- happy paths ----------------------------------------------------------------------------------------------------


async def test_whatsapp_request_is_sent_once_as_a_template_and_recorded(env, e2e_tenant):
    body = e2e_tenant.request("whatsapp")
    tel = recipient_of(body)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=15)
        await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")

    [message] = await env.sandboxes.twilio_messages()
    assert message["to"] == f"whatsapp:{tel}"
    assert message["from"] == "whatsapp:+447700900001"
    assert message["content_sid"] == DEMO_TEMPLATE_SID
    assert message["status_callback"] == STATUS_CALLBACK_URL
    variables = message["content_variables"]
    assert set(variables) == {"1", "2"}
    assert "Lee" in variables["1"]
    assert_initial_message_recorded(record, body, message["sid"], orjson.dumps(variables).decode())
    assert record["generated_content"] == variables
    await assert_one_ai_call_stored_as_the_thread(env, record)
    assert service.received == 1


async def test_sms_request_is_sent_once_as_a_body_and_recorded(env, e2e_tenant):
    body = e2e_tenant.request("sms")
    tel = recipient_of(body)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=15)
        await eventually(lambda: env.is_empty("sms"), timeout_s=5, what="the message is deleted")

    [message] = await env.sandboxes.twilio_messages()
    assert message["to"] == tel
    assert message["from"] == "+447700900002"
    assert message["content_sid"] is None
    assert message["body"].startswith("Hi Lee")
    assert message["status_callback"] == STATUS_CALLBACK_URL
    assert_initial_message_recorded(record, body, message["sid"], message["body"])
    await assert_one_ai_call_stored_as_the_thread(env, record)
    assert service.received == 1


async def test_email_request_is_sent_once_with_subject_and_body_and_recorded(env, e2e_tenant):
    body = e2e_tenant.request("email")
    email = recipient_of(body)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        record = await env.record_with_status(email, conversation_id, SENT, timeout_s=15)
        await eventually(lambda: env.is_empty("email"), timeout_s=5, what="the message is deleted")

    [mail] = await env.sandboxes.sendgrid_mails()
    assert mail["to"] == [email]
    assert mail["from"] == {"email": "hello@demo-homes.example", "name": "Demo Homes"}
    assert mail["subject"].startswith("Hi Lee")
    text = next(part["value"] for part in mail["content"] if part["type"] == "text/plain")
    assert text.strip()
    assert mail["custom_args"] == {"conversation_id": conversation_id}
    assert_initial_message_recorded(record, body, mail["message_id"], f"{mail['subject']}\n\n{text}")
    await assert_one_ai_call_stored_as_the_thread(env, record)
    assert service.received == 1


def gated(settings: Settings, gate: DynamoGate) -> Settings:
    """DynamoDB through the gate, and no botocore retries: the processor's own final-update retries are watched."""
    return settings.model_copy(update={"dynamodb_endpoint_url": gate.url, "aws_max_attempts": 1})


# -- redelivery after the send --------------------------------------------------------------------------------------


async def test_final_update_failing_after_send_is_repaired_by_the_redelivery_without_a_second_send(
    settings, deps, e2e_tenant
):
    # DynamoDB refuses the final update (500) until released: the send happened, the record still says
    # `attempting`. The redelivery must ask Twilio, find the message and finish the record with its SID.
    async with (
        e2e_env(settings, deps.aws, visibility_s=4) as env,
        DynamoGate(settings.aws_endpoint_url or "", mode="fail").running() as gate,
    ):
        body = e2e_tenant.request("whatsapp")
        tel = recipient_of(body)
        async with in_process_service(gated(env.settings, gate)) as service:
            conversation_id = await service.initiate(e2e_tenant, body)
            await eventually(
                lambda: service.metric("comms_final_update_failures_total", queue="whatsapp") == 1,
                timeout_s=20,
                what="the final update gave up and counted the critical metric",
            )
            stuck = await env.record(tel, conversation_id)
            assert stuck is not None
            assert (stuck["conversation_status"], stuck["send_state"]) == ("processing", "attempting")
            gate.release()
            record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=20)
            await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")

        [message] = await env.sandboxes.twilio_messages()
        content = orjson.dumps(message["content_variables"]).decode()
        assert_initial_message_recorded(record, body, message["sid"], content)
        assert (await env.sandboxes.twilio_stats())["listed"] >= 1  # the redelivery reconciled with Twilio
        assert len(await env.sandboxes.ai_requests()) == 1  # and did not ask the AI again
        assert gate.final_updates_seen >= 4  # three refused attempts (botocore may retry each), then the repair
        assert service.received == 2


async def test_email_redelivery_with_unknown_send_outcome_is_marked_for_review_not_resent(settings, deps, e2e_tenant):
    # SendGrid has no per-message look-up, so an `attempting` email cannot be reconciled: never send it blindly.
    async with (
        e2e_env(settings, deps.aws, visibility_s=4) as env,
        DynamoGate(settings.aws_endpoint_url or "", mode="fail").running() as gate,
    ):
        body = e2e_tenant.request("email")
        email = recipient_of(body)
        async with in_process_service(gated(env.settings, gate)) as service:
            conversation_id = await service.initiate(e2e_tenant, body)
            await eventually(
                lambda: service.metric("comms_final_update_failures_total", queue="email") == 1,
                timeout_s=20,
                what="the final update gave up and counted the critical metric",
            )
            gate.release()
            record = await env.record_with_status(email, conversation_id, "failed_to_send_message", timeout_s=20)
            await eventually(lambda: env.is_empty("email"), timeout_s=5, what="the message is deleted")

        assert len(await env.sandboxes.sendgrid_mails()) == 1
        assert "send_outcome_unknown_needs_review" in record["failure_reason"]
        assert record["send_state"] == "attempting"
        assert service.received == 2


# -- provider failures ----------------------------------------------------------------------------------------------


async def test_ai_rate_limit_then_server_error_is_retried_and_sent_once(env, e2e_tenant):
    await env.sandboxes.add_ai_fault(status=429, count=1, retry_after=0.2, method="POST")
    await env.sandboxes.add_ai_fault(status=500, count=1, method="POST")
    body = e2e_tenant.request("whatsapp")
    tel = recipient_of(body)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=20)
        await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")

    assert len(await env.sandboxes.ai_requests()) == 3  # 429, 500, answer
    [message] = await env.sandboxes.twilio_messages()
    assert_initial_message_recorded(record, body, message["sid"], orjson.dumps(message["content_variables"]).decode())
    assert service.received == 1  # retried inside the AI step, not by redelivery


@pytest.mark.parametrize(("code", "meaning"), [(21211, "invalid 'To' number"), (63016, "outside the 24 h window")])
async def test_twilio_permanent_error_fails_the_conversation_and_deletes_the_message(env, e2e_tenant, code, meaning):
    body = e2e_tenant.request("whatsapp")
    tel = recipient_of(body)
    await env.sandboxes.fail_twilio_sends_to(tel, code=code)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        record = await env.record_with_status(tel, conversation_id, "failed_to_send_message", timeout_s=15)
        await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="message deleted, nothing in the DLQ")

    assert str(code) in record["failure_reason"], meaning
    assert record["messages"] == []
    stats = await env.sandboxes.twilio_stats()
    assert (stats["rejected"], stats["created"]) == (1, 0)
    assert service.received == 1


# -- poison messages ------------------------------------------------------------------------------------------------


async def test_malformed_context_goes_straight_to_the_dead_letter_queue(env):
    queue = env.queues["whatsapp"]
    async with in_process_service(env.settings) as service:
        await env.send_raw("whatsapp", "{not json", {"conversationId": "unparseable"})
        [dead] = await eventually(lambda: env.peek(queue.dlq_url), timeout_s=10, what="the DLQ holds the message")
        await eventually(lambda: env.holds_nothing(queue.url), timeout_s=5, what="the source queue is empty")

    assert dead["Body"] == "{not json"
    assert dead["MessageAttributes"]["conversationId"]["StringValue"] == "unparseable"
    assert service.received == 1  # no retry loop
    reason = "invalid_context:context_not_json"
    assert (
        service.metric("comms_messages_finished_total", queue="whatsapp", disposition="dead_letter", reason=reason) == 1
    )


async def test_invalid_context_naming_its_conversation_is_dead_lettered_and_recorded_failed(env, e2e_tenant):
    body = e2e_tenant.request("whatsapp")
    tel = recipient_of(body)
    queue = env.queues["whatsapp"]
    async with in_process_service(env.settings, start_consumers=False) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        [queued] = (await env.aws.sqs.receive_message(QueueUrl=queue.url, WaitTimeSeconds=5))["Messages"]
        await env.aws.sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=queued["ReceiptHandle"])
        context = orjson.loads(queued["Body"])
        del context["company_data_payload"]["channel_config"]["whatsapp"]  # no sender, no credentials
        await env.send_raw("whatsapp", orjson.dumps(context).decode(), {"conversationId": conversation_id})
        await service.start_consumers()
        record = await env.record_with_status(tel, conversation_id, "failed_invalid_context", timeout_s=10)
        [dead] = await eventually(lambda: env.peek(queue.dlq_url), timeout_s=10, what="the DLQ holds the message")
        await eventually(lambda: env.holds_nothing(queue.url), timeout_s=5, what="the source queue is empty")

    assert record["failure_reason"] == "channel_config_missing"
    assert orjson.loads(dead["Body"])["conversation_data"]["conversation_id"] == conversation_id
    assert await env.sandboxes.ai_requests() == []
    assert service.received == 1


async def test_message_failing_transiently_every_time_lands_in_the_dead_letter_queue_after_three_receives(
    settings, deps, e2e_tenant
):
    async with e2e_env(settings, deps.aws, visibility_s=4, ai_max_attempts=1) as env:
        await env.sandboxes.add_ai_fault(status=503, count=100, retry_after=1, method="POST")
        body = e2e_tenant.request("whatsapp")
        queue = env.queues["whatsapp"]
        async with in_process_service(env.settings) as service:
            conversation_id = await service.initiate(e2e_tenant, body)
            [dead] = await eventually(lambda: env.peek(queue.dlq_url), timeout_s=30, what="the redrive moved it")
            await eventually(lambda: env.holds_nothing(queue.url), timeout_s=5, what="the source queue is empty")

        assert orjson.loads(dead["Body"])["conversation_data"]["conversation_id"] == conversation_id
        assert service.received == 3  # maxReceiveCount: the fourth receive found it gone
        retried = service.metric(
            "comms_messages_finished_total", queue="whatsapp", disposition="retry", reason="ai_transient"
        )
        assert retried >= 1
        assert len(await env.sandboxes.ai_requests()) == 3  # every receive was a real attempt
        assert await env.sandboxes.twilio_messages() == []


async def test_ai_failing_on_every_receive_ends_failed_as_exhausted_and_a_redrive_then_sends_it_once(
    settings, deps, e2e_tenant
):
    # Persistent AI 500s: three receives, then the DLQ. The record must say why (not `processing` for ever), and
    # `comms dlq redrive` with the AI healthy again must finish the conversation with exactly one send.
    async with e2e_env(settings, deps.aws, visibility_s=4, ai_max_attempts=1) as env:
        await env.sandboxes.add_ai_fault(status=500, count=1000, retry_after=1, method="POST")
        body = e2e_tenant.request("whatsapp")
        tel = recipient_of(body)
        queue = env.queues["whatsapp"]
        async with in_process_service(env.settings) as service:
            conversation_id = await service.initiate(e2e_tenant, body)
            [dead] = await eventually(lambda: env.peek(queue.dlq_url), timeout_s=30, what="the message is in the DLQ")
            await eventually(lambda: env.holds_nothing(queue.url), timeout_s=5, what="the source queue is empty")
            failed = await env.record_with_status(tel, conversation_id, "failed_to_process_ai", timeout_s=5)

            assert orjson.loads(dead["Body"])["conversation_data"]["conversation_id"] == conversation_id
            assert "retries_exhausted" in failed["failure_reason"]
            assert "ai_transient" in failed["failure_reason"] and "500" in failed["failure_reason"]
            assert failed["failure_kind"] == "retries_exhausted"
            assert failed["send_state"] == "not_sent"
            assert service.received == 3
            assert len(await env.sandboxes.ai_requests()) == 3
            exhausted = service.metric(
                "comms_messages_finished_total", queue="whatsapp", disposition="dead_letter", reason="retries_exhausted"
            )
            assert exhausted == 1

            async with env.sandboxes.http.post(f"{env.sandboxes.openai.url}/_sandbox/reset") as answer:
                assert answer.status == 200  # the AI is healthy again
            ctx = Context(env.settings, env.aws, Output())
            result = await redrive(ctx, DlqPair("whatsapp", queue.url, queue.dlq_url), None)
            assert (result.moved, result.reopened, result.not_sent) == (1, 1, {})

            record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=20)
            await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")

        [message] = await env.sandboxes.twilio_messages()
        assert_initial_message_recorded(
            record, body, message["sid"], orjson.dumps(message["content_variables"]).decode()
        )
        assert "failure_reason" not in record and "failure_kind" not in record
        assert record["last_failure_reason"] == failed["failure_reason"]
        assert service.received == 4


async def test_redrive_does_not_reopen_a_conversation_that_failed_permanently(env, e2e_tenant):
    body = e2e_tenant.request("whatsapp")
    tel = recipient_of(body)
    queue = env.queues["whatsapp"]
    await env.sandboxes.fail_twilio_sends_to(tel, code=21211)
    async with in_process_service(env.settings, start_consumers=False) as service:
        conversation_id = await service.initiate(e2e_tenant, body)
        [queued] = (await env.aws.sqs.receive_message(QueueUrl=queue.url, WaitTimeSeconds=5))["Messages"]
        await env.aws.sqs.send_message(QueueUrl=queue.dlq_url, MessageBody=queued["Body"])
        await env.aws.sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=queued["ReceiptHandle"])
        await env.aws.sqs.send_message(QueueUrl=queue.url, MessageBody=queued["Body"])
        await service.start_consumers()
        await env.record_with_status(tel, conversation_id, "failed_to_send_message", timeout_s=15)
        await eventually(lambda: env.holds_nothing(queue.url), timeout_s=5, what="the message is deleted")

        result = await redrive(
            Context(env.settings, env.aws, Output()), DlqPair("whatsapp", queue.url, queue.dlq_url), None
        )
        await eventually(lambda: env.is_empty("whatsapp"), timeout_s=10, what="the redriven copy is dropped")

    assert (result.moved, result.reopened) == (1, 0)
    record = await env.record(tel, conversation_id)
    assert record is not None and record["conversation_status"] == "failed_to_send_message"
    assert "21211" in record["failure_reason"]
    assert (await env.sandboxes.twilio_stats())["rejected"] == 1  # the redelivery was dropped, not sent again


# -- heartbeat ------------------------------------------------------------------------------------------------------


async def test_heartbeat_keeps_the_message_invisible_through_an_ai_call_three_times_its_visibility(
    settings, deps, e2e_tenant
):
    # Scaled down from a 30 s visibility and a 90 s AI call: 4 s visibility, one 12 s AI call.
    # A second consumer on the same queue must never see the message.
    async with e2e_env(settings, deps.aws, visibility_s=4, ai_latency_s=12) as env:
        body = e2e_tenant.request("whatsapp")
        tel = recipient_of(body)
        async with in_process_service(env.settings) as worker, in_process_service(env.settings) as rival:
            conversation_id = await worker.initiate(e2e_tenant, body)
            record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=30)
            await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")

        assert worker.received + rival.received == 1
        assert len(await env.sandboxes.ai_requests()) == 1
        [message] = await env.sandboxes.twilio_messages()
        assert_initial_message_recorded(
            record, body, message["sid"], orjson.dumps(message["content_variables"]).decode()
        )
        assert record["processing_time_ms"] >= 3 * 4 * 1000
        extensions = sum(
            service.metric("comms_visibility_extensions_total", queue="whatsapp", result="ok")
            for service in (worker, rival)
        )
        assert extensions >= 4
