"""Replies-engine test helpers: isolated worlds over real HTTP (one per test, or one per module where every test
only looks at its own conversation).

A world is: the session moto server (shared), its own replies/hand-off queues (and channel queues when asked),
fresh OpenAI and Twilio sandboxes, a fresh tenant, the service's composition root built on settings naming all
of that, and the HTTP app listening on the port `public_base_url` names (so the URL Twilio signs is the URL the
app hears). Conversations are seeded in the shape the template sender writes (`new_conversation_fields`), for a fresh
recipient number per test: the moto server is session-shared and webhooks find conversations by company number
+ sender.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp.test_utils import TestClient, TestServer
from twilio.request_validator import RequestValidator

from consumers.template_job import new_conversation, parse_template_job
from local_stack.moto_server import free_port
from local_stack.openai_sandbox import create_openai_sandbox
from local_stack.sandbox_http import RunningServer, serve
from local_stack.seed import DEMO_OPENAI_KEY, DEMO_TWILIO_ACCOUNT_SID, DEMO_TWILIO_AUTH_TOKEN
from local_stack.twilio_sandbox import create_twilio_sandbox
from service.adapters.aws.conversation_codec import item_key, new_conversation_fields
from service.adapters.aws.dynamo_codec import from_item, to_attribute, to_item
from service.adapters.aws.opt_out_registry import suppression_key
from service.adapters.aws.provisioning import ensure_queue
from service.adapters.aws.resources import QueueSpec
from service.api.app import create_app
from service.bootstrap import Dependencies, build
from service.config import Settings
from service.domain.conversation import ConversationKey
from service.domain.conversation import conversation_id as make_conversation_id
from service.domain.timefmt import utc_iso
from tests.conftest import initiate_body
from tests.stored_messages import with_messages
from tests.support import add_tenant

T = TypeVar("T")

COMPANY_NUMBERS = {"whatsapp": "+447700900001", "sms": "+447700900002"}  # the demo channel config's numbers
SIGNATURE_HEADER = "X-Twilio-Signature"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


# -- small things ---------------------------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], T | Awaitable[T]], *, timeout_s: float, what: str, interval_s: float = 0.05
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


def unique_tel() -> str:
    """A recipient number no other test uses (+44 771 then 7 digits from a fresh uuid)."""
    return f"+44771{uuid.uuid4().int % 10**7:07d}"


def new_sid() -> str:
    return "SM" + uuid.uuid4().hex


def address(channel: str, number: str) -> str:
    """How Twilio writes an address on a channel: `whatsapp:+44...` or the bare number."""
    return f"whatsapp:{number}" if channel == "whatsapp" else number


def sign(url: str, params: Mapping[str, str], token: str = DEMO_TWILIO_AUTH_TOKEN) -> str:
    """X-Twilio-Signature for a POST of `params` to `url`, computed by the twilio library itself."""
    return str(RequestValidator(token).compute_signature(url, dict(params)))


def inbound_form(channel: str, sender: str, body: str, sid: str | None = None) -> dict[str, str]:
    """The form Twilio posts for an incoming message from `sender` to the company number of `channel`."""
    sid = sid or new_sid()
    form = {
        "AccountSid": DEMO_TWILIO_ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "Body": body,
        "From": address(channel, sender),
        "MessageSid": sid,
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "SmsStatus": "received",
        "To": address(channel, COMPANY_NUMBERS[channel]),
    }
    if channel == "whatsapp":
        form.update(WaId=sender.lstrip("+"), ProfileName="Lee")
    return form


def status_form(channel: str, recipient: str, sid: str, status: str) -> dict[str, str]:
    """The form of Twilio's status callback for message `sid` sent from the company number to `recipient`."""
    form = {
        "AccountSid": DEMO_TWILIO_ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "MessageSid": sid,
        "MessageStatus": status,
        "SmsSid": sid,
        "SmsStatus": status,
        "From": address(channel, COMPANY_NUMBERS[channel]),
        "To": address(channel, recipient),
    }
    if channel == "whatsapp":
        form.update(ChannelPrefix="whatsapp", ChannelToAddress=recipient)
    return form


# -- provider sandboxes ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Providers:
    """Fresh OpenAI and Twilio sandboxes, steered and read over their HTTP control routes."""

    openai: RunningServer
    twilio: RunningServer
    http: aiohttp.ClientSession

    async def _call(self, method: str, url: str, payload: Any = None, **headers: str) -> Any:
        async with self.http.request(method, url, json=payload, headers=headers) as answer:
            assert answer.status == 200, f"{method} {url}: {answer.status} {await answer.text()}"
            return await answer.json()

    # OpenAI
    async def set_ai_latency(self, seconds: float) -> None:
        await self._call("POST", f"{self.openai.url}/_sandbox/latency", {"seconds": seconds})

    async def ai_responses_created(self) -> int:
        """How many Responses the AI was asked for (each one AI call)."""
        return int((await self._call("GET", f"{self.openai.url}/_sandbox/openai/stats"))["responses_created"])

    async def ai_calls_started(self) -> int:
        """POST /v1/responses requests the sandbox has received (recorded on arrival, before its latency)."""
        seen = await self._call("GET", f"{self.openai.url}/_sandbox/requests")
        return sum(1 for r in seen if r["method"] == "POST" and r["path"] == "/v1/responses")

    async def new_thread(self) -> str:
        """An OpenAI conversation (Conversations API), the continuation of a conversation started before the
        template sender chained responses by id; the reply sender still writes in it."""
        created = await self._call(
            "POST", f"{self.openai.url}/v1/conversations", {}, Authorization=f"Bearer {DEMO_OPENAI_KEY}"
        )
        return str(created["id"])

    async def thread_items(self, thread_id: str) -> list[tuple[str, str]]:
        """(role, text) of every item in the AI conversation, oldest first: what the AI was given and said."""
        listed = await self._call(
            "GET",
            f"{self.openai.url}/v1/conversations/{thread_id}/items?order=asc&limit=100",
            Authorization=f"Bearer {DEMO_OPENAI_KEY}",
        )
        return [
            (str(item.get("role")), "".join(str(part.get("text", "")) for part in item.get("content") or []))
            for item in listed["data"]
        ]

    async def exchange(self, response_id: str) -> tuple[str | None, list[tuple[str, str]], str]:
        """One stored response: the response it was chained to, the (role, text) input items it was given (oldest
        first; OpenAI holds what came before), and its output text."""
        auth = {"Authorization": f"Bearer {DEMO_OPENAI_KEY}"}
        response = await self._call("GET", f"{self.openai.url}/v1/responses/{response_id}", **auth)
        url = f"{self.openai.url}/v1/responses/{response_id}/input_items?order=asc&limit=100"
        listed = await self._call("GET", url, **auth)
        given = [
            (str(item.get("role")), "".join(str(part.get("text", "")) for part in item.get("content") or []))
            for item in listed["data"]
        ]
        output = "".join(str(part.get("text", "")) for item in response["output"] for part in item.get("content") or [])
        return response["previous_response_id"], given, output

    # Twilio
    async def set_twilio_latency(self, seconds: float) -> None:
        await self._call("POST", f"{self.twilio.url}/_sandbox/latency", {"seconds": seconds})

    async def twilio_sends_started(self) -> int:
        """Message-create requests the sandbox has received (recorded on arrival, before its latency)."""
        seen = await self._call("GET", f"{self.twilio.url}/_sandbox/requests")
        return sum(1 for r in seen if r["method"] == "POST" and r["path"].endswith("/Messages.json"))

    async def twilio_messages(self, to: str | None = None) -> list[dict[str, Any]]:
        query = f"?to={aiohttp.helpers.quote(to, safe='')}" if to else ""
        return list(await self._call("GET", f"{self.twilio.url}/_sandbox/twilio/messages{query}"))

    async def twilio_status_callbacks(self, *, enabled: bool, delay_s: float = 0.0) -> None:
        await self._call(
            "POST", f"{self.twilio.url}/_sandbox/twilio/callbacks", {"enabled": enabled, "delay_s": delay_s}
        )

    async def twilio_inbound(self, url: str, channel: str, sender: str, body: str, **extra: Any) -> dict[str, Any]:
        """Have the Twilio sandbox post a signed incoming-message webhook to `url`; return what it reports."""
        payload = {
            "url": url,
            "from": address(channel, sender),
            "to": address(channel, COMPANY_NUMBERS[channel]),
            "body": body,
            "account_sid": DEMO_TWILIO_ACCOUNT_SID,
            **extra,
        }
        return dict(await self._call("POST", f"{self.twilio.url}/_sandbox/twilio/inbound", payload))

    async def twilio_send(self, channel: str, to: str, body: str) -> str:
        """Send a message through the sandbox's Messages API as the service would; return its SID."""
        url = f"{self.twilio.url}/2010-04-01/Accounts/{DEMO_TWILIO_ACCOUNT_SID}/Messages.json"
        form = {"To": address(channel, to), "From": address(channel, COMPANY_NUMBERS[channel]), "Body": body}
        auth = aiohttp.encode_basic_auth(DEMO_TWILIO_ACCOUNT_SID, DEMO_TWILIO_AUTH_TOKEN)
        async with self.http.post(url, data=form, headers={"Authorization": auth}) as answer:
            assert answer.status == 201, await answer.text()
            return str((await answer.json())["sid"])


# -- the world ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyTenant:
    company_id: str
    project_id: str
    api_key: str


@dataclass(slots=True)
class RepliesWorld:
    settings: Settings
    deps: Dependencies
    client: TestClient[Any, Any]
    providers: Providers
    tenant: ReplyTenant
    started: list[Any] = field(default_factory=list)

    # ---- addresses ----------------------------------------------------------------------------------------------

    def public_url(self, path: str) -> str:
        """What Twilio is configured to call: the public base URL plus the path."""
        assert self.settings.public_base_url, "this world has no public base URL"
        return self.settings.public_base_url.rstrip("/") + path

    @property
    def server_url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    # ---- webhooks -----------------------------------------------------------------------------------------------

    async def post_form(
        self, path: str, form: Mapping[str, str], *, signature: str | None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        """POST a form to the app; (status, content type, body)."""
        sent = dict(headers or {})
        if signature is not None:
            sent[SIGNATURE_HEADER] = signature
        response = await self.client.post(path, data=dict(form), headers=sent)
        return response.status, response.content_type, await response.text()

    async def inbound(
        self, sender: str, body: str, *, channel: str = "whatsapp", sid: str | None = None
    ) -> tuple[int, str, str]:
        """A correctly signed incoming-message webhook from `sender`."""
        path = f"/webhooks/twilio/{channel}"
        form = inbound_form(channel, sender, body, sid)
        return await self.post_form(path, form, signature=sign(self.public_url(path), form))

    async def status_callback(self, recipient: str, sid: str, status: str, *, channel: str = "whatsapp") -> int:
        """A correctly signed status callback for message `sid`; the HTTP status the app answered."""
        path = "/webhooks/twilio/status"
        form = status_form(channel, recipient, sid, status)
        answered, _, _ = await self.post_form(path, form, signature=sign(self.public_url(path), form))
        return answered

    # ---- tenant and conversations ----------------------------------------------------------------------------------

    async def seed_conversation(
        self,
        recipient: str,
        *,
        channel: str = "whatsapp",
        tenant: ReplyTenant | None = None,
        status: str = "initial_message_sent",
        thread: bool = True,
        messages: list[dict[str, Any]] | None = None,
        **attributes: Any,
    ) -> ConversationKey:
        """A conversation exactly as the template sender leaves it after the first message, plus `attributes`."""
        tenant = tenant or self.tenant
        company = await self.deps.companies.get(tenant.company_id, tenant.project_id)
        assert company is not None
        body = initiate_body(
            channel,
            company_data={"company_id": tenant.company_id, "project_id": tenant.project_id},
            recipient_data={"recipient_tel": recipient},
        )
        request_id = body["request_data"]["request_id"]
        conversation = make_conversation_id(
            tenant.company_id, tenant.project_id, request_id, channel, COMPANY_NUMBERS[channel]
        )
        context = {
            "frontend_payload": body,
            "company_data_payload": company.public_view(),
            "conversation_data": {"conversation_id": conversation},
            "metadata": {"router_version": "test", "trace_id": uuid.uuid4().hex},
        }
        stamp = utc_iso(time.time())
        new = new_conversation(parse_template_job(orjson.dumps(context).decode()))
        record = new_conversation_fields(new, stamp, self.settings.conversation_index_shards)
        first = {"message_id": new_sid(), "timestamp": stamp, "role": "assistant", "content": "Hi Lee, first."}
        record.update(
            {
                "conversation_status": status,
                "send_state": "sent",
                "messages": [first] if messages is None else messages,
                **attributes,  # may override send_state (e.g. a send still being attempted)
            }
        )
        if thread:
            record["thread_id"] = await self.providers.new_thread()
        key = ConversationKey(recipient, conversation)
        await self.deps.aws.dynamodb.put_item(
            TableName=self.settings.conversations_table, Item={**item_key(key), **to_item(record)}
        )
        return key

    async def add_tenant(self, **changes: Any) -> ReplyTenant:
        """A tenant like the demo one with `changes` to its company record (e.g. project_status)."""
        suffix = uuid.uuid4().hex[:10]
        company_id, project_id = f"ci-rep-{suffix}", f"pi-rep-{suffix}"
        api_key = await add_tenant(self.deps, company_id, project_id, **changes)
        return ReplyTenant(company_id, project_id, api_key)

    # ---- reading what happened ------------------------------------------------------------------------------------

    async def conversation(self, key: ConversationKey) -> dict[str, Any]:
        """The stored record, its `messages` every message recorded ({} while there is none yet)."""
        answer = await self.deps.aws.dynamodb.get_item(
            TableName=self.settings.conversations_table, Key=item_key(key), ConsistentRead=True
        )
        if "Item" not in answer:
            return {}
        return await with_messages(self.deps.aws.dynamodb, self.settings.messages_table, from_item(answer["Item"]))

    async def update_conversation(self, key: ConversationKey, **values: Any) -> None:
        names = {f"#a{i}": name for i, name in enumerate(values)}
        attrs = {f":v{i}": to_attribute(value) for i, value in enumerate(values.values())}
        await self.deps.aws.dynamodb.update_item(
            TableName=self.settings.conversations_table,
            Key=item_key(key),
            UpdateExpression="SET " + ", ".join(f"#a{i} = :v{i}" for i in range(len(values))),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=attrs,
        )

    async def wait_for_status(self, key: ConversationKey, status: str, timeout_s: float = 10) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            record = await self.conversation(key)
            return record if record.get("conversation_status") == status else None

        return await eventually(reached, timeout_s=timeout_s, what=f"conversation is {status}")

    async def staged(self, conversation_id: str) -> list[dict[str, Any]]:
        answer = await self.deps.aws.dynamodb.query(
            TableName=self.settings.stage_table,
            KeyConditionExpression="conversation_id = :id",
            ExpressionAttributeValues={":id": to_attribute(conversation_id)},
            ConsistentRead=True,
        )
        return [from_item(item) for item in answer.get("Items", [])]

    async def lock(self, conversation_id: str) -> dict[str, Any] | None:
        answer = await self.deps.aws.dynamodb.get_item(
            TableName=self.settings.lock_table,
            Key={"conversation_id": to_attribute(conversation_id)},
            ConsistentRead=True,
        )
        return from_item(answer["Item"]) if "Item" in answer else None

    async def suppression(
        self, channel: str, recipient: str, tenant: ReplyTenant | None = None
    ) -> dict[str, Any] | None:
        tenant = tenant or self.tenant
        answer = await self.deps.aws.dynamodb.get_item(
            TableName=self.settings.opt_out_table,
            Key={
                "suppression_key": to_attribute(suppression_key(tenant.company_id, tenant.project_id, channel)),
                "recipient": to_attribute(recipient),
            },
            ConsistentRead=True,
        )
        return from_item(answer["Item"]) if "Item" in answer else None

    async def queue_depth(self, queue: str) -> dict[str, int]:
        """visible / in_flight / delayed, as SQS reports them."""
        names = {
            "visible": "ApproximateNumberOfMessages",
            "in_flight": "ApproximateNumberOfMessagesNotVisible",
            "delayed": "ApproximateNumberOfMessagesDelayed",
        }
        url = self.settings.queue_url(queue)
        assert url is not None
        attributes = (await self.deps.aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names.values())))[
            "Attributes"
        ]
        return {short: int(attributes.get(name, 0)) for short, name in names.items()}

    async def receive(self, queue: str, wait_s: int = 0) -> list[dict[str, Any]]:
        """Receive (and delete) what is visible on `queue` now: [{"body", "attributes", "sent_at"}]."""
        url = self.settings.queue_url(queue)
        assert url is not None
        answer = await self.deps.aws.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_s,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["SentTimestamp"],
        )
        found = []
        for message in answer.get("Messages", []):
            await self.deps.aws.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            found.append(
                {
                    "body": orjson.loads(message["Body"]),
                    "attributes": {k: v["StringValue"] for k, v in message.get("MessageAttributes", {}).items()},
                    "sent_at": int(message["Attributes"]["SentTimestamp"]) / 1000,
                }
            )
        return found

    async def messages_for(self, queue: str, conversation_id: str) -> list[dict[str, Any]]:
        """Every message visible on `queue` now that names this conversation (all visible ones are consumed)."""
        found: list[dict[str, Any]] = []
        while batch := await self.receive(queue):
            found += [m for m in batch if m["attributes"].get("conversationId") == conversation_id]
        return found

    # ---- consumers ------------------------------------------------------------------------------------------------

    async def start_consumers(self) -> None:
        for consumer in self.deps.consumers:
            await consumer.start()
            self.started.append(consumer)

    def consumer_idle(self, queue: str = "replies") -> bool:
        """The consumer has received something and has nothing in flight."""
        consumer = next(c for c in self.deps.consumers if c.queue_name == queue)
        return bool(consumer.counts.received) and consumer.ongoing == 0

    def finished(self, disposition: str, reason: str, queue: str = "replies") -> int:
        """How many messages of `queue` the consumer finished with this disposition and reason."""
        labels = {"queue": queue, "disposition": disposition, "reason": reason}
        return int(self.deps.registry.get_sample_value("comms_messages_finished_total", labels) or 0)


async def _queue(deps: Dependencies, kind: str, prefix: str, visibility_s: int) -> str:
    return await ensure_queue(deps.aws.sqs, QueueSpec(kind, f"{prefix}-{kind}", visibility_s))


@asynccontextmanager
async def replies_world(
    base: Settings,
    deps: Dependencies,
    *,
    consumers: bool = False,
    start: bool = True,
    channels: tuple[str, ...] = (),
    window_s: int = 1,
    visibility_s: int = 5,
    public: bool = True,
    **changes: Any,
) -> AsyncIterator[RepliesWorld]:
    """An isolated world (see the module docstring). `consumers` builds the replies consumer (and those of
    `channels`, whose queues are made too) and starts them unless `start` is False; `public=False` leaves
    `public_base_url` unset (the app then trusts X-Forwarded-Proto/Host)."""
    prefix = f"rep-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        urls = {kind: await _queue(deps, kind, prefix, visibility_s) for kind in ("replies", "handoff", *channels)}
        for url in urls.values():
            dlq = url + "-dlq"
            stack.push_async_callback(deps.aws.sqs.delete_queue, QueueUrl=url)
            stack.push_async_callback(deps.aws.sqs.delete_queue, QueueUrl=dlq)
        openai = await serve(create_openai_sandbox())
        stack.push_async_callback(openai.close)
        twilio = await serve(create_twilio_sandbox({DEMO_TWILIO_ACCOUNT_SID: DEMO_TWILIO_AUTH_TOKEN}))
        stack.push_async_callback(twilio.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        port = free_port()
        settings = base.model_copy(
            update={
                "replies_queue_url": urls["replies"],
                "handoff_queue_url": urls["handoff"],
                **{f"{channel}_queue_url": urls[channel] for channel in channels},
                "consumer_queues": ",".join(("replies", *channels)),
                "batching_window_s": window_s,
                "visibility_timeout_s": visibility_s,
                "openai_base_url": f"{openai.url}/v1",
                "twilio_base_url": twilio.url,
                "public_base_url": f"http://127.0.0.1:{port}" if public else None,
                **changes,
            }
        )
        wired = await stack.enter_async_context(build(settings, expects_consumers=consumers))
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(wired), port=port))
        await client.start_server()
        stack.push_async_callback(client.close)
        suffix = uuid.uuid4().hex[:10]
        company_id, project_id = f"ci-rep-{suffix}", f"pi-rep-{suffix}"
        tenant = ReplyTenant(company_id, project_id, await add_tenant(deps, company_id, project_id))
        world = RepliesWorld(settings, wired, client, Providers(openai, twilio, http), tenant)
        try:
            if consumers and start:
                await world.start_consumers()
            yield world
        finally:
            await asyncio.gather(*(consumer.stop(2.0) for consumer in world.started))
