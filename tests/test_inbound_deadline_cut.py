"""The request deadline never cuts an inbound webhook between taking the trigger lock and queueing the trigger.

The state-changing rest of the intake (stage, lock, trigger; opt-out; hand-off) runs shielded once the request is
verified and its conversation found: cancelling the handler answers 503 but the work completes. The intake runs on
the in-memory fakes (tests/fakes.py), a step held at a gate while the deadline cancels the request; a holder
re-taking its own lock after a cut is in tests/unit/test_inbound_intake.py. The DynamoDB lock condition itself is
proven against moto at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from service.adapters.aws.stage_store import DynamoReplyStage
from service.bootstrap import Dependencies
from service.domain.company import CompanyRecord
from service.domain.conversation import ConversationStatus
from service.domain.inbound import inbound_from_form
from service.domain.inbound_intake import InboundIntake, IntakeConfig, IntakePorts, SignedRequest
from tests.fakes import (
    CHANNEL_ADDRESSES,
    RECIPIENTS,
    TWILIO_TEST_SECRET,
    FakeSignatures,
    FakeWorld,
    Gate,
    conversation_record,
)

URL = "https://comms.example/webhooks/twilio/whatsapp"
NUMBER, SENDER = CHANNEL_ADDRESSES["whatsapp"], RECIPIENTS["whatsapp"]


def world_with_a_conversation() -> tuple[FakeWorld, InboundIntake, str]:
    world = FakeWorld()
    record = world.seed(conversation_record(ConversationStatus.INITIAL_MESSAGE_SENT))
    world.companies.records[(record.company_id, record.project_id)] = CompanyRecord.model_validate(
        {
            "company_id": record.company_id,
            "project_id": record.project_id,
            "project_status": "active",
            "allowed_channels": ["whatsapp"],
        }
    )
    ports = IntakePorts(
        conversations=world.lookup,
        companies=world.companies,
        secrets=world.secrets,
        opt_outs=world.opt_outs,
        stage=world.stage,
        publisher=world.publisher,
        signatures=world.signatures,
    )
    intake = InboundIntake(ports, IntakeConfig("replies", "handoff", batching_window_s=5), clock=world.clock)
    return world, intake, record.key.conversation_id


async def cut_while_held(intake: InboundIntake, body: str, gate: Gate) -> None:
    """Receive a signed message; the request deadline cancels it while a step waits at `gate`; then the gate opens."""
    form = {"MessageSid": "SM1", "From": f"whatsapp:{SENDER}", "To": f"whatsapp:{NUMBER}", "Body": body}
    signature = FakeSignatures.sign(TWILIO_TEST_SECRET["twilio_auth_token"], URL, form)
    receiving = asyncio.ensure_future(
        intake.receive(inbound_from_form("whatsapp", form), SignedRequest(URL, form, signature))
    )
    await asyncio.wait_for(gate.entered.wait(), 1)

    receiving.cancel()  # what the request deadline does
    with pytest.raises(asyncio.CancelledError):
        await receiving
    gate.open()
    for _ in range(20):  # the shielded rest runs on without the request
        await asyncio.sleep(0)


async def test_deadline_after_the_lock_is_taken_still_queues_the_trigger() -> None:
    world, intake, conversation_id = world_with_a_conversation()
    gate = Gate()
    world.publisher.faults.on_next("publish", gate)

    await cut_while_held(intake, "hello", gate)

    assert len(world.publisher.on("replies")) == 1
    lock = world.stage.locks[conversation_id]
    assert (lock.lease.owner, lock.trigger_queued) == ("SM1", True)
    assert list(world.stage.fragments[conversation_id]) == ["SM1"]


async def test_deadline_during_an_opt_out_still_marks_the_conversation_opted_out() -> None:
    world, intake, _ = world_with_a_conversation()
    gate = Gate()
    world.opt_outs.faults.on_next("opt_out", gate)

    await cut_while_held(intake, "STOP", gate)

    assert [recipient for _, recipient in world.opt_outs.entries] == [SENDER]
    [record] = world.table.records.values()
    assert record.status is ConversationStatus.OPTED_OUT


async def test_deadline_during_a_hand_off_still_marks_the_conversation_handed_off() -> None:
    world, intake, conversation_id = world_with_a_conversation()
    company = next(iter(world.companies.records.values()))
    world.companies.records[(company.company_id, company.project_id)] = company.model_copy(
        update={"auto_queue_reply_message": True}
    )
    gate = Gate()
    world.publisher.faults.on_next("publish", gate)

    await cut_while_held(intake, "call me", gate)

    assert [m.attributes["conversationId"] for m in world.publisher.on("handoff")] == [conversation_id]
    [record] = world.table.records.values()
    assert record.status is ConversationStatus.HANDED_OFF


async def test_a_request_cut_before_it_is_verified_stores_nothing() -> None:
    world, intake, _ = world_with_a_conversation()
    gate = Gate()
    world.secrets.faults.on_next("get_json", gate)

    await cut_while_held(intake, "hello", gate)

    assert world.stage.fragments == {} and world.stage.locks == {}
    assert world.publisher.messages == []


# -- the DynamoDB lock rule -----------------------------------------------------------------------------------------


async def test_a_holder_may_retake_its_own_lock_until_its_trigger_is_marked_queued(deps: Dependencies) -> None:
    store = DynamoReplyStage(deps.aws.dynamodb, deps.settings.stage_table, deps.settings.lock_table)
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
