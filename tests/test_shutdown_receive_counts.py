"""A graceful shutdown costs no message a receive it did not use (worker processes against moto and the sandboxes).

SQS cannot take back a ReceiveMessage: a long poll the stopping worker merely cancelled stays open at the
endpoint (moto's server thread waits on, as SQS does) and takes the messages the drain makes visible again,
hiding them for a visibility timeout and counting a receive; two rollouts during a slow AI call used to
dead-letter healthy messages. Here Secrets Manager hangs (the AI cannot outlast the drain grace: the settings
make the grace cover an AI call and a send), so every message is interrupted while the worker's next long poll
is open; the next worker must find each one visible at once, one receive per real processing attempt, and send
it exactly once.
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

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
from tests.fault_proxy import FaultProxy

SENT = "initial_message_sent"
VISIBILITY_S = 10  # the lowest COMMS_VISIBILITY_TIMEOUT_S allows
GRACE_S = 1.0  # covers the first worker's AI and provider timeouts (0.5 s each), far below its hung secrets fetch
MESSAGES = 4
SLOTS = 8  # more than MESSAGES: with every message in flight the worker's long poll is open


@pytest.fixture
async def e2e_tenant(deps, tenant) -> Tenant:
    # `tenant` seeds the demo provider secrets the new company's channel config names.
    return await new_tenant(deps)


@pytest.mark.slow
async def test_sigterm_during_stalled_work_costs_no_message_an_unused_receive(settings, deps, e2e_tenant, tmp_path):
    moto = urlsplit(settings.aws_endpoint_url)
    async with (
        e2e_env(
            settings,
            deps.aws,
            visibility_s=VISIBILITY_S,
            consumer_queues="whatsapp",
            consumer_concurrency=SLOTS,
        ) as env,
        FaultProxy(moto.hostname or "127.0.0.1", moto.port or 80) as secrets_proxy,
    ):
        queue = env.queues["whatsapp"]
        # The first worker's Secrets Manager never answers: nothing it starts can finish.
        secrets_proxy.stall()
        first_settings = env.settings.model_copy(
            update={
                "secretsmanager_endpoint_url": secrets_proxy.url,
                "drain_grace_s": GRACE_S,
                "ai_timeout_s": 0.5,
                "provider_timeout_s": 0.5,
            }
        )
        bodies = [e2e_tenant.request("whatsapp") for _ in range(MESSAGES)]
        async with in_process_service(env.settings, start_consumers=False) as api:
            async with worker_process(first_settings, tmp_path, "first") as first:
                conversations = {recipient_of(body): await api.initiate(e2e_tenant, body) for body in bodies}
                await eventually(
                    lambda: has_depth(env, queue.url, (0, MESSAGES)),
                    timeout_s=30,
                    what=f"all {MESSAGES} messages in flight, waiting for their secrets",
                )
                await eventually(lambda: secrets_proxy.connections > 0, timeout_s=10, what="a secrets fetch is waiting")
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
