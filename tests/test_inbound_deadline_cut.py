"""The request deadline never cuts an inbound webhook between taking the trigger lock and queueing the trigger.

The state-changing rest of the intake (stage, lock, trigger; opt-out; hand-off) runs shielded once the request is
verified and its conversation found: cancelling the handler answers 503 but the work completes. And a holder may
re-take its own trigger lock, so a Twilio retry of the same MessageSid re-queues a trigger that went missing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from local_stack.seed import DEMO_COMPANY_ID, DEMO_PROJECT_ID, demo_company
from service.adapters.aws.stage_store import DynamoStageStore
from service.bootstrap import Dependencies
from service.domain.company import CompanyRecord
from service.domain.conversation import ConversationKey
from service.domain.inbound import Fragment, InboundMessage
from service.domain.inbound_intake import (
    InboundIntake,
    IntakeConfig,
    IntakePorts,
    IntakeResult,
    SignedRequest,
)

NUMBER = "+447700900001"
SENDER = "+447712345678"
CREDENTIALS = "test/credentials"


def conversation() -> dict[str, Any]:
    return {
        "conversation_id": "c-1",
        "primary_channel": SENDER,
        "company_id": DEMO_COMPANY_ID,
        "project_id": DEMO_PROJECT_ID,
        "conversation_status": "initial_message_sent",
        "channel_config": {"whatsapp_credentials_id": CREDENTIALS},
    }


@dataclass
class _Conversations:
    marked: list[tuple[str, str]] = field(default_factory=list)

    async def tenant_credentials(self, channel: str, company_address: str) -> tuple[str, ...]:
        return (CREDENTIALS,)

    async def find_open(self, channel: str, company_address: str, sender: str) -> dict[str, Any] | None:
        return conversation()

    async def mark_opted_out(self, key: ConversationKey, stamp: str) -> None:
        self.marked.append(("opted_out", key.conversation_id))

    async def mark_opted_in(self, key: ConversationKey, stamp: str) -> None:
        self.marked.append(("opted_in", key.conversation_id))


class _Companies:
    async def get(self, company_id: str, project_id: str) -> CompanyRecord | None:
        return demo_company("comms/", "dev", 0)


class _Secrets:
    async def get_json(self, secret_id: str) -> dict[str, Any]:
        return {"twilio_auth_token": "token"}


class _Signatures:
    def valid(self, auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
        return True


@dataclass
class _Suppressions:
    gate: asyncio.Event | None = None
    writing: asyncio.Event = field(default_factory=asyncio.Event)
    opted_out: list[str] = field(default_factory=list)

    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool:
        return False

    async def opt_out(self, company_id: str, project_id: str, channel: str, recipient: str, at: str) -> None:
        self.writing.set()
        if self.gate is not None:
            await self.gate.wait()
        self.opted_out.append(recipient)

    async def opt_in(self, company_id: str, project_id: str, channel: str, recipient: str) -> None:
        return None


@dataclass
class _Stage:
    """The DynamoDB stage store's rules in memory (stage once per sid; lock absent, expired or the holder's)."""

    fragments: dict[str, Fragment] = field(default_factory=dict)
    lock: tuple[str, int] | None = None
    queued: bool = False

    async def stage(self, conversation_id: str, primary_channel: str, fragment: Fragment, expires_at: int) -> bool:
        if fragment.message_sid in self.fragments:
            return False
        self.fragments[fragment.message_sid] = fragment
        return True

    async def take_lock(self, conversation_id: str, holder: str, now: float, expires_at: int) -> bool:
        if self.lock is None or self.lock[1] < now or (self.lock[0] == holder and not self.queued):
            self.lock, self.queued = (holder, expires_at), False
            return True
        return False

    async def mark_queued(self, conversation_id: str, holder: str) -> None:
        if self.lock is not None and self.lock[0] == holder:
            self.queued = True

    async def release_lock(self, conversation_id: str, holder: str | None = None) -> None:
        if self.lock is not None and holder in (None, self.lock[0]):
            self.lock = None


@dataclass
class _GatedPublisher:
    """SQS whose send waits on `gate` (the deadline cuts the request while it waits)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    sending: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[str] = field(default_factory=list)

    async def publish(self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0) -> str:
        self.sending.set()
        await self.gate.wait()
        self.sent.append(body)
        return f"m-{len(self.sent)}"


def intake(stage: _Stage, publisher: _GatedPublisher, suppressions: _Suppressions | None = None) -> InboundIntake:
    ports = IntakePorts(
        conversations=_Conversations(),  # type: ignore[arg-type]
        companies=_Companies(),
        secrets=_Secrets(),
        suppressions=suppressions or _Suppressions(),
        stage=stage,
        publisher=publisher,
        signatures=_Signatures(),
    )
    return InboundIntake(ports, IntakeConfig("replies", "handoff", batching_window_s=5))


def message(body: str = "hello", sid: str = "SM1") -> InboundMessage:
    return InboundMessage(channel="whatsapp", message_sid=sid, sender=SENDER, company_address=NUMBER, body=body)


REQUEST = SignedRequest("https://example.test/webhooks/twilio/whatsapp", {}, "signature")


async def test_deadline_after_the_lock_is_taken_still_queues_the_trigger() -> None:
    stage, publisher = _Stage(), _GatedPublisher()
    receiving = asyncio.ensure_future(intake(stage, publisher).receive(message(), REQUEST))
    await asyncio.wait_for(publisher.sending.wait(), 1)
    assert stage.lock is not None  # the lock is taken, the trigger not yet queued

    receiving.cancel()  # what the request deadline does
    with pytest.raises(asyncio.CancelledError):
        await receiving
    publisher.gate.set()

    for _ in range(100):
        if publisher.sent:
            break
        await asyncio.sleep(0.01)
    assert len(publisher.sent) == 1
    assert stage.lock is not None and stage.lock[0] == "SM1"
    assert stage.queued


async def test_retry_of_the_same_message_sid_requeues_a_trigger_lost_after_the_lock() -> None:
    """A first delivery that took the lock and died before queueing (a crash): its retry queues the trigger."""
    stage, publisher = _Stage(), _GatedPublisher()
    publisher.gate.set()
    stage.fragments["SM1"] = Fragment("SM1", "hello", "2026-01-01T00:00:00.000Z")
    stage.lock = ("SM1", int(time.time()) + 65)

    assert await intake(stage, publisher).receive(message(), REQUEST) is IntakeResult.DUPLICATE

    assert len(publisher.sent) == 1


async def test_deadline_during_an_opt_out_still_marks_the_conversation_opted_out() -> None:
    stage, publisher = _Stage(), _GatedPublisher()
    suppressions = _Suppressions(gate=asyncio.Event())
    rig = intake(stage, publisher, suppressions)
    conversations = rig._ports.conversations
    assert isinstance(conversations, _Conversations)
    receiving = asyncio.ensure_future(rig.receive(message("STOP"), REQUEST))
    await asyncio.wait_for(suppressions.writing.wait(), 1)

    receiving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiving
    suppressions.gate.set()  # type: ignore[union-attr]

    for _ in range(100):
        if conversations.marked:
            break
        await asyncio.sleep(0.01)
    assert suppressions.opted_out == [SENDER]
    assert conversations.marked == [("opted_out", "c-1")]


# -- the DynamoDB lock rule -----------------------------------------------------------------------------------------


async def test_a_holder_may_retake_its_own_lock_until_its_trigger_is_marked_queued(deps: Dependencies) -> None:
    store = DynamoStageStore(deps.aws.dynamodb, deps.settings.stage_table, deps.settings.lock_table)
    conversation_id = f"c-{uuid.uuid4().hex}"
    now = time.time()

    assert await store.take_lock(conversation_id, "SM1", now, int(now) + 65)
    assert await store.take_lock(conversation_id, "SM1", now, int(now) + 65)
    assert not await store.take_lock(conversation_id, "SM2", now, int(now) + 65)
    await store.mark_queued(conversation_id, "SM2")  # not its lock: no effect
    assert await store.take_lock(conversation_id, "SM1", now, int(now) + 65)
    await store.mark_queued(conversation_id, "SM1")
    assert not await store.take_lock(conversation_id, "SM1", now, int(now) + 65)
    assert not await store.take_lock(conversation_id, "SM2", now, int(now) + 65)
