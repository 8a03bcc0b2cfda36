"""The template sender (SPEC §6) on in-memory fakes: one queued context becomes one AI-written first message, sent
once, whatever redelivery, crash, timeout or store failure happens around it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import RedrivePolicy
from consumers.template_job import TemplateJob, new_conversation, parse_template_job
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from service.domain.claims import RETRIES_EXHAUSTED, Claim, decide_conversation
from service.domain.company import CompanyRecord
from service.domain.context import build_context
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Message,
    NewConversation,
    SendState,
    TemplateDraft,
    TokenUsage,
    conversation_id,
)
from service.domain.initiate import validate_initiate_body
from service.domain.ports import ClaimAnswer
from service.domain.provider_ports import OutboundMessage, PermanentProviderError, TransientProviderError
from tests.fakes import CHANNEL_ADDRESSES, RECIPIENTS, FakeConversationClaims, FakeWorld

COMPANY_ID, PROJECT_ID = "ci-test", "pi-test"
LEASE_S = 30.0
MAX_RECEIVES = 3
SMS_TEXT = "Hi Lee, your viewing of 12 Acacia Avenue is on Saturday at 10am."
USAGE = TokenUsage(10, 5, 15)  # what the fake AI reports for every answer


def company() -> CompanyRecord:
    """A tenant whose secrets and addresses are the ones a FakeWorld starts with."""
    ai = {
        "api_key_reference": "ai-key",
        "model": "gpt-4.1-mini",
        "template_sender": {"instructions": "Write the first message of the conversation."},
        "replies": {"instructions": "Answer briefly."},
    }
    return CompanyRecord.model_validate(
        {
            "company_id": COMPANY_ID,
            "project_id": PROJECT_ID,
            "company_name": "Agency Ltd",
            "project_name": "Spring viewings",
            "project_status": "active",
            "allowed_channels": ["whatsapp", "sms", "email"],
            "company_rep": {"company_rep_1": "Alex Example"},
            "channel_config": {
                "whatsapp": {
                    "company_whatsapp_number": CHANNEL_ADDRESSES["whatsapp"],
                    "whatsapp_credentials_id": "cred-whatsapp",
                    "whatsapp_template_sid": "HXtemplate",
                },
                "sms": {"company_sms_number": CHANNEL_ADDRESSES["sms"], "sms_credentials_id": "cred-sms"},
                "email": {
                    "company_email": CHANNEL_ADDRESSES["email"],
                    "email_credentials_id": "cred-email",
                    "from_name": "Agency",
                },
            },
            "ai_config": {"openai_config": {channel: ai for channel in ("whatsapp", "sms", "email")}},
        }
    )


def context(channel: str = "sms") -> dict[str, Any]:
    """The queue message body the router builds for a fresh request (SPEC §4)."""
    request_id = str(uuid.uuid4())
    request = validate_initiate_body(
        {
            "company_data": {"company_id": COMPANY_ID, "project_id": PROJECT_ID},
            "recipient_data": {
                "recipient_first_name": "Lee",
                "recipient_last_name": "Hayton",
                "recipient_tel": RECIPIENTS["sms"],
                "recipient_email": RECIPIENTS["email"],
                "comms_consent": True,
            },
            "project_data": {"property": "12 Acacia Avenue", "viewing": "Saturday 10am"},
            "request_data": {
                "request_id": request_id,
                "channel_method": channel,
                "initial_request_timestamp": "2025-04-27T05:45:56Z",
            },
        }
    )
    tenant = company()
    sender = tenant.sender_address(channel) or ""
    conversation = conversation_id(COMPANY_ID, PROJECT_ID, request_id, channel, sender)
    built = build_context(request, tenant, conversation, router_version="r", trace_id="t", queue_timestamp="q")
    return built.model_dump(mode="json")


@dataclass
class Rig:
    world: FakeWorld
    processor: TemplateSender
    registry: CollectorRegistry
    body: str

    @property
    def job(self) -> TemplateJob:
        return parse_template_job(self.body)

    @property
    def key(self) -> ConversationKey:
        return self.job.key

    @property
    def record(self) -> ConversationRecord:
        return self.world.table[self.key]

    @property
    def sent(self) -> list[Any]:
        return self.world.sender(self.job.channel).sent

    async def deliver(self, receive_count: int = 1, lease: Lease | None = None) -> Outcome:
        message = QueueMessage(f"m-{receive_count}", "receipt", self.body, {}, receive_count, self.world.clock.now())
        return await self.processor.process(message, lease or Lease())

    async def claim_elsewhere(self, owner: str = "elsewhere", lease_s: float = LEASE_S) -> ClaimAnswer:
        """Another worker claims the conversation (it crashes or keeps working, as the test says)."""
        now = self.world.clock.now()
        return await self.world.conversation_claims.claim(new_conversation(self.job), owner, now + lease_s, now)

    def final_update_failures(self) -> float:
        value = self.registry.get_sample_value("comms_final_update_failures_total", {"queue": self.job.channel})
        return value or 0.0


def make_rig(channel: str = "sms", body: str | None = None, world: FakeWorld | None = None) -> Rig:
    world = world or FakeWorld()
    config = TemplateSenderConfig(
        queue=channel,
        claim_lease_s=LEASE_S,
        ai_timeout_s=10.0,
        status_callback_url="https://comms.example/webhooks/twilio/status",
        redrive=RedrivePolicy("https://sqs.example/dlq", MAX_RECEIVES),
    )
    ports = TemplatePorts(world.conversation_claims, world.secrets, world.ai, world.senders)
    registry = CollectorRegistry()
    processor = TemplateSender(config, ports, ConsumerMetrics(registry), clock=world.clock, sleep=world.clock.sleep)
    return Rig(world, processor, registry, body or orjson.dumps(context(channel)).decode())


@pytest.fixture
def rig() -> Rig:
    rig = make_rig()
    rig.world.ai.answer_next({"body": SMS_TEXT})
    return rig


def outbound_sms(rig: Rig, body: str) -> OutboundMessage:
    """The message the sender would send for `body` (as the provider matches a look-up)."""
    return OutboundMessage("sms", {}, CHANNEL_ADDRESSES["sms"], rig.job.recipient, body=body)


async def crashed_after_recording_the_attempt(rig: Rig, *, reached_the_provider: bool) -> None:
    """Another worker recorded its attempt (ATTEMPTING), perhaps sent, then crashed; its lease lapsed since."""
    answer = await rig.claim_elsewhere("crashed")
    assert answer.verdict is Claim.TAKE
    draft = TemplateDraft("conv_crashed", {"body": SMS_TEXT}, USAGE, rig.world.clock.now())
    assert await rig.world.conversation_claims.record_attempt(rig.key, "crashed", draft)
    if reached_the_provider:
        await rig.world.sender("sms").send(outbound_sms(rig, SMS_TEXT))
    rig.world.clock.advance(LEASE_S + 1)


def assert_sent_once_and_finalised(rig: Rig, text: str = SMS_TEXT) -> None:
    assert [r.message.body for r in rig.sent] == [text]
    record = rig.record
    provider_id = rig.sent[0].provider_message_id
    assert record.status is ConversationStatus.INITIAL_MESSAGE_SENT
    assert (record.ledger.state, record.ledger.provider_message_id) == (SendState.SENT, provider_id)
    assert [(m.message_id, m.role, m.content) for m in record.messages] == [(provider_id, "assistant", text)]


# ---- the first delivery ------------------------------------------------------------------------------------------


async def test_a_first_delivery_generates_records_the_attempt_sends_once_and_finalises(rig: Rig) -> None:
    ledger_at_send: list[Any] = []
    rig.world.sender("sms").faults.on_next("send", lambda: ledger_at_send.append(rig.record.ledger))

    outcome = await rig.deliver()

    assert outcome == Outcome.done("sent")
    [request] = rig.world.ai.requests
    assert (request.thread_id, request.history) == (None, ())  # a new conversation: one AI call, nothing before
    assert request.metadata["conversation_id"] == rig.key.conversation_id  # findable at OpenAI by conversation
    assert ledger_at_send[0].state is SendState.ATTEMPTING  # written before the provider was called
    assert ledger_at_send[0].generated == {"body": SMS_TEXT}
    assert_sent_once_and_finalised(rig)
    record = rig.record
    assert record.messages[0] == Message(
        rig.sent[0].provider_message_id, "assistant", SMS_TEXT, rig.world.clock.stamp(), USAGE
    )
    assert record.thread_id == "resp_fake_1"  # the continuation a reply chains from
    assert record.claim.expires_at == 0.0  # the claim dropped with the final update
    assert "processing_time_ms" in rig.world.table.notes[rig.key]
    sent = rig.sent[0].message
    assert (sent.sender, sent.recipient, sent.status_callback_url) == (
        CHANNEL_ADDRESSES["sms"],
        RECIPIENTS["sms"],
        "https://comms.example/webhooks/twilio/status",
    )


async def test_a_whatsapp_first_message_is_the_template_filled_with_the_generated_variables() -> None:
    rig = make_rig("whatsapp")
    rig.world.ai.answer_next({"1": "Lee", "2": "Your viewing is on Saturday."})

    assert await rig.deliver() == Outcome.done("sent")

    [sent] = rig.sent
    assert (sent.message.content_sid, sent.message.content_variables) == (
        "HXtemplate",
        {"1": "Lee", "2": "Your viewing is on Saturday."},
    )
    assert orjson.loads(rig.record.messages[0].content) == {"1": "Lee", "2": "Your viewing is on Saturday."}


async def test_an_email_first_message_is_sent_with_the_generated_subject_and_body() -> None:
    rig = make_rig("email")
    rig.world.ai.answer_next({"subject": "Your viewing", "body": "See you on Saturday."})

    assert await rig.deliver() == Outcome.done("sent")

    [sent] = rig.sent
    assert (sent.message.subject, sent.message.body, sent.message.sender_name) == (
        "Your viewing",
        "See you on Saturday.",
        "Agency",
    )
    assert sent.message.status_callback_url is None
    assert rig.record.messages[0].content == "Your viewing\n\nSee you on Saturday."


async def test_a_redelivery_of_a_finished_conversation_is_acknowledged_without_a_send(rig: Rig) -> None:
    await rig.deliver()

    assert await rig.deliver(receive_count=2) == Outcome.done("already_done")

    assert len(rig.sent) == 1
    assert len(rig.world.ai.requests) == 1


# ---- claims --------------------------------------------------------------------------------------------------------


async def test_a_live_claim_elsewhere_is_retried_after_its_lease(rig: Rig) -> None:
    await rig.claim_elsewhere()
    rig.world.clock.advance(10)

    outcome = await rig.deliver()

    assert outcome == Outcome.retry("claim_held_elsewhere", 20)
    assert rig.sent == [] and rig.world.ai.requests == []
    assert rig.record.claim.owner == "elsewhere"


async def test_a_lapsed_claim_is_taken_over(rig: Rig) -> None:
    await rig.claim_elsewhere("crashed")
    rig.world.clock.advance(LEASE_S + 1)

    assert await rig.deliver() == Outcome.done("sent")

    assert_sent_once_and_finalised(rig)


async def test_a_claim_whose_lease_ends_exactly_now_is_taken_over(rig: Rig) -> None:
    await rig.claim_elsewhere("crashed")
    rig.world.clock.advance(LEASE_S)  # now == the lease's expiry: lapsed (`Lease.is_live` is expires_at > now)

    assert decide_conversation(rig.record, rig.world.clock.now()) is Claim.TAKE
    assert await rig.deliver() == Outcome.done("sent")

    assert_sent_once_and_finalised(rig)


class AdapterLikeBoundaryClaims(FakeConversationClaims):
    """A store whose write is refused by a lease the rule already calls lapsed (a race at the expiry between two
    writers' clocks): it answers `decide_conversation` of the refusing record (TAKE, someone else's claim)."""

    async def claim(self, new: NewConversation, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        record = self.table.get(new.key)
        if record is not None and record.status is ConversationStatus.PROCESSING and record.claim.expires_at == now:
            return ClaimAnswer(decide_conversation(record, now), record)
        return await super().claim(new, owner, lease_until, now)


async def test_a_claim_the_store_refuses_at_the_lease_boundary_is_retried_in_a_second() -> None:
    world = FakeWorld()
    world.conversation_claims = AdapterLikeBoundaryClaims(world.table)
    rig = make_rig(world=world)
    await rig.claim_elsewhere("crashed")
    rig.world.clock.advance(LEASE_S)

    assert await rig.deliver() == Outcome.retry("claim_raced", 1)

    assert rig.sent == [] and rig.world.ai.requests == []
    assert rig.record.claim.owner == "crashed"


# ---- the send ledger -----------------------------------------------------------------------------------------------


async def test_content_generated_but_not_sent_is_sent_without_a_second_ai_call(rig: Rig) -> None:
    await crashed_after_recording_the_attempt(rig, reached_the_provider=False)
    assert await rig.world.conversation_claims.clear_attempt(rig.key, "crashed")  # certainly not sent

    assert await rig.deliver() == Outcome.done("sent")

    assert rig.world.ai.requests == []
    assert rig.world.sender("sms").lookups == []  # nothing to reconcile
    assert_sent_once_and_finalised(rig)


async def test_an_attempt_the_provider_shows_sent_is_finalised_with_its_id_without_a_second_send(rig: Rig) -> None:
    await crashed_after_recording_the_attempt(rig, reached_the_provider=True)

    assert await rig.deliver() == Outcome.done("sent")

    assert len(rig.world.sender("sms").lookups) == 1
    assert rig.world.ai.requests == []
    assert_sent_once_and_finalised(rig)
    assert rig.record.thread_id == "conv_crashed"


async def test_an_attempt_the_provider_has_no_record_of_is_sent_once(rig: Rig) -> None:
    await crashed_after_recording_the_attempt(rig, reached_the_provider=False)

    assert await rig.deliver() == Outcome.done("sent")

    assert len(rig.world.sender("sms").lookups) == 1
    assert rig.world.ai.requests == []
    assert_sent_once_and_finalised(rig)


async def test_an_attempt_found_unsent_is_recorded_anew_so_a_later_reconcile_looks_back_from_it(rig: Rig) -> None:
    await crashed_after_recording_the_attempt(rig, reached_the_provider=False)
    first_attempt_at = rig.record.ledger.attempted_at
    rig.world.clock.advance(86_400)  # redriven a day later
    recorded: list[float | None] = []
    rig.world.sender("sms").faults.on_next("send", lambda: recorded.append(rig.record.ledger.attempted_at))

    assert await rig.deliver() == Outcome.done("sent")

    assert first_attempt_at is not None
    assert recorded == [rig.world.clock.now()]


async def test_an_email_attempt_with_unknown_outcome_is_failed_for_review_never_sent_again() -> None:
    rig = make_rig("email")
    rig.world.ai.answer_next({"subject": "Your viewing", "body": "See you on Saturday."})
    rig.world.sender("email").time_out_next(sent=True)
    assert await rig.deliver() == Outcome.retry("send_outcome_unknown", detail="504: timeout")

    outcome = await rig.deliver(receive_count=2)

    assert outcome == Outcome.done("failed_to_send_message")
    assert len(rig.sent) == 1
    record = rig.record
    assert record.status is ConversationStatus.FAILED_TO_SEND_MESSAGE
    assert record.failure is not None
    assert record.failure.reason == "send_outcome_unknown_needs_review: lookup_unsupported"


@pytest.mark.parametrize("reached_the_provider", [True, False], ids=["sent-before-timeout", "not-sent"])
async def test_a_send_that_timed_out_is_retried_and_reconciled_never_sent_twice(
    rig: Rig, reached_the_provider: bool
) -> None:
    rig.world.sender("sms").time_out_next(sent=reached_the_provider)

    first = await rig.deliver()
    assert first == Outcome.retry("send_outcome_unknown", detail="504: timeout")
    assert rig.record.ledger.state is SendState.ATTEMPTING
    assert decide_conversation(rig.record, rig.world.clock.now()) is Claim.TAKE  # released for the redelivery

    assert await rig.deliver(receive_count=2) == Outcome.done("sent")

    assert len(rig.world.sender("sms").attempts) == (1 if reached_the_provider else 2)
    assert len(rig.world.ai.requests) == 1
    assert_sent_once_and_finalised(rig)


async def test_a_transient_send_failure_clears_the_attempt_and_retries(rig: Rig) -> None:
    rig.world.sender("sms").throttle_next(retry_after_s=6.5)

    outcome = await rig.deliver()

    assert outcome == Outcome.retry("send_transient", 7, detail="429: throttled")
    record = rig.record
    assert (record.status, record.ledger.state) == (ConversationStatus.PROCESSING, SendState.NOT_SENT)
    assert record.ledger.generated == {"body": SMS_TEXT}
    assert record.claim.expires_at == 0.0  # claimable at once by the retry
    assert rig.sent == []

    assert await rig.deliver(receive_count=2) == Outcome.done("sent")
    assert rig.world.sender("sms").lookups == []  # certainly not sent before: no reconciling
    assert len(rig.world.ai.requests) == 1
    assert_sent_once_and_finalised(rig)


# ---- permanent failures --------------------------------------------------------------------------------------------


def ai_refuses(rig: Rig) -> None:
    rig.world.ai.faults.fail_next("write", error=PermanentProviderError("content_policy", code="400"))


def credentials_missing(rig: Rig) -> None:
    del rig.world.secrets.secrets["cred-sms"]


def ai_key_missing(rig: Rig) -> None:
    rig.world.secrets.put("ai-key", {"something_else": "x"})


def recipient_refused(rig: Rig) -> None:
    rig.world.sender("sms").refuse_next()


@pytest.mark.parametrize(
    ("failure", "status", "reason"),
    [
        (ai_refuses, ConversationStatus.FAILED_TO_PROCESS_AI, "400: content_policy"),
        (credentials_missing, ConversationStatus.FAILED_SECRETS_FETCH, "ResourceNotFoundException: secret_not_found"),
        (ai_key_missing, ConversationStatus.FAILED_SECRETS_FETCH, "ai_api_key_missing"),
        (recipient_refused, ConversationStatus.FAILED_TO_SEND_MESSAGE, "21211: invalid_recipient"),
    ],
    ids=["ai-refuses", "credentials-missing", "ai-key-missing", "send-refused"],
)
async def test_a_permanent_failure_ends_in_its_failed_status_with_the_reason(
    rig: Rig, failure: Any, status: ConversationStatus, reason: str
) -> None:
    failure(rig)

    outcome = await rig.deliver()

    assert outcome == Outcome.done(status.value)
    assert rig.sent == []
    record = rig.record
    assert record.status is status
    assert record.failure is not None and (record.failure.reason, record.failure.exhausted) == (reason, False)
    assert record.claim.expires_at == 0.0
    assert await rig.deliver(receive_count=2) == Outcome.done("already_done")  # for good


# ---- retries exhausted ---------------------------------------------------------------------------------------------


def secrets_unavailable(rig: Rig) -> None:
    rig.world.secrets.faults.fail_next("get_json")


def ai_unavailable(rig: Rig) -> None:
    rig.world.ai.faults.fail_next("write", error=TransientProviderError("server_error", code="500"))


def send_throttled(rig: Rig) -> None:
    rig.world.sender("sms").throttle_next()


def send_timed_out(rig: Rig) -> None:
    rig.world.sender("sms").time_out_next(sent=False)


@pytest.mark.parametrize(
    ("failure", "status", "last", "ledger"),
    [
        (
            secrets_unavailable,
            ConversationStatus.FAILED_SECRETS_FETCH,
            "secrets_transient (get_json: injected_failure)",
            SendState.NOT_SENT,
        ),
        (
            ai_unavailable,
            ConversationStatus.FAILED_TO_PROCESS_AI,
            "ai_transient (500: server_error)",
            SendState.NOT_SENT,
        ),
        (
            send_throttled,
            ConversationStatus.FAILED_TO_SEND_MESSAGE,
            "send_transient (429: throttled)",
            SendState.NOT_SENT,
        ),
        (
            send_timed_out,
            ConversationStatus.FAILED_TO_SEND_MESSAGE,
            "send_outcome_unknown (504: timeout)",
            SendState.ATTEMPTING,
        ),
    ],
    ids=["secrets", "ai", "send-throttled", "send-timed-out"],
)
async def test_a_transient_failure_on_the_last_receive_is_marked_exhausted_and_dead_lettered(
    rig: Rig, failure: Any, status: ConversationStatus, last: str, ledger: SendState
) -> None:
    failure(rig)

    outcome = await rig.deliver(receive_count=MAX_RECEIVES)

    assert outcome == Outcome.dead_letter(RETRIES_EXHAUSTED)
    record = rig.record
    assert record.status is status
    assert record.failure is not None and record.failure.exhausted
    assert record.failure.reason.startswith(f"{RETRIES_EXHAUSTED}: gave up after {MAX_RECEIVES} receives;")
    assert record.failure.reason.endswith(f"last failure: {last}")
    assert record.ledger.state is ledger  # kept: a redrive reconciles an attempt, never sends it blindly
    assert rig.sent == []


async def test_a_transient_failure_before_the_last_receive_stays_a_retry(rig: Rig) -> None:
    ai_unavailable(rig)

    outcome = await rig.deliver(receive_count=MAX_RECEIVES - 1)

    assert outcome == Outcome.retry("ai_transient", detail="500: server_error")
    assert rig.record.status is ConversationStatus.PROCESSING
    assert rig.record.failure is None


async def test_a_lost_lease_on_the_last_receive_stays_a_retry_and_records_no_failure(rig: Rig) -> None:
    lease = Lease()
    lease.lost.set()

    outcome = await rig.deliver(receive_count=MAX_RECEIVES, lease=lease)

    assert outcome == Outcome.retry("lease_lost")
    assert rig.record.status is ConversationStatus.PROCESSING and rig.record.failure is None


# ---- the final update ----------------------------------------------------------------------------------------------


async def test_a_final_update_that_fails_once_is_retried_after_a_backoff(rig: Rig) -> None:
    rig.world.conversation_claims.faults.fail_next("finalise")

    assert await rig.deliver() == Outcome.done("sent")

    assert rig.world.clock.sleeps == [0.4]
    assert rig.world.conversation_claims.faults.calls["finalise"] == 2
    assert_sent_once_and_finalised(rig)
    assert rig.final_update_failures() == 0


async def test_a_final_update_applied_but_unanswered_is_not_applied_twice(rig: Rig) -> None:
    rig.world.conversation_claims.faults.fail_next("finalise", after_effect=True)

    assert await rig.deliver() == Outcome.done("already_finalised")

    assert_sent_once_and_finalised(rig)


async def test_a_final_update_that_keeps_failing_is_retried_and_nothing_is_sent_again(rig: Rig) -> None:
    rig.world.conversation_claims.faults.fail_next("finalise", times=3)

    outcome = await rig.deliver()

    assert outcome == Outcome.retry("final_update_failed")
    assert rig.world.clock.sleeps[:2] == [0.4, 0.8]  # (today a third, 1.6 s, follows the last attempt too)
    assert rig.final_update_failures() == 1
    assert rig.record.ledger.state is SendState.ATTEMPTING
    assert rig.record.claim.expires_at == 0.0

    assert await rig.deliver(receive_count=2) == Outcome.done("sent")  # reconciled with the provider
    assert len(rig.world.sender("sms").attempts) == 1
    assert_sent_once_and_finalised(rig)


# ---- stopping ------------------------------------------------------------------------------------------------------


async def test_a_lease_lost_during_the_ai_call_stops_before_sending(rig: Rig) -> None:
    lease = Lease()
    rig.world.ai.faults.on_next("write", lease.lost.set)

    outcome = await rig.deliver(lease=lease)

    assert outcome == Outcome.retry("lease_lost")
    assert rig.world.sender("sms").attempts == []
    assert rig.record.ledger.state is SendState.NOT_SENT
    assert decide_conversation(rig.record, rig.world.clock.now()) is Claim.TAKE


async def test_a_cancellation_during_the_ai_call_releases_the_claim(rig: Rig) -> None:
    writing = asyncio.Event()

    async def hang() -> None:
        writing.set()
        await asyncio.Event().wait()

    rig.world.ai.faults.on_next("write", hang)
    task = asyncio.create_task(rig.deliver())
    await writing.wait()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert rig.record.claim.expires_at == 0.0
    assert decide_conversation(rig.record, rig.world.clock.now()) is Claim.TAKE  # claimable again at once
    assert rig.world.sender("sms").attempts == []
    assert await rig.deliver(receive_count=2) == Outcome.done("sent")
    assert len(rig.sent) == 1


async def test_aws_failing_mid_work_releases_the_claim_for_the_retry(rig: Rig) -> None:
    rig.world.conversation_claims.faults.fail_next("record_attempt")

    outcome = await rig.deliver()

    assert outcome == Outcome.retry("dynamodb_unavailable")
    assert rig.record.claim.expires_at == 0.0  # a redelivery takes it at once, not after the lease
    assert rig.sent == []


# ---- invalid contexts ----------------------------------------------------------------------------------------------


async def test_an_invalid_context_naming_its_conversation_is_recorded_and_dead_lettered() -> None:
    body = context()
    body["conversation_data"]["conversation_id"] = "ci-other#pi-other#req#447700900002"
    rig = make_rig(body=orjson.dumps(body).decode())

    outcome = await rig.deliver()

    assert outcome == Outcome.dead_letter("invalid_context:conversation_id_mismatch")
    record = rig.world.table[ConversationKey(RECIPIENTS["sms"], "ci-other#pi-other#req#447700900002")]
    assert record.status is ConversationStatus.FAILED_INVALID_CONTEXT
    assert record.failure is not None and record.failure.reason == "conversation_id_mismatch"
    assert rig.world.ai.requests == [] and rig.world.sender("sms").attempts == []


async def test_a_context_that_is_not_json_is_dead_lettered_without_a_record() -> None:
    world = FakeWorld()
    config = TemplateSenderConfig("sms", LEASE_S, 10.0, None)
    ports = TemplatePorts(world.conversation_claims, world.secrets, world.ai, world.senders)
    processor = TemplateSender(config, ports, ConsumerMetrics(CollectorRegistry()), clock=world.clock)

    outcome = await processor.process(QueueMessage("m-1", "receipt", "{oops", {}, 1, 0.0), Lease())

    assert outcome.disposition is Disposition.DEAD_LETTER
    assert outcome.reason == "invalid_context:context_not_json"
    assert world.table.records == {}
