"""The initiate-conversation use case: tenant rules, request idempotency, queueing (SPEC §2, §4).

Talks only to ports. The queue-and-record step runs shielded, so a cancelled
request can never leave a message queued without its idempotency record settled.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
import structlog

from service.domain.company import CompanyRecord
from service.domain.context import build_context, message_attributes
from service.domain.conversation import conversation_id as make_conversation_id
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode
from service.domain.initiate import InitiateRequest
from service.domain.ports import CompanyDirectory, MessagePublisher, OptOutRegistry, RequestLedger
from service.domain.request_claim import (
    ClaimVerdict,
    RequestRecord,
    RequestState,
    request_key,
    verdict_for_existing,
)
from service.domain.timefmt import utc_iso

log = structlog.get_logger(__name__)


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
        router_version: str,
        lease_s: int,
        clock: Callable[[], float],
    ) -> None:
        self._ports = ports
        self._queue_urls = queue_urls
        self._router_version = router_version
        self._lease_s = lease_s
        self._clock = clock

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
        now = self._clock()
        claim = RequestRecord(key, RequestState.IN_PROGRESS, conversation_id, now + self._lease_s)
        refusal = await self._ports.ledger.claim(claim, now)
        if refusal is not None:
            repeat = self._answer_repeat(refusal, now)
            if repeat is not None:
                return repeat
        return await asyncio.shield(self._queue(request, company, conversation_id, key, queue_url, trace_id))

    async def _checked_company(self, request: InitiateRequest) -> CompanyRecord:
        """Opt-out first (a validation rule), then the tenant rules, in SPEC §2 order."""
        opted_out, company = await asyncio.gather(
            self._ports.opt_outs.is_opted_out(
                request.company_id, request.project_id, request.channel, request.recipient
            ),
            self._ports.companies.get(request.company_id, request.project_id),
            return_exceptions=True,
        )
        for result in (opted_out, company):
            if isinstance(result, BaseException):
                raise result
        if opted_out is True:
            raise ApiError(ErrorCode.RECIPIENT_OPTED_OUT, f"the recipient has opted out of {request.channel}")
        if not isinstance(company, CompanyRecord):
            raise ApiError(ErrorCode.COMPANY_NOT_FOUND, "company/project not found")
        if not company.is_active:
            raise ApiError(ErrorCode.PROJECT_INACTIVE, "the project is not active")
        if not company.allows(request.channel):
            raise ApiError(ErrorCode.CHANNEL_NOT_ALLOWED, f"channel {request.channel} is not allowed for this project")
        return company

    def _answer_repeat(self, refusal: RequestRecord, now: float) -> InitiateOutcome | None:
        verdict = verdict_for_existing(refusal, now)
        if verdict is ClaimVerdict.ALREADY_QUEUED:
            return InitiateOutcome(refusal.conversation_id, refusal.queue_timestamp or "", enqueued=False)
        if verdict is ClaimVerdict.IN_PROGRESS_ELSEWHERE:
            wait = max(1, math.ceil(refusal.lease_expires_at - now))
            raise ApiError(
                ErrorCode.REQUEST_IN_PROGRESS,
                "a request with this request_id is already being queued; retry shortly",
                retry_after_s=wait,
            )
        return None

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
            router_version=self._router_version,
            trace_id=trace_id,
            queue_timestamp=queue_timestamp,
        )
        body = orjson.dumps(context.model_dump(mode="json")).decode()
        try:
            await self._ports.publisher.publish(
                queue_url, body, message_attributes(request, conversation_id, queue_timestamp)
            )
        except Exception:
            # Nothing was queued: free the request_id so the caller's retry can queue it at once.
            await self._release_quietly(key)
            raise
        try:
            await self._ports.ledger.complete(key, queue_timestamp)
        except DependencyUnavailable as exc:
            # The message is queued. The claim lease expires; a repeat after that queues a twin,
            # which the consumers' conversation claim acknowledges without sending twice.
            log.warning("request_completion_not_recorded", conversation_id=conversation_id, error=str(exc))
        return InitiateOutcome(conversation_id, queue_timestamp, enqueued=True)

    async def _release_quietly(self, key: str) -> None:
        try:
            await self._ports.ledger.release(key)
        except DependencyUnavailable as exc:
            log.warning("request_claim_not_released", error=str(exc), lease_s=self._lease_s)
