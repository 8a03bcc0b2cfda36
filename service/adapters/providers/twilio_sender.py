"""WhatsApp and SMS sends through Twilio's Messages API, and the look-up that reconciles an unknown outcome.

One Twilio `Client` per account (cached), all on one shared pooled `AsyncTwilioHttpClient`. Every call runs
under `asyncio.timeout`; failures become the provider ports' errors by HTTP status and Twilio error code.
While tracing is on, each SDK call is a CLIENT span (channel, message sid and status, or the failure's kind).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import orjson
import structlog
from opentelemetry.trace import Span
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from service import tracing
from service.adapters.providers.twilio_client import build_twilio_client
from service.domain.provider_ports import (
    OutboundMessage,
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    SendOutcomeUnknown,
    SentMessage,
    TransientProviderError,
)

__all__ = ["TwilioSender", "classify_twilio_error"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

WHATSAPP_PREFIX = "whatsapp:"
CHANNELS = frozenset({"whatsapp", "sms"})
LOOKUP_LIMIT = 20
# Our clock and Twilio's may disagree a little, and Twilio keeps whole seconds: look this far before `since`.
CLOCK_SKEW_S = 5.0
TWILIO_ERRORS = (TwilioRestException, TwilioServiceException)
SEND_FAILURES = (*TWILIO_ERRORS, aiohttp.ClientError, TimeoutError, ValueError)
LOOKUP_FAILURES = (TwilioException, aiohttp.ClientError, TimeoutError)


class TwilioSender:
    """`MessageSender` for `whatsapp` and `sms`.

    `http_client` is shared by every account's `Client`; the caller owns it unless `owns_http_client`
    is True, in which case `close()` closes it. `base_url` points the SDK at a sandbox (None: Twilio).
    `timeout_s` bounds each API call as a whole (the SDK's async client has no overall timeout).
    """

    def __init__(
        self,
        http_client: AsyncTwilioHttpClient,
        base_url: str | None,
        timeout_s: float,
        *,
        owns_http_client: bool = False,
        max_clients: int = 1_000,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self._http_client = http_client
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._owns_http_client = owns_http_client
        self._max_clients = max_clients
        self._clients: OrderedDict[tuple[str, str], Client] = OrderedDict()

    async def send(self, message: OutboundMessage) -> SentMessage:
        client = self._client_for(message.credentials)
        params = create_params(message)
        with tracing.client_span("twilio", "messages.create", comms__channel=message.channel) as span:
            try:
                created = await self._bounded(client.messages.create_async(**params))
            except SEND_FAILURES as exc:
                raise traced(span, logged(send_failure(exc), message.channel)) from exc
            tracing.set_attributes(span, twilio__message_sid=str(created.sid), twilio__status=created.status)
        log.info("twilio.sent", channel=message.channel, message_sid=created.sid, status=created.status)
        return SentMessage(provider_message_id=str(created.sid), status=created.status)

    async def find_sent(self, message: OutboundMessage, since_epoch_s: float) -> SentMessage | None:
        """The newest message Twilio holds that matches `message` (see `is_same_message`), else None."""
        client = self._client_for(message.credentials)
        to, from_ = addresses(message)
        start = lookup_start(since_epoch_s)
        with tracing.client_span("twilio", "messages.list", comms__channel=message.channel) as span:
            try:
                records = await self._bounded(
                    client.messages.list_async(to=to, from_=from_, date_sent_after=start, limit=LOOKUP_LIMIT)
                )
            except LOOKUP_FAILURES as exc:
                raise traced(span, logged(lookup_failure(exc), message.channel)) from exc
            tracing.set_attributes(span, twilio__candidates=len(records))
        found = next((record for record in records if is_same_message(record, message, since_epoch_s)), None)
        log.info("twilio.lookup", channel=message.channel, candidates=len(records), found=found is not None)
        return None if found is None else SentMessage(provider_message_id=str(found.sid), status=found.status)

    async def close(self) -> None:
        self._clients.clear()
        if self._owns_http_client:
            await self._http_client.close()

    async def _bounded(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(self._timeout_s):
            return await call

    def _client_for(self, credentials: dict[str, str]) -> Client:
        account_sid = credentials.get("twilio_account_sid", "")
        auth_token = credentials.get("twilio_auth_token", "")
        if not account_sid or not auth_token:
            raise PermanentProviderError("twilio_credentials_missing")
        key = (account_sid, auth_token)
        client = self._clients.get(key)
        if client is None:
            client = build_twilio_client(
                account_sid, auth_token, base_url=self._base_url, http_client=self._http_client
            )
            self._clients[key] = client
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
        self._clients.move_to_end(key)
        return client


def channel_address(channel: str, number: str) -> str:
    """`whatsapp:+E164` for WhatsApp (added once), the bare number for SMS."""
    if channel == "whatsapp" and not number.startswith(WHATSAPP_PREFIX):
        return WHATSAPP_PREFIX + number
    return number


def addresses(message: OutboundMessage) -> tuple[str, str]:
    """(To, From) as Twilio stores them for this channel."""
    if message.channel not in CHANNELS:
        raise PermanentProviderError("unsupported_channel", code=message.channel)
    return channel_address(message.channel, message.recipient), channel_address(message.channel, message.sender)


def create_params(message: OutboundMessage) -> dict[str, Any]:
    """Keyword arguments for `messages.create_async`: a WhatsApp template, or a body (SMS, WhatsApp reply)."""
    to, from_ = addresses(message)
    params: dict[str, Any] = {"to": to, "from_": from_}
    if message.channel == "whatsapp" and message.content_sid:
        params["content_sid"] = message.content_sid
        if message.content_variables:
            params["content_variables"] = orjson.dumps(message.content_variables).decode()
    elif message.body:
        params["body"] = message.body
    else:
        raise PermanentProviderError("message_body_missing", code=message.channel)
    if message.status_callback_url:
        params["status_callback"] = message.status_callback_url
    return params


def lookup_start(since_epoch_s: float) -> datetime:
    """The `DateSent>=` bound: `since` less the clock skew allowance, in whole UTC seconds."""
    return datetime.fromtimestamp(math.floor(since_epoch_s - CLOCK_SKEW_S), UTC)


def is_same_message(record: Any, message: OutboundMessage, since_epoch_s: float) -> bool:
    """Same To and From, created no earlier than `lookup_start`, and for a body send the same body (ignoring
    surrounding whitespace). A template send has no body check: Twilio stores the rendered text, which only it knows.
    """
    to, from_ = addresses(message)
    if record.to != to or record.from_ != from_:
        return False
    created: datetime | None = record.date_created or record.date_sent
    if created is not None and created.timestamp() < lookup_start(since_epoch_s).timestamp():
        return False
    if message.channel == "whatsapp" and message.content_sid:
        return True
    return (record.body or "").strip() == (message.body or "").strip()


def classify_twilio_error(exc: TwilioRestException | TwilioServiceException) -> ProviderError:
    """4xx but 429: permanent (21211 invalid To, 63016 outside the 24 h window, 20003 auth, ...).
    429 and 5xx: transient, not sent. 504 (a gateway gave up waiting): the message may have been sent."""
    status = int(exc.status)
    code = str(exc.code) if exc.code is not None else str(status)
    if status == 504:
        return SendOutcomeUnknown("twilio_outcome_unknown", code=code)
    if status == 429:  # 20429 and the like: over the sender's (or account's) rate
        return ProviderRateLimited("twilio_rate_limited", code=code)
    if status >= 500:
        return TransientProviderError("twilio_unavailable", code=code)
    if 400 <= status < 500:
        return PermanentProviderError("twilio_rejected", code=code)
    return SendOutcomeUnknown("twilio_unexpected_status", code=code)


def send_failure(exc: Exception) -> ProviderError:
    """Not sent (refused, throttled, no connection) versus perhaps sent (timeout, dropped, unreadable answer)."""
    if isinstance(exc, TWILIO_ERRORS):
        return classify_twilio_error(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):  # no connection was made: nothing was written
        return TransientProviderError("twilio_unreachable", code=type(exc).__name__)
    if isinstance(exc, ValueError):  # a 2xx that is not JSON: Twilio may well have accepted the message
        return SendOutcomeUnknown("twilio_unreadable_answer", code=type(exc).__name__)
    return SendOutcomeUnknown("twilio_outcome_unknown", code=type(exc).__name__)


def lookup_failure(exc: Exception) -> ProviderError:
    """A failed look-up: permanent when Twilio refuses us (e.g. 20003, revoked credentials), else transient."""
    if isinstance(exc, TWILIO_ERRORS):
        status: int | None = int(exc.status)
        code = str(exc.code or exc.status)
    elif isinstance(exc, TwilioException):  # a list page that is not a 200 arrives as a bare TwilioException
        status = page_status(exc)
        code = str(status)
    else:
        status, code = None, type(exc).__name__
    if status is not None and 400 <= status < 500 and status != 429:
        return PermanentProviderError("twilio_lookup_failed", code=code)
    return TransientProviderError("twilio_lookup_failed", code=code)


def page_status(exc: TwilioException) -> int | None:
    """The HTTP status of the response a page-level TwilioException carries, when it carries one."""
    response = exc.args[1] if len(exc.args) > 1 else None
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def traced(span: Span | None, failure: ProviderError) -> ProviderError:
    """The failure on the call's span by kind, reason and Twilio code (never Twilio's text: it quotes numbers)."""
    tracing.set_attributes(span, comms__failure_reason=failure.reason, twilio__error_code=failure.code)
    tracing.mark_failed(span, type(failure).__name__)
    return failure


def logged(failure: ProviderError, channel: str) -> ProviderError:
    log.warning("twilio.failed", channel=channel, kind=type(failure).__name__, reason=failure.reason, code=failure.code)
    return failure
