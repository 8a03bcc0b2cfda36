"""Validation of a POST /initiate-conversation body (SPEC §2), first failure wins.

`validate_initiate_body` turns untrusted JSON into an `InitiateRequest` or raises
`ApiError` with the code of the first rule broken. Pure: no I/O, no clock.

Values are taken exactly as sent, never normalised (trimmed, re-cased, re-digited):
a value that carries whitespace at either end or a control character anywhere is
refused, because the raw string is what keys the opt-out list, the idempotency
claim and the conversation id, and what a provider is given to send to.
- request_id -> INVALID_REQUEST_ID, recipient_tel -> INVALID_RECIPIENT_TEL,
  recipient_email -> INVALID_RECIPIENT_EMAIL, initial_request_timestamp ->
  INVALID_TIMESTAMP, channel_method (e.g. " whatsapp ") -> UNSUPPORTED_CHANNEL;
  channel_method stays case-insensitive as SPEC says ("WhatsApp" -> "whatsapp").
- company_id / project_id -> INVALID_REQUEST (missing or blank stays MISSING_IDENTIFIERS).
- Every pattern must match the whole string (`fullmatch`: `$` would also match
  before a trailing newline) and uses ASCII classes (`[0-9]`, never `\\d`, which
  also accepts Arabic-Indic or fullwidth digits).
- A recipient address given for the other kind of channel (a tel on an email
  request, an email on a whatsapp/sms one) is optional but, when given, must be
  valid too: it is stored with the conversation.
- "Control character" means Unicode categories Cc (C0, DEL, C1 such as U+0085),
  Cf (format: zero-width and bidi controls), Zl/Zp (U+2028/U+2029) and Cs.

Nesting: project_data may be at most MAX_PROJECT_DATA_DEPTH levels deep (a flat
object is 1; lists count as levels) -> else INVALID_PROJECT_DATA; every other
top-level value likewise -> else INVALID_REQUEST. The conversation record keeps
project_data one level below a DynamoDB item (limit 32 levels), and the queue
serialiser refuses past ~254. The check is iterative and stops at the first
level past the limit, and runs right after the section type checks, before
anything reads inside a nested value.

Storable: a number DynamoDB cannot hold (magnitude 1e126 and up, or below 1e-130 but not 0) or a string holding
U+FFFE/U+FFFF (outside SQS's character set) anywhere in the body -> INVALID_PROJECT_DATA inside project_data,
INVALID_REQUEST elsewhere; accepted, the message would be lost after the caller's 200.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.domain.errors import ApiError, ErrorCode

SUPPORTED_CHANNELS = ("whatsapp", "sms", "email")
MAX_PROJECT_DATA_DEPTH = 16
# Every other top-level part of the body is held to the same depth.
MAX_SECTION_DEPTH = MAX_PROJECT_DATA_DEPTH

# The exported patterns are JSON Schema (ECMA-262) patterns for the OpenAPI document, where `$` is the end of
# the string. Python's `$` also matches before a trailing newline, so here they are only ever used with fullmatch.
UUID4_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
E164_PATTERN = r"^\+[1-9][0-9]{7,14}$"
_UUID4 = re.compile(UUID4_PATTERN, re.ASCII)
_E164 = re.compile(E164_PATTERN, re.ASCII)
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+",
    re.ASCII,
)
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# DynamoDB's number range (magnitude; 0 too), and the characters of a JSON body SQS refuses (`unstorable_reason`).
DYNAMODB_MIN, DYNAMODB_MAX = 1e-130, 1e126
_NOT_FOR_SQS = re.compile("[\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class InitiateRequest:
    """A body that passed every shape rule; `body` is the normalised original for the queue."""

    company_id: str
    project_id: str
    request_id: str
    channel: str
    initial_request_timestamp: str
    recipient_tel: str | None
    recipient_email: str | None
    body: dict[str, Any]

    @property
    def recipient(self) -> str:
        """The address the channel sends to: the phone number, or the email for email."""
        address = self.recipient_email if self.channel == "email" else self.recipient_tel
        assert address is not None  # guaranteed by validation
        return address


def payload_request_id(body: object) -> str | None:
    """The caller's request_id, for echoing in errors, when it is one (a UUID v4): anything else is not echoed
    (a request_id of 60 KiB, or holding a NUL or a newline, would come back whole in every refusal)."""
    if isinstance(body, dict):
        request_data = body.get("request_data")
        if isinstance(request_data, dict):
            value = request_data.get("request_id")
            if isinstance(value, str) and _UUID4.fullmatch(value):
                return value
    return None


def has_control_characters(value: str) -> bool:
    """True if any character is a control, format or line/paragraph separator character."""
    return any(unicodedata.category(char) in _CONTROL_CATEGORIES for char in value)


def is_clean_text(value: str) -> bool:
    """No whitespace at either end and no control character anywhere: a value usable exactly as sent."""
    return value == value.strip() and not has_control_characters(value)


def is_valid_e164(value: str) -> bool:
    return _E164.fullmatch(value) is not None


def is_valid_email(value: str) -> bool:
    return len(value) <= 254 and _EMAIL.fullmatch(value) is not None


def is_iso8601_with_zone(value: str) -> bool:
    # fromisoformat skips one arbitrary character before the zone ("…56\nZ", "…56 Z"): only plain ASCII reaches it.
    if not value.isascii() or not value.isprintable() or " " in value:
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return "T" in value.upper() and parsed.tzinfo is not None


def _depth_exceeds(value: object, limit: int) -> bool:
    """True if `value` nests dicts/lists more than `limit` levels (a flat container is 1; a scalar is 0).

    Iterative (no Python recursion), and it never looks inside a container past the
    limit, so a pathological structure costs at most the part of it within the limit.
    """
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        children: Iterable[Any] = current.values() if isinstance(current, dict) else current
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def unstorable_reason(value: object) -> str | None:
    """What in `value` (walked iteratively; its depth is already bounded) DynamoDB or SQS would refuse, else None:
    a number outside DynamoDB's range (|x| from 1e-130 to below 1e126, or 0), or a string or key holding U+FFFE or
    U+FFFF, the two characters of the BMP outside SQS's message character set (a JSON body writes them as they are).
    Accepted, either would be lost after the caller's 200: the queue send or the consumer's first write refused."""
    stack: list[object] = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, float) and current != 0 and not DYNAMODB_MIN <= abs(current) < DYNAMODB_MAX:
            return f"the number {current!r} is outside what DynamoDB stores"
        if isinstance(current, str) and _NOT_FOR_SQS.search(current):
            return "a string holds U+FFFE or U+FFFF, which SQS refuses"
        if isinstance(current, dict):
            stack.extend(current.keys())
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return None


def _check_storable(body: dict[str, Any], project_data: dict[str, Any]) -> None:
    for name, value in body.items():
        problem = unstorable_reason(project_data if name == "project_data" else value)
        if problem:
            code = ErrorCode.INVALID_PROJECT_DATA if name == "project_data" else ErrorCode.INVALID_REQUEST
            raise ApiError(code, f"'{name}': {problem}")


def _section(body: dict[str, Any], name: str, missing: ErrorCode, invalid: ErrorCode) -> dict[str, Any]:
    if name not in body or body[name] is None:
        raise ApiError(missing, f"'{name}' is required")
    value = body[name]
    if not isinstance(value, dict):
        raise ApiError(invalid, f"'{name}' must be a JSON object")
    return value


def _identifier(company_data: dict[str, Any], name: str) -> str:
    value = company_data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(ErrorCode.MISSING_IDENTIFIERS, f"company_data.{name} is required and must be a non-empty string")
    if not is_clean_text(value):
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"company_data.{name} must not contain whitespace at either end or control characters",
        )
    return value


def _request_field(request_data: dict[str, Any], name: str, missing: ErrorCode, invalid: ErrorCode) -> str:
    if name not in request_data or request_data[name] is None:
        raise ApiError(missing, f"request_data.{name} is required")
    value = request_data[name]
    if not isinstance(value, str) or not value.strip():
        raise ApiError(invalid, f"request_data.{name} must be a non-empty string")
    return value


def _check_tel(tel: object) -> None:
    if tel is None or tel == "":
        return
    if not isinstance(tel, str) or not is_valid_e164(tel):
        raise ApiError(ErrorCode.INVALID_RECIPIENT_TEL, "recipient_tel must be E.164: '+' then 8 to 15 digits")


def _check_email(email: object) -> None:
    if email is None or email == "":
        return
    if not isinstance(email, str) or not is_valid_email(email):
        raise ApiError(ErrorCode.INVALID_RECIPIENT_EMAIL, "recipient_email is not a valid email address")


def _check_nesting(body: dict[str, Any], project_data: dict[str, Any]) -> None:
    """Refuse nesting the stores and the serialiser cannot take, before anything reads inside it."""
    if _depth_exceeds(project_data, MAX_PROJECT_DATA_DEPTH):
        raise ApiError(
            ErrorCode.INVALID_PROJECT_DATA,
            f"'project_data' must not be nested more than {MAX_PROJECT_DATA_DEPTH} levels deep",
        )
    for name, value in body.items():
        if name != "project_data" and _depth_exceeds(value, MAX_SECTION_DEPTH):
            raise ApiError(
                ErrorCode.INVALID_REQUEST, f"'{name}' must not be nested more than {MAX_SECTION_DEPTH} levels deep"
            )


def validate_identifiers(body: object) -> tuple[str, str]:
    """The company_id and project_id of a body, checked before authorisation is decided."""
    if not isinstance(body, dict):
        raise ApiError(ErrorCode.INVALID_REQUEST, "request body must be a JSON object")
    company_data = _section(body, "company_data", ErrorCode.MISSING_COMPANY_DATA, ErrorCode.INVALID_COMPANY_DATA_TYPE)
    return _identifier(company_data, "company_id"), _identifier(company_data, "project_id")


def validate_initiate_body(body: object) -> InitiateRequest:
    """Apply every SPEC §2 shape rule in order; raise `ApiError` on the first one broken."""
    company_id, project_id = validate_identifiers(body)
    assert isinstance(body, dict)
    recipient = _section(
        body, "recipient_data", ErrorCode.MISSING_RECIPIENT_DATA, ErrorCode.INVALID_RECIPIENT_DATA_TYPE
    )
    request = _section(body, "request_data", ErrorCode.MISSING_REQUEST_DATA, ErrorCode.INVALID_REQUEST_DATA_TYPE)
    project_data = body.get("project_data", {})
    if project_data is None:
        project_data = {}
    if not isinstance(project_data, dict):
        raise ApiError(ErrorCode.INVALID_PROJECT_DATA_TYPE, "'project_data' must be a JSON object")
    _check_nesting(body, project_data)

    request_id = _request_field(
        request, "request_id", ErrorCode.MISSING_REQUEST_ID, ErrorCode.INVALID_REQUEST_ID_FORMAT
    )
    channel_raw = _request_field(
        request, "channel_method", ErrorCode.MISSING_CHANNEL_METHOD, ErrorCode.INVALID_CHANNEL_METHOD_FORMAT
    )
    timestamp = _request_field(
        request,
        "initial_request_timestamp",
        ErrorCode.MISSING_INITIAL_REQUEST_TIMESTAMP,
        ErrorCode.INVALID_INITIAL_REQUEST_TIMESTAMP_FORMAT,
    )
    if _UUID4.fullmatch(request_id) is None:
        raise ApiError(ErrorCode.INVALID_REQUEST_ID, "request_id must be a lowercase hyphenated UUID v4")
    # ASCII only before lowering: no lookalike letter may fold into a supported name.
    channel = channel_raw.lower() if channel_raw.isascii() else channel_raw
    if channel not in SUPPORTED_CHANNELS:
        raise ApiError(ErrorCode.UNSUPPORTED_CHANNEL, f"channel_method must be one of {', '.join(SUPPORTED_CHANNELS)}")
    if not is_iso8601_with_zone(timestamp):
        raise ApiError(ErrorCode.INVALID_TIMESTAMP, "initial_request_timestamp must be ISO 8601 with a time zone")

    tel = recipient.get("recipient_tel")
    email = recipient.get("recipient_email")
    if channel in ("whatsapp", "sms") and (tel is None or tel == ""):
        raise ApiError(ErrorCode.MISSING_RECIPIENT_TEL, f"recipient_data.recipient_tel is required for {channel}")
    if channel == "email" and (email is None or email == ""):
        raise ApiError(ErrorCode.MISSING_RECIPIENT_EMAIL, "recipient_data.recipient_email is required for email")
    # The channel's own address first; the other one is optional but must be valid when given.
    if channel == "email":
        _check_email(email)
        _check_tel(tel)
    else:
        _check_tel(tel)
        _check_email(email)

    if "comms_consent" not in recipient or recipient["comms_consent"] is None:
        raise ApiError(ErrorCode.MISSING_COMMS_CONSENT, "recipient_data.comms_consent is required")
    consent = recipient["comms_consent"]
    if not isinstance(consent, bool):
        raise ApiError(ErrorCode.INVALID_COMMS_CONSENT_TYPE, "recipient_data.comms_consent must be a boolean")
    if not consent:
        raise ApiError(ErrorCode.CONSENT_REQUIRED, "the recipient has not consented to communications")

    _check_storable(body, project_data)  # last: a field's own rule names what is wrong with it first
    normalised = {**body, "project_data": project_data, "request_data": {**request, "channel_method": channel}}
    return InitiateRequest(
        company_id=company_id,
        project_id=project_id,
        request_id=request_id,
        channel=channel,
        initial_request_timestamp=timestamp,
        recipient_tel=tel if isinstance(tel, str) and tel else None,
        recipient_email=email if isinstance(email, str) and email else None,
        body=normalised,
    )
