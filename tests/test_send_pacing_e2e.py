"""Provider pacing end to end (issue 14 §3): a burst of conversations from one SMS sender, through the real
endpoint, the consumers, the rate-limits table on moto and the Twilio sandbox holding each sender to its limit."""

from __future__ import annotations

import time
import uuid

from local_stack.seed import demo_company
from service.bootstrap import Dependencies
from service.config import Settings
from tests.e2e_support import Tenant, e2e_env, eventually, in_process_service
from tests.support import add_tenant

CONVERSATIONS = 8
PACE_PER_SECOND = 2.0


async def tenant_paced_at(deps: Dependencies, sms_per_second: float) -> Tenant:
    suffix = uuid.uuid4().hex[:8]
    company_id, project_id = f"ci-pace-{suffix}", f"pi-pace-{suffix}"
    channel_config = demo_company(deps.settings.secrets_prefix, "dev", time.time()).channel_config
    channel_config = channel_config.model_dump(mode="json", exclude_none=True)
    channel_config["sms"]["sends_per_second"] = sms_per_second
    api_key = await add_tenant(deps, company_id, project_id, channel_config=channel_config)
    return Tenant(company_id, project_id, api_key)


async def test_a_burst_from_one_sender_goes_out_at_its_pace_without_one_429(
    settings: Settings, deps: Dependencies, tenant: object
) -> None:
    paced = await tenant_paced_at(deps, PACE_PER_SECOND)
    async with e2e_env(settings, deps.aws, consumer_queues="sms") as env:
        # Twilio's side: 5 sends a second per sender; the pace (2 a second, a burst of 2) stays under it.
        await env.sandboxes.limit_twilio_senders(max_sends=5, window_s=1.0)
        async with in_process_service(env.settings) as service:
            bodies = [paced.request("sms") for _ in range(CONVERSATIONS)]
            for body in bodies:
                await service.initiate(paced, body)

            async def all_sent() -> bool:
                return len(await env.sandboxes.twilio_messages()) == CONVERSATIONS

            await eventually(all_sent, timeout_s=60, what="every conversation was sent")

        messages = await env.sandboxes.twilio_messages()
        stats = await env.sandboxes.twilio_stats()
    assert stats["rate_limited"] == 0
    assert sorted(m["to"] for m in messages) == sorted(b["recipient_data"]["recipient_tel"] for b in bodies)
