"""A graceful shutdown costs no message a receive it did not use (worker processes against moto and the sandboxes).

SQS cannot take back a ReceiveMessage: a long poll the stopping worker merely cancelled stays open at the
endpoint (moto's server thread waits on, as SQS does) and takes the messages the drain makes visible again,
hiding them for a visibility timeout and counting a receive; two rollouts during a slow AI call used to
dead-letter healthy messages. Here the AI is slower than the drain grace, so every message is interrupted
while the worker's next long poll is open; the next worker must find each one visible at once, one receive
per real processing attempt, and send it exactly once.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.e2e_support import (
    E2EEnv,
    Tenant,
    e2e_env,
    eventually,
    in_process_service,
    new_tenant,
    recipient_of,
    worker_process,
)

SENT = "initial_message_sent"
VISIBILITY_S = 10  # the lowest COMMS_VISIBILITY_TIMEOUT_S allows
GRACE_S = 1.0
SLOW_AI_S = 30.0  # far past the grace: nothing the first worker starts can finish
MESSAGES = 4
SLOTS = 8  # more than MESSAGES: with every message in flight the worker's long poll is open


@pytest.fixture
async def e2e_tenant(deps, tenant) -> Tenant:
    # `tenant` seeds the demo provider secrets the new company's channel config names.
    return await new_tenant(deps)


async def ai_calls_started(env: E2EEnv) -> int:
    """AI calls that reached the sandbox (each message's first one, while the latency holds the rest back)."""
    return sum([len(await env.sandboxes.ai_requests("POST", path)) for path in ("/v1/conversations", "/v1/responses")])


@pytest.mark.slow
async def test_sigterm_during_slow_ai_costs_no_message_an_unused_receive(settings, deps, e2e_tenant, tmp_path):
    async with e2e_env(
        settings,
        deps.aws,
        visibility_s=VISIBILITY_S,
        ai_latency_s=SLOW_AI_S,
        consumer_queues="whatsapp",
        consumer_concurrency=SLOTS,
        drain_grace_s=GRACE_S,
    ) as env:
        queue = env.queues["whatsapp"]
        bodies = [e2e_tenant.request("whatsapp") for _ in range(MESSAGES)]
        async with in_process_service(env.settings, start_consumers=False) as api:
            async with worker_process(env.settings, tmp_path, "first") as first:
                conversations = {recipient_of(body): await api.initiate(e2e_tenant, body) for body in bodies}
                await eventually(
                    lambda: has_at_least(ai_calls_started(env), MESSAGES),
                    timeout_s=30,
                    what=f"all {MESSAGES} messages in flight, waiting for the AI",
                )
                first.terminate()
                # The open long poll (20 s) ends by itself before anything is made visible again.
                assert await first.exit_code(timeout_s=45) == 0

            # Made visible at once, and not taken by the receive that was open during the stop.
            await eventually(
                lambda: has_depth(env, queue.url, (MESSAGES, 0)),
                timeout_s=3,
                what=f"{MESSAGES} visible, none in flight",
            )
            interrupted = first.events("message_finished")
            assert Counter(e["reason"] for e in interrupted) == {"shutdown": MESSAGES}
            assert all(e["retry_in_s"] == 0 for e in interrupted)

            await env.sandboxes.set_ai_latency(0)
            async with worker_process(env.settings, tmp_path, "second") as second:
                for tel, conversation_id in conversations.items():
                    await env.record_with_status(tel, conversation_id, SENT, timeout_s=30)
                await eventually(lambda: env.is_empty("whatsapp"), timeout_s=10, what="queue and DLQ empty")

        # Exactly one send per conversation.
        sent = Counter(message["to"].removeprefix("whatsapp:") for message in await env.sandboxes.twilio_messages())
        assert sent == dict.fromkeys(conversations, 1)

        # Each receive a worker made of these messages was a processing attempt (none handed back unstarted),
        # and the count SQS kept is exactly the number of attempts: the first worker's and the send.
        assert first.events("message_returned") == second.events("message_returned") == []
        attempts = Counter(e["message_id"] for e in [*interrupted, *second.events("message_finished")])
        assert len(attempts) == MESSAGES
        done = [e for e in second.events("message_finished") if e["reason"] == "sent"]
        assert len(done) == MESSAGES
        for event in done:
            assert event["receive_count"] == attempts[event["message_id"]] == 2, event
        assert await env.holds_nothing(queue.dlq_url)


async def has_at_least(count, expected: int) -> bool:
    return await count >= expected


async def has_depth(env: E2EEnv, url: str, expected: tuple[int, int]) -> bool:
    return await env.depth(url) == expected
