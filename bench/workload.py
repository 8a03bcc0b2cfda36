"""The conversations the benchmark feeds the consumer, built by the service's own initiate path.

`build_messages` runs `ConversationInitiator.initiate` (tenant checks, opt-out, request claim, context
building) with a publisher that keeps each context message instead of sending it, in the setup phase.
During the load they go on the channel queue with SendMessageBatch (straight to moto, not through the
counting proxy), one of two ways:

- `feed` (default, "steady"): start C conversations spread over one AI latency, then keep `ahead` messages
  queued or in flight (C plus a margin), topping up as conversations finish, so the consumer never runs
  dry and the queue stays shallow. moto's ReceiveMessage
  costs O(queue depth) per message (it recomputes every queue attribute), so a deep backlog would make
  the local endpoint, not the service, the limit.
- `enqueue` with `visible_at` ("upfront"): all N at once, made visible at the same moment (DelaySeconds).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.bootstrap import build
from service.config import Settings
from service.domain.initiate import validate_initiate_body

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

SQS_BATCH = 10
MAX_DELAY_S = 900  # SQS's DelaySeconds limit


@dataclass(frozen=True, slots=True)
class ContextMessage:
    conversation_id: str
    recipient: str
    body: str
    attributes: dict[str, str]
    group: str | None = None  # the tenant's MessageGroupId, as the service would send it


class KeepingPublisher:
    """A `MessagePublisher` that keeps what it is given; the benchmark sends it later, in batches."""

    def __init__(self) -> None:
        # conversationId attribute -> (body, attributes, group)
        self.kept: dict[str, tuple[str, dict[str, str], str | None]] = {}

    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        self.kept[attributes["conversationId"]] = (body, attributes, group)
        return uuid.uuid4().hex


def recipient_tel(index: int) -> str:
    """A distinct E.164 number per conversation, so the Twilio sandbox can tell duplicates apart."""
    return f"+4475{index:08d}"


def initiate_body(company_id: str, project_id: str, index: int) -> dict[str, Any]:
    return {
        "company_data": {"company_id": company_id, "project_id": project_id},
        "recipient_data": {
            "recipient_first_name": "Lee",
            "recipient_last_name": f"Bench{index}",
            "recipient_tel": recipient_tel(index),
            "recipient_email": f"lee{index}@example.com",
            "comms_consent": True,
        },
        "project_data": {"property": f"{index} Acacia Avenue", "viewing_slot": "Saturday 10:00"},
        "request_data": {
            "request_id": str(uuid.uuid4()),
            "channel_method": "whatsapp",
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
        },
    }


async def build_messages(
    settings: Settings, company_id: str, project_id: str, indexes: range, concurrency: int = 16
) -> list[ContextMessage]:
    """One whatsapp context message per index, through the real initiate use case (its publisher kept aside)."""
    publisher = KeepingPublisher()
    gate = asyncio.Semaphore(concurrency)
    async with build(settings, publisher=publisher) as deps:

        async def one(index: int) -> ContextMessage:
            request = validate_initiate_body(initiate_body(company_id, project_id, index))
            async with gate:
                outcome = await deps.initiator.initiate(request, trace_id=f"bench-{uuid.uuid4().hex}")
            body, attributes, group = publisher.kept[outcome.conversation_id]
            return ContextMessage(outcome.conversation_id, request.recipient, body, attributes, group)

        return list(await asyncio.gather(*(one(i) for i in indexes)))


def batch_entries(messages: Sequence[ContextMessage], delay_s: int) -> list[SendMessageBatchRequestEntryTypeDef]:
    return [batch_entry(str(i), m, delay_s) for i, m in enumerate(messages)]


def batch_entry(entry_id: str, message: ContextMessage, delay_s: int) -> SendMessageBatchRequestEntryTypeDef:
    entry: SendMessageBatchRequestEntryTypeDef = {
        "Id": entry_id,
        "MessageBody": message.body,
        "DelaySeconds": delay_s,
        "MessageAttributes": {k: {"DataType": "String", "StringValue": v} for k, v in message.attributes.items()},
    }
    if message.group:  # the tenant, as the service's own SendMessage names it
        entry["MessageGroupId"] = message.group
    return entry


async def enqueue(
    sqs: SQSClient, queue_url: str, messages: Sequence[ContextMessage], visible_at: float, concurrency: int = 8
) -> None:
    """SendMessageBatch every message so that all become visible at `visible_at` (time.time(), 1 s resolution)."""
    gate = asyncio.Semaphore(concurrency)

    async def send(chunk: Sequence[ContextMessage]) -> None:
        async with gate:
            delay = min(MAX_DELAY_S, max(0, math.ceil(visible_at - time.time())))
            answer = await sqs.send_message_batch(QueueUrl=queue_url, Entries=batch_entries(chunk, delay))
        if answer.get("Failed"):
            raise RuntimeError(f"SendMessageBatch failed for {answer['Failed']}")

    chunks = [messages[i : i + SQS_BATCH] for i in range(0, len(messages), SQS_BATCH)]
    await asyncio.gather(*(send(chunk) for chunk in chunks))


async def feed(
    sqs: SQSClient,
    queue_url: str,
    messages: Sequence[ContextMessage],
    finished: Callable[[], int],
    ahead: int,
    ramp: Callable[[float], int],
    tick_s: float = 0.02,
) -> None:
    """Enqueue `messages` so that at most `ahead` are queued or in flight (`finished()` counts those done).

    `ramp(seconds since start)` caps that number while the load starts (e.g. C per L), so the first C
    conversations start spread over one AI latency instead of all at once and finish as a steady stream,
    not in waves of C every L.
    """
    started = time.monotonic()
    queued = 0
    while queued < len(messages):
        allowed = min(ahead, ramp(time.monotonic() - started))
        room = min(allowed - (queued - finished()), 4 * SQS_BATCH, len(messages) - queued)
        if room >= SQS_BATCH or (room > 0 and queued + room == len(messages)):
            await enqueue(sqs, queue_url, messages[queued : queued + room], visible_at=0.0)
            queued += room
        else:
            await asyncio.sleep(tick_s)
