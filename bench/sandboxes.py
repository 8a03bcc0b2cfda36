"""The provider sandboxes, served from the benchmark process (their CPU is not the service's).

The OpenAI sandbox answers a model call (`POST /v1/responses`) after the fixed latency L; creating the
OpenAI conversation (`POST /v1/conversations`, the thread) takes `thread_latency_s` (default 0), so the
ideal throughput of C slots is C/L. The shared `SandboxControl.latency_s` would delay both calls. Both latencies
live in `Sandboxes.latency`, so a run can change them between phases (the replies mode sends its templates fast).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from local_stack.openai_sandbox import OPENAI_STATE_KEY, OpenAISandboxStats, create_openai_sandbox
from local_stack.sandbox_http import Handler, RunningServer, SandboxControl, serve
from local_stack.seed import DEMO_SENDGRID_KEY, DEMO_TWILIO_ACCOUNT_SID, DEMO_TWILIO_AUTH_TOKEN
from local_stack.sendgrid_sandbox import create_sendgrid_sandbox
from local_stack.twilio_sandbox import TWILIO_STATE_KEY, TwilioSandboxState, create_twilio_sandbox


@dataclass(slots=True)
class AiLatency:
    """Seconds the sandbox takes per model call and per conversation create; a run may change them between phases."""

    model_s: float
    thread_s: float = 0.0


def ai_latency(latency: AiLatency) -> Middleware:
    """Innermost middleware: the model call takes L, the thread creation its own (usually zero) time."""

    @web.middleware
    async def delay(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/v1/responses" and latency.model_s > 0:
            await asyncio.sleep(latency.model_s)
        elif request.method == "POST" and request.path == "/v1/conversations" and latency.thread_s > 0:
            await asyncio.sleep(latency.thread_s)
        return await handler(request)

    return delay


@dataclass(slots=True)
class Sandboxes:
    openai: RunningServer
    twilio: RunningServer
    sendgrid: RunningServer
    openai_stats: OpenAISandboxStats
    twilio_state: TwilioSandboxState
    latency: AiLatency

    async def close(self) -> None:
        for server in (self.sendgrid, self.twilio, self.openai):
            await server.close()

    @property
    def messages_sent(self) -> int:
        return self.twilio_state.counts.created


async def start_sandboxes(model_latency_s: float, thread_latency_s: float) -> Sandboxes:
    latency = AiLatency(model_latency_s, thread_latency_s)
    openai_app = create_openai_sandbox(SandboxControl(latency_s=0.0))
    openai_app.middlewares.append(ai_latency(latency))
    twilio_app = create_twilio_sandbox({DEMO_TWILIO_ACCOUNT_SID: DEMO_TWILIO_AUTH_TOKEN})
    openai = await serve(openai_app)
    twilio = await serve(twilio_app)
    sendgrid = await serve(create_sendgrid_sandbox({DEMO_SENDGRID_KEY}))
    stats, state = openai_app[OPENAI_STATE_KEY].stats, twilio_app[TWILIO_STATE_KEY]
    return Sandboxes(openai, twilio, sendgrid, stats, state, latency)
