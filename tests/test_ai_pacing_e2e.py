"""AI pacing end to end (issue 14 §3): a burst of conversations on one OpenAI API key, through the real endpoint,
the consumers, the paced OpenAI writer the composition root builds (its turns leased from the rate-limits table on
moto) and the OpenAI sandbox holding each key to its limit. The pace is set both as the project's (its
`ai_config.openai_config.whatsapp.requests_per_second`) and as the default, so the run means the same whichever
the composition reads."""

from __future__ import annotations

import time
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any

from local_stack.seed import demo_company
from service.bootstrap import Dependencies
from service.config import Settings
from tests.e2e_support import E2EEnv, Tenant, e2e_env, eventually, in_process_service
from tests.support import add_tenant

CONVERSATIONS = 16
# OpenAI's side: 10 creates per key in any 3 s. The pace, 2 a second with a burst of 2, lets at most 2 + 2 x 3 = 8
# into any 3 s; unpaced, the burst is all in well within 3 s.
KEY_LIMIT = {"max_requests": 10, "window_s": 3.0}
PACE_PER_SECOND = 2.0
WORKER_SLOTS = 16


async def openai_key_limit(env: E2EEnv, limit: dict[str, float] | None = None) -> dict[str, Any]:
    """Set the sandbox's per-key limit (with `limit`), or read it and how many creates it refused."""
    url = f"{env.sandboxes.openai.url}/_sandbox/openai/key-limit"
    async with env.sandboxes.http.request("POST" if limit else "GET", url, json=limit) as answer:
        assert answer.status == 200, await answer.text()
        return dict(await answer.json())


def one_key_env(settings: Settings, deps: Dependencies, ai_per_second: float) -> AbstractAsyncContextManager[E2EEnv]:
    """The WhatsApp queue with enough worker slots for the whole burst at once, AI keys paced at `ai_per_second`."""
    return e2e_env(
        settings,
        deps.aws,
        consumer_queues="whatsapp",
        consumer_concurrency=WORKER_SLOTS,
        ai_requests_per_second=ai_per_second,
    )


async def tenant_with_ai_pace(deps: Dependencies, per_second: float | None) -> Tenant:
    """A tenant like the demo one whose WhatsApp AI key is paced at `per_second` (None: the default pace)."""
    suffix = uuid.uuid4().hex[:8]
    company_id, project_id = f"ci-aipace-{suffix}", f"pi-aipace-{suffix}"
    ai_config = demo_company(deps.settings.secrets_prefix, "dev", time.time()).ai_config
    whatsapp = {k: v for k, v in ai_config["openai_config"]["whatsapp"].items() if k != "requests_per_second"}
    if per_second is not None:
        whatsapp["requests_per_second"] = per_second
    ai_config = {**ai_config, "openai_config": {**ai_config["openai_config"], "whatsapp": whatsapp}}
    api_key = await add_tenant(deps, company_id, project_id, ai_config=ai_config)
    return Tenant(company_id, project_id, api_key)


async def burst(env: E2EEnv, tenant: Tenant, *, until_all_sent: bool) -> list[dict[str, Any]]:
    """Initiate the burst on one channel (one API key); wait until every conversation was sent, or else until the
    sandbox first refused a create."""
    await openai_key_limit(env, KEY_LIMIT)
    async with in_process_service(env.settings) as service:
        bodies = [tenant.request("whatsapp") for _ in range(CONVERSATIONS)]
        for body in bodies:
            await service.initiate(tenant, body)

        async def all_sent() -> bool:
            return len(await env.sandboxes.twilio_messages()) == CONVERSATIONS

        async def refused() -> bool:
            return bool((await openai_key_limit(env))["rate_limited"])

        if until_all_sent:
            await eventually(all_sent, timeout_s=60, what="every conversation was sent")
        else:
            await eventually(refused, timeout_s=30, what="the sandbox refused a create")
    return bodies


async def test_a_burst_on_one_key_at_its_pace_meets_no_429(
    settings: Settings,
    deps: Dependencies,
    tenant: object,  # the demo tenant's provider secrets, which ours shares
) -> None:
    ours = await tenant_with_ai_pace(deps, PACE_PER_SECOND)
    async with one_key_env(settings, deps, PACE_PER_SECOND) as env:
        bodies = await burst(env, ours, until_all_sent=True)
        messages = await env.sandboxes.twilio_messages()
        limit = await openai_key_limit(env)
        creates = await env.sandboxes.ai_requests()
    assert limit["rate_limited"] == 0
    assert len(creates) == CONVERSATIONS  # each conversation's AI call made once: none refused, none repeated
    assert sorted(m["to"] for m in messages) == sorted(
        f"whatsapp:{b['recipient_data']['recipient_tel']}" for b in bodies
    )


async def test_the_same_burst_unpaced_meets_the_key_s_limit(
    settings: Settings,
    deps: Dependencies,
    tenant: object,  # the demo tenant's provider secrets, which ours shares
) -> None:
    ours = await tenant_with_ai_pace(deps, None)
    async with one_key_env(settings, deps, 0.0) as env:
        await burst(env, ours, until_all_sent=False)
        limit = await openai_key_limit(env)
    assert limit["rate_limited"] > 0
