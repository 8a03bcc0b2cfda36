"""Email sends through SendGrid's v3 mail send API over the service's shared aiohttp session.

Owns the request body (from, subject, text and HTML content, `custom_args`) and the mapping of SendGrid's
answers to the provider ports' errors. SendGrid v3 offers no cheap per-message look-up, so `find_sent` refuses.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import structlog

from service.domain.provider_ports import (
    OutboundMessage,
    PermanentProviderError,
    ProviderError,
    SendOutcomeUnknown,
    SentMessage,
    TransientProviderError,
)

__all__ = ["SendGridSender", "classify_sendgrid_answer", "mail_body"]

log = structlog.get_logger(__name__)

MAIL_SEND_PATH = "/v3/mail/send"
MAX_REASON_CHARS = 300


class SendGridSender:
    """`MessageSender` for `email`. The caller owns `session` (one per process) and closes it.
    `base_url` is the API root (https://api.sendgrid.com, or a sandbox); `timeout_s` bounds each send."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self._session = session
        self._url = base_url.rstrip("/") + MAIL_SEND_PATH
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(self, message: OutboundMessage) -> SentMessage:
        api_key = message.credentials.get("sendgrid_api_key", "")
        if not api_key:
            raise PermanentProviderError("sendgrid_credentials_missing")
        payload = orjson.dumps(mail_body(message))
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        try:
            async with self._session.post(self._url, data=payload, headers=headers, timeout=self._timeout) as answer:
                status, answer_headers, raw = answer.status, answer.headers, await answer.read()
        except aiohttp.ClientConnectorError as exc:  # no connection was made: nothing was sent
            raise logged(TransientProviderError("sendgrid_unreachable", code=type(exc).__name__)) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:  # the request may have been written
            raise logged(SendOutcomeUnknown("sendgrid_outcome_unknown", code=type(exc).__name__)) from exc
        if 200 <= status < 300:
            return accepted(answer_headers.get("X-Message-Id"), message.reference)
        raise logged(classify_sendgrid_answer(status, answer_headers, raw))

    async def find_sent(self, message: OutboundMessage, since_epoch_s: float) -> SentMessage | None:
        """SendGrid v3 has no per-message look-up without the paid Email Activity add-on: mark for review."""
        raise PermanentProviderError("sendgrid_lookup_unsupported")


def mail_body(message: OutboundMessage) -> dict[str, Any]:
    """The v3 mail send body: one recipient, plain text first and a simple HTML version of the same text."""
    text = message.body or ""
    if not text.strip() or not (message.subject or "").strip():
        raise PermanentProviderError("email_content_missing")
    sender: dict[str, str] = {"email": message.credentials.get("from_email") or message.sender}
    name = message.credentials.get("from_name") or message.sender_name
    if name:
        sender["name"] = name
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": message.recipient}]}],
        "from": sender,
        "subject": message.subject,
        "content": [{"type": "text/plain", "value": text}, {"type": "text/html", "value": html_version(text)}],
    }
    if message.reference:
        body["custom_args"] = {"conversation_id": message.reference}
    return body


def html_version(text: str) -> str:
    """Paragraphs on blank lines, line breaks within them, everything escaped."""
    paragraphs = [part.strip() for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]
    return "".join(f"<p>{html.escape(part).replace(chr(10), '<br>')}</p>" for part in paragraphs)


def accepted(message_id: str | None, reference: str | None) -> SentMessage:
    if not message_id:  # accepted all the same: never report a sent mail as failed
        log.warning("sendgrid.accepted_without_message_id", reference=reference)
    else:
        log.info("sendgrid.sent", message_id=message_id, reference=reference)
    return SentMessage(provider_message_id=message_id or "", status="accepted")


def classify_sendgrid_answer(status: int, headers: Mapping[str, str], raw: bytes) -> ProviderError:
    """429/5xx: transient (Retry-After honoured); 504: outcome unknown; other statuses: permanent."""
    code = str(status)
    if status == 504:
        return SendOutcomeUnknown("sendgrid_outcome_unknown", code=code)
    if status == 429 or status >= 500:
        return TransientProviderError("sendgrid_unavailable", code=code, retry_after_s=retry_after_s(headers))
    return PermanentProviderError(first_error_message(raw) or f"sendgrid rejected the mail ({status})", code=code)


def first_error_message(raw: bytes) -> str | None:
    """`errors[0].message` from SendGrid's error body, shortened; None when the body has none."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    message = errors[0].get("message")
    return str(message)[:MAX_REASON_CHARS] if message else None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` (seconds or HTTP date), else SendGrid's `X-RateLimit-Reset` (epoch seconds)."""
    raw = headers.get("Retry-After")
    if raw is not None:
        try:
            return max(float(raw), 0.0)
        except ValueError:
            pass
        try:
            return max(parsedate_to_datetime(raw).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None
    reset = headers.get("X-RateLimit-Reset")
    try:
        return max(float(reset) - time.time(), 0.0) if reset is not None else None
    except ValueError:
        return None


def logged(failure: ProviderError) -> ProviderError:
    log.warning("sendgrid.failed", kind=type(failure).__name__, reason=failure.reason, code=failure.code)
    return failure
