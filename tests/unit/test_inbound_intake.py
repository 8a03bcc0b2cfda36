"""The Twilio webhooks' use case (SPEC §7) on in-memory fakes: authenticate against the tenant's token, handle
opt-out keywords, hand off, or stage the fragment and queue one delayed reply trigger per window; status callbacks
move a message's delivery state forward only."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest

from service.domain.company import CompanyRecord, tenant_group
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Message,
    SendLedger,
    SendState,
)
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Fragment, inbound_from_form
from service.domain.inbound_intake import InboundIntake, IntakeConfig, IntakePorts, IntakeResult, SignedRequest
from service.domain.reply_trigger import lock_expiry
from tests.fakes import (
    CHANNEL_ADDRESSES,
    RECIPIENTS,
    START_EPOCH_S,
    TWILIO_TEST_SECRET,
    FakeSignatures,
    FakeWorld,
    Gate,
    StagedFragment,
    conversation_record,
)

COMPANY_ID, PROJECT_ID = "ci-test", "pi-test"
REPLIES_URL = "https://sqs.example/replies"
HANDOFF_URL = "https://sqs.example/handoff"
WEBHOOK_URL = "https://comms.example/webhooks/twilio/whatsapp"
STATUS_URL = "https://comms.example/webhooks/twilio/status"
WINDOW_S = 10
TOKEN = TWILIO_TEST_SECRET["twilio_auth_token"]
NUMBER, SENDER = CHANNEL_ADDRESSES["whatsapp"], RECIPIENTS["whatsapp"]


def company(**changes: Any) -> CompanyRecord:
    data: dict[str, Any] = {
        "company_id": COMPANY_ID,
        "project_id": PROJECT_ID,
        "project_status": "active",
        "allowed_channels": ["whatsapp", "sms"],
    }
    return CompanyRecord.model_validate({**data, **changes})


@dataclass
class Rig:
    world: FakeWorld
    intake: InboundIntake
    key: ConversationKey

    @property
    def record(self) -> ConversationRecord:
        return self.world.table[self.key]

    @property
    def cid(self) -> str:
        return self.key.conversation_id

    @property
    def staged_sids(self) -> list[str]:
        return sorted(self.world.stage.fragments.get(self.cid, {}))

    @property
    def triggers(self) -> list[Any]:
        return self.world.publisher.on(REPLIES_URL)

    async def receive(
        self, body: str, sid: str = "SMin1", *, to: str = NUMBER, token: str | None = TOKEN
    ) -> IntakeResult:
        """A WhatsApp webhook from the recipient, signed with `token` (None: unsigned)."""
        form = {"MessageSid": sid, "From": f"whatsapp:{SENDER}", "To": f"whatsapp:{to}", "Body": body}
        signature = FakeSignatures.sign(token, WEBHOOK_URL, form) if token else ""
        return await self.intake.receive(
            inbound_from_form("whatsapp", form), SignedRequest(WEBHOOK_URL, form, signature)
        )

    async def status(self, sid: str, status: str, *, token: str | None = TOKEN) -> IntakeResult:
        """A status callback for a message we sent the recipient (`From` is our number)."""
        form = {"MessageSid": sid, "MessageStatus": status, "From": f"whatsapp:{NUMBER}", "To": f"whatsapp:{SENDER}"}
        signature = FakeSignatures.sign(token, STATUS_URL, form) if token else ""
        return await self.intake.delivery_status(form, SignedRequest(STATUS_URL, form, signature))

    async def cut_while(self, gate: Gate, body: str, sid: str = "SMin1") -> None:
        """Receive `body`; the request deadline cancels it while a step waits at `gate`; then the gate opens."""
        receiving = asyncio.ensure_future(self.receive(body, sid))
        await asyncio.wait_for(gate.entered.wait(), 1)
        receiving.cancel()  # what the request deadline does
        with pytest.raises(asyncio.CancelledError):
            await receiving
        gate.open()
        await settle()

    def assert_nothing_stored(self) -> None:
        assert self.world.stage.fragments == {} and self.world.stage.locks == {}
        assert self.world.publisher.messages == []
        assert self.world.opt_outs.entries == {}


async def settle() -> None:
    """Let shielded and background work run on without the request."""
    for _ in range(20):
        await asyncio.sleep(0)


def make_rig(record: ConversationRecord | None = None, tenant: CompanyRecord | None = None) -> Rig:
    world = FakeWorld()
    seeded = world.seed(record or conversation_record(ConversationStatus.INITIAL_MESSAGE_SENT))
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = tenant or company()
    ports = IntakePorts(
        conversations=world.lookup,
        companies=world.companies,
        secrets=world.secrets,
        opt_outs=world.opt_outs,
        stage=world.stage,
        publisher=world.publisher,
        signatures=world.signatures,
    )
    intake = InboundIntake(ports, IntakeConfig(REPLIES_URL, HANDOFF_URL, WINDOW_S), clock=world.clock)
    return Rig(world, intake, seeded.key)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


# ---- staging and the trigger -----------------------------------------------------------------------------------------


async def test_a_signed_message_to_a_known_number_stages_and_queues_one_delayed_trigger(rig: Rig) -> None:
    assert await rig.receive("Hello") is IntakeResult.STAGED

    now, stamp = rig.world.clock.now(), rig.world.clock.stamp()
    assert rig.world.stage.fragments[rig.cid] == {
        "SMin1": StagedFragment(Fragment("SMin1", "Hello", stamp), SENDER, lock_expiry(now, WINDOW_S))
    }
    [trigger] = rig.triggers
    assert trigger.delay_s == WINDOW_S
    assert orjson.loads(trigger.body) == {"conversation_id": rig.cid, "primary_channel": SENDER}
    lock = rig.world.stage.locks[rig.cid]
    assert (lock.lease.owner, lock.lease.expires_at) == ("SMin1", now + WINDOW_S + 60)
    assert rig.world.signatures.checks == [(TOKEN, WEBHOOK_URL, True)]


async def test_a_reply_trigger_names_the_conversation_s_tenant_as_its_message_group(rig: Rig) -> None:
    await rig.receive("Hello")

    [trigger] = rig.triggers
    assert trigger.group == tenant_group(rig.record.company_id, rig.record.project_id)


async def test_a_window_answered_200_writes_no_queued_mark(rig: Rig) -> None:
    """Twilio retries only a webhook it did not get a 200 for: the mark that stops a retry re-queueing is not needed."""
    assert await rig.receive("Hello") is IntakeResult.STAGED

    assert rig.world.stage.faults.calls["mark_queued"] == 0
    assert not rig.world.stage.locks[rig.cid].trigger_queued


async def test_a_second_fragment_in_the_window_only_stages(rig: Rig) -> None:
    await rig.receive("Hello")
    rig.world.clock.advance(3)

    assert await rig.receive("Is Saturday still fine?", "SMin2") is IntakeResult.STAGED

    assert rig.staged_sids == ["SMin1", "SMin2"]
    assert len(rig.triggers) == 1
    assert rig.world.stage.locks[rig.cid].lease.owner == "SMin1"


async def test_a_fragment_after_the_window_lapsed_queues_a_new_trigger(rig: Rig) -> None:
    await rig.receive("Hello")
    rig.world.clock.advance(WINDOW_S + 60)  # the lock's expiry: lapsed, even before TTL deletes it

    assert await rig.receive("Anyone there?", "SMin2") is IntakeResult.STAGED

    assert len(rig.triggers) == 2
    assert rig.world.stage.locks[rig.cid].lease.owner == "SMin2"


async def test_a_webhook_retry_after_a_cut_once_the_trigger_was_queued_is_a_duplicate_without_a_second_trigger(
    rig: Rig,
) -> None:
    gate = Gate()
    rig.world.publisher.faults.on_next("publish", gate)
    await rig.cut_while(gate, "Hello")  # answered 503; the shielded rest queued the trigger
    assert rig.world.stage.locks[rig.cid].trigger_queued

    assert await rig.receive("Hello") is IntakeResult.DUPLICATE

    assert rig.staged_sids == ["SMin1"]
    assert len(rig.triggers) == 1


async def test_a_request_cut_just_after_it_queued_the_trigger_still_marks_it_for_the_retry(rig: Rig) -> None:
    """The deadline lands after the work finished but before the handler resumed: the mark is written then."""
    receiving: list[asyncio.Future[IntakeResult]] = []
    rig.world.publisher.faults.on_next("publish", lambda: asyncio.get_running_loop().call_soon(receiving[0].cancel))
    receiving.append(asyncio.ensure_future(rig.receive("Hello")))

    with pytest.raises(asyncio.CancelledError):
        await receiving[0]
    await settle()

    assert len(rig.triggers) == 1
    assert rig.world.stage.locks[rig.cid].trigger_queued
    assert await rig.receive("Hello") is IntakeResult.DUPLICATE
    assert len(rig.triggers) == 1


async def test_a_repeat_of_a_message_answered_200_is_stored_once(rig: Rig) -> None:
    """Twilio does not retry a 200; a repeat (a crash or a lost answer) re-takes its own unmarked lock and queues a
    second trigger, which finds the fragment answered or answers it once (the reply claim, the answered sids)."""
    await rig.receive("Hello")

    assert await rig.receive("Hello") is IntakeResult.DUPLICATE

    assert rig.staged_sids == ["SMin1"]
    assert [orjson.loads(t.body)["conversation_id"] for t in rig.triggers] == [rig.cid, rig.cid]


async def test_a_retry_after_a_cut_between_lock_and_publish_queues_the_trigger(rig: Rig) -> None:
    now = rig.world.clock.now()  # the first delivery staged and took the lock, then died
    await rig.world.stage.stage(rig.key, Fragment("SMin1", "Hello", rig.world.clock.stamp()), lock_expiry(now, 10))
    await rig.world.stage.take_lock(rig.cid, "SMin1", now, lock_expiry(now, WINDOW_S))
    rig.world.clock.advance(2)

    assert await rig.receive("Hello") is IntakeResult.DUPLICATE

    assert len(rig.triggers) == 1
    assert rig.world.stage.locks[rig.cid].lease.owner == "SMin1"


async def test_a_failed_publish_gives_the_lock_back_so_the_retry_queues_the_trigger(rig: Rig) -> None:
    rig.world.publisher.faults.fail_next("publish")

    with pytest.raises(DependencyUnavailable):  # 503: Twilio retries
        await rig.receive("Hello")
    assert rig.staged_sids == ["SMin1"]
    assert rig.cid not in rig.world.stage.locks

    assert await rig.receive("Hello") is IntakeResult.DUPLICATE
    assert len(rig.triggers) == 1


# ---- authentication ------------------------------------------------------------------------------------------------


async def test_an_unsigned_message_is_forbidden_and_reveals_nothing(rig: Rig) -> None:
    assert await rig.receive("Hello", token=None) is IntakeResult.FORBIDDEN

    rig.assert_nothing_stored()
    assert rig.world.lookup.faults.calls == {}  # not even the number was looked up
    assert rig.world.secrets.fetches == {}


async def test_a_message_with_an_invalid_signature_is_forbidden_before_any_pair_is_looked_up(rig: Rig) -> None:
    assert await rig.receive("Hello", token="not-the-tenants-token") is IntakeResult.FORBIDDEN

    rig.assert_nothing_stored()
    assert rig.world.lookup.faults.calls["find_open"] == 0
    assert rig.world.signatures.checks == [(TOKEN, WEBHOOK_URL, False)]


async def test_a_message_to_a_number_no_tenant_owns_is_forbidden(rig: Rig) -> None:
    assert await rig.receive("Hello", to="+447700900999") is IntakeResult.FORBIDDEN

    rig.assert_nothing_stored()
    assert rig.world.lookup.faults.calls["find_open"] == 0
    assert rig.world.secrets.fetches == {}


async def test_a_conversation_of_another_tenant_sharing_the_number_is_not_written(rig: Rig) -> None:
    """The number verifies with our token, but the open conversation names another tenant's credentials."""
    other = conversation_record(ConversationStatus.INITIAL_MESSAGE_SENT, request_id="req-other")
    other = replace(other, credentials_id="cred-other", created_at="2099-01-01T00:00:00.000Z")
    rig.world.seed(other)
    rig.world.secrets.put("cred-other", {"twilio_auth_token": "the-other-tenants-token"})

    assert await rig.receive("Hello") is IntakeResult.UNKNOWN_CONVERSATION

    rig.assert_nothing_stored()


async def test_a_sender_without_an_open_conversation_is_not_staged() -> None:
    rig = make_rig(replace(conversation_record(), is_open=False))

    assert await rig.receive("Hello") is IntakeResult.UNKNOWN_CONVERSATION

    rig.assert_nothing_stored()


@pytest.mark.parametrize(
    "tenant", [company(project_status="inactive"), company(allowed_channels=["sms"])], ids=["inactive", "channel"]
)
async def test_a_project_the_rules_refuse_stores_nothing(tenant: CompanyRecord) -> None:
    rig = make_rig(tenant=tenant)

    assert await rig.receive("Hello") is IntakeResult.REFUSED_BY_RULES

    rig.assert_nothing_stored()


# ---- opt-out keywords ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["STOP", " stop ", "Unsubscribe", "QUIT"])
async def test_an_opt_out_keyword_suppresses_the_sender_and_marks_the_conversation(rig: Rig, word: str) -> None:
    assert await rig.receive(word) is IntakeResult.OPTED_OUT

    stamp = rig.world.clock.stamp()
    assert rig.world.opt_outs.entries == {(f"{COMPANY_ID}#{PROJECT_ID}#whatsapp", SENDER): stamp}
    assert rig.record.status is ConversationStatus.OPTED_OUT
    assert rig.world.table.notes[rig.key]["opted_out_at"] == stamp
    assert rig.staged_sids == [] and rig.world.publisher.messages == []


@pytest.mark.parametrize("word", ["START", "unstop", "YES"])
async def test_an_opt_in_keyword_from_a_suppressed_sender_makes_the_conversation_answerable(word: str) -> None:
    rig = make_rig(conversation_record(ConversationStatus.OPTED_OUT))
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", SENDER, "2026-01-01T00:00:00.000Z")

    assert await rig.receive(word) is IntakeResult.OPTED_IN

    assert rig.world.opt_outs.entries == {}
    assert rig.record.status is ConversationStatus.REPLY_SENT
    assert rig.staged_sids == [] and rig.world.publisher.messages == []


async def test_yes_from_a_sender_not_suppressed_is_an_ordinary_answer(rig: Rig) -> None:
    assert await rig.receive("Yes") is IntakeResult.STAGED

    assert rig.staged_sids == ["SMin1"]


async def test_an_ordinary_message_is_staged_without_reading_the_suppression_list(rig: Rig) -> None:
    """The reply consumer reads the list before any AI reply, so reading it here too would only cost a request."""
    assert await rig.receive("Is Saturday still fine?") is IntakeResult.STAGED

    assert rig.world.opt_outs.faults.calls["is_opted_out"] == 0
    assert len(rig.triggers) == 1


async def test_yes_from_a_sender_suppressed_through_another_conversation_opts_in(rig: Rig) -> None:
    """The conversation is not marked opted out (the STOP came in another one): YES still reads the list."""
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", SENDER, "2026-01-01T00:00:00.000Z")

    assert await rig.receive("yes") is IntakeResult.OPTED_IN

    assert rig.world.opt_outs.entries == {}
    assert rig.staged_sids == [] and rig.world.publisher.messages == []


async def test_a_suppressed_sender_in_a_handed_off_conversation_is_not_handed_to_a_human() -> None:
    rig = make_rig(conversation_record(ConversationStatus.HANDED_OFF))
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", SENDER, "2026-01-01T00:00:00.000Z")

    assert await rig.receive("Call me") is IntakeResult.SUPPRESSED

    assert rig.world.publisher.messages == [] and rig.staged_sids == []


async def test_other_text_from_a_suppressed_sender_is_not_answered() -> None:
    rig = make_rig(conversation_record(ConversationStatus.OPTED_OUT))
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", SENDER, "2026-01-01T00:00:00.000Z")

    assert await rig.receive("What about Sunday?") is IntakeResult.SUPPRESSED

    assert rig.staged_sids == [] and rig.world.publisher.messages == []
    assert rig.record.status is ConversationStatus.OPTED_OUT


# ---- hand-off --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_changes", "tenant", "reason"),
    [
        ({"hand_off_to_human": True}, company(), "conversation_flagged"),
        ({"status": ConversationStatus.HANDED_OFF}, company(), "conversation_handed_off"),
        ({}, company(auto_queue_reply_message=True), "project_auto_queue"),
        ({}, company(auto_queue_reply_message_from_number=[f" {SENDER} "]), "sender_auto_queue"),
    ],
    ids=["flagged", "handed-off-already", "project-rule", "sender-rule"],
)
async def test_a_hand_off_rule_routes_the_reply_to_the_hand_off_queue(
    record_changes: dict[str, Any], tenant: CompanyRecord, reason: str
) -> None:
    rig = make_rig(replace(conversation_record(), **record_changes), tenant)

    assert await rig.receive("I'd like to speak to someone") is IntakeResult.HANDED_OFF

    [handoff] = rig.world.publisher.messages
    assert (handoff.queue_url, handoff.delay_s) == (HANDOFF_URL, 0)
    assert handoff.attributes == {"conversationId": rig.cid, "handOffReason": reason}
    assert orjson.loads(handoff.body)["hand_off_reason"] == reason
    assert rig.record.status is ConversationStatus.HANDED_OFF
    assert rig.world.table.notes[rig.key]["hand_off_reason"] == reason
    assert rig.staged_sids == [] and rig.world.stage.locks == {}


async def test_a_hand_off_carries_the_conversation_with_its_newest_20_messages() -> None:
    messages = tuple(Message(f"SM{i:02d}", "assistant", f"m{i}", f"2026-01-01T00:00:{i:02d}.000Z") for i in range(25))
    rig = make_rig(conversation_record(messages=messages), company(auto_queue_reply_message=True))

    await rig.receive("Call me please")

    context = orjson.loads(rig.world.publisher.messages[0].body)
    conversation = context["conversation"]
    assert [m["message_id"] for m in conversation["messages"]] == [f"SM{i:02d}" for i in range(5, 25)]
    assert (conversation["conversation_id"], conversation["primary_channel"]) == (rig.cid, SENDER)
    assert "channel_config" not in conversation and "ai_config" not in conversation
    assert context["inbound"]["message_sid"] == "SMin1" and context["inbound"]["body"] == "Call me please"
    assert context["company"] == {"company_id": COMPANY_ID, "project_id": PROJECT_ID}
    assert context["received_at"] == rig.world.clock.stamp()


# ---- status callbacks ------------------------------------------------------------------------------------------------


async def test_a_status_callback_moves_the_delivery_state_forward(rig: Rig) -> None:
    assert await rig.status("SM0", "sent") is IntakeResult.STATUS_APPLIED
    assert await rig.status("SM0", "delivered") is IntakeResult.STATUS_APPLIED

    assert rig.record.messages[0].delivery_status == "delivered"


@pytest.mark.parametrize("late", ["sent", "queued", "delivered", "failed"])
async def test_a_stale_or_repeated_status_callback_is_refused(rig: Rig, late: str) -> None:
    await rig.status("SM0", "delivered")

    assert await rig.status("SM0", late) is IntakeResult.STATUS_STALE

    assert rig.record.messages[0].delivery_status == "delivered"


async def test_a_status_callback_before_its_message_is_recorded_is_held_and_applied_by_the_final_update() -> None:
    attempting = SendLedger(SendState.ATTEMPTING, generated={"1": "Hello"}, attempted_at=START_EPOCH_S)
    rig = make_rig(conversation_record(ConversationStatus.PROCESSING, ledger=attempting))  # the send is under way

    assert await rig.status("SMnew", "delivered") is IntakeResult.STATUS_HELD
    assert rig.record.early_delivery_sids == {"SMnew"}
    assert await rig.status("SMnew", "sent") is IntakeResult.STATUS_STALE  # the held one moves forward only too

    sent = Message("SMnew", "assistant", "Hello", rig.world.clock.stamp())
    assert await rig.world.conversation_claims.finalise(rig.key, sent, "conv_1", 10)  # the final update

    assert [(m.message_id, m.delivery_status) for m in rig.record.messages] == [("SMnew", "delivered")]
    assert rig.record.early_delivery_sids == frozenset()


async def test_an_unsigned_status_callback_is_forbidden(rig: Rig) -> None:
    assert await rig.status("SM0", "delivered", token=None) is IntakeResult.FORBIDDEN

    assert rig.record.messages[0].delivery_status is None


async def test_a_status_value_we_do_not_track_is_unknown(rig: Rig) -> None:
    assert await rig.status("SM0", "teleported") is IntakeResult.STATUS_UNKNOWN

    assert rig.record.messages[0].delivery_status is None
