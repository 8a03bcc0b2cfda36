"""Repeats of a request_id (SPEC §2 "Idempotent"): concurrent duplicates wait for the first, other bodies are refused.

Over HTTP against moto: the wiring. The rules are pure tests of `claims.decide_request`
(tests/unit/test_claim_rules.py); the waiting, backoff, release and deadline behaviour of the use case run on the
in-memory fakes with a fake clock (tests/unit/test_initiation.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.domain.claims import RequestRecord, RequestState, body_fingerprint, request_key
from service.domain.conversation import Lease
from service.domain.initiate import validate_initiate_body
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
        await wired.adapters.ledger.claim(
            RequestRecord(_key(body), RequestState.IN_PROGRESS, "other", Lease(expires_at=now + 30), **extra), now
        )
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
        await deps.adapters.ledger.complete(_key(body), "2025-04-27T05:46:00.000Z")
        completed.set()

    async def hold_refusal_until_completed() -> None:
        refused.set()
        await completed.wait()

    ledger = deps.adapters.ledger
    holding = _HoldingLedger(ledger, hold_refusal_until_completed)
    async with api_client(settings, {"ledger": holding}) as (client, _):
        now = time.time()
        first = RequestRecord(_key(body), RequestState.IN_PROGRESS, conversation_id, Lease(expires_at=now + 30))
        assert await ledger.claim(first, now) is None
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

    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        self.publishing.set()
        await self.gate.wait()
        return await self.inner.publish(queue_url, body, attributes, delay_s=delay_s)  # type: ignore[no-any-return]


@pytest.mark.parametrize("change", [_other_project_data, _other_recipient], ids=["project_data", "recipient"])
async def test_same_request_id_with_another_body_while_the_first_is_in_flight_is_422(settings, deps, tenant, change):
    body = initiate_body()
    gated = _GatedPublisher(deps.adapters.publisher)
    async with api_client(settings, {"publisher": gated}) as (client, _):
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
    await deps.adapters.ledger.claim(
        RequestRecord(_key(body), RequestState.IN_PROGRESS, "legacy-conversation", Lease(expires_at=now + 30)), now
    )
    await deps.adapters.ledger.complete(_key(body), "2025-01-01T00:00:00.000Z")
    status, answer, _ = await _post(api, tenant.api_key, _other_project_data(body))
    assert status == 200
    assert (answer["conversation_id"], answer["queue_timestamp"]) == ("legacy-conversation", "2025-01-01T00:00:00.000Z")


async def test_lapsed_claim_is_taken_over_by_the_same_body_but_refused_to_another(api, deps, tenant):
    body, other = initiate_body(), initiate_body()
    for claimed in (body, other):
        now = time.time()
        stale = RequestRecord(
            _key(claimed),
            RequestState.IN_PROGRESS,
            "crashed",
            Lease(expires_at=now - 60),
            body_hash=_fingerprint(claimed),
        )
        await deps.adapters.ledger.claim(stale, now - 90)
    status, answer, _ = await _post(api, tenant.api_key, body)
    assert status == 200
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, answer["conversation_id"])) == 1
    status, answer, _ = await _post(api, tenant.api_key, _other_project_data(other))
    assert (status, answer["error_code"]) == (422, "IDEMPOTENCY_KEY_REUSED")


def _fingerprint(body: dict[str, Any]) -> str:
    return body_fingerprint(validate_initiate_body(body).body)
