"""The reply sender (SPEC §7, reply consumer) on in-memory fakes: one trigger answers every fragment staged in its
window with one reply, never twice, never losing a fragment."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.reply_sender import ReplyPorts, ReplySender, ReplySenderConfig
from consumers.sqs_messages import RedrivePolicy
from service.domain.claims import RETRIES_EXHAUSTED, Claim, decide_reply
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Message,
    ReplyAttempt,
    TokenUsage,
    answered_fragments,
)
from service.domain.conversation import Lease as RecordLease
from service.domain.inbound import Fragment
from service.domain.ports import ClaimAnswer
from service.domain.provider_ports import OutboundMessage, PermanentProviderError, TransientProviderError
from service.domain.reply_trigger import lock_expiry
from tests.fakes import FakeReplyClaims, FakeWorld, conversation_record

REPLIES_URL = "https://sqs.example/replies"
LEASE_S = 30.0
WINDOW_S = 10
MAX_RECEIVES = 3
REPLY = "Saturday at 10am works. See you then!"
USAGE = TokenUsage(10, 5, 15)  # what the fake AI reports for every answer


@dataclass
class Rig:
    world: FakeWorld
    processor: ReplySender
    key: ConversationKey

    @property
    def record(self) -> ConversationRecord:
        return self.world.table[self.key]

    @property
    def cid(self) -> str:
        return self.key.conversation_id

    @property
    def sent(self) -> list[Any]:
        return self.world.sender("whatsapp").sent

    @property
    def staged_sids(self) -> list[str]:
        return sorted(self.world.stage.fragments.get(self.cid, {}))

    async def trigger(self, receive_count: int = 1) -> Outcome:
        body = orjson.dumps({"conversation_id": self.cid, "primary_channel": self.key.primary_channel}).decode()
        message = QueueMessage(f"t-{receive_count}", "receipt", body, {}, receive_count, self.world.clock.now())
        return await self.processor.process(message, Lease())

    async def inbound(self, sid: str, body: str, *, lock: bool = True) -> Fragment:
        """A fragment staged as the intake stages it; the window's first also takes the lock and queues."""
        now = self.world.clock.now()
        fragment = Fragment(sid, body, self.world.clock.stamp())
        assert await self.world.stage.stage(self.key, fragment, lock_expiry(now, WINDOW_S))
        if lock and await self.world.stage.take_lock(self.cid, sid, now, lock_expiry(now, WINDOW_S)):
            await self.world.stage.mark_queued(self.cid, sid)
        return fragment

    async def claim_elsewhere(self, owner: str = "elsewhere") -> None:
        now = self.world.clock.now()
        answer = await self.world.reply_claims.claim(self.key, owner, now + LEASE_S, now)
        assert answer.verdict is Claim.TAKE


def make_rig(
    status: ConversationStatus = ConversationStatus.INITIAL_MESSAGE_SENT, world: FakeWorld | None = None
) -> Rig:
    world = world or FakeWorld()
    record = world.seed(conversation_record(status))
    config = ReplySenderConfig(
        queue_url=REPLIES_URL,
        claim_lease_s=LEASE_S,
        ai_timeout_s=10.0,
        batching_window_s=WINDOW_S,
        status_callback_url="https://comms.example/webhooks/twilio/status",
        redrive=RedrivePolicy("https://sqs.example/replies-dlq", MAX_RECEIVES),
    )
    ports = ReplyPorts(
        claims=world.reply_claims,
        stage=world.stage,
        secrets=world.secrets,
        ai=world.ai,
        senders=world.senders,
        opt_outs=world.opt_outs,
        publisher=world.publisher,
    )
    metrics = ConsumerMetrics(CollectorRegistry())
    processor = ReplySender(config, ports, metrics, clock=world.clock, sleep=world.clock.sleep)
    world.ai.answer_next({"content": REPLY})
    return Rig(world, processor, record.key)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


def assert_untouched(rig: Rig) -> None:
    """Nothing written, nothing sent."""
    assert rig.world.ai.requests == []
    assert rig.world.sender("whatsapp").attempts == []


async def crashed_after_recording_the_reply(rig: Rig, *, reached_the_provider: bool) -> None:
    """Another replier recorded its attempt, perhaps sent it, then crashed; its lease lapsed since."""
    fragment = await rig.inbound("SMin1", "Is Saturday still fine?")
    await rig.claim_elsewhere("crashed")
    now = rig.world.clock.now()
    attempt = ReplyAttempt(("SMin1",), fragment.body, fragment.received_at, REPLY, USAGE, "resp_crashed", now)
    assert await rig.world.reply_claims.record_attempt(rig.key, "crashed", attempt)
    if reached_the_provider:
        sender = rig.record.company_address or ""
        await rig.world.sender("whatsapp").send(OutboundMessage("whatsapp", {}, sender, rig.key.primary_channel, REPLY))
    rig.world.clock.advance(LEASE_S + 1)


# ---- answering -----------------------------------------------------------------------------------------------------


async def test_fragments_staged_in_order_are_answered_with_one_reply_in_received_order(rig: Rig) -> None:
    first = await rig.inbound("SMb", "Hello")  # the sids sort the other way round
    rig.world.clock.advance(1)
    await rig.inbound("SMa", "Is Saturday still fine?")

    outcome = await rig.trigger()

    assert outcome == Outcome.done("reply_sent")
    [request] = rig.world.ai.requests
    assert (request.input_text, request.thread_id, request.output_keys) == (
        "Hello\nIs Saturday still fine?",
        "resp_seeded",
        ("content",),
    )
    assert request.history == (Message("SM0", "assistant", "Hello from the agency", rig.record.messages[0].timestamp),)
    assert request.instructions == "Answer briefly."
    [sent] = rig.sent
    assert (sent.message.body, sent.message.sender, sent.message.recipient) == (
        REPLY,
        rig.record.company_address,
        rig.key.primary_channel,
    )
    record = rig.record
    assert record.thread_id == "resp_fake_1"  # the next reply chains from this one
    assert record.messages[-2:] == (
        Message("SMb", "user", "Hello\nIs Saturday still fine?", first.received_at, fragment_sids=("SMb", "SMa")),
        Message(sent.provider_message_id, "assistant", REPLY, rig.world.clock.stamp(), USAGE, "queued"),
    )
    assert record.status is ConversationStatus.REPLY_SENT
    assert answered_fragments(record, record.messages) == {"SMa", "SMb"}
    assert (record.reply_attempt, record.reply_claim) == (None, RecordLease())
    assert rig.staged_sids == []
    assert rig.cid not in rig.world.stage.locks
    assert rig.world.publisher.messages == []  # nothing left to look again for


async def test_a_reply_deletes_its_fragments_with_the_lock_and_reads_the_stage_once_more_only_to_look_again(
    rig: Rig,
) -> None:
    await rig.inbound("SMin1", "Hello")

    assert await rig.trigger() == Outcome.done("reply_sent")

    calls = rig.world.stage.faults.calls
    assert (calls["staged"], calls["finish_window"]) == (2, 1)  # gather, look again; fragments + lock together
    assert (calls["delete_staged"], calls["release_lock"]) == (0, 0)
    assert rig.staged_sids == [] and rig.cid not in rig.world.stage.locks


async def test_an_answered_fragment_staged_again_during_the_reply_is_deleted_not_answered_again(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.table.put(replace(rig.record, replied_sids=frozenset({"SMold"})))

    async def staged_again() -> None:  # a webhook retry of a fragment answered by an earlier reply
        await rig.inbound("SMold", "Earlier question", lock=False)

    rig.world.sender("whatsapp").faults.on_next("send", staged_again)

    assert await rig.trigger() == Outcome.done("reply_sent")

    assert rig.staged_sids == []
    assert rig.world.publisher.messages == []
    assert [r.message.body for r in rig.sent] == [REPLY]


async def test_nothing_staged_is_acknowledged_and_the_status_restored() -> None:
    rig = make_rig(ConversationStatus.REPLY_SENT)
    await rig.world.stage.take_lock(rig.cid, "SMgone", rig.world.clock.now(), 10**10)

    assert await rig.trigger() == Outcome.done("nothing_to_answer")

    assert_untouched(rig)
    assert (rig.record.status, rig.record.reply_claim) == (ConversationStatus.REPLY_SENT, RecordLease())
    assert rig.cid not in rig.world.stage.locks


async def test_fragments_answered_already_but_left_staged_are_deleted_not_answered_again(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.table.put(replace(rig.record, replied_sids=frozenset({"SMin1"})))  # a tidy-up that failed after it

    assert await rig.trigger() == Outcome.done("nothing_to_answer")

    assert_untouched(rig)
    assert rig.staged_sids == []


async def test_fragments_a_recorded_user_message_answered_but_left_staged_are_deleted_not_answered_again(
    rig: Rig,
) -> None:
    await rig.inbound("SMin1", "Hello")
    answered = Message("SMin1", "user", "Hello", rig.world.clock.stamp(), fragment_sids=("SMin1",))
    rig.world.table.put(replace(rig.record, messages=(*rig.record.messages, answered)))  # its tidy-up failed

    assert await rig.trigger() == Outcome.done("nothing_to_answer")

    assert_untouched(rig)
    assert rig.staged_sids == []


async def test_an_opted_out_recipient_is_not_answered(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    record = rig.record
    at = rig.world.clock.stamp()
    await rig.world.opt_outs.opt_out(record.company_id, record.project_id, "whatsapp", rig.key.primary_channel, at)

    assert await rig.trigger() == Outcome.done("suppressed")

    assert_untouched(rig)
    assert rig.record.status is ConversationStatus.INITIAL_MESSAGE_SENT
    assert rig.staged_sids == []
    assert rig.cid not in rig.world.stage.locks


# ---- claims ----------------------------------------------------------------------------------------------------------


async def test_a_live_reply_claim_is_retried_after_its_lease(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    await rig.claim_elsewhere()
    rig.world.clock.advance(10)

    assert await rig.trigger() == Outcome.retry("reply_claim_held", 20)

    assert_untouched(rig)
    assert rig.staged_sids == ["SMin1"]
    assert rig.record.reply_claim.owner == "elsewhere"


async def test_a_held_reply_claim_on_the_last_receive_is_left_to_its_holder(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    await rig.claim_elsewhere()

    assert await rig.trigger(receive_count=MAX_RECEIVES) == Outcome.done("left_to_claim_holder")

    assert_untouched(rig)
    assert rig.staged_sids == ["SMin1"]
    assert rig.record.reply_claim.owner == "elsewhere"


async def test_a_reply_while_the_first_message_is_in_flight_is_retried_in_5_s() -> None:
    rig = make_rig(ConversationStatus.PROCESSING)
    await rig.inbound("SMin1", "Hello")

    assert await rig.trigger() == Outcome.retry("first_message_in_flight", 5)

    assert_untouched(rig)
    assert rig.staged_sids == ["SMin1"]


@pytest.mark.parametrize(
    "status",
    [ConversationStatus.HANDED_OFF, ConversationStatus.OPTED_OUT, ConversationStatus.FAILED_TO_PROCESS_AI],
)
async def test_a_conversation_not_answerable_drops_the_trigger_and_releases_the_lock(
    status: ConversationStatus,
) -> None:
    rig = make_rig(status)
    await rig.inbound("SMin1", "Hello")

    assert await rig.trigger() == Outcome.done("not_answerable")

    assert_untouched(rig)
    assert rig.record.status is status
    assert rig.cid not in rig.world.stage.locks


async def test_a_reply_claim_whose_lease_ends_exactly_now_is_taken_over(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    await rig.claim_elsewhere("crashed")
    rig.world.clock.advance(LEASE_S)  # now == the lease's expiry: lapsed (`Lease.is_live` is expires_at > now)

    assert decide_reply(rig.record, rig.world.clock.now()) is Claim.TAKE
    assert await rig.trigger() == Outcome.done("reply_sent")

    assert len(rig.sent) == 1
    assert answered_fragments(rig.record, rig.record.messages) == {"SMin1"}


class AdapterLikeBoundaryReplyClaims(FakeReplyClaims):
    """A store whose write is refused by a lease the rule already calls lapsed (a race at the expiry: the adapter's
    condition and `decide_reply` agree on the boundary, the clocks of two writers need not): it answers
    `decide_reply` of the refusing record, TAKE, with the other replier's claim on it."""

    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        record = self.table.get(key)
        if (
            record is not None
            and record.status is ConversationStatus.PROCESSING_REPLY
            and record.reply_claim.expires_at == now
        ):
            return ClaimAnswer(decide_reply(record, now), record)
        return await super().claim(key, owner, lease_until, now)


async def test_a_reply_claim_the_store_refuses_at_the_lease_boundary_is_not_worked_on() -> None:
    world = FakeWorld()
    world.reply_claims = AdapterLikeBoundaryReplyClaims(world.table)
    rig = make_rig(world=world)
    await rig.inbound("SMin1", "Hello")
    await rig.claim_elsewhere("slow")
    rig.world.clock.advance(LEASE_S)

    outcome = await rig.trigger()

    assert_untouched(rig)
    assert outcome.disposition is Disposition.RETRY
    assert rig.record.reply_claim.owner == "slow"


# ---- never twice -----------------------------------------------------------------------------------------------------


async def test_a_pending_reply_the_provider_shows_sent_is_finalised_without_a_new_send(rig: Rig) -> None:
    await crashed_after_recording_the_reply(rig, reached_the_provider=True)

    assert await rig.trigger() == Outcome.done("reply_sent")

    assert rig.world.ai.requests == []
    assert len(rig.world.sender("whatsapp").attempts) == 1
    [sent] = rig.sent
    record = rig.record
    assert (record.messages[-1].message_id, record.messages[-1].delivery_status) == (sent.provider_message_id, "sent")
    assert record.messages[-2].message_id == "SMin1"
    assert record.thread_id == "resp_crashed"  # the recorded attempt's continuation
    assert (record.status, answered_fragments(record, record.messages), record.reply_attempt) == (
        ConversationStatus.REPLY_SENT,
        frozenset({"SMin1"}),
        None,
    )
    assert rig.staged_sids == []


async def test_a_pending_reply_the_provider_has_no_record_of_is_sent_once(rig: Rig) -> None:
    await crashed_after_recording_the_reply(rig, reached_the_provider=False)

    assert await rig.trigger() == Outcome.done("reply_sent")

    assert rig.world.ai.requests == []  # the recorded text is sent, not written again
    assert [r.message.body for r in rig.sent] == [REPLY]
    assert answered_fragments(rig.record, rig.record.messages) == {"SMin1"}


async def test_a_pending_reply_that_went_out_before_an_opt_out_is_still_recorded(rig: Rig) -> None:
    await crashed_after_recording_the_reply(rig, reached_the_provider=True)
    record = rig.record
    at = rig.world.clock.stamp()
    await rig.world.opt_outs.opt_out(record.company_id, record.project_id, "whatsapp", rig.key.primary_channel, at)

    await rig.trigger()

    assert len(rig.world.sender("whatsapp").attempts) == 1  # nothing is sent again
    assert answered_fragments(rig.record, rig.record.messages) == {"SMin1"}
    assert rig.record.messages[-1].message_id == rig.sent[0].provider_message_id
    assert rig.record.reply_attempt is None


async def test_a_pending_reply_the_provider_never_got_is_not_sent_after_an_opt_out(rig: Rig) -> None:
    await crashed_after_recording_the_reply(rig, reached_the_provider=False)
    record = rig.record
    at = rig.world.clock.stamp()
    await rig.world.opt_outs.opt_out(record.company_id, record.project_id, "whatsapp", rig.key.primary_channel, at)

    assert await rig.trigger() == Outcome.done("suppressed")

    assert rig.sent == []
    assert (rig.record.reply_attempt, rig.record.status) == (None, ConversationStatus.INITIAL_MESSAGE_SENT)
    assert rig.staged_sids == []


async def test_a_fragment_arriving_during_the_reply_gets_its_own_trigger_after_the_window(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")

    async def arrives_meanwhile() -> None:
        await rig.inbound("SMlate", "And can I bring my dog?")  # the lock is held: it only stages

    rig.world.sender("whatsapp").faults.on_next("send", arrives_meanwhile)

    assert await rig.trigger() == Outcome.done("reply_sent")

    [retrigger] = rig.world.publisher.on(REPLIES_URL)
    assert retrigger.delay_s == WINDOW_S
    assert orjson.loads(retrigger.body) == {"conversation_id": rig.cid, "primary_channel": rig.key.primary_channel}
    assert rig.staged_sids == ["SMlate"]
    assert answered_fragments(rig.record, rig.record.messages) == {"SMin1"}
    lock = rig.world.stage.locks[rig.cid]
    assert (lock.lease.owner, lock.trigger_queued) == ("retrigger:SMlate", True)
    assert [r.message.body for r in rig.sent] == [REPLY]


async def test_an_opt_out_landing_while_sending_keeps_opted_out_and_records_the_reply(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.sender("whatsapp").faults.on_next("send", lambda: rig.world.lookup.mark_opted_out(rig.key))

    assert await rig.trigger() == Outcome.done("reply_sent")

    record = rig.record
    assert record.status is ConversationStatus.OPTED_OUT
    assert answered_fragments(record, record.messages) == {"SMin1"}
    assert record.messages[-1].message_id == rig.sent[0].provider_message_id
    assert record.reply_claim == RecordLease()


# ---- failures --------------------------------------------------------------------------------------------------------


async def test_exhausted_retries_keep_the_conversation_answerable_and_dead_letter_the_trigger(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.sender("whatsapp").time_out_next(sent=True)

    outcome = await rig.trigger(receive_count=MAX_RECEIVES)

    assert outcome == Outcome.dead_letter(RETRIES_EXHAUSTED)
    record = rig.record
    assert (record.status, record.reply_claim) == (ConversationStatus.INITIAL_MESSAGE_SENT, RecordLease())
    assert record.reply_attempt is not None and record.reply_attempt.message_sids == ("SMin1",)  # kept: reconciled
    failure = rig.world.table.notes[rig.key]["last_reply_failure"]
    assert failure.exhausted and failure.reason.endswith("last failure: send_outcome_unknown (504: timeout)")
    assert rig.cid not in rig.world.stage.locks
    assert rig.staged_sids == ["SMin1"]


async def test_a_reply_kept_by_exhausted_retries_is_reconciled_by_the_next_trigger_never_sent_twice(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.sender("whatsapp").time_out_next(sent=True)
    await rig.trigger(receive_count=MAX_RECEIVES)

    await rig.inbound("SMin2", "Hello?")  # the recipient writes again: a new window, a new trigger
    assert await rig.trigger() == Outcome.done("reply_sent")

    assert len(rig.world.sender("whatsapp").attempts) == 1
    assert answered_fragments(rig.record, rig.record.messages) == {"SMin1"}
    assert rig.staged_sids == ["SMin2"]  # answered next, by the look-again trigger
    assert len(rig.world.publisher.on(REPLIES_URL)) == 1


async def test_exhausted_ai_retries_leave_nothing_to_reconcile(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.ai.faults.fail_next("write", error=TransientProviderError("server_error", code="500"))

    assert await rig.trigger(receive_count=MAX_RECEIVES) == Outcome.dead_letter(RETRIES_EXHAUSTED)

    record = rig.record
    assert (record.status, record.reply_attempt) == (ConversationStatus.INITIAL_MESSAGE_SENT, None)
    assert rig.world.table.notes[rig.key]["last_reply_failure"].status is ConversationStatus.FAILED_TO_PROCESS_AI


async def test_a_permanent_ai_failure_fails_the_conversation_and_releases_the_lock(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.ai.faults.fail_next("write", error=PermanentProviderError("content_policy", code="400"))

    assert await rig.trigger() == Outcome.done("failed_to_process_ai")

    record = rig.record
    assert record.status is ConversationStatus.FAILED_TO_PROCESS_AI
    assert record.failure is not None and record.failure.reason == "400: content_policy"
    assert record.reply_claim == RecordLease()
    assert rig.cid not in rig.world.stage.locks
    assert rig.world.sender("whatsapp").attempts == []


async def test_unusable_channel_credentials_wait_for_an_operator(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    del rig.world.secrets.secrets["cred-whatsapp"]

    outcome = await rig.trigger()

    assert outcome == Outcome.retry("secrets_permanent", 60, detail="ResourceNotFoundException: secret_not_found")
    assert_untouched(rig)
    assert decide_reply(rig.record, rig.world.clock.now()) is Claim.TAKE  # released for the retry
    assert rig.staged_sids == ["SMin1"]


async def test_a_transient_send_failure_clears_the_reply_attempt_and_retries(rig: Rig) -> None:
    await rig.inbound("SMin1", "Hello")
    rig.world.sender("whatsapp").throttle_next()

    assert await rig.trigger() == Outcome.retry("send_transient", detail="429: throttled")

    assert rig.record.reply_attempt is None
    assert rig.sent == []
    assert await rig.trigger(receive_count=2) == Outcome.done("reply_sent")
    assert rig.world.sender("whatsapp").lookups == []
    assert len(rig.world.ai.requests) == 2  # the draft was not kept: the retry writes again
    assert len(rig.sent) == 1
