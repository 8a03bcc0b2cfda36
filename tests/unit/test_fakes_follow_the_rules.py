"""The in-memory fakes keep the promises of their ports, so tests built on them mean something."""

from __future__ import annotations

import pytest

from service.domain.claims import Claim, RequestRecord, RequestState
from service.domain.conversation import (
    ConversationStatus,
    Failure,
    Lease,
    Message,
    ReplyAttempt,
    TemplateDraft,
    TokenUsage,
    answered_fragments,
)
from service.domain.delivery_state import DeliveryStatus
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Fragment
from service.domain.provider_ports import (
    AiRequest,
    OutboundMessage,
    PermanentProviderError,
    SendOutcomeUnknown,
    TransientProviderError,
)
from tests.fakes import FakeClock, FakeWorld, conversation_record, new_conversation

LEASE_S = 30.0


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


def draft(world: FakeWorld) -> TemplateDraft:
    return TemplateDraft("conv_1", {"1": "Hi"}, TokenUsage(1, 2, 3), world.clock.now())


def message(sid: str, role: str = "assistant") -> Message:
    return Message(sid, role, "Hello", "2026-01-01T00:00:00.000Z")


def outbound(body: str = "Hello") -> OutboundMessage:
    return OutboundMessage("sms", {"twilio_auth_token": "t"}, "+447700900002", "+447700900123", body=body)


# ---- claims -----------------------------------------------------------------------------------------


async def test_a_refused_request_claim_returns_the_record_that_refused_it(world: FakeWorld) -> None:
    now = world.clock.now()
    first = RequestRecord("c#p#r", RequestState.IN_PROGRESS, "conv", Lease("a", now + LEASE_S), body_hash="h1")
    assert await world.requests.claim(first, now) is None

    again = RequestRecord("c#p#r", RequestState.IN_PROGRESS, "conv", Lease("b", now + LEASE_S), body_hash="h1")
    other_body = RequestRecord("c#p#r", RequestState.IN_PROGRESS, "conv", Lease("b", now + LEASE_S), body_hash="h2")
    stored = await world.requests.read("c#p#r")
    assert stored is not None and stored.lease.expires_at == int(now + LEASE_S)  # whole seconds, like the adapter
    assert await world.requests.claim(again, now) == stored
    assert await world.requests.claim(other_body, now + 2 * LEASE_S) == stored  # another body: even once lapsed
    assert await world.requests.claim(again, now + 2 * LEASE_S) is None  # same body, lapsed: taken over


async def test_a_completed_request_is_kept_and_a_released_one_forgotten(world: FakeWorld) -> None:
    now = world.clock.now()
    record = RequestRecord("c#p#r", RequestState.IN_PROGRESS, "conv", Lease("a", now + LEASE_S))
    await world.requests.claim(record, now)
    await world.requests.complete("c#p#r", "2026-01-01T00:00:00.000Z")
    await world.requests.release("c#p#r")  # only an IN_PROGRESS record is released
    stored = await world.requests.read("c#p#r")
    assert stored is not None and stored.state is RequestState.COMPLETED


async def test_a_refused_conversation_claim_returns_the_holders_record(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    taken = await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)
    refused = await world.conversation_claims.claim(new, "worker-b", now + LEASE_S, now + 1)

    assert taken.verdict is Claim.TAKE and taken.record is not None
    assert taken.record.status is ConversationStatus.PROCESSING
    assert refused.verdict is Claim.HELD
    assert refused.record is not None and refused.record.claim.owner == "worker-a"


async def test_a_takeover_keeps_the_ledger_and_locks_the_old_owner_out(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)
    assert await world.conversation_claims.record_attempt(new.key, "worker-a", draft(world))

    world.clock.advance(LEASE_S + 1)
    later = world.clock.now()
    takeover = await world.conversation_claims.claim(new, "worker-b", later + LEASE_S, later)

    assert takeover.verdict is Claim.TAKE and takeover.record is not None
    assert takeover.record.ledger.generated == {"1": "Hi"}  # reconciled, not generated again
    assert not await world.conversation_claims.refresh(new.key, "worker-a", later + LEASE_S)
    assert not await world.conversation_claims.record_attempt(new.key, "worker-a", draft(world))
    failure = Failure(ConversationStatus.FAILED_TO_SEND_MESSAGE, "x")
    assert not await world.conversation_claims.fail(new.key, "worker-a", failure)
    assert world.table[new.key].claim.owner == "worker-b"


async def test_a_conversation_is_finalised_once_only(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)

    assert await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 120)
    assert not await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 120)
    record = world.table[new.key]
    assert record.status is ConversationStatus.INITIAL_MESSAGE_SENT
    assert [m.message_id for m in record.messages] == ["SM1"]
    done = await world.conversation_claims.claim(new, "worker-b", now + LEASE_S, now)
    assert done.verdict is Claim.DONE


async def test_a_reply_claim_by_someone_else_is_held_and_their_writes_refused(world: FakeWorld) -> None:
    record = world.seed(conversation_record(ConversationStatus.REPLY_SENT))
    now = world.clock.now()
    assert (await world.reply_claims.claim(record.key, "r-1", now + LEASE_S, now)).verdict is Claim.TAKE
    refused = await world.reply_claims.claim(record.key, "r-2", now + LEASE_S, now)

    assert refused.verdict is Claim.HELD and refused.record is not None
    assert refused.record.reply_claim.owner == "r-1"
    attempt = ReplyAttempt(("SMin1",), "hi", "2026-01-01T00:00:00.000Z", "Hello", TokenUsage(), "conv_1", now)
    assert not await world.reply_claims.record_attempt(record.key, "r-2", attempt)
    finalised = await world.reply_claims.finalise(
        record.key, "r-2", [message("SMout")], ["SMin1"], "resp_2", 5, claimed=record
    )
    assert finalised is None
    assert await world.reply_claims.finish_unanswered(record.key, "r-1")
    assert world.table[record.key].status is ConversationStatus.REPLY_SENT


async def test_a_reply_sent_while_the_recipient_opted_out_is_recorded_and_the_opt_out_kept(world: FakeWorld) -> None:
    record = world.seed(conversation_record(ConversationStatus.INITIAL_MESSAGE_SENT))
    now = world.clock.now()
    await world.reply_claims.claim(record.key, "r-1", now + LEASE_S, now)
    await world.lookup.mark_opted_out(record.key)

    finalised = await world.reply_claims.finalise(
        record.key, "r-1", [message("SMout")], ["SMin1"], "resp_2", 5, claimed=record
    )

    assert finalised is not None
    assert finalised.status is ConversationStatus.OPTED_OUT
    assert answered_fragments(finalised, finalised.messages) == {"SMin1"}
    assert finalised.messages[-1].message_id == "SMout"
    assert finalised.thread_id == "resp_2"
    assert finalised.reply_claim == Lease()


async def test_a_trigger_lock_is_retaken_by_its_holder_only_until_its_trigger_is_queued(world: FakeWorld) -> None:
    now = world.clock.now()
    assert await world.stage.take_lock("conv", "SM1", now, int(now) + 60)
    assert not await world.stage.take_lock("conv", "SM2", now, int(now) + 60)
    assert await world.stage.take_lock("conv", "SM1", now, int(now) + 60)  # a webhook retry after a cut
    await world.stage.mark_queued("conv", "SM1")
    assert not await world.stage.take_lock("conv", "SM1", now, int(now) + 60)
    assert await world.stage.take_lock("conv", "SM2", now + 61, int(now) + 121)  # lapsed


async def test_a_fragment_is_staged_once(world: FakeWorld) -> None:
    record = conversation_record()
    fragment = Fragment("SMin1", "hi", "2026-01-01T00:00:00.000Z")
    assert await world.stage.stage(record.key, fragment, 10)
    assert not await world.stage.stage(record.key, fragment, 10)
    assert await world.stage.staged(record.key.conversation_id) == [fragment]


# ---- delivery states ------------------------------------------------------------------------------------


async def test_a_stale_delivery_status_is_refused(world: FakeWorld) -> None:
    record = world.seed(conversation_record(messages=(message("SM1"),)))
    assert await world.lookup.set_delivery_status(record, 0, "SM1", DeliveryStatus.DELIVERED)
    assert not await world.lookup.set_delivery_status(record, 0, "SM1", DeliveryStatus.SENT)
    assert not await world.lookup.set_delivery_status(record, 0, "SM9", DeliveryStatus.READ)  # another message
    assert world.table[record.key].messages[0].delivery_status == "delivered"


async def test_a_status_for_a_message_not_recorded_yet_is_applied_by_the_final_update(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)

    assert await world.lookup.hold_delivery_status(new.key, "SM1", DeliveryStatus.DELIVERED)
    assert not await world.lookup.hold_delivery_status(new.key, "SM1", DeliveryStatus.SENT)  # stale
    assert world.table[new.key].early_delivery_sids == {"SM1"}
    await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 10)

    record = world.table[new.key]
    assert record.messages[0].delivery_status == "delivered"
    assert record.early_delivery_sids == frozenset()


# ---- failure injection, providers, clock ----------------------------------------------------------------


async def test_an_injected_failure_fails_the_next_calls_then_heals(world: FakeWorld) -> None:
    world.opt_outs.faults.fail_next("is_opted_out", times=2)
    for _ in range(2):
        with pytest.raises(DependencyUnavailable):
            await world.opt_outs.is_opted_out("c", "p", "sms", "+447700900123")
    assert not await world.opt_outs.is_opted_out("c", "p", "sms", "+447700900123")
    assert world.opt_outs.faults.calls["is_opted_out"] == 3


async def test_a_failure_after_the_effect_applies_the_write_and_loses_the_answer(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)
    world.conversation_claims.faults.fail_next("finalise", after_effect=True)

    with pytest.raises(DependencyUnavailable):
        await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 10)
    assert world.table[new.key].status is ConversationStatus.INITIAL_MESSAGE_SENT
    assert not await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 10)


def test_a_failure_can_only_be_planned_for_a_port_method(world: FakeWorld) -> None:
    with pytest.raises(ValueError, match="no port method"):
        world.conversation_claims.faults.fail_next("finalize")


async def test_an_action_planned_on_a_call_lands_before_its_effect(world: FakeWorld) -> None:
    record = world.seed(conversation_record(ConversationStatus.REPLY_SENT))
    now = world.clock.now()
    world.reply_claims.faults.on_next("claim", lambda: world.lookup.mark_handed_off(record.key, "flagged"))
    answer = await world.reply_claims.claim(record.key, "r-1", now + LEASE_S, now)
    assert answer.verdict is Claim.REFUSED
    assert world.table.notes[record.key]["hand_off_reason"] == "flagged"


async def test_a_send_that_timed_out_after_reaching_the_provider_is_found(world: FakeWorld) -> None:
    sender, since = world.sender("sms"), world.clock.now()
    sender.time_out_next(sent=True)
    with pytest.raises(SendOutcomeUnknown):
        await sender.send(outbound())
    found = await sender.find_sent(outbound(), since)
    assert found is not None and found.provider_message_id == sender.sent[0].provider_message_id
    assert await sender.find_sent(outbound("another text"), since) is None


async def test_a_refused_or_throttled_send_sends_nothing(world: FakeWorld) -> None:
    sender = world.sender("sms")
    sender.refuse_next()
    sender.throttle_next()
    sender.time_out_next(sent=False)
    with pytest.raises(PermanentProviderError):
        await sender.send(outbound())
    with pytest.raises(TransientProviderError):
        await sender.send(outbound())
    with pytest.raises(SendOutcomeUnknown):
        await sender.send(outbound())
    assert sender.sent == []
    assert await sender.find_sent(outbound(), world.clock.now() - 60) is None


async def test_the_email_sender_cannot_look_sends_up(world: FakeWorld) -> None:
    with pytest.raises(PermanentProviderError):
        await world.sender("email").find_sent(outbound(), world.clock.now())


async def test_the_ai_writer_answers_as_scripted_and_refuses_an_answer_with_other_keys(world: FakeWorld) -> None:
    request = AiRequest("k", "m", "i", "hello", ("1", "2"), "conv_1")
    world.ai.answer_next({"1": "a", "2": "b"}, {"1": "a"}, TransientProviderError("ai_unavailable"))
    assert (await world.ai.write(request)).output == {"1": "a", "2": "b"}
    with pytest.raises(PermanentProviderError):
        await world.ai.write(request)
    with pytest.raises(TransientProviderError):
        await world.ai.write(request)
    assert set((await world.ai.write(request)).output) == {"1", "2"}
    assert len(world.ai.requests) == 4


async def test_a_missing_secret_is_permanent(world: FakeWorld) -> None:
    world.secrets.put("cred-sms", {"twilio_auth_token": "t"})
    assert await world.secrets.get_json("cred-sms") == {"twilio_auth_token": "t"}
    with pytest.raises(PermanentProviderError):
        await world.secrets.get_json("missing")


def test_a_signature_made_with_the_token_verifies_and_no_other_does(world: FakeWorld) -> None:
    params = {"MessageSid": "SM1", "Body": "hi"}
    signature = world.signatures.sign("token", "https://x.example/sms", params)
    assert world.signatures.valid("token", "https://x.example/sms", params, signature)
    assert not world.signatures.valid("other", "https://x.example/sms", params, signature)
    assert not world.signatures.valid("token", "https://x.example/sms", {**params, "Body": "ho"}, signature)


async def test_the_clock_sleeps_without_waiting() -> None:
    clock = FakeClock(100.0)
    await clock.sleep(30)
    clock.advance(5)
    assert (clock.now(), clock(), clock.sleeps) == (135.0, 135.0, [30])


async def test_a_redrive_reopens_only_an_exhausted_failure_keeping_the_ledger(world: FakeWorld) -> None:
    new, now = new_conversation(), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)
    await world.conversation_claims.record_attempt(new.key, "worker-a", draft(world))
    exhausted = Failure(ConversationStatus.FAILED_TO_SEND_MESSAGE, "twilio_unavailable", exhausted=True)
    await world.conversation_claims.fail(new.key, "worker-a", exhausted)

    assert world.table.reopen_exhausted(new.key) is not None
    record = world.table[new.key]
    assert (record.status, record.last_failure_reason, record.reopen_count) == (
        ConversationStatus.PROCESSING,
        "twilio_unavailable",
        1,
    )
    assert record.ledger.state.value == "attempting"  # reconciled by the redelivery, never sent blindly
    assert world.table.reopen_exhausted(new.key) is None
    taken = await world.conversation_claims.claim(new, "worker-b", now + LEASE_S, now)
    assert taken.verdict is Claim.TAKE


async def test_the_shared_fields_are_the_stored_form_a_hand_off_carries(world: FakeWorld) -> None:
    new, now = new_conversation(recipient="+447700900999"), world.clock.now()
    await world.conversation_claims.claim(new, "worker-a", now + LEASE_S, now)
    await world.conversation_claims.finalise(new.key, message("SM1"), "conv_1", 10)
    await world.lookup.mark_handed_off(new.key, "conversation_flagged")

    shared = world.table[new.key].shared_fields
    assert shared["conversation_status"] == "handed_off"
    assert shared["hand_off_reason"] == "conversation_flagged"
    assert [m["message_id"] for m in shared["messages"]] == ["SM1"]
    assert shared["recipient_tel"] == "+447700900999"
    assert "ai_config" not in shared and "channel_config" not in shared


async def test_the_look_ups_find_the_newest_open_conversation_of_a_pair(world: FakeWorld) -> None:
    old = world.seed(conversation_record(request_id="r-old", created_at="2025-01-01T00:00:00.000Z"))
    newer = world.seed(conversation_record(request_id="r-new", created_at="2025-06-01T00:00:00.000Z"))
    address, sender = old.company_address or "", old.key.primary_channel

    assert await world.lookup.find_open("whatsapp", address, sender) == newer
    assert len(await world.lookup.conversations_between("whatsapp", address, sender)) == 2
    assert await world.lookup.tenant_credentials("whatsapp", address) == ("cred-whatsapp",)
    assert await world.lookup.find_open("sms", address, sender) is None
