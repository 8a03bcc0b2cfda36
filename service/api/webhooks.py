"""Twilio webhooks: inbound messages and status callbacks (SPEC §7).

Answers fast with empty TwiML: every slow step (AI, sending) happens on the replies queue.
403 for a missing or invalid signature (nothing stored), 503 on a transient AWS failure so
Twilio retries, 400 for a form without the fields every Twilio webhook carries.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from service.api.state import DEPS
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import InvalidInbound, inbound_from_form
from service.domain.inbound_intake import IntakeResult, SignedRequest

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
SIGNATURE_HEADER = "X-Twilio-Signature"


def public_url(request: web.Request, public_base_url: str | None) -> str:
    """The URL Twilio signed: the configured public base URL, else what the ingress forwarded, else ours."""
    path = str(request.rel_url)  # path and query string, as sent
    if public_base_url:
        return public_base_url.rstrip("/") + path
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}{path}"


async def _signed(request: web.Request) -> SignedRequest:
    form = await request.post()
    params = {name: value for name, value in form.items() if isinstance(value, str)}
    url = public_url(request, request.app[DEPS].settings.public_base_url)
    return SignedRequest(url, params, request.headers.get(SIGNATURE_HEADER, ""))


def _answer(kind: str, result: IntakeResult, request: web.Request) -> web.Response:
    request.app[DEPS].api_metrics.webhooks.labels(kind=kind, result=result.value).inc()
    if result is IntakeResult.FORBIDDEN:
        return web.Response(status=403, text="invalid signature")
    return web.Response(text=EMPTY_TWIML, content_type="text/xml")


def _unavailable(kind: str, request: web.Request) -> web.Response:
    request.app[DEPS].api_metrics.webhooks.labels(kind=kind, result="unavailable").inc()
    return web.Response(status=503, text="temporarily unavailable", headers={"Retry-After": "5"})


async def twilio_inbound(request: web.Request) -> web.Response:
    channel = request.match_info["channel"]
    signed = await _signed(request)
    try:
        message = inbound_from_form(channel, signed.params)
    except (InvalidInbound, ValidationError):
        return web.Response(status=400, text="MessageSid, From and To are required")
    try:
        result = await request.app[DEPS].intake.receive(message, signed)
    except DependencyUnavailable:
        return _unavailable(channel, request)
    return _answer(channel, result, request)


async def twilio_status(request: web.Request) -> web.Response:
    signed = await _signed(request)
    try:
        result = await request.app[DEPS].intake.delivery_status(signed.params, signed)
    except DependencyUnavailable:
        return _unavailable("status", request)
    return _answer("status", result, request)
