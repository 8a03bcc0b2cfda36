"""Repeats of a request_id (SPEC §2 "Idempotent"): concurrent duplicates wait for the first, other bodies are refused.

HTTP tests run against moto; the waiting and backoff rules are also covered by pure
tests of `decide` and by the use case over an in-memory ledger with a fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from local_stack.seed import demo_company
from service.domain.errors import ApiError, ErrorCode
from service.domain.initiate import validate_initiate_body
from service.domain.initiation import ConversationInitiator, InitiationPorts, poll_delays
from service.domain.request_claim import (
    ClaimVerdict,
    RequestRecord,
    RequestState,
    body_fingerprint,
    decide,
    request_key,
)
from tests.conftest import initiate_body
from tests.support import api_client, queued_messages

CONVERSATION = "ci-demo-001#pi-demo-001#{request_id}#447700900001"


async def _post(client: Any, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
    response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": key})
    return response.status, await response.json(), response.headers


def _key(body: dict[str, Any]) -> str:
    return request_key("ci-demo-001", "pi-demo-001", body["request_data"]["request_id"])


def _other_project_data(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "project_data": {"property": "7 Other Road", "viewing": "Sunday 2pm"}}


def _other_recipient(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "recipient_data": {**body["recipient_data"], "recipient_tel": "+447700900999"}}


# --- over HTTP ---------------------------------------------------------------------------


async def test_six_concurrent_identical_requests_all_answer_200_and_queue_once(api, deps, tenant):
    body = initiate_body()
    answers = await asyncio.gather(*(_post(api, tenant.api_key, body) for _ in range(6)))
    assert [status for status, _, _ in answers] == [200] * 6
    assert len({answer["conversation_id"] for _, answer, _ in answers}) == 1
    assert len({answer["queue_timestamp"] for _, answer, _ in answers}) == 1
    conversation_id = answers[0][1]["conversation_id"]
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, conversation_id)) == 1


@pytest.mark.parametrize("stored_hash", [True, False], ids=["hashed-claim", "claim-from-before-hashes"])
async def test_duplicate_still_in_flight_after_the_wait_is_409_with_a_short_retry_after(settings, tenant, stored_hash):
    body = initiate_body()
    extra = {"body_hash": _fingerprint(body)} if stored_hash else {}
    async with api_client(settings, duplicate_wait_s=0.1) as (client, wired):
        now = time.time()
        await wired.ledger.claim(RequestRecord(_key(body), RequestState.IN_PROGRESS, "other", now + 30, **extra), now)
        status, answer, headers = await _post(client, tenant.api_key, body)
    assert (status, answer["error_code"]) == (409, "REQUEST_IN_PROGRESS")
    assert 1 <= int(headers["Retry-After"]) <= 2


@dataclass
class _HoldingLedger:
    """The real ledger, except that a refused claim is reported only after `on_refused` has run."""

    inner: Any
    on_refused: Callable[[], Awaitable[None]]
    refusals: int = 0

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        refusal: RequestRecord | None = await self.inner.claim(record, now)
        if refusal is not None:
            self.refusals += 1
            await self.on_refused()
        return refusal

    async def read(self, key: str) -> RequestRecord | None:
        return await self.inner.read(key)  # type: ignore[no-any-return]

    async def complete(self, key: str, queue_timestamp: str) -> None:
        await self.inner.complete(key, queue_timestamp)

    async def release(self, key: str) -> None:
        await self.inner.release(key)


async def test_duplicate_that_sees_the_first_complete_during_its_wait_answers_200_with_its_answer(
    settings, deps, tenant
):
    body = initiate_body()
    conversation_id = CONVERSATION.format(request_id=body["request_data"]["request_id"])
    refused = asyncio.Event()
    completed = asyncio.Event()

    async def complete_the_first() -> None:
        await refused.wait()
        await wired.ledger.complete(_key(body), "2025-04-27T05:46:00.000Z")
        completed.set()

    async def hold_refusal_until_completed() -> None:
        refused.set()
        await completed.wait()

    async with api_client(settings) as (client, wired):
        now = time.time()
        first = RequestRecord(_key(body), RequestState.IN_PROGRESS, conversation_id, now + 30)
        assert await wired.ledger.claim(first, now) is None
        holding = _HoldingLedger(wired.ledger, hold_refusal_until_completed)
        wired.initiator = ConversationInitiator(
            InitiationPorts(wired.companies, wired.opt_outs, holding, wired.publisher),
            {"whatsapp": settings.whatsapp_queue_url},
            router_version="test",
            lease_s=30,
            clock=time.time,
        )
        completer = asyncio.create_task(complete_the_first())
        status, answer, _ = await _post(client, tenant.api_key, body)
        await completer
    assert holding.refusals == 1
    assert status == 200
    assert answer["conversation_id"] == conversation_id
    assert answer["queue_timestamp"] == "2025-04-27T05:46:00.000Z"
    assert await queued_messages(deps, settings.whatsapp_queue_url, conversation_id) == []


@dataclass
class _GatedPublisher:
    """The real publisher, held at the gate: the first request stays in flight until the test opens it."""

    inner: Any
    publishing: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0) -> str:
        self.publishing.set()
        await self.gate.wait()
        return await self.inner.publish(queue_url, body, attributes, delay_s=delay_s)  # type: ignore[no-any-return]


@pytest.mark.parametrize("change", [_other_project_data, _other_recipient], ids=["project_data", "recipient"])
async def test_same_request_id_with_another_body_while_the_first_is_in_flight_is_422(settings, deps, tenant, change):
    body = initiate_body()
    async with api_client(settings) as (client, wired):
        gated = _GatedPublisher(wired.publisher)
        wired.initiator = ConversationInitiator(
            InitiationPorts(wired.companies, wired.opt_outs, wired.ledger, gated),
            {"whatsapp": settings.whatsapp_queue_url},
            router_version="test",
            lease_s=30,
            clock=time.time,
        )
        first = asyncio.create_task(_post(client, tenant.api_key, body))
        await gated.publishing.wait()
        try:
            status, answer, _ = await _post(client, tenant.api_key, change(body))
        finally:
            gated.gate.set()
            first_status, first_answer, _ = await first
    assert (status, answer["error_code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert answer["request_id"] == body["request_data"]["request_id"]
    assert first_status == 200
    assert len(await queued_messages(deps, settings.whatsapp_queue_url, first_answer["conversation_id"])) == 1


async def test_same_request_id_with_another_body_after_completion_is_422_and_the_original_still_repeats(
    api, deps, tenant
):
    body = initiate_body()
    first_status, first, _ = await _post(api, tenant.api_key, body)
    assert first_status == 200
    for changed in (_other_project_data(body), _other_recipient(body)):
        status, answer, _ = await _post(api, tenant.api_key, changed)
        assert (status, answer["error_code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, again, _ = await _post(api, tenant.api_key, body)
    assert status == 200
    assert (again["conversation_id"], again["queue_timestamp"]) == (first["conversation_id"], first["queue_timestamp"])
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, first["conversation_id"])) == 1


async def test_identical_repeat_differing_only_in_key_order_and_channel_case_answers_the_same(api, deps, tenant):
    body = initiate_body()
    first_status, first, _ = await _post(api, tenant.api_key, body)
    reordered = {name: dict(reversed(list(section.items()))) for name, section in reversed(list(body.items()))}
    reordered["request_data"]["channel_method"] = "WhatsApp"
    status, again, _ = await _post(api, tenant.api_key, reordered)
    assert (first_status, status) == (200, 200)
    assert (again["conversation_id"], again["queue_timestamp"]) == (first["conversation_id"], first["queue_timestamp"])
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, first["conversation_id"])) == 1


async def test_completed_record_from_before_body_hashes_matches_any_body(api, deps, tenant):
    body = initiate_body()
    now = time.time()
    await deps.ledger.claim(RequestRecord(_key(body), RequestState.IN_PROGRESS, "legacy-conversation", now + 30), now)
    await deps.ledger.complete(_key(body), "2025-01-01T00:00:00.000Z")
    status, answer, _ = await _post(api, tenant.api_key, _other_project_data(body))
    assert status == 200
    assert (answer["conversation_id"], answer["queue_timestamp"]) == ("legacy-conversation", "2025-01-01T00:00:00.000Z")


async def test_lapsed_claim_is_taken_over_by_the_same_body_but_refused_to_another(api, deps, tenant):
    body, other = initiate_body(), initiate_body()
    for claimed in (body, other):
        now = time.time()
        stale = RequestRecord(
            _key(claimed), RequestState.IN_PROGRESS, "crashed", now - 60, body_hash=_fingerprint(claimed)
        )
        await deps.ledger.claim(stale, now - 90)
    status, answer, _ = await _post(api, tenant.api_key, body)
    assert status == 200
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, answer["conversation_id"])) == 1
    status, answer, _ = await _post(api, tenant.api_key, _other_project_data(other))
    assert (status, answer["error_code"]) == (422, "IDEMPOTENCY_KEY_REUSED")


def _fingerprint(body: dict[str, Any]) -> str:
    return body_fingerprint(validate_initiate_body(body).body)


# --- the decision, pure ------------------------------------------------------------------

MINE, THEIRS = "a" * 64, "b" * 64


def _record(state: RequestState, lease: float, body_hash: str | None = MINE) -> RequestRecord:
    return RequestRecord("k", state, "conv", lease, "2025-01-01T00:00:00.000Z", body_hash=body_hash)


@pytest.mark.parametrize(
    ("record", "verdict"),
    [
        (None, ClaimVerdict.CLAIMED),
        (_record(RequestState.IN_PROGRESS, 100), ClaimVerdict.IN_PROGRESS_ELSEWHERE),
        (_record(RequestState.IN_PROGRESS, 40), ClaimVerdict.CLAIMED),
        (_record(RequestState.IN_PROGRESS, 50), ClaimVerdict.CLAIMED),
        (_record(RequestState.COMPLETED, 0), ClaimVerdict.ALREADY_QUEUED),
        (_record(RequestState.IN_PROGRESS, 100, THEIRS), ClaimVerdict.KEY_REUSED),
        (_record(RequestState.IN_PROGRESS, 40, THEIRS), ClaimVerdict.KEY_REUSED),
        (_record(RequestState.COMPLETED, 0, THEIRS), ClaimVerdict.KEY_REUSED),
        (_record(RequestState.IN_PROGRESS, 100, None), ClaimVerdict.IN_PROGRESS_ELSEWHERE),
        (_record(RequestState.COMPLETED, 0, None), ClaimVerdict.ALREADY_QUEUED),
    ],
    ids=[
        "absent",
        "live-same-body",
        "lapsed-same-body",
        "lapsing-now",
        "completed-same-body",
        "live-other-body",
        "lapsed-other-body",
        "completed-other-body",
        "live-before-hashes",
        "completed-before-hashes",
    ],
)
def test_decision_for_a_request_given_the_ledger_record(record, verdict):
    assert decide(record, now=50, body_hash=MINE) is verdict


def test_body_fingerprint_is_sha256_hex_of_canonical_json():
    one = {"b": {"y": 1, "x": [1, "two"]}, "a": "é"}
    two = {"a": "é", "b": {"x": [1, "two"], "y": 1}}
    assert body_fingerprint(one) == body_fingerprint(two)
    assert body_fingerprint(one) == hashlib.sha256(b'{"a":"\xc3\xa9","b":{"x":[1,"two"],"y":1}}').hexdigest()
    assert body_fingerprint({**one, "a": "e"}) != body_fingerprint(one)


def test_polls_back_off_from_25_ms_doubling_to_200_ms():
    assert list(itertools.islice(poll_delays(), 7)) == [0.025, 0.05, 0.1, 0.2, 0.2, 0.2, 0.2]


# --- the waiting, over an in-memory ledger and a fake clock ------------------------------


@dataclass
class _MemoryLedger:
    """The adapter's rules in memory; `script[n]` runs before the n-th read (1-based)."""

    records: dict[str, RequestRecord] = field(default_factory=dict)
    script: dict[int, Callable[[_MemoryLedger], None]] = field(default_factory=dict)
    reads: int = 0
    claims: int = 0

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        self.claims += 1
        old = self.records.get(record.key)
        lapsed = old is not None and old.state is RequestState.IN_PROGRESS and old.lease_expires_at < now
        if old is None or (lapsed and old.body_hash in (None, record.body_hash)):
            self.records[record.key] = record
            return None
        return old

    async def read(self, key: str) -> RequestRecord | None:
        self.reads += 1
        if step := self.script.get(self.reads):
            step(self)
        return self.records.get(key)

    async def complete(self, key: str, queue_timestamp: str) -> None:
        self.records[key] = replace(self.records[key], state=RequestState.COMPLETED, queue_timestamp=queue_timestamp)

    async def release(self, key: str) -> None:
        self.records.pop(key, None)


@dataclass
class _FakeTime:
    now: float = 1_000_000.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class _Tenant:
    async def get(self, company_id: str, project_id: str) -> Any:
        return demo_company("comms/", "dev", 0)

    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool:
        return False


@dataclass
class _KeptPublisher:
    sent: list[str] = field(default_factory=list)

    async def publish(self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0) -> str:
        self.sent.append(attributes["conversationId"])
        return f"m-{len(self.sent)}"


@dataclass
class _Rig:
    ledger: _MemoryLedger
    time: _FakeTime
    publisher: _KeptPublisher
    initiator: ConversationInitiator
    body: dict[str, Any]

    @property
    def key(self) -> str:
        return _key(self.body)

    def hold_elsewhere(self, body_hash: str | None = None) -> None:
        hashed = _fingerprint(self.body) if body_hash is None else body_hash
        self.ledger.records[self.key] = RequestRecord(
            self.key, RequestState.IN_PROGRESS, "elsewhere", self.time.now + 30, body_hash=hashed
        )

    async def initiate(self) -> Any:
        return await self.initiator.initiate(validate_initiate_body(self.body), trace_id="t")


def _rig(duplicate_wait_s: float = 2.0) -> _Rig:
    ledger, fake_time, publisher, tenant = _MemoryLedger(), _FakeTime(), _KeptPublisher(), _Tenant()
    initiator = ConversationInitiator(
        InitiationPorts(companies=tenant, opt_outs=tenant, ledger=ledger, publisher=publisher),
        {"whatsapp": "queue"},
        router_version="test",
        lease_s=30,
        clock=fake_time.clock,
        duplicate_wait_s=duplicate_wait_s,
        sleep=fake_time.sleep,
    )
    return _Rig(ledger, fake_time, publisher, initiator, initiate_body())


async def test_duplicate_waits_at_most_duplicate_wait_s_with_backoff_then_409():
    rig = _rig(duplicate_wait_s=2.0)
    rig.hold_elsewhere()
    with pytest.raises(ApiError) as refused:
        await rig.initiate()
    assert (refused.value.code, refused.value.retry_after_s) == (ErrorCode.REQUEST_IN_PROGRESS, 1)
    assert rig.time.slept[:5] == [0.025, 0.05, 0.1, 0.2, 0.2]
    assert max(rig.time.slept) == 0.2
    assert sum(rig.time.slept) == pytest.approx(2.0)
    assert rig.ledger.reads == len(rig.time.slept)
    assert rig.publisher.sent == []


async def test_no_wait_configured_means_an_immediate_409():
    rig = _rig(duplicate_wait_s=0)
    rig.hold_elsewhere()
    with pytest.raises(ApiError) as refused:
        await rig.initiate()
    assert refused.value.code is ErrorCode.REQUEST_IN_PROGRESS
    assert (rig.time.slept, rig.ledger.reads) == ([], 0)


async def test_duplicate_answers_as_the_first_once_it_completes():
    rig = _rig()
    rig.hold_elsewhere()
    rig.ledger.script[3] = _completing(rig.key, "2025-04-27T05:46:00.000Z")
    outcome = await rig.initiate()
    assert (outcome.conversation_id, outcome.queue_timestamp, outcome.enqueued) == (
        "elsewhere",
        "2025-04-27T05:46:00.000Z",
        False,
    )
    assert (rig.time.slept, rig.publisher.sent) == ([0.025, 0.05, 0.1], [])


def _completing(key: str, queue_timestamp: str) -> Callable[[_MemoryLedger], None]:
    def step(ledger: _MemoryLedger) -> None:
        ledger.records[key] = replace(
            ledger.records[key], state=RequestState.COMPLETED, queue_timestamp=queue_timestamp
        )

    return step


async def test_duplicate_queues_itself_once_the_first_releases_its_claim():
    rig = _rig()
    rig.hold_elsewhere()
    rig.ledger.script[2] = lambda ledger: ledger.records.clear()
    outcome = await rig.initiate()
    assert outcome.enqueued is True
    assert rig.publisher.sent == [outcome.conversation_id]
    assert rig.ledger.records[rig.key].state is RequestState.COMPLETED
    assert rig.ledger.claims == 2


async def test_duplicate_takes_over_a_claim_whose_lease_lapses_during_the_wait():
    rig = _rig()
    rig.hold_elsewhere()
    rig.ledger.records[rig.key] = replace(rig.ledger.records[rig.key], lease_expires_at=rig.time.now + 0.1)
    outcome = await rig.initiate()
    assert outcome.enqueued is True
    assert rig.publisher.sent == [outcome.conversation_id]


async def test_another_body_is_refused_without_waiting():
    rig = _rig()
    rig.hold_elsewhere(body_hash=THEIRS)
    with pytest.raises(ApiError) as refused:
        await rig.initiate()
    assert refused.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert rig.time.slept == []


@dataclass
class _WrittenThenStuckLedger(_MemoryLedger):
    """A claim whose conditional write DynamoDB applied, but whose answer never comes back before the deadline."""

    written: asyncio.Event = field(default_factory=asyncio.Event)

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        answer = await super().claim(record, now)
        self.written.set()
        await asyncio.Event().wait()  # until cancelled
        return answer


async def test_deadline_during_an_applied_claim_write_frees_the_request_id_for_the_retry():
    rig = _rig(duplicate_wait_s=0)
    stuck = _WrittenThenStuckLedger()
    rig.initiator._ports = replace(rig.initiator._ports, ledger=stuck)
    first = asyncio.ensure_future(rig.initiate())
    await asyncio.wait_for(stuck.written.wait(), 1)
    assert stuck.records[rig.key].state is RequestState.IN_PROGRESS

    first.cancel()  # the request deadline
    with pytest.raises(asyncio.CancelledError):
        await first

    assert rig.key not in stuck.records
    rig.initiator._ports = replace(rig.initiator._ports, ledger=rig.ledger)
    rig.ledger.records.update(stuck.records)
    outcome = await rig.initiate()  # the caller's retry: queued at once, not 409 for the whole lease
    assert outcome.enqueued is True
    assert rig.publisher.sent == [outcome.conversation_id]


async def test_deadline_during_a_claim_write_never_frees_another_attempts_claim():
    rig = _rig(duplicate_wait_s=0)
    rig.hold_elsewhere()
    stuck = _WrittenThenStuckLedger(records=rig.ledger.records)
    rig.initiator._ports = replace(rig.initiator._ports, ledger=stuck)
    first = asyncio.ensure_future(rig.initiate())
    await asyncio.wait_for(stuck.written.wait(), 1)

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    assert stuck.records[rig.key].conversation_id == "elsewhere"
