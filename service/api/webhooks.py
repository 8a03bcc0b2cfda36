"""Twilio webhooks: inbound messages and status callbacks (SPEC §7).

Answers fast with empty TwiML: every slow step (AI, sending) happens on the replies queue.
Refusals carry the SPEC §2 error body: 403 AUTHORIZATION_ERROR for anything whose signature cannot be verified
with the business number's tenant (unsigned, a bad signature, a number no tenant owns), the same answer
whatever the (From, To) pair, nothing stored; 503 DATABASE_ERROR / QUEUE_ERROR / SERVICE_UNAVAILABLE with
Retry-After on a transient AWS failure so Twilio retries; 400 INVALID_REQUEST for a form without the fields
every Twilio webhook carries.
"""

from __future__ import annotations

import uuid

import structlog
from aiohttp import web
from pydantic import ValidationError

from service.api.middleware import RETRY_AFTER_S
from service.api.request_bodies import read_form
from service.api.responses import error_response
from service.api.state import DEPS, REQUEST_ID
from service.domain.errors import DependencyUnavailable, ErrorCode
from service.domain.inbound import InvalidInbound, inbound_from_form
from service.domain.inbound_intake import IntakeResult, SignedRequest

log = structlog.get_logger(__name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
SIGNATURE_HEADER = "X-Twilio-Signature"
# The form field each InboundMessage field comes from (for refusals that name them).
FORM_FIELD = {"message_sid": "MessageSid", "sender": "From", "company_address": "To", "body": "Body"}
_UNAVAILABLE_CODES = {"dynamodb": ErrorCode.DATABASE_ERROR, "sqs": ErrorCode.QUEUE_ERROR}


def public_url(request: web.Request, public_base_url: str | None) -> str:
    """The URL Twilio signed: the configured public base URL, else what the ingress forwarded, else ours."""
    path = str(request.rel_url)  # path and query string, as sent
    if public_base_url:
        return public_base_url.rstrip("/") + path
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}{path}"


async def _signed(request: web.Request) -> SignedRequest:
    params = await read_form(request)
    url = public_url(request, request.app[DEPS].settings.public_base_url)
    return SignedRequest(url, params, request.headers.get(SIGNATURE_HEADER, ""))


def _request_id(request: web.Request) -> str:
    return request.get(REQUEST_ID) or str(uuid.uuid4())


def _answer(kind: str, result: IntakeResult, request: web.Request) -> web.Response:
    request.app[DEPS].api_metrics.webhooks.labels(kind=kind, result=result.value).inc()
    if result is IntakeResult.FORBIDDEN:
        # One answer for every unverifiable request, whatever the pair: nothing about conversations leaks.
        return error_response(ErrorCode.AUTHORIZATION_ERROR, "invalid signature", _request_id(request), status=403)
    return web.Response(text=EMPTY_TWIML, content_type="text/xml")


def _unavailable(kind: str, request: web.Request, exc: DependencyUnavailable) -> web.Response:
    request.app[DEPS].api_metrics.webhooks.labels(kind=kind, result="unavailable").inc()
    log.warning("webhook_dependency_unavailable", service=exc.service, operation=exc.operation, detail=exc.detail)
    code = _UNAVAILABLE_CODES.get(exc.service, ErrorCode.SERVICE_UNAVAILABLE)
    return error_response(
        code, f"{exc.service} is unavailable; retry later", _request_id(request), retry_after_s=RETRY_AFTER_S
    )


async def twilio_inbound(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    signed = await _signed(request)
    try:
        message = inbound_from_form(channel, signed.params)
    except InvalidInbound:
        return error_response(
            ErrorCode.INVALID_REQUEST, "MessageSid, From and To are required", _request_id(request), status=400
        )
    except ValidationError as exc:  # present but over a limit: name the fields, never their values
        fields = ", ".join(sorted({FORM_FIELD.get(str(e["loc"][0]), str(e["loc"][0])) for e in exc.errors()}))
        return error_response(
            ErrorCode.INVALID_REQUEST, f"{fields}: over the length a Twilio webhook carries", _request_id(request)
        )
    try:
        result = await request.app[DEPS].intake.receive(message, signed)
    except DependencyUnavailable as exc:
        return _unavailable(channel, request, exc)
    return _answer(channel, result, request)


async def twilio_status(request: web.Request) -> web.Response:
    signed = await _signed(request)
    try:
        result = await request.app[DEPS].intake.delivery_status(signed.params, signed)
    except DependencyUnavailable as exc:
        return _unavailable("status", request, exc)
    return _answer("status", result, request)
