"""In-memory fakes for every port of `service.domain.ports`, so processor and use-case tests run without moto.

Each fake is a real implementation over dicts, making the same decisions as its DynamoDB adapter:

- claims are decided by the pure functions of `service.domain.claims` (the fakes cannot drift from the rules);
  a refused claim answers with the record that refused it;
- writes conditioned on a claim apply only while the owner still holds it (owner + status, like the adapters'
  conditions: a lapsed lease not yet taken over still belongs to its owner) and answer False/None otherwise;
- the template `finalise` applies once (False after); the reply `finalise` keeps an opt-out or hand-off that
  landed while sending (the adapters' "stopped" variant);
- delivery states move forward only (`delivery_state.is_forward`), and a callback for a message not recorded
  yet is held until the final update that records it applies it.

Every effect runs without an `await` between its read and its write, so it is atomic, like a conditional write.

Time comes from one `FakeClock`. Failures are injected uniformly on every fake through its `faults`:

    world.conversation_claims.faults.fail_next("finalise")                       # DependencyUnavailable, not applied
    world.conversation_claims.faults.fail_next("finalise", after_effect=True)    # applied, then the answer is lost
    world.sender("whatsapp").faults.fail_next("send", error=PermanentProviderError("invalid_to", code="21211"))
    world.lookup.faults.on_next("set_delivery_status", action)                   # run `action` first (a race)

`FakeWorld` builds a consistent set sharing one clock and one conversations table.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import inspect
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.reply_claims import with_fragments
from service.config import Settings
from service.domain.claims import (
    REPLYABLE_STATUSES,
    Claim,
    RequestRecord,
    RequestState,
    TriggerLock,
    decide_conversation,
    decide_reply,
    decide_request,
    decide_trigger_lock,
    may_reopen,
)
from service.domain.company import CompanyRecord
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Failure,
    Lease,
    Message,
    NewConversation,
    ReplyAttempt,
    SendLedger,
    SendState,
    TemplateDraft,
)
from service.domain.delivery_state import DeliveryStatus, is_forward, parse_delivery_status
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Fragment
from service.domain.ports import ApiKeyRecord, ClaimAnswer
from service.domain.provider_ports import (
    AiRequest,
    AiResult,
    OutboundMessage,
    PermanentProviderError,
    SendOutcomeUnknown,
    SentMessage,
    TransientProviderError,
)
from service.domain.rate_limit import MICROS, Grant, RateLimit, held_off_tat, take_tokens
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from service.domain.ports import (
        AiWriter,
        ApiKeyStore,
        CompanyDirectory,
        ConversationClaims,
        ConversationLookup,
        MessagePublisher,
        MessageSender,
        OptOutRegistry,
        ReplyClaims,
        ReplyStage,
        RequestLedger,
        SecretStore,
        SignatureVerifier,
        TokenLeases,
    )

P = ParamSpec("P")
R = TypeVar("R")
PortT = TypeVar("PortT", bound="FakePort")

START_EPOCH_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z
EARLY_DELIVERY_CAP = 20  # held callbacks per conversation (the adapter's PENDING_CAP)
LOOKUP_SKEW_S = 5.0  # the Twilio sender's clock skew allowance on `find_sent`
INDEX_SHARDS: int = Settings.model_fields["conversation_index_shards"].default  # as the service is configured

# ---- time ----------------------------------------------------------------------------------------


class FakeClock:
    """Controllable time: `now()` (also callable as `clock()`, so it fits a `Callable[[], float]` parameter),
    `advance(s)`, and an async `sleep` that advances time at once and records the delay asked for."""

    def __init__(self, start: float = START_EPOCH_S) -> None:
        self._now = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    __call__ = now
    monotonic = now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._now += seconds
        return self._now

    def stamp(self) -> str:
        """Now as the records store it (ISO 8601 UTC, milliseconds, `Z`)."""
        return utc_iso(self._now)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still a suspension point: other tasks run, as they would while sleeping


# ---- failure injection ---------------------------------------------------------------------------


class Gate:
    """Holds the next call of a fake's method until `open()`: `entered` tells the test it is waiting there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._open = asyncio.Event()

    async def __call__(self) -> None:
        self.entered.set()
        await self._open.wait()

    def open(self) -> None:
        self._open.set()


ErrorSpec = BaseException | Callable[[], BaseException]
Action = Callable[[], Awaitable[object] | object]


@dataclass(slots=True)
class _Plan:
    remaining: int | None  # None: every call until `heal`
    error: ErrorSpec | None  # None: the fake's default error
    after_effect: bool


class Faults:
    """Failure injection for one fake, by method name.

    `fail_next(method, times=1, error=None, after_effect=False)`: the next `times` calls raise `error` (an
    exception, or a zero-argument factory; default: the fake's own, `DependencyUnavailable` for stores,
    `TransientProviderError` for providers). Without `after_effect` the call changes nothing; with it the
    effect applies and then the error is raised (a write whose answer was lost, a send that timed out after
    reaching the provider). Plans queue up in order. `fail_always` fails every call until `heal`.
    `on_next(method, action)` runs `action` (sync or async) once, just before the next call's effect: how a
    test makes something land in the middle of a step. `calls` counts every call, failed ones included."""

    def __init__(self, owner: object, default: Callable[[str], BaseException]) -> None:
        self._owner = owner
        self._default = default
        self._plans: dict[str, deque[_Plan]] = {}
        self._actions: dict[str, deque[Action]] = {}
        self.calls: Counter[str] = Counter()

    def _check(self, method: str) -> None:
        if not getattr(getattr(self._owner, method, None), "fake_port_call", False):
            raise ValueError(f"{type(self._owner).__name__} has no port method {method!r}")

    def fail_next(
        self, method: str, times: int = 1, error: ErrorSpec | None = None, *, after_effect: bool = False
    ) -> None:
        self._check(method)
        if times < 1:
            raise ValueError("times must be at least 1")
        self._plans.setdefault(method, deque()).append(_Plan(times, error, after_effect))

    def fail_always(self, method: str, error: ErrorSpec | None = None, *, after_effect: bool = False) -> None:
        self._check(method)
        self._plans.setdefault(method, deque()).append(_Plan(None, error, after_effect))

    def on_next(self, method: str, action: Action) -> None:
        self._check(method)
        self._actions.setdefault(method, deque()).append(action)

    def heal(self, method: str | None = None) -> None:
        """Forget planned failures and actions (of `method`, or all)."""
        if method is None:
            self._plans.clear()
            self._actions.clear()
        else:
            self._plans.pop(method, None)
            self._actions.pop(method, None)

    def pending(self, method: str) -> int:
        """Planned failures left for `method` (-1: fails always)."""
        plans = self._plans.get(method, deque())
        if any(p.remaining is None for p in plans):
            return -1
        return sum(p.remaining or 0 for p in plans)

    def _take(self, method: str) -> _Plan | None:
        self.calls[method] += 1
        plans = self._plans.get(method)
        if not plans:
            return None
        plan = plans[0]
        if plan.remaining is not None:
            plan.remaining -= 1
            if plan.remaining == 0:
                plans.popleft()
        return plan

    def _error(self, method: str, plan: _Plan) -> BaseException:
        if plan.error is None:
            return self._default(method)
        return plan.error if isinstance(plan.error, BaseException) else plan.error()

    async def enter(self, method: str) -> _Plan | None:
        """Before a call's effect: count it, run the next action, raise a failure planned before the effect."""
        plan = self._take(method)
        actions = self._actions.get(method)
        if actions:
            result = actions.popleft()()
            if inspect.isawaitable(result):
                await result
        if plan is not None and not plan.after_effect:
            raise self._error(method, plan)
        return plan

    def enter_sync(self, method: str) -> _Plan | None:
        plan = self._take(method)
        actions = self._actions.get(method)
        if actions:
            result = actions.popleft()()
            if inspect.isawaitable(result):
                raise TypeError(f"{method} is synchronous: its on_next action must be too")
        if plan is not None and not plan.after_effect:
            raise self._error(method, plan)
        return plan

    def leave(self, method: str, plan: _Plan | None) -> None:
        """After a call's effect: raise a failure planned after it."""
        if plan is not None and plan.after_effect:
            raise self._error(method, plan)


def store_failure(service: str) -> Callable[[str], BaseException]:
    return lambda method: DependencyUnavailable(service, method, "injected failure")


def provider_failure(method: str) -> BaseException:
    return TransientProviderError("injected_failure", code=method)


class FakePort:
    """Base of every fake: a `faults` for failure injection (see `Faults`)."""

    def __init__(self, default_error: Callable[[str], BaseException]) -> None:
        self.faults = Faults(self, default_error)


def port_call(
    method: Callable[Concatenate[PortT, P], Awaitable[R]],
) -> Callable[Concatenate[PortT, P], Coroutine[Any, Any, R]]:
    """Wraps an async port method with the fake's failure injection."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: PortT, /, *args: P.args, **kwargs: P.kwargs) -> R:
        plan = await self.faults.enter(name)
        result = await method(self, *args, **kwargs)
        self.faults.leave(name, plan)
        return result

    call.fake_port_call = True  # type: ignore[attr-defined]
    return call


def port_call_sync(method: Callable[Concatenate[PortT, P], R]) -> Callable[Concatenate[PortT, P], R]:
    name = method.__name__

    @functools.wraps(method)
    def call(self: PortT, /, *args: P.args, **kwargs: P.kwargs) -> R:
        plan = self.faults.enter_sync(name)
        result = method(self, *args, **kwargs)
        self.faults.leave(name, plan)
        return result

    call.fake_port_call = True  # type: ignore[attr-defined]
    return call


# ---- tenants and requests ------------------------------------------------------------------------


class FakeCompanyDirectory(FakePort):
    def __init__(self, records: Iterable[CompanyRecord] = ()) -> None:
        super().__init__(store_failure("dynamodb"))
        self.records: dict[tuple[str, str], CompanyRecord] = {}
        for record in records:
            self.records[(record.company_id, record.project_id)] = record

    @port_call
    async def get(self, company_id: str, project_id: str) -> CompanyRecord | None:
        return self.records.get((company_id, project_id))

    @port_call
    async def put(self, record: CompanyRecord, *, overwrite: bool = True) -> bool:
        """Like the adapter: without `overwrite`, False when the record already exists."""
        key = (record.company_id, record.project_id)
        if not overwrite and key in self.records:
            return False
        self.records[key] = record
        return True


class FakeApiKeyStore(FakePort):
    def __init__(self, records: Iterable[ApiKeyRecord] = ()) -> None:
        super().__init__(store_failure("dynamodb"))
        self.records: dict[str, ApiKeyRecord] = {record.key_id: record for record in records}

    @port_call
    async def find(self, key_id: str) -> ApiKeyRecord | None:
        return self.records.get(key_id)

    @port_call
    async def put(self, record: ApiKeyRecord) -> None:
        self.records[record.key_id] = record


class FakeOptOutRegistry(FakePort):
    """Keyed like the adapter: `company#project#channel` + recipient (emails compared lower-case)."""

    def __init__(self) -> None:
        super().__init__(store_failure("dynamodb"))
        self.entries: dict[tuple[str, str], str] = {}  # (suppression key, recipient) -> opted_out_at

    @staticmethod
    def _key(company_id: str, project_id: str, channel: str, recipient: str) -> tuple[str, str]:
        return f"{company_id}#{project_id}#{channel}", recipient.lower() if channel == "email" else recipient

    @port_call
    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool:
        return self._key(company_id, project_id, channel, recipient) in self.entries

    @port_call
    async def opt_out(self, company_id: str, project_id: str, channel: str, recipient: str, at: str) -> None:
        self.entries[self._key(company_id, project_id, channel, recipient)] = at

    @port_call
    async def opt_in(self, company_id: str, project_id: str, channel: str, recipient: str) -> None:
        self.entries.pop(self._key(company_id, project_id, channel, recipient), None)


class FakeRequestLedger(FakePort):
    """The idempotency records: `claim` writes when `decide_request` says TAKE, else returns the refusing
    record; `complete` marks it COMPLETED; `release` deletes an IN_PROGRESS record only. Stored as the adapter
    stores it: the lease's expiry in whole seconds, without its owner."""

    def __init__(self) -> None:
        super().__init__(store_failure("dynamodb"))
        self.records: dict[str, RequestRecord] = {}

    @port_call
    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        existing = self.records.get(record.key)
        if decide_request(existing, now=now, body_hash=record.body_hash) is not Claim.TAKE:
            return existing
        self.records[record.key] = replace(record, lease=Lease(expires_at=float(int(record.lease.expires_at))))
        return None

    @port_call
    async def read(self, key: str) -> RequestRecord | None:
        return self.records.get(key)

    @port_call
    async def complete(self, key: str, queue_timestamp: str) -> None:
        record = self.records.get(key)
        if record is not None:
            self.records[key] = replace(record, state=RequestState.COMPLETED, queue_timestamp=queue_timestamp)

    @port_call
    async def release(self, key: str) -> None:
        record = self.records.get(key)
        if record is not None and record.state is RequestState.IN_PROGRESS:
            del self.records[key]


class FakeTokenLeases(FakePort):
    """The shared rate-limit buckets: one `tat` per key under `rate_limit.take_tokens`, as the adapter keeps it;
    `calls` counts leases (each is one UpdateItem or more on the adapter)."""

    def __init__(self) -> None:
        super().__init__(store_failure("dynamodb"))
        self.tat_us: dict[str, int] = {}
        self.calls = 0

    @port_call
    async def lease(self, key: str, limit: RateLimit, wanted: int, now: float) -> Grant:
        self.calls += 1
        take = take_tokens(self.tat_us.get(key), int(now * MICROS), limit, wanted)
        if take.granted < 1:
            return Grant(0, take.retry_after_us / MICROS)
        self.tat_us[key] = take.tat_us
        return Grant(take.granted)

    @port_call
    async def hold_off(self, key: str, limit: RateLimit, until: float) -> None:
        self.tat_us[key] = max(self.tat_us.get(key, 0), held_off_tat(limit, int(until * MICROS)))


@dataclass(frozen=True, slots=True)
class PublishedMessage:
    queue_url: str
    body: str
    attributes: dict[str, str]
    delay_s: int
    message_id: str
    published_at: float
    group: str | None = None

    @property
    def visible_at(self) -> float:
        return self.published_at + self.delay_s


class FakePublisher(FakePort):
    """Records every message put on a queue (delay clamped to 0..900 s, like SQS)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(store_failure("sqs"))
        self._clock = clock
        self.messages: list[PublishedMessage] = []

    @port_call
    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        message_id = f"msg-{len(self.messages) + 1:06d}"
        delay = max(0, min(900, delay_s))
        self.messages.append(
            PublishedMessage(queue_url, body, dict(attributes), delay, message_id, self._clock.now(), group)
        )
        return message_id

    def on(self, queue_url: str) -> list[PublishedMessage]:
        return [m for m in self.messages if m.queue_url == queue_url]


# ---- outside services ----------------------------------------------------------------------------


class FakeSecrets(FakePort):
    """Secrets by id; a missing one is PermanentProviderError (like ResourceNotFoundException). `fetches`
    counts reads per id. Default injected failure: TransientProviderError (Secrets Manager unavailable)."""

    def __init__(self, secrets: Mapping[str, Mapping[str, str]] | None = None) -> None:
        super().__init__(provider_failure)
        self.secrets: dict[str, dict[str, str]] = {k: dict(v) for k, v in (secrets or {}).items()}
        self.fetches: Counter[str] = Counter()

    def put(self, secret_id: str, value: Mapping[str, str]) -> None:
        self.secrets[secret_id] = dict(value)

    @port_call
    async def get_json(self, secret_id: str) -> dict[str, str]:
        self.fetches[secret_id] += 1
        secret = self.secrets.get(secret_id)
        if secret is None:
            raise PermanentProviderError("secret_not_found", code="ResourceNotFoundException")
        return dict(secret)


AiAnswer = Mapping[str, str] | AiResult | BaseException


class FakeAiWriter(FakePort):
    """Answers each `write` with the next scripted answer (`answer_next`), else a default output naming each
    key. Like the adapter, an output whose keys are not exactly `output_keys` is a PermanentProviderError, and a
    result's `thread_id` (the continuation to store) is its response id. `requests` holds every AiRequest."""

    def __init__(self) -> None:
        super().__init__(provider_failure)
        self.requests: list[AiRequest] = []
        self._script: deque[AiAnswer] = deque()

    def answer_next(self, *answers: AiAnswer) -> None:
        """Queue answers for the next `write` calls: an output mapping, a whole AiResult, or an exception."""
        self._script.extend(answers)

    @port_call
    async def write(self, request: AiRequest) -> AiResult:
        self.requests.append(request)
        number = len(self.requests)
        answer: AiAnswer = (
            self._script.popleft() if self._script else {key: f"{key} #{number}" for key in request.output_keys}
        )
        if isinstance(answer, BaseException):
            raise answer
        response_id = f"resp_fake_{number}"
        result = answer if isinstance(answer, AiResult) else AiResult(dict(answer), response_id, 10, 5, 15, response_id)
        if set(result.output) != set(request.output_keys):
            raise PermanentProviderError("ai_output_keys_mismatch")
        return result


@dataclass(frozen=True, slots=True)
class SentRecord:
    message: OutboundMessage
    provider_message_id: str
    sent_at: float


def _records_attempt(
    send: Callable[[FakeSender, OutboundMessage], Coroutine[Any, Any, SentMessage]],
) -> Callable[[FakeSender, OutboundMessage], Coroutine[Any, Any, SentMessage]]:
    """`attempts` gets every call, before any injected failure (a refused or timed-out send is an attempt too)."""

    @functools.wraps(send)  # keeps `fake_port_call`
    async def call(self: FakeSender, message: OutboundMessage) -> SentMessage:
        self.attempts.append(message)
        return await send(self, message)

    return call


class FakeSender(FakePort):
    """Sends by recording (`sent`); `find_sent` answers from what it really sent, matched like the Twilio
    sender (same channel, from, to, since the bound less the skew allowance, same body unless a WhatsApp
    template). `can_look_up=False` mirrors SendGrid: `find_sent` raises PermanentProviderError.

    Scripted outcomes go through `faults` on "send" (default: TransientProviderError, certainly not sent);
    `refuse_next`, `throttle_next` and `time_out_next` are shorthands."""

    def __init__(self, clock: FakeClock, *, id_prefix: str = "SM", can_look_up: bool = True) -> None:
        super().__init__(provider_failure)
        self._clock = clock
        self._prefix = id_prefix
        self._counter = 0
        self.can_look_up = can_look_up
        self.sent: list[SentRecord] = []
        self.attempts: list[OutboundMessage] = []  # every send call, refused ones included
        self.lookups: list[tuple[OutboundMessage, float]] = []

    def refuse_next(self, reason: str = "invalid_recipient", code: str = "21211") -> None:
        self.faults.fail_next("send", error=lambda: PermanentProviderError(reason, code=code))

    def throttle_next(self, times: int = 1, retry_after_s: float | None = None) -> None:
        self.faults.fail_next(
            "send", times, lambda: TransientProviderError("throttled", code="429", retry_after_s=retry_after_s)
        )

    def time_out_next(self, *, sent: bool = True) -> None:
        """The next send raises SendOutcomeUnknown: after really sending (`sent`), or without."""
        self.faults.fail_next("send", error=lambda: SendOutcomeUnknown("timeout", code="504"), after_effect=sent)

    @_records_attempt
    @port_call
    async def send(self, message: OutboundMessage) -> SentMessage:
        self._counter += 1
        provider_id = f"{self._prefix}{self._counter:032x}"
        self.sent.append(SentRecord(message, provider_id, self._clock.now()))
        return SentMessage(provider_id, status="queued")

    @port_call
    async def find_sent(self, message: OutboundMessage, since_epoch_s: float) -> SentMessage | None:
        self.lookups.append((message, since_epoch_s))
        if not self.can_look_up:
            raise PermanentProviderError("lookup_unsupported")
        bound = math.floor(since_epoch_s - LOOKUP_SKEW_S)
        for record in reversed(self.sent):  # newest first
            if _same_send(record, message) and record.sent_at >= bound:
                return SentMessage(record.provider_message_id, status="sent")
        return None

    def sent_to(self, recipient: str) -> list[SentRecord]:
        return [r for r in self.sent if r.message.recipient == recipient]


def _same_send(record: SentRecord, message: OutboundMessage) -> bool:
    sent = record.message
    if (sent.channel, sent.sender, sent.recipient) != (message.channel, message.sender, message.recipient):
        return False
    if message.channel == "whatsapp" and message.content_sid:
        return True
    return (sent.body or "").strip() == (message.body or "").strip()


class FakeSignatures(FakePort):
    """Twilio's request signature (HMAC-SHA1 over the URL and the sorted parameters, base64): `sign` makes
    one, `valid` checks it; `checks` records every check."""

    def __init__(self) -> None:
        super().__init__(provider_failure)
        self.checks: list[tuple[str, str, bool]] = []  # (auth token, url, valid)

    @staticmethod
    def sign(auth_token: str, url: str, params: Mapping[str, str]) -> str:
        payload = url + "".join(f"{name}{params[name]}" for name in sorted(params))
        digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()

    @port_call_sync
    def valid(self, auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
        ok = bool(signature) and hmac.compare_digest(self.sign(auth_token, url, params), signature)
        self.checks.append((auth_token, url, ok))
        return ok


# ---- the conversations table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldStatus:
    status: DeliveryStatus
    at: str


# Bookkeeping a write stores as an attribute of its own (and so shows in `shared_fields`).
NOTED_ATTRIBUTES = ("processing_time_ms", "hand_off_reason", "opted_out_at", "status_before_reply")


class FakeConversationTable:
    """The conversations table, shared by the three fakes that write it (claims, reply claims, look-ups).

    `put` seeds a record as it is; the fakes write through `write`, which stamps `updated_at` like the adapters
    do and keeps `shared_fields` the stored form (the creation fields, the current status, the messages as
    elements, ...), what a hand-off carries. `notes` keeps what the record type does not carry:
    `status_before_reply`, `processing_time_ms`, `hand_off_reason`, `opted_out_at`, `last_reply_failure`.
    `held` holds the status callbacks kept for messages not recorded yet (the adapters' `early_delivery`)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.records: dict[ConversationKey, ConversationRecord] = {}
        self.notes: dict[ConversationKey, dict[str, Any]] = {}
        self.held: dict[ConversationKey, dict[str, HeldStatus]] = {}
        self._created: dict[ConversationKey, dict[str, Any]] = {}  # the fields the first write stored

    def get(self, key: ConversationKey) -> ConversationRecord | None:
        return self.records.get(key)

    def __getitem__(self, key: ConversationKey) -> ConversationRecord:
        return self.records[key]

    def put(self, record: ConversationRecord) -> ConversationRecord:
        """Store a record as it is (seeding a test): its `shared_fields` are taken as what was stored with it."""
        self._created.setdefault(record.key, dict(record.shared_fields))
        return self.write(record, touch=False)

    def write(self, record: ConversationRecord, *, touch: bool = True) -> ConversationRecord:
        if touch:
            record = replace(record, updated_at=self.clock.stamp())
        record = replace(record, early_delivery_sids=frozenset(self.held.get(record.key, {})))
        record = replace(record, shared_fields=self._stored_form(record))
        self.records[record.key] = record
        return record

    def note(self, key: ConversationKey) -> dict[str, Any]:
        return self.notes.setdefault(key, {})

    def _stored_form(self, record: ConversationRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            **self._created.get(record.key, {}),
            "primary_channel": record.key.primary_channel,
            "conversation_id": record.key.conversation_id,
            "conversation_status": record.status.value,
            "messages": [codec.message_element(m) for m in record.messages],
            "send_state": record.ledger.state.value,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
        }
        optional = {
            "thread_id": record.thread_id,
            "provider_message_id": record.ledger.provider_message_id,
            "failure_reason": record.failure.reason if record.failure else None,
            "last_failure_reason": record.last_failure_reason,
            "reopen_count": record.reopen_count or None,
        }
        notes = self.notes.get(record.key, {})
        for name in NOTED_ATTRIBUTES:
            optional[name] = notes.get(name)
        for name, value in optional.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value.value if isinstance(value, ConversationStatus) else value
        return fields

    # ---- `comms dlq redrive` (the adapter's, not a port's) ------------------------------------------------

    def reopen_exhausted(self, key: ConversationKey) -> str | None:
        """A record `may_reopen` allows back to PROCESSING with a lapsed claim, the ledger kept, the reason kept
        as `last_failure_reason`: the stamp written, or None when nothing changed."""
        record = self.records.get(key)
        if record is None or record.failure is None or not may_reopen(record):
            return None
        reopened = replace(
            record,
            status=ConversationStatus.PROCESSING,
            claim=Lease(record.claim.owner, 0.0),
            failure=None,
            last_failure_reason=record.failure.reason,
            reopen_count=record.reopen_count + 1,
        )
        return self.write(reopened).updated_at

    def close_reopened(self, key: ConversationKey, before: ConversationRecord, reopened_at: str) -> bool:
        """Undo `reopen_exhausted` while the record is exactly as that reopen left it."""
        record = self.records.get(key)
        if before.failure is None or not may_reopen(before) or record is None:
            return False
        untouched = (
            record.status is ConversationStatus.PROCESSING
            and record.claim == Lease(before.claim.owner, 0.0)
            and record.updated_at == reopened_at
            and record.reopen_count == before.reopen_count + 1
            and record.failure is None
        )
        if not untouched:
            return False
        restored = replace(
            record,
            status=before.status,
            failure=before.failure,
            last_failure_reason=before.last_failure_reason,
            reopen_count=before.reopen_count,
        )
        self.write(restored)
        return True

    def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        """The newest `limit` of the messages `record` counts, as stored now (with their delivery states)."""
        stored = self.records.get(record.key, record)
        recorded = stored.messages[: record.recorded_messages]
        return recorded[max(0, len(recorded) - limit) :]

    # ---- delivery states --------------------------------------------------------------------------

    def set_status(self, key: ConversationKey, index: int, sid: str, new: DeliveryStatus) -> bool:
        """Forward-only: applied when message `index` is `sid` and has no state yet or one `new` may replace."""
        record = self.records.get(key)
        if record is None or not 0 <= index < len(record.messages) or record.messages[index].message_id != sid:
            return False
        message = record.messages[index]
        current = parse_delivery_status(message.delivery_status) if message.delivery_status else None
        if message.delivery_status and current is None:
            return False  # an unknown stored value is not one `new` may replace
        if not is_forward(current, new):
            return False
        messages = list(record.messages)
        messages[index] = replace(message, delivery_status=new.value)
        self.write(replace(record, messages=tuple(messages)), touch=False)
        return True

    def hold(self, key: ConversationKey, sid: str, new: DeliveryStatus) -> bool:
        """Keep a callback for a SID not in `messages`, forward-only (a full map drops its oldest entry); if the
        message is recorded already, apply it there. True when kept or applied; False when stale or gone."""
        record = self.records.get(key)
        if record is None:
            return False  # the conversation is gone
        index = record.message_index(sid)
        if index is not None:  # recorded meanwhile: straight onto the message
            return self.set_status(key, index, sid, new)
        held = self.held.setdefault(key, {})
        kept = held.get(sid)
        if kept is not None and not is_forward(kept.status, new):
            return False  # stale
        if kept is None and len(held) >= EARLY_DELIVERY_CAP:  # full: the oldest entry makes room
            oldest = min(held, key=lambda s: (held[s].at, s))
            del held[oldest]
        held[sid] = HeldStatus(new, self.clock.stamp())
        self.write(record, touch=False)
        return True

    def apply_held(self, key: ConversationKey, sids: Iterable[str]) -> None:
        """After a final update: apply (forward-only) and forget what was held for the SIDs it recorded."""
        held = self.held.get(key)
        if not held:
            return
        for sid in sids:
            index = self.records[key].message_index(sid)
            kept = held.get(sid)
            if kept is None or index is None:
                continue
            self.set_status(key, index, sid, kept.status)
            del held[sid]
        self.write(self.records[key], touch=False)


def record_from_new(new: NewConversation, owner: str, lease_until: float, created_at: str) -> ConversationRecord:
    """The record the template sender's first claim creates (PROCESSING, claimed by `owner`), through the
    adapter's own codec, so the fakes store exactly what DynamoDB would."""
    item = {
        **codec.new_conversation_fields(new, created_at, INDEX_SHARDS),
        **codec.item_fields(new.key),
        codec.STATUS: ConversationStatus.PROCESSING.value,
        "claim_owner": owner,
        "claim_expires_at": lease_until,
        "updated_at": created_at,
    }
    return codec.record_from_item(item)


class FakeConversationClaims(FakePort):
    """`ConversationClaims` (template sender) over a `FakeConversationTable`."""

    def __init__(self, table: FakeConversationTable) -> None:
        super().__init__(store_failure("dynamodb"))
        self.table = table

    def _owned(self, key: ConversationKey, owner: str) -> ConversationRecord | None:
        """Like the adapter's condition: owner and status, not the lease (a lapsed claim nobody took over is
        still its owner's)."""
        record = self.table.get(key)
        if record is None or record.status is not ConversationStatus.PROCESSING or record.claim.owner != owner:
            return None
        return record

    @port_call
    async def claim(self, new: NewConversation, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        record = self.table.get(new.key)
        verdict = decide_conversation(record, now)
        if verdict is not Claim.TAKE:
            return ClaimAnswer(verdict, record)
        if record is None:
            return ClaimAnswer(
                Claim.TAKE, self.table.put(record_from_new(new, owner, lease_until, self.table.clock.stamp()))
            )
        # a lapsed claim: only the claim changes, the ledger and content stay
        taken = replace(record, status=ConversationStatus.PROCESSING, claim=Lease(owner, lease_until))
        return ClaimAnswer(Claim.TAKE, self.table.write(taken))

    @port_call
    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, claim=Lease(owner, lease_until)), touch=False)
        return True

    @port_call
    async def release(self, key: ConversationKey, owner: str) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, claim=Lease(owner, 0.0)), touch=False)
        return True

    @port_call
    async def record_attempt(self, key: ConversationKey, owner: str, draft: TemplateDraft) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        ledger = replace(
            record.ledger,
            state=SendState.ATTEMPTING,
            generated=dict(draft.content),
            usage=draft.usage,
            attempted_at=draft.attempted_at,
        )
        self.table.write(replace(record, ledger=ledger, thread_id=draft.thread_id))
        return True

    @port_call
    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, ledger=replace(record.ledger, state=SendState.NOT_SENT)))
        return True

    @port_call
    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        """The failed_* status and the failure (exhausted or not); the claim dropped; the ledger as it is."""
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, status=failure.status, failure=failure, claim=Lease(owner, 0.0)))
        return True

    @port_call
    async def finalise(self, key: ConversationKey, message: Message, thread_id: str, processing_time_ms: int) -> bool:
        """Once: refused when the ledger is SENT already (then a callback held since is applied anyway)."""
        record = self.table.get(key)
        if record is None:
            return False
        if record.ledger.state is SendState.SENT:
            self.table.apply_held(key, [message.message_id])
            return False
        self.table.note(key)["processing_time_ms"] = processing_time_ms
        self.table.write(
            replace(
                record,
                status=ConversationStatus.INITIAL_MESSAGE_SENT,
                ledger=replace(record.ledger, state=SendState.SENT, provider_message_id=message.message_id),
                thread_id=thread_id,
                messages=(*record.messages, message),
                is_open=True,
                claim=Lease(record.claim.owner, 0.0),
            )
        )
        self.table.apply_held(key, [message.message_id])
        return True

    @port_call
    async def record_invalid(self, key: ConversationKey, reason: str) -> None:
        """Created (once) with only its key, the status and the reason, like the adapter's item."""
        if self.table.get(key) is not None:
            return
        status = ConversationStatus.FAILED_INVALID_CONTEXT
        stamp = self.table.clock.stamp()
        self.table.put(
            ConversationRecord(
                key=key,
                status=status,
                channel="",
                company_id="",
                project_id="",
                created_at=stamp,
                is_open=False,  # no task_complete attribute
                failure=Failure(status, reason),
                updated_at=stamp,
            )
        )


STOPPED_STATUSES = frozenset({ConversationStatus.OPTED_OUT, ConversationStatus.HANDED_OFF})


class FakeReplyClaims(FakePort):
    """`ReplyClaims` (reply sender) over a `FakeConversationTable`."""

    def __init__(self, table: FakeConversationTable) -> None:
        super().__init__(store_failure("dynamodb"))
        self.table = table

    def _owned(self, key: ConversationKey, owner: str) -> ConversationRecord | None:
        record = self.table.get(key)
        if (
            record is None
            or record.status is not ConversationStatus.PROCESSING_REPLY
            or record.reply_claim.owner != owner
        ):
            return None
        return record

    def _unclaimed(self, record: ConversationRecord, status: ConversationStatus) -> ConversationRecord:
        """The reply claim dropped (owner, lease and the status to return to)."""
        self.table.note(record.key).pop("status_before_reply", None)
        return replace(record, status=status, reply_claim=Lease())

    def _status_before(self, key: ConversationKey) -> ConversationStatus:
        before: ConversationStatus = self.table.note(key).get("status_before_reply", ConversationStatus.REPLY_SENT)
        return before

    @port_call
    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        record = self.table.get(key)
        verdict = decide_reply(record, now)
        if verdict is not Claim.TAKE or record is None:
            return ClaimAnswer(verdict, record)
        if record.status in REPLYABLE_STATUSES:  # a takeover keeps the status the first claim noted
            self.table.note(key).setdefault("status_before_reply", record.status)
        claimed = replace(record, status=ConversationStatus.PROCESSING_REPLY, reply_claim=Lease(owner, lease_until))
        return ClaimAnswer(Claim.TAKE, self.table.write(claimed))

    @port_call
    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, reply_claim=Lease(owner, lease_until)), touch=False)
        return True

    @port_call
    async def release(self, key: ConversationKey, owner: str) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, reply_claim=Lease(owner, 0.0)), touch=False)
        return True

    @port_call
    async def record_attempt(self, key: ConversationKey, owner: str, draft: ReplyAttempt) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, reply_attempt=draft))
        return True

    @port_call
    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(replace(record, reply_attempt=None), touch=False)
        return True

    @port_call
    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        """Permanent: its failed_* status. Retries exhausted: back to the status before the claim (still
        answerable), the failure noted (`last_reply_failure`). Either way the claim is dropped and
        `reply_attempt` kept, so a reply that may have gone out is reconciled, never sent twice."""
        record = self._owned(key, owner)
        if record is None:
            return False
        if failure.exhausted:
            self.table.note(key)["last_reply_failure"] = failure
            self.table.write(self._unclaimed(record, self._status_before(key)))
        else:
            self.table.write(replace(self._unclaimed(record, failure.status), failure=failure))
        return True

    @port_call
    async def finish_unanswered(self, key: ConversationKey, owner: str) -> bool:
        record = self._owned(key, owner)
        if record is None:
            return False
        self.table.write(self._unclaimed(record, self._status_before(key)))
        return True

    @port_call
    async def finalise(
        self,
        key: ConversationKey,
        owner: str,
        messages: Sequence[Message],
        answered_sids: Sequence[str],
        thread_id: str,
        processing_time_ms: int,
        *,
        claimed: ConversationRecord,
    ) -> ConversationRecord | None:
        """reply_sent; or, when an opt-out or hand-off replaced processing_reply while sending, that status kept
        (the adapter's "stopped" variant); None when `owner` no longer holds the claim. The messages go after the
        ones `claimed` (the record as claimed) counts, as the adapter's items do."""
        record = self.table.get(key)
        if record is None or record.reply_claim.owner != owner:
            return None
        if record.status is ConversationStatus.PROCESSING_REPLY:
            status = ConversationStatus.REPLY_SENT
        elif record.status in STOPPED_STATUSES:
            status = record.status
        else:
            return None
        self.table.note(key)["processing_time_ms"] = processing_time_ms
        finished = replace(
            self._unclaimed(record, status),
            messages=(*record.messages[: claimed.recorded_messages], *with_fragments(messages, answered_sids)),
            thread_id=thread_id,
            reply_attempt=None,
        )
        self.table.write(finished)
        self.table.apply_held(key, [m.message_id for m in messages if m.message_id])
        return self.table[key]

    @port_call
    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        return self.table.recent_messages(record, limit)


class FakeConversationLookup(FakePort):
    """`ConversationLookup` (webhook intake) over a `FakeConversationTable`: the index look-ups by company
    address + sender (emails compared lower-case), the intake's status writes (each a no-op on a conversation
    that is gone), forward-only delivery states."""

    def __init__(self, table: FakeConversationTable) -> None:
        super().__init__(store_failure("dynamodb"))
        self.table = table

    @staticmethod
    def _same_sender(channel: str, record: ConversationRecord, sender: str) -> bool:
        stored = record.key.primary_channel
        return stored.lower() == sender.lower() if channel == "email" else stored == sender

    def _between(self, channel: str, company_address: str, sender: str) -> list[ConversationRecord]:
        return [
            r
            for r in self.table.records.values()
            if r.channel == channel and r.company_address == company_address and self._same_sender(channel, r, sender)
        ]

    @port_call
    async def tenant_credentials(self, channel: str, company_address: str) -> tuple[str, ...]:
        found: dict[str, None] = {}  # insertion-ordered set
        for record in self.table.records.values():
            if record.channel == channel and record.company_address == company_address and record.credentials_id:
                found[record.credentials_id] = None
        return tuple(found)

    @port_call
    async def find_open(self, channel: str, company_address: str, sender: str) -> ConversationRecord | None:
        candidates = [r for r in self._between(channel, company_address, sender) if r.is_open]
        return max(candidates, key=lambda r: r.created_at, default=None)

    @port_call
    async def conversations_between(self, channel: str, company_address: str, sender: str) -> list[ConversationRecord]:
        return self._between(channel, company_address, sender)

    @port_call
    async def mark_opted_out(self, key: ConversationKey) -> None:
        record = self.table.get(key)
        if record is not None:
            self.table.note(key)["opted_out_at"] = self.table.clock.stamp()
            self.table.write(replace(record, status=ConversationStatus.OPTED_OUT))

    @port_call
    async def mark_opted_in(self, key: ConversationKey) -> None:
        record = self.table.get(key)
        if record is not None and record.status is ConversationStatus.OPTED_OUT:
            self.table.note(key).pop("opted_out_at", None)
            self.table.write(replace(record, status=ConversationStatus.REPLY_SENT))

    @port_call
    async def mark_handed_off(self, key: ConversationKey, reason: str) -> None:
        record = self.table.get(key)
        if record is not None:
            self.table.note(key)["hand_off_reason"] = reason
            self.table.write(replace(record, status=ConversationStatus.HANDED_OFF))

    @port_call
    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        return self.table.recent_messages(record, limit)

    @port_call
    async def find_message(self, record: ConversationRecord, message_sid: str) -> tuple[int, Message] | None:
        stored = self.table.get(record.key)
        index = None if stored is None else stored.message_index(message_sid)
        return None if stored is None or index is None else (index, stored.messages[index])

    @port_call
    async def set_delivery_status(
        self, record: ConversationRecord, index: int, message_sid: str, new: DeliveryStatus
    ) -> bool:
        return self.table.set_status(record.key, index, message_sid, new)

    @port_call
    async def hold_delivery_status(self, key: ConversationKey, message_sid: str, new: DeliveryStatus) -> bool:
        return self.table.hold(key, message_sid, new)


# ---- staged fragments and the trigger lock ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagedFragment:
    fragment: Fragment
    primary_channel: str
    expires_at: int


class FakeReplyStage(FakePort):
    """`ReplyStage`: fragments keyed by conversation + MessageSid (a repeat is refused), and the trigger lock
    decided by `decide_trigger_lock`. Expired entries stay until deleted, like DynamoDB's lazy TTL."""

    def __init__(self) -> None:
        super().__init__(store_failure("dynamodb"))
        self.fragments: dict[str, dict[str, StagedFragment]] = {}
        self.locks: dict[str, TriggerLock] = {}

    @port_call
    async def stage(self, key: ConversationKey, fragment: Fragment, expires_at: int) -> bool:
        staged = self.fragments.setdefault(key.conversation_id, {})
        if fragment.message_sid in staged:
            return False
        staged[fragment.message_sid] = StagedFragment(fragment, key.primary_channel, expires_at)
        return True

    @port_call
    async def staged(self, conversation_id: str) -> list[Fragment]:
        staged = self.fragments.get(conversation_id, {})
        return [staged[sid].fragment for sid in sorted(staged)]  # the sort key's order

    @port_call
    async def delete_staged(self, conversation_id: str, message_sids: Sequence[str]) -> None:
        staged = self.fragments.get(conversation_id, {})
        for sid in message_sids:
            staged.pop(sid, None)

    @port_call
    async def finish_window(self, conversation_id: str, message_sids: Sequence[str]) -> None:
        staged = self.fragments.get(conversation_id, {})
        for sid in message_sids:
            staged.pop(sid, None)
        self.locks.pop(conversation_id, None)

    @port_call
    async def take_lock(self, conversation_id: str, holder: str, now: float, expires_at: int) -> bool:
        if decide_trigger_lock(self.locks.get(conversation_id), holder, now) is not Claim.TAKE:
            return False
        self.locks[conversation_id] = TriggerLock(conversation_id, Lease(holder, float(expires_at)))
        return True

    @port_call
    async def mark_queued(self, conversation_id: str, holder: str) -> None:
        lock = self.locks.get(conversation_id)
        if lock is not None and lock.lease.owner == holder:
            self.locks[conversation_id] = replace(lock, trigger_queued=True)

    @port_call
    async def release_lock(self, conversation_id: str, holder: str | None = None) -> None:
        lock = self.locks.get(conversation_id)
        if lock is not None and (holder is None or lock.lease.owner == holder):
            del self.locks[conversation_id]


# ---- builders and the world ---------------------------------------------------------------------------

# The secrets `new_conversation`'s defaults name (a FakeWorld starts with them).
TWILIO_TEST_SECRET = {"twilio_account_sid": "ACtest", "twilio_auth_token": "twilio-test-token"}
DEFAULT_SECRETS: dict[str, dict[str, str]] = {
    "cred-whatsapp": TWILIO_TEST_SECRET,
    "cred-sms": TWILIO_TEST_SECRET,
    "cred-email": {"sendgrid_api_key": "SG.test", "from_email": "hello@agency.example"},
    "ai-key": {"ai_api_key": "sk-test"},
}
CHANNEL_ADDRESSES = {"whatsapp": "+447700900001", "sms": "+447700900002", "email": "hello@agency.example"}
RECIPIENTS = {"whatsapp": "+447700900123", "sms": "+447700900123", "email": "lee@example.com"}


def new_conversation(
    channel: str = "whatsapp",
    *,
    request_id: str = "req-1",
    recipient: str | None = None,
    company_address: str | None = None,
    company_id: str = "ci-test",
    project_id: str = "pi-test",
    credentials_id: str | None = None,
    api_key_reference: str = "ai-key",
    **overrides: Any,
) -> NewConversation:
    """A valid NewConversation for tests (override any field by keyword)."""
    recipient = recipient or RECIPIENTS[channel]
    company_address = company_address or CHANNEL_ADDRESSES[channel]
    conversation_id = "#".join(
        (company_id, project_id, request_id, company_address if channel == "email" else company_address.lstrip("+"))
    )
    fields: dict[str, Any] = {
        "key": ConversationKey(recipient, conversation_id),
        "request_id": request_id,
        "channel": channel,
        "company_id": company_id,
        "project_id": project_id,
        "company_address": company_address,
        "recipient": {"recipient_tel" if channel != "email" else "recipient_email": recipient},
        "ai_config": {"api_key_reference": api_key_reference, "replies": {"instructions": "Answer briefly."}},
        "channel_config": {f"{channel}_credentials_id": credentials_id or f"cred-{channel}"},
        **overrides,
    }
    return NewConversation(**fields)


def conversation_record(
    status: ConversationStatus = ConversationStatus.INITIAL_MESSAGE_SENT, channel: str = "whatsapp", **overrides: Any
) -> ConversationRecord:
    """A stored conversation for tests (made from `new_conversation`; override any record field by keyword)."""
    new = new_conversation(channel, **{k: overrides.pop(k) for k in ("request_id", "recipient") if k in overrides})
    record = replace(record_from_new(new, "template-owner", 0.0, utc_iso(START_EPOCH_S)), status=status)
    if status is not ConversationStatus.PROCESSING:  # the first message sent and recorded
        first = Message("SM0", "assistant", "Hello from the agency", utc_iso(START_EPOCH_S))
        ledger = SendLedger(SendState.SENT, generated={"1": "Hello"}, provider_message_id="SM0")
        record = replace(record, thread_id="resp_seeded", ledger=ledger, messages=(first,))
    return replace(record, **overrides)


@dataclass
class FakeWorld:
    """Every fake, consistent: one clock, one conversations table behind the three conversation ports, one
    sender per channel (email's cannot look sends up, like SendGrid), the secrets `new_conversation` names.

    A processor is built from it directly: `world.conversation_claims` / `world.reply_claims` as its claims,
    `world.secrets`, `world.ai`, `world.senders`, `clock=world.clock`, `sleep=world.clock.sleep`."""

    clock: FakeClock = field(default_factory=FakeClock)
    companies: FakeCompanyDirectory = field(default_factory=FakeCompanyDirectory)
    api_keys: FakeApiKeyStore = field(default_factory=FakeApiKeyStore)
    opt_outs: FakeOptOutRegistry = field(default_factory=FakeOptOutRegistry)
    requests: FakeRequestLedger = field(default_factory=FakeRequestLedger)
    secrets: FakeSecrets = field(default_factory=lambda: FakeSecrets(DEFAULT_SECRETS))
    ai: FakeAiWriter = field(default_factory=FakeAiWriter)
    signatures: FakeSignatures = field(default_factory=FakeSignatures)
    stage: FakeReplyStage = field(default_factory=FakeReplyStage)
    publisher: FakePublisher = field(init=False)
    senders: dict[str, FakeSender] = field(init=False)
    table: FakeConversationTable = field(init=False)
    conversation_claims: FakeConversationClaims = field(init=False)
    reply_claims: FakeReplyClaims = field(init=False)
    lookup: FakeConversationLookup = field(init=False)

    def __post_init__(self) -> None:
        self.publisher = FakePublisher(self.clock)
        self.senders = {
            "whatsapp": FakeSender(self.clock),
            "sms": FakeSender(self.clock),
            "email": FakeSender(self.clock, id_prefix="sg", can_look_up=False),
        }
        self.table = FakeConversationTable(self.clock)
        self.conversation_claims = FakeConversationClaims(self.table)
        self.reply_claims = FakeReplyClaims(self.table)
        self.lookup = FakeConversationLookup(self.table)

    def sender(self, channel: str) -> FakeSender:
        return self.senders[channel]

    @property
    def fakes(self) -> tuple[FakePort, ...]:
        return (
            self.companies,
            self.api_keys,
            self.opt_outs,
            self.requests,
            self.publisher,
            self.secrets,
            self.ai,
            self.signatures,
            *self.senders.values(),
            self.conversation_claims,
            self.reply_claims,
            self.lookup,
            self.stage,
        )

    def heal(self) -> None:
        for fake in self.fakes:
            fake.faults.heal()

    def seed(self, record: ConversationRecord) -> ConversationRecord:
        return self.table.put(record)


if TYPE_CHECKING:  # what mypy checks when run on this file: every fake implements its port

    def _fakes_implement_the_ports(world: FakeWorld) -> None:
        companies: CompanyDirectory = world.companies
        api_keys: ApiKeyStore = world.api_keys
        opt_outs: OptOutRegistry = world.opt_outs
        requests: RequestLedger = world.requests
        publisher: MessagePublisher = world.publisher
        secrets: SecretStore = world.secrets
        ai: AiWriter = world.ai
        sender: MessageSender = world.sender("sms")
        signatures: SignatureVerifier = world.signatures
        claims: ConversationClaims = world.conversation_claims
        replies: ReplyClaims = world.reply_claims
        lookup: ConversationLookup = world.lookup
        stage: ReplyStage = world.stage
        token_leases: TokenLeases = FakeTokenLeases()
        del token_leases
        del companies, api_keys, opt_outs, requests, publisher, secrets, ai, sender, signatures
        del claims, replies, lookup, stage
