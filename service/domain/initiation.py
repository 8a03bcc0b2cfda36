"""The initiate-conversation use case: tenant rules, request idempotency, queueing (SPEC §2, §4).

Talks only to ports. The queue-and-record step runs shielded, so a cancelled
request can never leave a message queued without its idempotency record settled;
one cancelled during the claim write releases the claim it may have written.

A repeat of a request_id that is still being queued waits for it (bounded by
`duplicate_wait_s`, polling the ledger) and answers as it does; a repeat whose body
differs from the first is refused (the state table is in `service.domain.claims`).

The caller is answered once its message is queued: the ledger completion (which only lets a later repeat answer
at once instead of waiting) runs after the answer, as a task the initiator keeps until it ends (`settle`, at
stop). Its failure never changed the answer: the claim's lease runs out and a repeat after that queues a twin,
which the consumers' conversation claim acknowledges without sending twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import orjson
import structlog

from service.domain.claims import Claim, RequestRecord, RequestState, body_fingerprint, decide_request, request_key
from service.domain.company import CompanyRecord, tenant_group
from service.domain.context import build_context, message_attributes
from service.domain.conversation import Lease
from service.domain.conversation import conversation_id as make_conversation_id
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode
from service.domain.initiate import InitiateRequest
from service.domain.ports import CompanyDirectory, MessagePublisher, OptOutRegistry, RequestLedger
from service.domain.timefmt import utc_iso
from service.versions import ROUTER_VERSION

log = structlog.get_logger(__name__)

# Polling a request_id another attempt is queueing: 25 ms, doubling, at most 200 ms apart.
POLL_FIRST_S = 0.025
POLL_MAX_S = 0.2
# Retry-After of a 409 REQUEST_IN_PROGRESS: the retry itself waits `duplicate_wait_s` again,
# so a short hint suffices (the lease length would tell callers to idle for 30 s).
IN_PROGRESS_RETRY_AFTER_S = 1


def poll_delays(first_s: float = POLL_FIRST_S, max_s: float = POLL_MAX_S) -> Iterator[float]:
    """The pauses between ledger polls: `first_s`, doubling, capped at `max_s`, forever."""
    delay = first_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


@dataclass(frozen=True, slots=True)
class InitiateOutcome:
    conversation_id: str
    queue_timestamp: str
    enqueued: bool


@dataclass(frozen=True, slots=True)
class InitiationPorts:
    companies: CompanyDirectory
    opt_outs: OptOutRegistry
    ledger: RequestLedger
    publisher: MessagePublisher


class ConversationInitiator:
    def __init__(
        self,
        ports: InitiationPorts,
        queue_urls: Mapping[str, str | None],
        *,
        lease_s: int,
        clock: Callable[[], float],
        duplicate_wait_s: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._ports = ports
        self._queue_urls = queue_urls
        self._lease_s = lease_s
        self._clock = clock
        self._duplicate_wait_s = duplicate_wait_s
        self._sleep = sleep
        self._completions: set[asyncio.Task[None]] = set()

    async def initiate(self, request: InitiateRequest, trace_id: str) -> InitiateOutcome:
        company = await self._checked_company(request)
        queue_url = self._queue_urls.get(request.channel)
        sender = company.sender_address(request.channel)
        if not queue_url:
            raise ApiError(ErrorCode.CONFIGURATION_ERROR, f"no queue is configured for channel {request.channel}")
        if not sender:
            raise ApiError(ErrorCode.CONFIGURATION_ERROR, f"the project has no {request.channel} sender configured")
        conversation_id = make_conversation_id(
            request.company_id, request.project_id, request.request_id, request.channel, sender
        )
        key = request_key(request.company_id, request.project_id, request.request_id)
        repeat = await self._claim_or_follow(key, conversation_id, body_fingerprint(request.body))
        if repeat is not None:
            return repeat
        return await asyncio.shield(self._queue(request, company, conversation_id, key, queue_url, trace_id))

    async def _checked_company(self, request: InitiateRequest) -> CompanyRecord:
        """Opt-out first (a validation rule), then the tenant rules, in SPEC §2 order.

        The company is read first and alone: the handler has just read it for the rate limit, so it comes from the
        directory's cache, and running the two reads side by side would only cost two tasks per request. A failed
        opt-out read still outranks a failed company read."""
        try:
            company = await self._ports.companies.get(request.company_id, request.project_id)
        except Exception:
            await self._opted_out(request)
            raise
        if await self._opted_out(request):
            raise ApiError(ErrorCode.RECIPIENT_OPTED_OUT, f"the recipient has opted out of {request.channel}")
        if not isinstance(company, CompanyRecord):
            raise ApiError(ErrorCode.COMPANY_NOT_FOUND, "company/project not found")
        if not company.is_active:
            raise ApiError(ErrorCode.PROJECT_INACTIVE, "the project is not active")
        if not company.allows(request.channel):
            raise ApiError(ErrorCode.CHANNEL_NOT_ALLOWED, f"channel {request.channel} is not allowed for this project")
        return company

    async def _opted_out(self, request: InitiateRequest) -> bool:
        return await self._ports.opt_outs.is_opted_out(
            request.company_id, request.project_id, request.channel, request.recipient
        )

    async def _claim_or_follow(self, key: str, conversation_id: str, body_hash: str) -> InitiateOutcome | None:
        """Claim the request_id (None: it is ours, go and queue), or the answer a repeat of it gets.

        A claim refused by a live claim for the same body waits for that attempt, polling
        the ledger (consistent reads) until it completes (answer as it did), goes away or
        lapses (claim again), or `duplicate_wait_s` has passed (409 with a short Retry-After).
        """
        now = self._clock()
        deadline = now + self._duplicate_wait_s
        delays = poll_delays()
        record: RequestRecord | None = None
        verdict = Claim.TAKE
        while True:
            if verdict is Claim.TAKE:
                lease = Lease(expires_at=now + self._lease_s)
                claim = RequestRecord(key, RequestState.IN_PROGRESS, conversation_id, lease, body_hash=body_hash)
                record = await self._claim(claim, now)
                if record is None:
                    return None
                # Refused: follow the record that refused. Even one `decide_request` calls claimable (a lease
                # lapsing this very second) is polled before the next claim: no loop of writes.
                verdict = decide_request(record, now=now, body_hash=body_hash)
            if verdict is Claim.REFUSED:
                raise ApiError(
                    ErrorCode.IDEMPOTENCY_KEY_REUSED, "this request_id was already used with a different request body"
                )
            if verdict is Claim.DONE:
                assert record is not None  # decide_request answers DONE only for a record
                return InitiateOutcome(record.conversation_id, record.queue_timestamp or "", enqueued=False)
            if now >= deadline:
                raise ApiError(
                    ErrorCode.REQUEST_IN_PROGRESS,
                    "a request with this request_id is still being queued; retry shortly",
                    retry_after_s=IN_PROGRESS_RETRY_AFTER_S,
                )
            await self._sleep(min(next(delays), deadline - now))
            now = self._clock()
            record = await self._ports.ledger.read(key)
            verdict = decide_request(record, now=now, body_hash=body_hash)

    async def _claim(self, claim: RequestRecord, now: float) -> RequestRecord | None:
        """The ledger claim; cancelled (the request deadline) while the write may have been applied, the claim is
        released (shielded, best effort, only if the record is still this very claim) so a retry need not wait
        out the whole lease for a request that queued nothing."""
        try:
            return await self._ports.ledger.claim(claim, now)
        except asyncio.CancelledError:
            await asyncio.shield(self._release_if_ours(claim))
            raise

    async def _release_if_ours(self, claim: RequestRecord) -> None:
        try:
            record = await self._ports.ledger.read(claim.key)
        except DependencyUnavailable as exc:
            log.warning("request_claim_not_released", error=str(exc), lease_s=self._lease_s)
            return
        ours = (
            record is not None
            and record.state is RequestState.IN_PROGRESS
            and record.conversation_id == claim.conversation_id
            and record.body_hash == claim.body_hash
            and int(record.lease.expires_at) == int(claim.lease.expires_at)  # the ledger stores whole seconds
        )
        if ours:
            await self._release_quietly(claim.key)

    async def _queue(
        self,
        request: InitiateRequest,
        company: CompanyRecord,
        conversation_id: str,
        key: str,
        queue_url: str,
        trace_id: str,
    ) -> InitiateOutcome:
        queue_timestamp = utc_iso(self._clock())
        context = build_context(
            request,
            company,
            conversation_id,
            router_version=ROUTER_VERSION,
            trace_id=trace_id,
            queue_timestamp=queue_timestamp,
        )
        body = orjson.dumps(context.model_dump(mode="json")).decode()
        try:
            await self._ports.publisher.publish(
                queue_url,
                body,
                message_attributes(request, conversation_id, queue_timestamp),
                group=tenant_group(company.company_id, company.project_id),
            )
        except Exception:
            # Nothing was queued: free the request_id so the caller's retry can queue it at once.
            await self._release_quietly(key)
            raise
        completion = asyncio.create_task(self._complete(key, queue_timestamp, conversation_id), name="request-complete")
        self._completions.add(completion)
        completion.add_done_callback(self._completions.discard)
        return InitiateOutcome(conversation_id, queue_timestamp, enqueued=True)

    async def _complete(self, key: str, queue_timestamp: str, conversation_id: str) -> None:
        # Either way the message is queued and the caller answered: the claim's lease runs out (module doc).
        try:
            await self._ports.ledger.complete(key, queue_timestamp)
        except DependencyUnavailable as exc:
            log.warning("request_completion_not_recorded", conversation_id=conversation_id, error=str(exc))
        except Exception:  # a defect, not AWS: nobody awaits this task, so it is logged here with its traceback
            log.exception("request_completion_failed", conversation_id=conversation_id)

    async def settle(self, timeout_s: float) -> int:
        """Wait (at most `timeout_s`) for the ledger completions still running; the number left unfinished, which
        are cancelled (their claims lapse, module doc). The service calls it at stop, before its clients close."""
        pending = set(self._completions)
        if not pending:
            return 0
        _, unfinished = await asyncio.wait(pending, timeout=max(0.0, timeout_s))
        for task in unfinished:
            task.cancel()
        if unfinished:
            log.warning("request_completions_abandoned", count=len(unfinished))
        return len(unfinished)

    async def _release_quietly(self, key: str) -> None:
        try:
            await self._ports.ledger.release(key)
        except DependencyUnavailable as exc:
            log.warning("request_claim_not_released", error=str(exc), lease_s=self._lease_s)
