"""The worker as its own process (`python -m service serve --role worker`): kill -9 mid-flight and SIGTERM drains.

The API runs in this process and queues through the real endpoint; the workers share the moto server and this
test's sandboxes over HTTP. Visibility is 10 s (the lowest COMMS_VISIBILITY_TIMEOUT_S allows), so a killed
worker's message reappears within 10 s and its conversation claim (0.8 x visibility) has lapsed by about then.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from service.config import Settings
from tests.e2e_support import (
    DynamoGate,
    Tenant,
    e2e_env,
    eventually,
    in_process_service,
    new_tenant,
    recipient_of,
    worker_process,
)

SENT = "initial_message_sent"
VISIBILITY_S = 10
# An idle worker no longer exits at once on SIGTERM: it lets its open long poll (WaitTimeSeconds 20) end by
# itself, bounded by the receive margin (5 s), and hands back what it brings; cancelling the poll would leave it
# open at SQS to take (count a receive of, and hide) a message made visible meanwhile. Plus a little to exit.
IDLE_EXIT_S = 20 + 5 + 5


@pytest.fixture
async def e2e_tenant(deps, tenant) -> Tenant:
    # `tenant` seeds the demo provider secrets the new company's channel config names.
    return await new_tenant(deps)


async def test_worker_killed_mid_flight_leads_to_exactly_one_send_after_the_visibility_timeout(
    settings, deps, e2e_tenant, tmp_path
):
    # Two crash points, each in its own world (queues, sandboxes, workers), run side by side to save the wait.
    async with asyncio.TaskGroup() as scenarios:  # a failure cancels the other and reports both
        scenarios.create_task(killed_before_sending(settings, deps, e2e_tenant, tmp_path / "before_send"))
        scenarios.create_task(killed_after_the_send_call(settings, deps, e2e_tenant, tmp_path / "after_send"))


async def killed_before_sending(settings, deps, e2e_tenant, log_dir):
    """Killed while asking the AI (whose first answer never comes): nothing was sent, so the next worker
    generates again and sends once."""
    log_dir.mkdir()
    async with e2e_env(settings, deps.aws, visibility_s=VISIBILITY_S, consumer_queues="whatsapp") as env:
        await env.sandboxes.add_ai_fault(mode="hang", count=1, method="POST")
        body = e2e_tenant.request("whatsapp")
        tel = recipient_of(body)
        async with in_process_service(env.settings, start_consumers=False) as api:
            async with worker_process(one_slot(env.settings), log_dir, "first") as first:
                conversation_id = await api.initiate(e2e_tenant, body)
                await eventually(env.sandboxes.ai_requests, timeout_s=15, what="the first worker is asking the AI")
                first.kill()
                assert await first.exit_code(timeout_s=5) == -signal.SIGKILL
            assert await env.sandboxes.twilio_messages() == []

            async with worker_process(env.settings, log_dir, "second") as second:
                record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=VISIBILITY_S + 15)
                await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")
                second.terminate()
                assert await second.exit_code(timeout_s=IDLE_EXIT_S) == 0

        [message] = await env.sandboxes.twilio_messages()
        assert message["to"] == f"whatsapp:{tel}"
        assert record["provider_message_id"] == message["sid"]
        assert [m["message_id"] for m in record["messages"]] == [message["sid"]]
        [finished] = [e for e in second.events("message_finished") if e["reason"] == "sent"]
        assert finished["receive_count"] >= 2


async def killed_after_the_send_call(settings, deps, e2e_tenant, log_dir):
    """Killed after Twilio accepted the message, before the final update (held at a DynamoDB gate): the record
    says `attempting`, so the next worker must reconcile with Twilio and finish the record, not resend."""
    log_dir.mkdir()
    async with (
        e2e_env(settings, deps.aws, visibility_s=VISIBILITY_S, consumer_queues="whatsapp") as env,
        DynamoGate(settings.aws_endpoint_url or "", mode="hold").running() as gate,
    ):
        body = e2e_tenant.request("whatsapp")
        tel = recipient_of(body)
        gated = env.settings.model_copy(update={"dynamodb_endpoint_url": gate.url})
        async with in_process_service(env.settings, start_consumers=False) as api:
            async with worker_process(one_slot(gated), log_dir, "first") as first:
                conversation_id = await api.initiate(e2e_tenant, body)
                await eventually(gate.holding.is_set, timeout_s=15, what="the first worker sent and is finalising")
                assert len(await env.sandboxes.twilio_messages()) == 1
                first.kill()
                assert await first.exit_code(timeout_s=5) == -signal.SIGKILL
            stuck = await env.record(tel, conversation_id)
            assert stuck is not None
            assert (stuck["conversation_status"], stuck["send_state"]) == ("processing", "attempting")

            async with worker_process(env.settings, log_dir, "second") as second:
                record = await env.record_with_status(tel, conversation_id, SENT, timeout_s=VISIBILITY_S + 15)
                await eventually(lambda: env.is_empty("whatsapp"), timeout_s=5, what="the message is deleted")
                second.terminate()
                assert await second.exit_code(timeout_s=IDLE_EXIT_S) == 0

        [message] = await env.sandboxes.twilio_messages()
        assert record["provider_message_id"] == message["sid"]
        assert [m["message_id"] for m in record["messages"]] == [message["sid"]]
        assert [e["found"] for e in second.events("send_reconciled")] == [True]
        assert len(await env.sandboxes.ai_requests()) == 1  # the redelivery reused the stored generation


async def test_sigterm_drain_outlasts_the_ai_timeout_so_no_work_is_cut_off(settings, deps, e2e_tenant, tmp_path):
    # Eight conversations for six worker slots. Every AI request takes 1.5 s and two AI answers never come.
    # The drain grace covers an AI call and a send (the settings refuse less), so on SIGTERM nothing is cut
    # off: the four with answers finish and are sent; the two stuck end by the AI timeout within the grace
    # and are retried later like any AI failure; the two never received stay on the queue.
    ai_timeout_s, provider_timeout_s = 2.5, 0.5
    grace_s = ai_timeout_s + provider_timeout_s
    async with e2e_env(
        settings,
        deps.aws,
        visibility_s=VISIBILITY_S,
        ai_latency_s=1.5,
        consumer_queues="whatsapp",
        consumer_concurrency=6,
        drain_grace_s=grace_s,
        ai_timeout_s=ai_timeout_s,
        provider_timeout_s=provider_timeout_s,
    ) as env:
        await env.sandboxes.add_ai_fault(mode="hang", count=2, method="POST")
        bodies = [e2e_tenant.request("whatsapp") for _ in range(8)]
        async with (
            in_process_service(env.settings, start_consumers=False) as api,
            worker_process(env.settings, tmp_path) as worker,
        ):
            conversations = {recipient_of(body): await api.initiate(e2e_tenant, body) for body in bodies}
            await eventually(
                lambda: has_count(env.sandboxes.ai_requests(), 6), timeout_s=15, what="six AI requests in flight"
            )
            worker.terminate()
            assert await worker.exit_code(timeout_s=grace_s + 15) == 0  # hang guard
            # Nothing was deleted but the four sent: two retried later (invisible), two never received.
            await eventually(lambda: has_total_depth(env, 4), timeout_s=2, what="4 messages left on the queue")

        # The stop began with the grace period and cut nothing off: no work was cancelled, none waited longer.
        assert [e["grace_s"] for e in worker.events("consumer_stopping")] == [grace_s]
        for longer_wait in ("cancelling_protected_work", "receive_abandoned", "finishing_timed_out", "forced_stop"):
            assert worker.events(longer_wait) == [], longer_wait
        sent = {message["to"].removeprefix("whatsapp:"): message for message in await env.sandboxes.twilio_messages()}
        assert len(sent) == 4
        statuses = Counter()
        for tel, conversation_id in conversations.items():
            record = await env.record(tel, conversation_id)
            status = record["conversation_status"] if record else "never_received"
            statuses[status] += 1
            if tel in sent:
                assert status == SENT
                assert [m["message_id"] for m in record["messages"]] == [sent[tel]["sid"]]
            elif record:  # the AI timed out: nothing sent, the claim released for the retry
                assert (record["send_state"], record["claim_expires_at"]) == ("not_sent", 0)
        assert statuses == {SENT: 4, "processing": 2, "never_received": 2}
        reasons = Counter(event["reason"] for event in worker.events("message_finished"))
        assert reasons == {"sent": 4, "ai_transient": 2}


async def test_a_second_sigterm_during_shutdown_stops_at_once(settings, deps, tmp_path):
    # The first SIGTERM starts the graceful stop, which waits for the open long poll (up to 20 s); the second
    # one abandons it and exits at once.
    async with (
        e2e_env(settings, deps.aws, visibility_s=VISIBILITY_S, consumer_queues="whatsapp") as env,
        worker_process(env.settings, tmp_path) as worker,
    ):
        worker.terminate()
        await eventually(lambda: bool(worker.events("service_stopping")), timeout_s=10, what="graceful stop began")
        worker.terminate()
        assert await worker.exit_code(timeout_s=10) == 0
        assert [e["signal"] for e in worker.events("forced_stop")] == ["SIGTERM"]
        assert len(worker.events("consumer_abandoned")) == 1


def one_slot(settings: Settings) -> Settings:
    """One worker slot: once it holds the message, the worker has no long poll open. A poll open when the worker
    is killed lives on in the SQS endpoint and would take the message when it reappears (as on SQS itself),
    costing the next worker another visibility timeout."""
    return settings.model_copy(update={"consumer_concurrency": 1})


async def has_count(items, expected: int) -> bool:
    return len(await items) == expected


async def has_total_depth(env, expected: int) -> bool:
    return sum(await env.depth(env.queues["whatsapp"].url)) == expected
