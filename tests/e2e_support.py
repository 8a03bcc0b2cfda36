"""End-to-end helpers: per-test queues and provider sandboxes, the service in-process or as a worker process.

Everything talks over real HTTP: the moto server (session-shared, so every test makes its own queues and
recipients), fresh OpenAI/Twilio/SendGrid sandboxes per test, and optionally a DynamoDB gate (a pass-through
proxy in front of moto that can fail or hold the final update) to put a crash exactly where a test wants it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumers.runtime import QueueConsumer
from local_stack.moto_server import LOCAL_CREDENTIALS, free_port
from local_stack.openai_sandbox import create_openai_sandbox
from local_stack.sandbox_http import RunningServer, serve
from local_stack.seed import DEMO_OPENAI_KEY, DEMO_SENDGRID_KEY, DEMO_TWILIO_ACCOUNT_SID, DEMO_TWILIO_AUTH_TOKEN
from local_stack.sendgrid_sandbox import create_sendgrid_sandbox
from local_stack.twilio_sandbox import create_twilio_sandbox
from service.adapters.aws.clients import AwsClients
from service.adapters.aws.conversation_codec import item_key
from service.adapters.aws.dynamo_codec import from_item
from service.adapters.aws.provisioning import ensure_queue
from service.adapters.aws.resources import queue_specs
from service.api.app import create_app
from service.bootstrap import Dependencies, build
from service.config import CHANNELS, Settings
from service.domain.conversation import ConversationKey
from tests.conftest import initiate_body
from tests.stored_messages import with_messages
from tests.support import add_tenant

T = TypeVar("T")

PUBLIC_BASE_URL = "http://127.0.0.1:9"  # only ever named in status-callback URLs; the sandbox does not call it
STATUS_CALLBACK_URL = f"{PUBLIC_BASE_URL}/webhooks/twilio/status"
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- waiting -------------------------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], T | Awaitable[T]], *, timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll `check` until it returns something truthy (and return it); fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what} (last seen: {result!r})")
        await asyncio.sleep(interval_s)


# -- unique recipients and a tenant of our own ----------------------------------------------------------------


def unique_tel() -> str:
    return f"+4477009{random.randint(0, 99999):05d}"


def unique_email() -> str:
    return f"lee.{uuid.uuid4().hex[:10]}@example.com"


@dataclass(frozen=True, slots=True)
class Tenant:
    company_id: str
    project_id: str
    api_key: str

    def request(self, channel: str, *, tel: str | None = None, email: str | None = None) -> dict[str, Any]:
        """An initiate body for this tenant with a fresh request_id and (unless given) fresh recipients."""
        return initiate_body(
            channel,
            company_data={"company_id": self.company_id, "project_id": self.project_id},
            recipient_data={"recipient_tel": tel or unique_tel(), "recipient_email": email or unique_email()},
        )


async def new_tenant(deps: Dependencies) -> Tenant:
    """A company/project like the demo one (same provider secrets), untouched by other tests."""
    suffix = uuid.uuid4().hex[:8]
    company_id, project_id = f"ci-e2e-{suffix}", f"pi-e2e-{suffix}"
    api_key = await add_tenant(deps, company_id, project_id)
    return Tenant(company_id, project_id, api_key)


def recipient_of(body: dict[str, Any]) -> str:
    """The conversation's primary_channel: the recipient's email for email, else the number."""
    recipient = body["recipient_data"]
    return str(
        recipient["recipient_email"]
        if body["request_data"]["channel_method"] == "email"
        else recipient["recipient_tel"]
    )


# -- provider sandboxes -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sandboxes:
    """Fresh OpenAI, Twilio and SendGrid sandboxes, steered and read over their HTTP control routes."""

    openai: RunningServer
    twilio: RunningServer
    sendgrid: RunningServer
    http: aiohttp.ClientSession

    async def _call(self, method: str, url: str, payload: dict[str, Any] | None = None, **headers: str) -> Any:
        async with self.http.request(method, url, json=payload, headers=headers) as answer:
            assert answer.status == 200, f"{method} {url}: {answer.status} {await answer.text()}"
            return await answer.json()

    # OpenAI
    async def set_ai_latency(self, seconds: float) -> None:
        await self._call("POST", f"{self.openai.url}/_sandbox/latency", {"seconds": seconds})

    async def add_ai_fault(self, **fault: Any) -> None:
        """Answer the next `count` matching OpenAI requests with a fault (see `sandbox_http.Fault`)."""
        await self._call("POST", f"{self.openai.url}/_sandbox/faults", {"path_prefix": "/v1/responses", **fault})

    async def ai_requests(self, method: str = "POST", path: str = "/v1/responses") -> list[dict[str, Any]]:
        """The OpenAI requests seen so far with this method and exact path (recorded as they arrive)."""
        seen = await self._call("GET", f"{self.openai.url}/_sandbox/requests")
        return [r for r in seen if r["method"] == method and r["path"] == path]

    async def ai_response(self, response_id: str) -> dict[str, Any]:
        """A stored OpenAI response (GET /v1/responses/{id}), e.g. the one a conversation's thread_id names."""
        return dict(
            await self._call(
                "GET", f"{self.openai.url}/v1/responses/{response_id}", Authorization=f"Bearer {DEMO_OPENAI_KEY}"
            )
        )

    # Twilio
    async def twilio_messages(self) -> list[dict[str, Any]]:
        """Every message the Twilio sandbox created, with the request fields Twilio does not echo back."""
        return list(await self._call("GET", f"{self.twilio.url}/_sandbox/twilio/messages"))

    async def twilio_stats(self) -> dict[str, Any]:
        return dict(await self._call("GET", f"{self.twilio.url}/_sandbox/twilio/stats"))

    async def fail_twilio_sends_to(self, number: str, *, code: int, status: int = 400) -> None:
        await self._call(
            "POST", f"{self.twilio.url}/_sandbox/twilio/recipients", {"number": number, "code": code, "status": status}
        )

    async def limit_twilio_senders(self, **limit: float) -> None:
        """Each sender's limit (`per_second`, or `max_sends` per `window_s`); past it Twilio answers 429/20429."""
        await self._call("POST", f"{self.twilio.url}/_sandbox/twilio/sender-limit", dict(limit))

    # SendGrid
    async def sendgrid_mails(self) -> list[dict[str, Any]]:
        return list(await self._call("GET", f"{self.sendgrid.url}/_sandbox/sendgrid/messages"))


async def _serve(app: web.Application) -> RunningServer:
    server = await serve(app)
    assert server.runner.server is not None
    server.runner.server.handler_cancellation = True  # a killed client ends its hung or slow request at once
    return server


@asynccontextmanager
async def provider_sandboxes(ai_latency_s: float = 0.0) -> AsyncIterator[Sandboxes]:
    async with AsyncExitStack() as stack:
        servers = [
            await _serve(create_openai_sandbox()),
            await _serve(create_twilio_sandbox({DEMO_TWILIO_ACCOUNT_SID: DEMO_TWILIO_AUTH_TOKEN})),
            await _serve(create_sendgrid_sandbox({DEMO_SENDGRID_KEY})),
        ]
        for server in servers:
            stack.push_async_callback(server.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        sandboxes = Sandboxes(*servers, http=http)
        if ai_latency_s:
            await sandboxes.set_ai_latency(ai_latency_s)
        yield sandboxes


# -- queues -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueuePair:
    """A queue and its dead-letter queue."""

    url: str
    dlq_url: str


@dataclass(slots=True)
class E2EEnv:
    """One test's world: its queues, its sandboxes, settings naming them, and direct AWS clients to check with."""

    settings: Settings
    sandboxes: Sandboxes
    queues: dict[str, QueuePair]
    aws: AwsClients  # straight to moto (never through a gate), for reading what happened

    async def record(self, primary_channel: str, conversation_id: str) -> dict[str, Any] | None:
        """The stored item as it is (a consistent read), its `messages` every message recorded, or None."""
        key = item_key(ConversationKey(primary_channel, conversation_id))
        answer = await self.aws.dynamodb.get_item(
            TableName=self.settings.conversations_table, Key=key, ConsistentRead=True
        )
        if "Item" not in answer:
            return None
        return await with_messages(self.aws.dynamodb, self.settings.messages_table, from_item(answer["Item"]))

    async def record_with_status(
        self, primary_channel: str, conversation_id: str, status: str, timeout_s: float
    ) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            found = await self.record(primary_channel, conversation_id)
            return found if found and found.get("conversation_status") == status else None

        return await eventually(reached, timeout_s=timeout_s, what=f"conversation {conversation_id} is {status}")

    async def depth(self, url: str) -> tuple[int, int]:
        """(visible, in flight) as SQS reports them."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = (await self.aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))["Attributes"]
        return int(attributes[names[0]]), int(attributes[names[1]])

    async def holds_nothing(self, url: str) -> bool:
        """The queue holds no message, visible or in flight."""
        return await self.depth(url) == (0, 0)

    async def is_empty(self, channel: str) -> bool:
        """Neither the channel queue nor its DLQ holds anything, visible or in flight."""
        queue = self.queues[channel]
        return await self.holds_nothing(queue.url) and await self.holds_nothing(queue.dlq_url)

    async def peek(self, url: str) -> list[dict[str, Any]]:
        """Receive what is visible without consuming it (visibility 0 puts it straight back)."""
        answer = await self.aws.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return list(answer.get("Messages", []))

    async def send_raw(self, channel: str, body: str, attributes: dict[str, str] | None = None) -> str:
        encoded = {name: {"DataType": "String", "StringValue": value} for name, value in (attributes or {}).items()}
        answer = await self.aws.sqs.send_message(
            QueueUrl=self.queues[channel].url, MessageBody=body, MessageAttributes=encoded
        )
        return str(answer["MessageId"])


@asynccontextmanager
async def e2e_env(
    base: Settings, aws: AwsClients, *, visibility_s: int = 30, ai_latency_s: float = 0.0, **changes: Any
) -> AsyncIterator[E2EEnv]:
    """Fresh queues (each with a DLQ after 3 receives) and sandboxes, and settings pointing at them.

    Every queue kind gets its own queue, so nothing reaches the session's shared ones; the consumers run the
    template sender's channel queues unless `consumer_queues` says otherwise. A `visibility_s` below the 10 s
    the environment allows is for in-process tests only (settings copies are not re-validated); the consumer
    runtime accepts anything from 2 s.
    """
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    queues: dict[str, QueuePair] = {}
    async with provider_sandboxes(ai_latency_s) as sandboxes:
        for spec in queue_specs(prefix, visibility_s):
            url = await ensure_queue(aws.sqs, spec)
            dlq_url = (await aws.sqs.get_queue_url(QueueName=spec.dead_letter_name))["QueueUrl"]
            queues[spec.kind] = QueuePair(url, dlq_url)
        settings = base.model_copy(
            update={
                **{f"{kind}_queue_url": queue.url for kind, queue in queues.items()},
                "consumer_queues": ",".join(CHANNELS),  # the template sender's queues only
                "visibility_timeout_s": visibility_s,
                "openai_base_url": f"{sandboxes.openai.url}/v1",
                "twilio_base_url": sandboxes.twilio.url,
                "sendgrid_base_url": sandboxes.sendgrid.url,
                "public_base_url": PUBLIC_BASE_URL,
                **changes,
            }
        )
        try:
            yield E2EEnv(settings, sandboxes, queues, aws)
        finally:
            for queue in queues.values():
                await aws.sqs.delete_queue(QueueUrl=queue.url)
                await aws.sqs.delete_queue(QueueUrl=queue.dlq_url)


# -- the service in this process ----------------------------------------------------------------------------------


@dataclass(slots=True)
class InProcessService:
    """The composition root's dependencies, the HTTP app over real HTTP, and (once started) the consumers."""

    deps: Dependencies
    client: TestClient[Any, Any]
    started: list[QueueConsumer] = field(default_factory=list)

    async def initiate(self, tenant: Tenant, body: dict[str, Any]) -> str:
        """POST /initiate-conversation; return the conversation_id it queued."""
        response = await self.client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        answer = await response.json()
        assert response.status == 200, answer
        return str(answer["conversation_id"])

    async def start_consumers(self) -> None:
        for consumer in self.deps.consumers:
            await consumer.start()
            self.started.append(consumer)

    @property
    def received(self) -> int:
        return sum(consumer.counts.received for consumer in self.deps.consumers)

    def metric(self, name: str, **labels: str) -> float:
        return self.deps.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def in_process_service(
    settings: Settings, *, start_consumers: bool = True, grace_s: float = 2.0
) -> AsyncIterator[InProcessService]:
    """`build(settings)` as `run_service` does, the API on a loopback port, consumers started unless told not to
    (then only the API consumes nothing, and `start_consumers()` starts them later)."""
    async with build(settings, expects_consumers=True) as deps:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(deps)))
        await client.start_server()
        service = InProcessService(deps, client)
        try:
            if start_consumers:
                await service.start_consumers()
            yield service
        finally:
            await asyncio.gather(*(consumer.stop(grace_s) for consumer in service.started))
            await client.close()


# -- a DynamoDB gate: pass, fail or hold the final update ---------------------------------------------------------

GateMode = Literal["pass", "fail", "hold"]
_HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


def is_final_update(target: str, body: bytes) -> bool:
    """The template sender's final update: the one UpdateItem that sets `initial_message_sent`."""
    return target.endswith(".UpdateItem") and b'"initial_message_sent"' in body


@dataclass(slots=True)
class DynamoGate:
    """A proxy in front of the DynamoDB endpoint; every request passes except the final update, per `mode`:
    `fail` answers it 500 (DynamoDB unavailable), `hold` keeps it waiting (never answered while held)."""

    upstream: str
    mode: GateMode = "pass"
    final_updates_seen: int = 0
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _session: aiohttp.ClientSession | None = None
    _server: RunningServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def release(self) -> None:
        self.mode = "pass"
        self._release.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if is_final_update(request.headers.get("X-Amz-Target", ""), body):
            self.final_updates_seen += 1
            if self.mode == "fail":
                error = {"__type": "com.amazonaws.dynamodb.v20120810#InternalServerError", "message": "gate: refused"}
                return web.Response(status=500, body=orjson.dumps(error), content_type="application/x-amz-json-1.0")
            if self.mode == "hold":
                self.holding.set()
                await self._release.wait()
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            answer_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
            return web.Response(status=answer.status, body=payload, headers=answer_headers)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DynamoGate]:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            self._server = await _serve(app)
            try:
                yield self
            finally:
                self._release.set()
                await self._server.close()


# -- the service as a worker process --------------------------------------------------------------------------------

_SETTINGS_IN_ENV = (
    "aws_endpoint_url",
    "dynamodb_endpoint_url",
    "secretsmanager_endpoint_url",
    "aws_max_attempts",
    "whatsapp_queue_url",
    "sms_queue_url",
    "email_queue_url",
    "replies_queue_url",
    "handoff_queue_url",
    "conversations_table",
    "messages_table",
    "company_table",
    "secrets_prefix",
    "environment",
    "visibility_timeout_s",
    "consumer_concurrency",
    "consumer_queues",
    "drain_grace_s",
    "ai_timeout_s",
    "provider_timeout_s",
    "openai_base_url",
    "twilio_base_url",
    "sendgrid_base_url",
    "public_base_url",
    "rate_limit_scope",
)


def worker_environment(settings: Settings, port: int, metrics_port: int | None = None) -> dict[str, str]:
    """The process environment for `settings`: inherited variables minus any COMMS_*, plus ours (the HTTP
    and metrics listeners on free loopback ports, so workers side by side never collide)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMS_")}
    env.update(LOCAL_CREDENTIALS)
    for name in _SETTINGS_IN_ENV:
        value = getattr(settings, name)
        if value is not None:
            env[f"COMMS_{name.upper()}"] = str(value)
    env.update({"COMMS_HOST": "127.0.0.1", "COMMS_PORT": str(port), "COMMS_LOG_LEVEL": "INFO"})
    env["COMMS_METRICS_PORT"] = str(metrics_port or free_port())
    return env


@dataclass(slots=True)
class WorkerProcess:
    """`python -m service serve --role worker` in its own process, its JSON log lines in a file."""

    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def ready() -> bool:
            if self.process.returncode is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{self.url}/readyz") as answer:
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout_s=timeout_s, what="worker /readyz answers 200", interval_s=0.2)

    def kill(self) -> None:
        """kill -9: no drain, no final update, no deletes."""
        self.process.kill()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def exit_code(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"worker still running after {timeout_s:g} s:\n{self.log_tail()}") from None

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines whose `event` is `name`."""
        found = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                entry = orjson.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])


@asynccontextmanager
async def worker_process(
    settings: Settings, log_dir: Path, name: str = "worker", role: str = "worker"
) -> AsyncIterator[WorkerProcess]:
    """Start a worker (or another `role`) on `settings` and wait until it is ready; kill it on the way out if it
    still runs."""
    port = free_port()
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            "--role",
            role,
            cwd=REPO_ROOT,
            env=worker_environment(settings, port),
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    worker = WorkerProcess(process, port, log_path)
    try:
        await worker.wait_ready()
        yield worker
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
