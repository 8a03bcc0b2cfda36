"""POST /initiate-conversation: translate the HTTP request into the use case and back (SPEC §2)."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from service.api.request_bodies import read_limited_body
from service.api.responses import json_response
from service.api.state import DEPS, PAYLOAD_REQUEST_ID, TRACE_ID
from service.domain.access import authenticate, authorise, rate_limit_for
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode
from service.domain.initiate import payload_request_id, validate_identifiers, validate_initiate_body

ACCEPTED_MESSAGE = "Request accepted and queued for processing"


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, "request body is not valid JSON") from exc


def _one_api_key(request: web.Request) -> str | None:
    """The x-api-key header; None (401) when there are several: a gateway in front that checks another of them
    than this service reads would let one key pass for another."""
    presented = request.headers.getall("x-api-key", [])
    return presented[0] if len(presented) == 1 else None


async def initiate_conversation(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    key = await authenticate(_one_api_key(request), deps.api_keys)
    structlog.contextvars.bind_contextvars(company_id=key.company_id, project_id=key.project_id)
    own_company = await deps.companies.get(key.company_id, key.project_id)
    wait = await deps.rate_limiter.check(key.key_id, rate_limit_for(own_company, deps.default_rate_limit))
    if wait:
        raise ApiError(ErrorCode.RATE_LIMIT_EXCEEDED, "rate limit exceeded; retry later", retry_after_s=wait)

    body = parse_json(await read_limited_body(request, deps.settings.max_body_bytes))
    caller_request_id = payload_request_id(body)
    if caller_request_id:
        request[PAYLOAD_REQUEST_ID] = caller_request_id
    company_id, project_id = validate_identifiers(body)
    authorise(key, company_id, project_id)
    valid = validate_initiate_body(body)

    try:
        outcome = await deps.initiator.initiate(valid, trace_id=request[TRACE_ID])
    except DependencyUnavailable:
        deps.api_metrics.queue_sends.labels(channel=valid.channel, outcome="failed").inc()
        raise
    deps.api_metrics.queue_sends.labels(channel=valid.channel, outcome="queued" if outcome.enqueued else "repeat").inc()
    structlog.get_logger("service.api").info(
        "conversation_queued" if outcome.enqueued else "conversation_repeat_request",
        conversation_id=outcome.conversation_id,
        channel=valid.channel,
    )
    return json_response(
        {
            "status": "success",
            "request_id": valid.request_id,
            "conversation_id": outcome.conversation_id,
            "message": ACCEPTED_MESSAGE,
            "queue_timestamp": outcome.queue_timestamp,
        }
    )
