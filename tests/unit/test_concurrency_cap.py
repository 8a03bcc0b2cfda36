"""A project's concurrent_conversations across the fleet (service/domain/concurrency_cap.py) and the claimed-work
skeleton's deferrals (consumers/claimed_work.py): over the cap, or with no provider turn soon, a message is
deferred (no receive burnt) and holds nothing; under it, the in-flight lease lives exactly as long as the work.
On fakes and a fake clock."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.reply_sender import ReplySender
from consumers.sqs_messages import RedrivePolicy
from consumers.template_job import parse_template_job
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from service.domain.company import CompanyRecord, RateLimits
from service.domain.concurrency_cap import ASSUMED_HOLD_S, MAX_DEFER_S, OVERBOOK, ConcurrencyCap, inflight_key
from service.domain.conversation import SendState
from service.domain.provider_ports import ProviderPaced
from tests.cap_fakes import FakeInflightLeases
from tests.fakes import FakeWorld, Gate
from tests.unit.test_reply_sender import make_rig as make_reply_rig
from tests.unit.test_template_sender import COMPANY_ID, PROJECT_ID, SMS_TEXT, company, context

DEFER_S = 5
LEASE_S = 30.0
KEY = inflight_key(COMPANY_ID, PROJECT_ID)


def capped_company(cap: int | None) -> CompanyRecord:
    return company().model_copy(update={"rate_limits": RateLimits(concurrent_conversations=cap)})


def cap_over(world: FakeWorld, leases: FakeInflightLeases, cap: int | None) -> ConcurrencyCap:
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = capped_company(cap)
    return ConcurrencyCap(world.companies, leases, world.clock, lease_s=LEASE_S, defer_s=DEFER_S)


def sender(world: FakeWorld, cap: ConcurrencyCap, claim_lease_s: float = LEASE_S) -> TemplateSender:
    config = TemplateSenderConfig(
        queue="sms",
        claim_lease_s=claim_lease_s,
        ai_timeout_s=10.0,
        status_callback_url=None,
        redrive=RedrivePolicy("https://sqs.example/dlq", 3),
    )
    ports = TemplatePorts(world.conversation_claims, world.secrets, world.ai, world.senders)
    metrics = ConsumerMetrics(CollectorRegistry())
    return TemplateSender(config, ports, metrics, clock=world.clock, sleep=world.clock.sleep, cap=cap)


def new_body() -> str:
    return orjson.dumps(context("sms")).decode()


async def deliver(processor: TemplateSender, world: FakeWorld, body: str, message_id: str = "m-1") -> Outcome:
    message = QueueMessage(message_id, "receipt", body, {}, 1, world.clock.now())
    return await processor.process(message, Lease())


# ---- the cap's rules ---------------------------------------------------------------------------------------------


async def test_a_project_without_a_cap_costs_no_lease_call() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    admission = await cap_over(world, leases, None).enter(COMPANY_ID, PROJECT_ID)
    assert admission.admitted and admission.slot is None
    assert sum(leases.faults.calls.values()) == 0


async def test_leases_are_taken_up_to_the_cap_then_refused() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 2)
    admissions = [await cap.enter(COMPANY_ID, PROJECT_ID) for _ in range(3)]
    assert [a.admitted for a in admissions] == [True, True, False]
    assert leases.held(KEY) == 2


async def test_a_refusal_is_remembered_briefly_so_a_backlog_costs_no_call_per_message() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await cap.enter(COMPANY_ID, PROJECT_ID)
    await cap.enter(COMPANY_ID, PROJECT_ID)  # refused: remembered
    calls = leases.faults.calls["acquire"]
    assert not (await cap.enter(COMPANY_ID, PROJECT_ID)).admitted
    assert leases.faults.calls["acquire"] == calls
    world.clock.advance(1.5)
    await cap.enter(COMPANY_ID, PROJECT_ID)
    assert leases.faults.calls["acquire"] == calls + 1


async def test_leaving_frees_room_at_once() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    first = await cap.enter(COMPANY_ID, PROJECT_ID)
    assert not (await cap.enter(COMPANY_ID, PROJECT_ID)).admitted
    assert first.slot is not None
    await cap.leave(first.slot)
    assert (await cap.enter(COMPANY_ID, PROJECT_ID)).admitted  # the remembered refusal is forgotten too


async def test_a_crashed_workers_lease_lapses_by_itself() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await cap.enter(COMPANY_ID, PROJECT_ID)  # never left: the worker crashed
    world.clock.advance(LEASE_S + 1)
    assert (await cap.enter(COMPANY_ID, PROJECT_ID)).admitted


@pytest.mark.parametrize("failing", ["acquire", "directory"])
async def test_dynamodb_unavailable_for_the_cap_lets_the_message_go_ahead_unleased(failing: str) -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    if failing == "acquire":
        leases.faults.fail_next("acquire")
    else:
        world.companies.faults.fail_next("get")
    admission = await cap.enter(COMPANY_ID, PROJECT_ID)
    assert admission.admitted and admission.slot is None


async def test_a_projects_refused_messages_come_back_twice_as_often_as_its_cap_frees_a_lease() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 2)
    for _ in range(2):
        await cap.enter(COMPANY_ID, PROJECT_ID)

    waits = [(await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s for _ in range(9)]

    # ASSUMED_HOLD_S / (OVERBOOK x cap) = 0.25 s apart from DEFER_S on, in whole seconds (SQS's DelaySeconds)
    assert (ASSUMED_HOLD_S, OVERBOOK) == (1.0, 2)
    assert waits == [DEFER_S] * 4 + [DEFER_S + 1] * 4 + [DEFER_S + 2]


async def held_for(cap: ConcurrencyCap, world: FakeWorld, hold_s: float, times: int = 30) -> None:
    """Conversations of the project that each held its one lease for `hold_s`."""
    for _ in range(times):
        admission = await cap.enter(COMPANY_ID, PROJECT_ID)
        assert admission.slot is not None
        world.clock.advance(hold_s)
        await cap.leave(admission.slot)


async def test_the_spacing_of_returns_follows_how_long_the_projects_conversations_held_their_lease() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await held_for(cap, world, 1.6)  # a lease frees every 1.6 s: a return booked every 0.8 s (the assumed: 0.5 s)
    await cap.enter(COMPANY_ID, PROJECT_ID)

    waits = [(await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s for _ in range(10)]

    assert waits[0] == DEFER_S and waits[-1] == DEFER_S + 7  # 9 x 0.8 s later, in whole seconds


async def test_a_backlogged_project_gets_a_return_at_least_every_second_however_long_its_holds() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await held_for(cap, world, 10.0)  # half a hold apart would leave a freed lease waiting up to 5 s
    await cap.enter(COMPANY_ID, PROJECT_ID)

    waits = [(await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s for _ in range(3)]

    assert waits == [DEFER_S, DEFER_S + 1, DEFER_S + 2]


async def test_a_backlog_that_has_come_back_starts_again_from_the_shortest_wait() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await cap.enter(COMPANY_ID, PROJECT_ID)
    for _ in range(10):  # booked up to DEFER_S + 10 s from now
        await cap.enter(COMPANY_ID, PROJECT_ID)
    world.clock.advance(DEFER_S + 11)  # within the first lease's LEASE_S

    assert (await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s == DEFER_S


async def test_a_return_beyond_sqs_longest_delay_is_not_booked_and_comes_back_within_its_second_half() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await cap.enter(COMPANY_ID, PROJECT_ID)
    while (await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s < MAX_DEFER_S:
        pass  # booked, each a little later than the one before

    beyond = [(await cap.enter(COMPANY_ID, PROJECT_ID)).wait_s for _ in range(50)]

    assert all(MAX_DEFER_S / 2 <= wait <= MAX_DEFER_S for wait in beyond) and len(set(beyond)) > 1
    world.clock.advance(MAX_DEFER_S - DEFER_S)  # the booked ones came back: the next is booked near the front
    assert cap.refused(KEY, 1, world.clock.now()).wait_s == DEFER_S


async def test_each_project_has_its_own_backlog() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    world.companies.records[(COMPANY_ID, "other-project")] = capped_company(1).model_copy(
        update={"project_id": "other-project"}
    )
    await cap.enter(COMPANY_ID, PROJECT_ID)
    await cap.enter(COMPANY_ID, "other-project")
    for _ in range(10):
        await cap.enter(COMPANY_ID, PROJECT_ID)

    assert (await cap.enter(COMPANY_ID, "other-project")).wait_s == DEFER_S


# ---- the skeleton: deferred, never held --------------------------------------------------------------------------


async def test_a_message_over_its_projects_cap_is_deferred_before_its_conversation_is_claimed() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    cap = cap_over(world, leases, 1)
    await cap.enter(COMPANY_ID, PROJECT_ID)  # another worker's conversation of the project
    body = new_body()

    outcome = await deliver(sender(world, cap), world, body)

    assert outcome == Outcome.defer("concurrency_capped", DEFER_S)
    assert world.table.get(parse_template_job(body).key) is None
    assert world.ai.requests == [] and leases.held(KEY) == 1


async def test_the_lease_is_held_while_the_work_runs_and_released_once_sent() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    held_during_ai: list[int] = []
    world.ai.faults.on_next("write", lambda: held_during_ai.append(leases.held(KEY)))
    world.ai.answer_next({"body": SMS_TEXT})

    outcome = await deliver(sender(world, cap_over(world, leases, 1)), world, new_body())

    assert outcome == Outcome.done("sent")
    assert held_during_ai == [1] and leases.held(KEY) == 0


async def test_the_lease_is_released_when_the_message_is_retried() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    world.ai.faults.fail_next("write")

    outcome = await deliver(sender(world, cap_over(world, leases, 1)), world, new_body())

    assert (outcome.disposition, outcome.reason) == (Disposition.RETRY, "ai_transient")
    assert leases.held(KEY) == 0


async def test_the_lease_is_released_when_the_work_is_cancelled() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    gate = Gate()
    world.ai.faults.on_next("write", gate)
    task = asyncio.create_task(deliver(sender(world, cap_over(world, leases, 1)), world, new_body()))
    await gate.entered.wait()
    assert leases.held(KEY) == 1

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the shielded release
    assert leases.held(KEY) == 0


async def test_the_lease_is_kept_alive_with_the_claim_while_a_slow_call_runs() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    gate = Gate()
    world.ai.faults.on_next("write", gate)
    world.ai.answer_next({"body": SMS_TEXT})
    refreshed = asyncio.Event()
    leases.faults.on_next("refresh", refreshed.set)
    processor = sender(world, cap_over(world, leases, 1), claim_lease_s=0.02)  # keep-alive every 10 ms
    task = asyncio.create_task(deliver(processor, world, new_body()))
    await gate.entered.wait()
    await refreshed.wait()
    gate.open()
    assert await task == Outcome.done("sent")
    assert world.conversation_claims.faults.calls["refresh"] >= 1


async def test_workers_sharing_the_cap_run_no_more_conversations_of_the_project_than_it_allows() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = capped_company(2)
    gates = [Gate() for _ in range(5)]
    for gate in gates:
        world.ai.faults.on_next("write", gate)
    workers = [
        sender(world, ConcurrencyCap(world.companies, leases, world.clock, lease_s=LEASE_S, defer_s=DEFER_S))
        for _ in range(5)
    ]
    tasks = [asyncio.create_task(deliver(w, world, new_body(), f"m-{i}")) for i, w in enumerate(workers)]
    await gates[0].entered.wait()
    await gates[1].entered.wait()
    deferred = [t for t in tasks if t.done()]
    for gate in gates:
        gate.open()
    outcomes = await asyncio.gather(*tasks)

    assert len(deferred) == 3
    assert sorted(o.reason for o in outcomes) == ["concurrency_capped"] * 3 + ["sent"] * 2
    assert leases.most_held[KEY] == 2 and leases.held(KEY) == 0


# ---- provider paces: deferred, not retried -----------------------------------------------------------------------


async def test_an_ai_key_with_no_turn_soon_defers_the_message_and_frees_the_conversation() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    world.ai.answer_next(ProviderPaced("ai_key_paced", retry_after_s=7.2))
    body = new_body()

    outcome = await deliver(sender(world, cap_over(world, leases, 1)), world, body)

    assert outcome == Outcome.defer("ai_paced", 8)
    record = world.table[parse_template_job(body).key]
    assert record.claim.expires_at <= world.clock.now()  # released: the deferred copy can claim it at once
    assert record.ledger.state is not SendState.ATTEMPTING
    assert leases.held(KEY) == 0


async def test_a_sender_with_no_turn_soon_defers_the_message_with_nothing_sent_or_attempted() -> None:
    world, leases = FakeWorld(), FakeInflightLeases()
    world.ai.answer_next({"body": SMS_TEXT})
    world.sender("sms").faults.fail_next("send", error=ProviderPaced("sender_paced", retry_after_s=3))
    body = new_body()

    outcome = await deliver(sender(world, cap_over(world, leases, None)), world, body)

    assert outcome == Outcome.defer("send_paced", 3)
    assert world.table[parse_template_job(body).key].ledger.state is not SendState.ATTEMPTING
    assert world.sender("sms").sent == []


# ---- a deferral's duplicate --------------------------------------------------------------------------------------


async def test_a_deferred_copy_and_its_undeleted_original_send_to_the_person_once() -> None:
    """The copy was queued but the original's delete failed: both come back, on two workers at once."""
    world, leases = FakeWorld(), FakeInflightLeases()
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = capped_company(5)
    body = new_body()
    workers = [
        sender(world, ConcurrencyCap(world.companies, leases, world.clock, lease_s=LEASE_S, defer_s=DEFER_S))
        for _ in range(2)
    ]
    outcomes = await asyncio.gather(deliver(workers[0], world, body, "copy"), deliver(workers[1], world, body, "orig"))
    world.clock.advance(LEASE_S + 1)
    late = [
        await deliver(w, world, body, "again") for w, o in zip(workers, outcomes, strict=True) if o.reason != "sent"
    ]

    assert len(world.sender("sms").sent) == 1
    assert sorted(o.reason for o in outcomes).count("sent") == 1
    assert all(o == Outcome.done("already_done") for o in late)


# ---- replies: the cap is checked right at the claim (the trigger names no project) ------------------------------


async def test_a_reply_over_its_projects_cap_is_deferred_and_its_reply_claim_given_back() -> None:
    rig = make_reply_rig()
    world, leases = rig.world, FakeInflightLeases()
    record = rig.record
    world.companies.records[(record.company_id, record.project_id)] = capped_company(1).model_copy(
        update={"company_id": record.company_id, "project_id": record.project_id}
    )
    cap = ConcurrencyCap(world.companies, leases, world.clock, lease_s=LEASE_S, defer_s=DEFER_S)
    await cap.enter(record.company_id, record.project_id)  # another reply of the project is being written
    await rig.inbound("SM1", "Is Saturday still OK?")
    rig.processor = ReplySender(
        rig.processor._config, rig.processor._ports, ConsumerMetrics(CollectorRegistry()), clock=world.clock, cap=cap
    )

    outcome = await rig.trigger()

    assert outcome == Outcome.defer("concurrency_capped", DEFER_S)
    assert rig.record.reply_claim.expires_at <= world.clock.now()
    assert world.ai.requests == [] and rig.staged_sids == ["SM1"]
