"""Reading a request's body whatever the client sent: the raw bytes of an initiate (bounded), the form of a Twilio
webhook. A body the server cannot decode (a Content-Encoding it does not have, a form in an unknown charset or not
UTF-8, anything but a URL-encoded form on a webhook) is 400 INVALID_REQUEST, never a 500: none of it is the
service's fault, and a webhook's form is read before its signature can be checked, so anyone can send it."""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from service.domain.errors import ApiError, ErrorCode

# Twilio posts every webhook as a URL-encoded form (charset UTF-8).
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# What aiohttp raises for a body it cannot take apart: the payload's framing or encoding, then the form's text.
UNREADABLE_PAYLOAD = (BadHttpMessage, RequestPayloadError)
UNREADABLE_FORM = (*UNREADABLE_PAYLOAD, ValueError, LookupError)  # UnicodeDecodeError is a ValueError


async def read_limited_body(request: web.Request, limit: int) -> bytes:
    """The whole raw body, however framed and segmented, or 413 PAYLOAD_TOO_LARGE as soon as it is
    known to exceed `limit` (from Content-Length, or once more than `limit` bytes have arrived)."""
    too_large = ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"request body exceeds {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    # One read answers with what is buffered, not the whole body: read until EOF.
    parts: list[bytes] = []
    received = 0
    try:
        while chunk := await request.content.readany():
            received += len(chunk)
            if received > limit:
                raise too_large
            parts.append(chunk)
    except UNREADABLE_PAYLOAD as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, "request body could not be decoded") from exc
    return b"".join(parts)


async def read_form(request: web.Request) -> dict[str, str]:
    """A webhook's form fields (the last value of a repeated name, as the signature check sees it too)."""
    if request.content_type != FORM_CONTENT_TYPE:
        raise ApiError(ErrorCode.INVALID_REQUEST, f"a Twilio webhook is a form ({FORM_CONTENT_TYPE})")
    try:
        form = await request.post()
    except UNREADABLE_FORM as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, "form could not be decoded (URL-encoded UTF-8 expected)") from exc
    return {name: value for name, value in form.items() if isinstance(value, str)}
