"""The embedded default: moto server, tables and queues, provider sandboxes, the demo tenant.

Everything listens on 127.0.0.1; the service talks to it through the real SDKs,
exactly as it would talk to AWS, OpenAI, Twilio and SendGrid.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from local_stack.moto_server import MotoServer, free_port, start_moto_server
from local_stack.openai_sandbox import create_openai_sandbox
from local_stack.sandbox_http import RunningServer, SandboxControl, serve
from local_stack.seed import (
    DEMO_SENDGRID_KEY,
    DEMO_TWILIO_ACCOUNT_SID,
    DEMO_TWILIO_AUTH_TOKEN,
    DemoTenant,
    seed_demo_tenant,
)
from local_stack.sendgrid_sandbox import create_sendgrid_sandbox
from local_stack.twilio_sandbox import create_twilio_sandbox
from service.adapters.aws.provisioning import provision_resources
from service.bootstrap import build
from service.config import Settings


@dataclass(slots=True)
class LocalStack:
    settings: Settings
    moto: MotoServer
    tenant: DemoTenant
    openai: RunningServer
    twilio: RunningServer
    sendgrid: RunningServer


@asynccontextmanager
async def local_stack(base: Settings, *, ai_latency_s: float = 0.2) -> AsyncIterator[LocalStack]:
    moto = await asyncio.to_thread(start_moto_server)
    servers: list[RunningServer] = []
    try:
        settings = await provision_resources(base.model_copy(update={"aws_endpoint_url": moto.url}))
        openai = await serve(create_openai_sandbox(SandboxControl(latency_s=ai_latency_s)))
        twilio = await serve(
            create_twilio_sandbox({DEMO_TWILIO_ACCOUNT_SID: DEMO_TWILIO_AUTH_TOKEN}, status_callbacks=True)
        )
        sendgrid = await serve(create_sendgrid_sandbox({DEMO_SENDGRID_KEY}))
        servers += [openai, twilio, sendgrid]
        settings = settings.model_copy(
            update={
                "openai_base_url": f"{openai.url}/v1",
                "twilio_base_url": twilio.url,
                "sendgrid_base_url": sendgrid.url,
                "public_base_url": base.public_base_url or f"http://127.0.0.1:{base.port}",
                # Two local runs must not collide on the default metrics port: a free one unless set.
                "metrics_port": base.metrics_port if "metrics_port" in base.model_fields_set else free_port(),
            }
        )
        async with build(settings) as deps:
            tenant = await seed_demo_tenant(deps.aws, settings)
        yield LocalStack(settings, moto, tenant, openai, twilio, sendgrid)
    finally:
        for server in reversed(servers):
            await server.close()
        await asyncio.to_thread(moto.stop)


def demo_request(tenant: DemoTenant, channel: str = "whatsapp") -> dict[str, Any]:
    return {
        "company_data": {"company_id": tenant.company_id, "project_id": tenant.project_id},
        "recipient_data": {
            "recipient_first_name": "Lee",
            "recipient_last_name": "Hayton",
            "recipient_tel": "+447700900123",
            "recipient_email": "lee@example.com",
            "comms_consent": True,
        },
        "project_data": {"property": "12 Acacia Avenue", "viewing_slot": "Saturday 10:00"},
        "request_data": {
            "request_id": str(uuid.uuid4()),
            "channel_method": channel,
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
        },
    }


def demo_inbound(stack: LocalStack, port: int, body: str = "Is the viewing still on?") -> dict[str, str]:
    return {
        "url": f"http://127.0.0.1:{port}/webhooks/twilio/whatsapp",
        "from": "whatsapp:+447700900123",
        "to": "whatsapp:+447700900001",
        "body": body,
        "account_sid": DEMO_TWILIO_ACCOUNT_SID,
    }


def ready_banner(stack: LocalStack) -> str:
    port = stack.settings.port
    body = orjson.dumps(demo_request(stack.tenant)).decode()
    return "\n".join(
        [
            "",
            "AI Multi-Comms Engine is running on the embedded local stack.",
            f"  API              http://127.0.0.1:{port}  (health /healthz, readiness /readyz)",
            f"  Metrics          http://127.0.0.1:{stack.settings.metrics_port}/metrics",
            f"  AWS (moto)       {stack.moto.url}",
            f"  OpenAI sandbox   {stack.openai.url}/v1",
            f"  Twilio sandbox   {stack.twilio.url}   (sent messages: {stack.twilio.url}/_sandbox/twilio/messages)",
            f"  SendGrid sandbox {stack.sendgrid.url} (sent mail: {stack.sendgrid.url}/_sandbox/sendgrid/messages)",
            f"  Demo API key     {stack.tenant.api_key}",
            "",
            "Start a conversation (repeat it and you get the same conversation_id, queued once):",
            "",
            f"curl -sS -X POST http://127.0.0.1:{port}/initiate-conversation \\",
            "  -H 'Content-Type: application/json' \\",
            f"  -H 'x-api-key: {stack.tenant.api_key}' \\",
            f"  -d '{body}'",
            "",
            "Then answer it as the recipient would (the sandbox signs the webhook like Twilio; the AI replies",
            f"after the {stack.settings.batching_window_s} s batching window, see the sandbox's sent messages):",
            "",
            f"curl -sS -X POST {stack.twilio.url}/_sandbox/twilio/inbound \\",
            "  -H 'Content-Type: application/json' \\",
            f"  -d '{orjson.dumps(demo_inbound(stack, port)).decode()}'",
            "",
            "Stop with Ctrl-C.",
            "",
        ]
    )
