"""The initiate use case (SPEC §2) on in-memory fakes: tenant rules, request idempotency and queueing.

A request_id queues once; a repeat answers as the first did (waiting for it while it is in flight, polling the
ledger 25 ms, doubling, at most 200 ms apart), another body under the same request_id is refused. Over HTTP and
moto: tests/test_initiate_idempotency.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog.testing

from service.domain.claims import (
    Claim,
    RequestRecord,
    RequestState,
    body_fingerprint,
    decide_request,
    request_key,
)
from service.domain.company import CompanyRecord
from service.domain.conversation import Lease, conversation_id
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode
from service.domain.initiate import validate_initiate_body
from service.domain.initiation import ConversationInitiator, InitiateOutcome, InitiationPorts, poll_delays
from tests.fakes import CHANNEL_ADDRESSES, RECIPIENTS, FakeRequestLedger, FakeWorld

COMPANY_ID, PROJECT_ID = "ci-test", "pi-test"
QUEUES: dict[str, str | None] = {
    "whatsapp": "https://sqs.example/whatsapp",
    "sms": "https://sqs.example/sms",
    "email": None,  # not configured
}
LEASE_S = 30
THEIRS = "b" * 64  # another body's fingerprint


def company(**changes: Any) -> CompanyRecord:
    data: dict[str, Any] = {
        "company_id": COMPANY_ID,
        "project_id": PROJECT_ID,
        "company_name": "Agency Ltd",
        "project_status": "active",
        "allowed_channels": ["whatsapp", "sms", "email"],
        "channel_config": {
            "whatsapp": {
                "company_whatsapp_number": CHANNEL_ADDRESSES["whatsapp"],
                "whatsapp_credentials_id": "cred-whatsapp",
            },
            "sms": {"company_sms_number": CHANNEL_ADDRESSES["sms"], "sms_credentials_id": "cred-sms"},
            "email": {"company_email": CHANNEL_ADDRESSES["email"], "email_credentials_id": "cred-email"},
        },
        "ai_config": {"openai_config": {}},
    }
    return CompanyRecord.model_validate({**data, **changes})


def initiate_body(channel: str = "whatsapp") -> dict[str, Any]:
    """A valid request for the test tenant; every call gets a fresh request_id."""
    return {
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
            "request_id": str(uuid.uuid4()),
            "channel_method": channel,
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
        },
    }


def other_project_data(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "project_data": {"property": "7 Other Road", "viewing": "Sunday 2pm"}}


def fingerprint(body: dict[str, Any]) -> str:
    return body_fingerprint(validate_initiate_body(body).body)


@dataclass
class Rig:
    world: FakeWorld
    initiator: ConversationInitiator
    body: dict[str, Any]

    @property
    def key(self) -> str:
        return request_key(COMPANY_ID, PROJECT_ID, self.body["request_data"]["request_id"])

    @property
    def conversation_id(self) -> str:
        request_id = self.body["request_data"]["request_id"]
        return conversation_id(COMPANY_ID, PROJECT_ID, request_id, "whatsapp", CHANNEL_ADDRESSES["whatsapp"])

    @property
    def ledger(self) -> FakeRequestLedger:
        return self.world.requests

    @property
    def queued(self) -> list[Any]:
        return self.world.publisher.messages

    @property
    def reads(self) -> int:
        return self.ledger.faults.calls["read"]

    async def initiate(self, body: dict[str, Any] | None = None) -> InitiateOutcome:
        """The answer, once the ledger completion that follows it has ended too."""
        outcome = await self.answer(body)
        assert await self.initiator.settle(timeout_s=5) == 0
        return outcome

    async def answer(self, body: dict[str, Any] | None = None) -> InitiateOutcome:
        return await self.initiator.initiate(validate_initiate_body(body or self.body), trace_id="trace-1")

    def hold_elsewhere(self, body_hash: str | None = None, lease_s: float = LEASE_S) -> RequestRecord:
        """Another attempt of the same request_id is queueing it (its claim is live for `lease_s`)."""
        hashed = fingerprint(self.body) if body_hash is None else body_hash
        lease = Lease(expires_at=self.world.clock.now() + lease_s)
        record = RequestRecord(self.key, RequestState.IN_PROGRESS, "elsewhere", lease, body_hash=hashed)
        self.ledger.records[self.key] = record
        return record

    def before_read(self, number: int, action: Callable[[], object]) -> None:
        """Run `action` just before the `number`-th ledger read (1-based)."""
        for _ in range(number - 1):
            self.ledger.faults.on_next("read", lambda: None)
        self.ledger.faults.on_next("read", action)


def make_rig(duplicate_wait_s: float = 2.0, world: FakeWorld | None = None) -> Rig:
    world = world or FakeWorld()
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = company()
    ports = InitiationPorts(
        companies=world.companies, opt_outs=world.opt_outs, ledger=world.requests, publisher=world.publisher
    )
    initiator = ConversationInitiator(
        ports,
        QUEUES,
        lease_s=LEASE_S,
        clock=world.clock,
        duplicate_wait_s=duplicate_wait_s,
        sleep=world.clock.sleep,
    )
    return Rig(world, initiator, initiate_body())


@pytest.fixture
def rig() -> Rig:
    return make_rig()


# ---- the fingerprint and the polling, pure (the decision table: tests/unit/test_claim_rules.py) ----------------------


def test_body_fingerprint_is_sha256_hex_of_canonical_json() -> None:
    one = {"b": {"y": 1, "x": [1, "two"]}, "a": "é"}
    two = {"a": "é", "b": {"x": [1, "two"], "y": 1}}
    assert body_fingerprint(one) == body_fingerprint(two)
    assert body_fingerprint(one) == hashlib.sha256(b'{"a":"\xc3\xa9","b":{"x":[1,"two"],"y":1}}').hexdigest()
    assert body_fingerprint({**one, "a": "e"}) != body_fingerprint(one)


def test_polls_back_off_from_25_ms_doubling_to_200_ms() -> None:
    assert list(itertools.islice(poll_delays(), 7)) == [0.025, 0.05, 0.1, 0.2, 0.2, 0.2, 0.2]


# ---- a new request and its repeats -----------------------------------------------------------------------------------


async def test_a_new_request_queues_once_and_completes_the_ledger(rig: Rig) -> None:
    outcome = await rig.initiate()

    stamp = rig.world.clock.stamp()
    assert outcome == InitiateOutcome(rig.conversation_id, stamp, enqueued=True)
    [queued] = rig.queued
    assert queued.queue_url == QUEUES["whatsapp"]
    assert queued.attributes == {
        "channelMethod": "whatsapp",
        "conversationId": rig.conversation_id,
        "routerTimestamp": stamp,
        "recipientTel": RECIPIENTS["sms"],
    }
    context = orjson.loads(queued.body)
    assert context["conversation_data"]["conversation_id"] == rig.conversation_id
    assert context["frontend_payload"]["request_data"]["request_id"] == rig.body["request_data"]["request_id"]
    assert (context["metadata"]["trace_id"], context["metadata"]["queue_timestamp"]) == ("trace-1", stamp)
    record = rig.ledger.records[rig.key]
    assert (record.state, record.queue_timestamp, record.body_hash) == (
        RequestState.COMPLETED,
        stamp,
        fingerprint(rig.body),
    )
    assert rig.world.clock.sleeps == []


async def test_a_repeat_after_completion_answers_the_stored_result_without_queueing(rig: Rig) -> None:
    first = await rig.initiate()
    rig.world.clock.advance(5)

    again = await rig.initiate()

    assert again == InitiateOutcome(first.conversation_id, first.queue_timestamp, enqueued=False)
    assert len(rig.queued) == 1
    assert rig.world.clock.sleeps == []


@pytest.mark.parametrize("completed", [False, True], ids=["in-flight", "completed"])
async def test_another_body_under_the_same_request_id_is_refused_without_waiting(rig: Rig, completed: bool) -> None:
    if completed:
        await rig.initiate()
    else:
        rig.hold_elsewhere()

    with pytest.raises(ApiError) as refused:
        await rig.initiate(other_project_data(rig.body))

    assert refused.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert refused.value.http_status == 422
    assert rig.world.clock.sleeps == []
    assert len(rig.queued) == (1 if completed else 0)


# ---- a repeat while the first is in flight ------------------------------------------------------------------------


async def test_a_duplicate_waits_at_most_duplicate_wait_s_with_backoff_then_409(rig: Rig) -> None:
    rig.hold_elsewhere()

    with pytest.raises(ApiError) as refused:
        await rig.initiate()

    assert (refused.value.code, refused.value.retry_after_s) == (ErrorCode.REQUEST_IN_PROGRESS, 1)
    sleeps = rig.world.clock.sleeps
    assert sleeps[:5] == [0.025, 0.05, 0.1, 0.2, 0.2]
    assert max(sleeps) == 0.2
    assert sum(sleeps) == pytest.approx(2.0)
    assert rig.reads == len(sleeps)
    assert rig.queued == []


async def test_no_wait_configured_means_an_immediate_409() -> None:
    rig = make_rig(duplicate_wait_s=0)
    rig.hold_elsewhere()

    with pytest.raises(ApiError) as refused:
        await rig.initiate()

    assert refused.value.code is ErrorCode.REQUEST_IN_PROGRESS
    assert (rig.world.clock.sleeps, rig.reads) == ([], 0)


async def test_a_duplicate_answers_as_the_first_once_it_completes(rig: Rig) -> None:
    rig.hold_elsewhere()
    rig.before_read(3, lambda: rig.ledger.complete(rig.key, "2025-04-27T05:46:00.000Z"))

    outcome = await rig.initiate()

    assert outcome == InitiateOutcome("elsewhere", "2025-04-27T05:46:00.000Z", enqueued=False)
    assert rig.world.clock.sleeps == [0.025, 0.05, 0.1]
    assert rig.queued == []


async def test_a_duplicate_queues_itself_once_the_first_releases_its_claim(rig: Rig) -> None:
    rig.hold_elsewhere()
    rig.before_read(2, lambda: rig.ledger.release(rig.key))  # the first one's publish failed

    outcome = await rig.initiate()

    assert outcome.enqueued is True
    assert [m.attributes["conversationId"] for m in rig.queued] == [outcome.conversation_id]
    assert rig.ledger.records[rig.key].state is RequestState.COMPLETED
    assert rig.ledger.faults.calls["claim"] == 2


async def test_a_duplicate_takes_over_a_claim_whose_lease_lapses_during_the_wait(rig: Rig) -> None:
    rig.hold_elsewhere(lease_s=0.1)

    outcome = await rig.initiate()

    assert outcome.enqueued is True
    assert len(rig.queued) == 1
    assert rig.world.clock.sleeps == [0.025, 0.05, 0.1]


async def test_a_request_claim_whose_lease_ends_exactly_now_is_taken_over(rig: Rig) -> None:
    held = rig.hold_elsewhere(lease_s=0)  # expires_at == now: lapsed (`Lease.is_live` is expires_at > now)

    assert decide_request(held, now=rig.world.clock.now(), body_hash=held.body_hash) is Claim.TAKE
    outcome = await rig.initiate()

    assert outcome.enqueued is True
    assert rig.world.clock.sleeps == []


class AdapterLikeLedger(FakeRequestLedger):
    """A store that still refuses, in the second its lease ends, a claim the rule calls lapsed (two writers' clocks
    a little apart: the ledger keeps whole seconds)."""

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        existing = self.records.get(record.key)
        in_progress = existing is not None and existing.state is RequestState.IN_PROGRESS
        if existing is not None and in_progress and int(existing.lease.expires_at) >= int(now):
            return existing
        return await super().claim(record, now)


async def test_a_request_claim_the_store_refuses_in_its_last_second_is_polled_until_the_second_has_passed() -> None:
    rig = make_rig(world=FakeWorld(requests=AdapterLikeLedger()))
    rig.hold_elsewhere(lease_s=0)

    outcome = await rig.initiate()

    assert outcome.enqueued is True
    assert len(rig.queued) == 1
    assert 1.0 <= sum(rig.world.clock.sleeps) < 1.3  # polled, no loop of writes, until int(now) moved on


# ---- failures and refusals ---------------------------------------------------------------------------------------


async def test_a_publish_failure_releases_the_claim_so_the_retry_queues_at_once(rig: Rig) -> None:
    rig.world.publisher.faults.fail_next("publish")

    with pytest.raises(DependencyUnavailable):
        await rig.initiate()

    assert rig.key not in rig.ledger.records
    assert rig.queued == []
    outcome = await rig.initiate()
    assert outcome.enqueued is True
    assert len(rig.queued) == 1
    assert rig.world.clock.sleeps == []


async def test_the_caller_is_answered_once_queued_and_the_ledger_completes_after(rig: Rig) -> None:
    completing = asyncio.Event()
    release = asyncio.Event()

    async def held() -> None:
        completing.set()
        await release.wait()

    rig.ledger.faults.on_next("complete", held)

    outcome = await rig.answer()

    assert outcome.enqueued is True and len(rig.queued) == 1
    await completing.wait()
    assert rig.ledger.records[rig.key].state is RequestState.IN_PROGRESS
    release.set()
    assert await rig.initiator.settle(timeout_s=5) == 0
    assert rig.ledger.records[rig.key].state is RequestState.COMPLETED


async def test_a_completion_still_running_at_stop_is_abandoned_after_the_timeout(rig: Rig) -> None:
    rig.ledger.faults.on_next("complete", asyncio.Event().wait)  # an AWS call that hangs

    await rig.answer()

    assert await rig.initiator.settle(timeout_s=0.01) == 1
    assert rig.ledger.records[rig.key].state is RequestState.IN_PROGRESS  # its lease runs out (module doc)


async def test_a_completion_not_recorded_still_answers_queued(rig: Rig) -> None:
    rig.world.requests.faults.fail_next("complete")

    outcome = await rig.initiate()

    assert outcome.enqueued is True
    assert len(rig.queued) == 1
    assert rig.ledger.records[rig.key].state is RequestState.IN_PROGRESS  # its lease runs out; consumers dedupe


async def test_an_opted_out_recipient_is_refused_before_anything_is_claimed(rig: Rig) -> None:
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", RECIPIENTS["whatsapp"], "2026-01-01")

    with pytest.raises(ApiError) as refused:
        await rig.initiate()

    assert (refused.value.code, refused.value.http_status) == (ErrorCode.RECIPIENT_OPTED_OUT, 422)
    assert rig.ledger.faults.calls["claim"] == 0
    assert rig.ledger.records == {} and rig.queued == []


async def test_an_opt_out_on_another_channel_does_not_refuse(rig: Rig) -> None:
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "sms", RECIPIENTS["sms"], "2026-01-01")

    assert (await rig.initiate()).enqueued is True


@pytest.mark.parametrize(
    ("tenant", "channel", "code"),
    [
        (None, "whatsapp", ErrorCode.COMPANY_NOT_FOUND),
        (company(project_status="paused"), "whatsapp", ErrorCode.PROJECT_INACTIVE),
        (company(allowed_channels=["sms"]), "whatsapp", ErrorCode.CHANNEL_NOT_ALLOWED),
        (company(), "email", ErrorCode.CONFIGURATION_ERROR),
        (company(channel_config={}), "sms", ErrorCode.CONFIGURATION_ERROR),
    ],
    ids=["unknown-company", "inactive", "channel-not-allowed", "no-queue", "no-sender"],
)
async def test_a_tenant_rule_refuses_before_anything_is_claimed(
    rig: Rig, tenant: CompanyRecord | None, channel: str, code: ErrorCode
) -> None:
    if tenant is None:
        rig.world.companies.records.clear()
    else:
        rig.world.companies.records[(COMPANY_ID, PROJECT_ID)] = tenant

    with pytest.raises(ApiError) as refused:
        await rig.initiate(initiate_body(channel))

    assert refused.value.code is code
    assert rig.ledger.faults.calls["claim"] == 0
    assert rig.queued == []


# ---- the request deadline ----------------------------------------------------------------------------------------


class StuckAfterClaim(FakeRequestLedger):
    """The next claim's conditional write is applied, but its answer never comes back (until cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()
        self.stuck = 1

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        answer = await super().claim(record, now)
        if self.stuck:
            self.stuck -= 1
            self.written.set()
            await asyncio.Event().wait()
        return answer


async def cut_during_the_claim(rig: Rig) -> None:
    ledger = rig.world.requests
    assert isinstance(ledger, StuckAfterClaim)
    first = asyncio.ensure_future(rig.initiate())
    await ledger.written.wait()
    first.cancel()  # the request deadline
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_deadline_during_an_applied_claim_write_frees_the_request_id_for_the_retry() -> None:
    rig = make_rig(duplicate_wait_s=0, world=FakeWorld(requests=StuckAfterClaim()))

    await cut_during_the_claim(rig)

    assert rig.key not in rig.ledger.records
    outcome = await rig.initiate()  # the caller's retry: queued at once, not 409 for the whole lease
    assert outcome.enqueued is True
    assert len(rig.queued) == 1


async def test_a_deadline_during_a_claim_write_never_frees_another_attempts_claim() -> None:
    rig = make_rig(duplicate_wait_s=0, world=FakeWorld(requests=StuckAfterClaim()))
    held = rig.hold_elsewhere()

    await cut_during_the_claim(rig)

    assert rig.ledger.records[rig.key] == held
    assert rig.queued == []


async def test_a_deadline_after_the_claim_still_settles_the_ledger(rig: Rig) -> None:
    publishing, gate = asyncio.Event(), asyncio.Event()

    async def held_at_the_gate() -> None:
        publishing.set()
        await gate.wait()

    rig.world.publisher.faults.on_next("publish", held_at_the_gate)
    first = asyncio.ensure_future(rig.initiate())
    await publishing.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert await rig.initiator.settle(timeout_s=5) == 0

    assert len(rig.queued) == 1
    assert rig.ledger.records[rig.key].state is RequestState.COMPLETED


async def test_a_completion_that_fails_for_another_reason_is_logged_and_the_answer_stands(rig: Rig) -> None:
    rig.world.requests.faults.fail_next("complete", error=RuntimeError("a defect"))

    with structlog.testing.capture_logs() as logs:
        outcome = await rig.initiate()

    assert outcome.enqueued is True and len(rig.queued) == 1
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["request_completion_failed"]
