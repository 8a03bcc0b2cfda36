"""A local stand-in for Twilio's Messages API (2010-04-01) that the real twilio SDK can be pointed at.

Owns message create/fetch/list with Twilio's validation, error codes and JSON shapes, Basic
auth, signed status callbacks, signed inbound-message webhooks, and its `/_sandbox/twilio/*` controls.

Controls (on top of sandbox_http's latency/faults/requests/reset):
    POST   /_sandbox/twilio/recipients {"number": "+447700900999", "status": 400, "code": 63016, "message": "..."}
    DELETE /_sandbox/twilio/recipients                  (forget every programmed failure)
    POST   /_sandbox/twilio/callbacks  {"enabled": true, "delay_s": 0.05}
    POST   /_sandbox/twilio/sender-limit {"per_second": 80}  each sender's rate (null: none); past it, sends
                                        from that sender answer 429 with error 20429, as Twilio's do
                                        (or {"max_sends": 2, "window_s": 600}: that many per window)
    POST   /_sandbox/twilio/inbound    {"url", "from", "to", "body", "account_sid"; optional "auth_token",
                                        "profile_name", "message_sid", "extra": {...}}
    GET    /_sandbox/twilio/messages   [?to=...]          every message created, plus what the resource hides
    GET    /_sandbox/twilio/stats                          counts and peak in-flight API requests
    POST   /_sandbox/twilio/reset                          forget messages, programmed failures and counts
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import MultiDictProxy
from twilio.request_validator import RequestValidator

from local_stack.sandbox_http import Handler, SandboxControl, json_response, new_sandbox_app

__all__ = [
    "TWILIO_STATE_KEY",
    "ProgrammedFailure",
    "RequestGauge",
    "TwilioApiError",
    "TwilioMessage",
    "TwilioSandboxState",
    "create_twilio_sandbox",
    "gauge_middleware",
    "post_signed_form",
    "read_json_object",
    "required_text",
]

log = structlog.get_logger("local_stack.twilio_sandbox")

API_VERSION = "2010-04-01"
API_PREFIX = f"/{API_VERSION}/"
MESSAGES_PATH = f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json"
MESSAGE_PATH = f"/{API_VERSION}/Accounts/{{account_sid}}/Messages/{{sid}}.json"
WHATSAPP = "whatsapp:"
MAX_BODY_CHARS = 1600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
CALLBACK_TIMEOUT_S = 15.0  # Twilio gives a webhook 15 s before it logs error 11200
SIGNATURE_HEADER = "X-Twilio-Signature"

_E164 = re.compile(r"^\+[1-9]\d{7,14}$")
_SHORT_CODE = re.compile(r"^\d{5,6}$")
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("^{}\\[~]|€")


# ----------------------------------------------------------------------------- errors


class TwilioApiError(Exception):
    """An error Twilio answers with: HTTP status plus a Twilio error code and message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


def authentication_error() -> TwilioApiError:
    return TwilioApiError(401, 20003, "Authenticate")


def not_found_error(path: str) -> TwilioApiError:
    return TwilioApiError(404, 20404, f"The requested resource {path} was not found")


def invalid_parameter_error(name: str, value: str) -> TwilioApiError:
    # Twilio answers an unusable query parameter with a 400; 20001 is its generic "invalid parameter".
    return TwilioApiError(400, 20001, f"Invalid {name}: {value}")


@web.middleware
async def answer_twilio_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TwilioApiError as error:
        return json_response(error.body(), status=error.status)


# ----------------------------------------------------------------------------- state


@dataclass(slots=True)
class ProgrammedFailure:
    """How every send to one number fails, as programmed through /_sandbox/twilio/recipients."""

    status: int
    code: int
    message: str


@dataclass(slots=True)
class TwilioMessage:
    """One outbound message as Twilio stores it (plus what the sandbox needs to sign its callbacks)."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    body: str
    status: str
    date_created: datetime
    num_segments: int
    num_media: int = 0
    messaging_service_sid: str | None = None
    content_sid: str | None = None
    content_variables: dict[str, str] | None = None
    status_callback: str | None = None
    auth_token: str = field(default="", repr=False)
    date_updated: datetime | None = None
    date_sent: datetime | None = None

    @property
    def uri(self) -> str:
        return MESSAGE_PATH.format(account_sid=self.account_sid, sid=self.sid)

    def sent_at(self) -> datetime:
        """What the DateSent filters compare: when it was sent, or created if it is still queued."""
        return self.date_sent or self.date_created

    def advance(self, status: str) -> None:
        now = utc_now()
        self.status = status
        self.date_updated = now
        if status in ("sent", "delivered") and self.date_sent is None:
            self.date_sent = now

    def resource(self) -> dict[str, Any]:
        """The Message resource JSON exactly as the SDK's MessageInstance reads it."""
        uri_base = self.uri.removesuffix(".json")
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": rfc2822(self.date_created),
            "date_sent": rfc2822(self.date_sent),
            "date_updated": rfc2822(self.date_updated or self.date_created),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": str(self.num_media),
            "num_segments": str(self.num_segments),
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {"media": f"{uri_base}/Media.json", "feedback": f"{uri_base}/Feedback.json"},
            "to": self.to,
            "uri": self.uri,
        }

    def sandbox_view(self) -> dict[str, Any]:
        """The resource plus the request fields Twilio does not echo back (for test assertions)."""
        return {
            **self.resource(),
            "content_sid": self.content_sid,
            "content_variables": self.content_variables,
            "status_callback": self.status_callback,
        }


@dataclass(slots=True)
class RequestGauge:
    """How many provider API requests are being served right now, and the most there ever were."""

    in_flight: int = 0
    peak_in_flight: int = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def reset_peak(self) -> None:
        self.peak_in_flight = self.in_flight


@dataclass(slots=True)
class TwilioCounts:
    created: int = 0
    rejected: int = 0
    fetched: int = 0
    listed: int = 0
    callbacks_delivered: int = 0
    callbacks_failed: int = 0
    inbound_posted: int = 0
    rate_limited: int = 0


@dataclass(slots=True)
class TwilioSandboxState:
    """Everything one Twilio sandbox remembers; lives under `TWILIO_STATE_KEY` on its app."""

    accounts: dict[str, str] | None = None
    callbacks_enabled: bool = False
    callback_delay_s: float = 0.0
    messages: dict[str, TwilioMessage] = field(default_factory=dict)
    failures: dict[str, ProgrammedFailure] = field(default_factory=dict)
    counts: TwilioCounts = field(default_factory=TwilioCounts)
    gauge: RequestGauge = field(default_factory=RequestGauge)
    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sender_limit: tuple[int, float] | None = None  # (sends, per window_s) for each sender; None: no limit
    recent_sends: dict[str, deque[float]] = field(default_factory=dict)  # sender -> its send times in the window

    def over_sender_limit(self, sender: str, now: float) -> bool:
        """Whether one more send from `sender` at `now` exceeds `sender_limit` over the window before it."""
        if self.sender_limit is None:
            return False
        most, window_s = self.sender_limit
        times = self.recent_sends.setdefault(sender, deque())
        while times and times[0] <= now - window_s:
            times.popleft()
        if len(times) >= most:
            return True
        times.append(now)
        return False

    def token_for(self, account_sid: str) -> str | None:
        return None if self.accounts is None else self.accounts.get(account_sid)

    def failure_for(self, address: str) -> ProgrammedFailure | None:
        return self.failures.get(bare_number(address))

    def add(self, message: TwilioMessage) -> None:
        self.messages[message.sid] = message
        self.counts.created += 1

    def newest_first(self, account_sid: str) -> list[TwilioMessage]:
        return [m for m in reversed(self.messages.values()) if m.account_sid == account_sid]

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.counts),
            "stored": len(self.messages),
            "programmed_failures": len(self.failures),
            "callbacks_enabled": self.callbacks_enabled,
            "callback_tasks": len(self.tasks),
            **asdict(self.gauge),
        }

    def reset(self) -> None:
        self.messages.clear()
        self.failures.clear()
        self.recent_sends.clear()
        self.sender_limit = None
        self.counts = TwilioCounts()
        self.gauge.reset_peak()


TWILIO_STATE_KEY = web.AppKey("twilio_sandbox_state", TwilioSandboxState)


# ----------------------------------------------------------------------------- small helpers


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc2822(moment: datetime | None) -> str | None:
    return None if moment is None else format_datetime(moment)


def new_sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def bare_number(address: str) -> str:
    return address.removeprefix(WHATSAPP)


def is_whatsapp(address: str) -> bool:
    return address.startswith(WHATSAPP)


def is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "_" not in (parts.hostname or "")


def form_text(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value != "" else None


def count_segments(body: str, whatsapp: bool) -> int:
    """SMS segments the way carriers count them: GSM-7 160/153 per part, else UCS-2 70/67."""
    if whatsapp or not body:
        return 1
    if all(ch in _GSM7 or ch in _GSM7_EXTENDED for ch in body):
        units = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in body)
        single, part = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, part = 70, 67
    return 1 if units <= single else math.ceil(units / part)


def render_template(content_sid: str, variables: dict[str, str] | None) -> str:
    """What the sandbox "renders" for a Content template: its SID and the variables it was given."""
    pairs = sorted((variables or {}).items(), key=lambda item: variable_order(item[0]))
    return f"template {content_sid}: {{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"


def variable_order(key: str) -> tuple[int, int, str]:
    """Numbered template variables in numeric order ("2" before "10"), named ones after them."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """A control route's JSON body, or a 400 saying why it is not a JSON object."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


def required_text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise web.HTTPBadRequest(text=f"'{name}' is required and must be a non-empty string")
    return value


# ----------------------------------------------------------------------------- auth and validation


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(login, password) from an `Authorization: Basic ...` header, or None when it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (login, password) if colon else None


def authenticate(request: web.Request, state: TwilioSandboxState) -> str:
    """Check HTTP Basic AccountSid:AuthToken against the path's account; return the token used."""
    account_sid = request.match_info["account_sid"]
    credentials = basic_credentials(request.headers.get("Authorization", ""))
    if credentials is None:
        raise authentication_error()
    login, password = credentials
    if login != account_sid or not password:
        raise authentication_error()
    expected = state.token_for(account_sid) if state.accounts is not None else password
    if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
        raise authentication_error()
    return password


def check_to(to: str | None) -> str:
    if to is None:
        raise TwilioApiError(400, 21604, "A 'To' phone number is required.")
    if not _E164.match(bare_number(to)):
        raise TwilioApiError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
    return to


def check_from(from_: str | None, messaging_service_sid: str | None) -> str | None:
    if from_ is None:
        if messaging_service_sid is None:
            raise TwilioApiError(400, 21603, "A 'From' phone number is required.")
        return None
    sender = bare_number(from_)
    valid = (
        _E164.match(sender)
        if is_whatsapp(from_)
        else (_E164.match(sender) or _SHORT_CODE.match(sender) or _ALPHANUMERIC_SENDER.match(sender))
    )
    if not valid:
        raise TwilioApiError(
            400, 21212, f"The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID."
        )
    return from_


def check_same_channel(to: str, from_: str | None) -> None:
    if from_ is not None and is_whatsapp(to) != is_whatsapp(from_):
        raise TwilioApiError(400, 21910, "Invalid From and To pair. From and To should be of the same channel")


def check_content_variables(raw: str | None) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        variables = orjson.loads(raw)
    except orjson.JSONDecodeError:
        variables = None
    if not isinstance(variables, dict) or not all(isinstance(v, str) and v for v in variables.values()):
        raise TwilioApiError(400, 21656, "The ContentVariables Parameter is invalid.")
    return variables


def check_has_content(body: str | None, content_sid: str | None, num_media: int) -> None:
    if body is None and content_sid is None and num_media == 0:
        raise TwilioApiError(400, 21619, "A text message body or media URL must be specified.")
    if body is not None and len(body) > MAX_BODY_CHARS:
        raise TwilioApiError(400, 21617, "The concatenated message body exceeds the 1600 character limit.")


def check_status_callback(url: str | None) -> str | None:
    if url is not None and not is_http_url(url):
        raise TwilioApiError(400, 21609, f"The StatusCallback URL {url} is not a valid URL.")
    return url


def check_programmed_failure(state: TwilioSandboxState, to: str) -> None:
    failure = state.failure_for(to)
    if failure is not None:
        raise TwilioApiError(failure.status, failure.code, failure.message)


def message_from_form(form: MultiDictProxy[Any], account_sid: str, auth_token: str) -> TwilioMessage:
    """Validate a Messages.json POST like Twilio does (in its order) and build the queued message."""
    messaging_service_sid = form_text(form, "MessagingServiceSid")
    to = check_to(form_text(form, "To"))
    from_ = check_from(form_text(form, "From"), messaging_service_sid)
    check_same_channel(to, from_)
    body = form_text(form, "Body")
    content_sid = form_text(form, "ContentSid")
    num_media = len([url for url in form.getall("MediaUrl", []) if isinstance(url, str) and url])
    check_has_content(body, content_sid, num_media)
    variables = check_content_variables(form_text(form, "ContentVariables"))
    status_callback = check_status_callback(form_text(form, "StatusCallback"))
    text = render_template(content_sid, variables) if content_sid is not None else (body or "")
    return TwilioMessage(
        sid=new_sid("SM"),
        account_sid=account_sid,
        to=to,
        from_=from_,
        body=text,
        status="accepted" if from_ is None else "queued",
        date_created=utc_now(),
        num_segments=count_segments(text, is_whatsapp(to)),
        num_media=num_media,
        messaging_service_sid=messaging_service_sid,
        content_sid=content_sid,
        content_variables=variables,
        status_callback=status_callback,
        auth_token=auth_token,
    )


# ----------------------------------------------------------------------------- outbound webhooks


async def post_signed_form(
    session: aiohttp.ClientSession, url: str, params: dict[str, str], auth_token: str
) -> tuple[int, str]:
    """POST `params` form-encoded to `url`, signed the way Twilio signs webhooks; return status and body."""
    signature = str(RequestValidator(auth_token).compute_signature(url, params))
    headers = {SIGNATURE_HEADER: signature, "User-Agent": "TwilioProxy/1.1"}
    timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
    async with session.post(url, data=params, headers=headers, timeout=timeout) as response:
        return response.status, await response.text()


def status_callback_params(message: TwilioMessage) -> dict[str, str]:
    params = {
        "AccountSid": message.account_sid,
        "ApiVersion": API_VERSION,
        "MessageSid": message.sid,
        "MessageStatus": message.status,
        "SmsSid": message.sid,
        "SmsStatus": message.status,
        "To": message.to,
    }
    if message.from_ is not None:
        params["From"] = message.from_
    if message.messaging_service_sid is not None:
        params["MessagingServiceSid"] = message.messaging_service_sid
    if is_whatsapp(message.to):
        params["ChannelPrefix"] = "whatsapp"
        params["ChannelToAddress"] = bare_number(message.to)
    return params


def inbound_params(data: Mapping[str, Any], account_sid: str) -> dict[str, str]:
    """The form fields of Twilio's incoming-message webhook for the /_sandbox/twilio/inbound request."""
    sid = str(data.get("message_sid") or new_sid("SM"))
    from_ = required_text(data, "from")
    params = {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "Body": str(data.get("body", "")),
        "From": from_,
        "MessageSid": sid,
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "SmsStatus": "received",
        "To": required_text(data, "to"),
    }
    if is_whatsapp(from_):
        params["WaId"] = bare_number(from_).lstrip("+")
        params["ProfileName"] = str(data.get("profile_name", "Sandbox User"))
    extra = data.get("extra") or {}
    if not isinstance(extra, dict):
        raise web.HTTPBadRequest(text="'extra' must be an object of string fields")
    params.update({str(k): str(v) for k, v in extra.items()})
    return params


async def post_status_callback(state: TwilioSandboxState, message: TwilioMessage) -> None:
    url = message.status_callback
    if url is None or state.session is None:
        return
    try:
        status, _ = await post_signed_form(state.session, url, status_callback_params(message), message.auth_token)
    except (aiohttp.ClientError, TimeoutError) as exc:
        state.counts.callbacks_failed += 1
        log.warning("twilio_sandbox.callback_failed", message_sid=message.sid, url=url, error=repr(exc))
        return
    if 200 <= status < 300:
        state.counts.callbacks_delivered += 1
    else:
        state.counts.callbacks_failed += 1
        log.warning("twilio_sandbox.callback_rejected", message_sid=message.sid, url=url, status=status)


async def report_delivery(state: TwilioSandboxState, message: TwilioMessage) -> None:
    """Move a message through sent and delivered, posting a signed status callback for each."""
    try:
        for status in ("sent", "delivered"):
            await asyncio.sleep(state.callback_delay_s)
            message.advance(status)
            await post_status_callback(state, message)
    except Exception:  # a callback must never take the sandbox down
        log.exception("twilio_sandbox.delivery_report_crashed", message_sid=message.sid)


def start_delivery(state: TwilioSandboxState, message: TwilioMessage) -> None:
    """Deliver now (no callbacks wanted) or in the background with callbacks."""
    if state.callbacks_enabled and message.status_callback is not None:
        state.spawn(report_delivery(state, message))
    else:
        message.advance("delivered")


# ----------------------------------------------------------------------------- listing


def parse_date_filter(name: str, raw: str) -> tuple[datetime | date, bool]:
    """A DateSent value: `YYYY-MM-DD` (day granularity) or `YYYY-MM-DDTHH:MM:SSZ` (as the SDK sends)."""
    try:
        if len(raw) == 10:
            return date.fromisoformat(raw), True
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC), False
    except ValueError as exc:
        raise invalid_parameter_error(name, raw) from exc


def date_filter(name: str, raw: str, compare: Callable[[Any, Any], bool]) -> Callable[[TwilioMessage], bool]:
    bound, day_only = parse_date_filter(name, raw)
    if day_only:
        return lambda m: compare(m.sent_at().date(), bound)
    return lambda m: compare(m.sent_at(), bound)


def list_filters(query: Mapping[str, str]) -> list[Callable[[TwilioMessage], bool]]:
    """Twilio's list filters; `DateSent>`/`DateSent<` are inclusive (they are `>=`/`<=` once URL-decoded)."""
    filters: list[Callable[[TwilioMessage], bool]] = []
    if (to := query.get("To")) is not None:
        filters.append(lambda m: m.to == to)
    if (from_ := query.get("From")) is not None:
        filters.append(lambda m: m.from_ == from_)
    comparisons: dict[str, Callable[[Any, Any], bool]] = {
        "DateSent": lambda a, b: a == b,
        "DateSent>": lambda a, b: a >= b,
        "DateSent<": lambda a, b: a <= b,
    }
    for name, compare in comparisons.items():
        if (raw := query.get(name)) is not None:
            filters.append(date_filter(name, raw, compare))
    return filters


def query_int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise invalid_parameter_error(name, raw) from exc
    if not low <= value <= high:
        raise invalid_parameter_error(name, raw)
    return value


def page_start(matches: list[TwilioMessage], page: int, page_size: int, token: str | None) -> int:
    """Where a page begins: just after the SID in `PageToken` (stable under new sends), else page * size."""
    if token is not None and token.startswith("PA"):
        after = token[2:]
        for index, message in enumerate(matches):
            if message.sid == after:
                return index + 1
    return page * page_size


def page_uri(path: str, filters: dict[str, str], page_size: int, page: int, token: str | None = None) -> str:
    params = {**filters, "PageSize": str(page_size), "Page": str(page)}
    if token is not None:
        params["PageToken"] = token
    return f"{path}?{urlencode(params)}"


def message_page(
    matches: list[TwilioMessage], request: web.Request, page: int, page_size: int, token: str | None
) -> dict[str, Any]:
    """Twilio's paged list shape; `messages` must be the only non-meta key (the SDK's Page relies on it)."""
    start = page_start(matches, page, page_size, token)
    records = matches[start : start + page_size]
    filters = {k: v for k, v in request.query.items() if k not in ("PageSize", "Page", "PageToken")}
    has_more = start + page_size < len(matches)
    return {
        "messages": [m.resource() for m in records],
        "start": start,
        "end": start + max(len(records) - 1, 0),
        "page": page,
        "page_size": page_size,
        "uri": request.path_qs,
        "first_page_uri": page_uri(request.path, filters, page_size, 0),
        "previous_page_uri": page_uri(request.path, filters, page_size, page - 1) if page > 0 else None,
        "next_page_uri": page_uri(request.path, filters, page_size, page + 1, "PA" + records[-1].sid)
        if has_more and records
        else None,
    }


# ----------------------------------------------------------------------------- API handlers


async def create_message(request: web.Request) -> web.Response:
    state = request.app[TWILIO_STATE_KEY]
    account_sid = request.match_info["account_sid"]
    auth_token = authenticate(request, state)
    form = await request.post()
    try:
        message = message_from_form(form, account_sid, auth_token)
        check_programmed_failure(state, message.to)
        check_sender_limit(state, message)
    except TwilioApiError:
        state.counts.rejected += 1
        raise
    state.add(message)
    response = json_response(message.resource(), status=201)
    start_delivery(state, message)
    return response


async def fetch_message(request: web.Request) -> web.Response:
    state = request.app[TWILIO_STATE_KEY]
    authenticate(request, state)
    message = state.messages.get(request.match_info["sid"])
    if message is None or message.account_sid != request.match_info["account_sid"]:
        raise not_found_error(request.path)
    state.counts.fetched += 1
    return json_response(message.resource())


async def list_messages(request: web.Request) -> web.Response:
    state = request.app[TWILIO_STATE_KEY]
    authenticate(request, state)
    query = request.query
    page_size = query_int(query, "PageSize", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    page = query_int(query, "Page", 0, 0, 1_000_000)
    filters = list_filters(query)
    matches = [m for m in state.newest_first(request.match_info["account_sid"]) if all(f(m) for f in filters)]
    state.counts.listed += 1
    return json_response(message_page(matches, request, page, page_size, query.get("PageToken")))


# ----------------------------------------------------------------------------- control handlers


async def program_recipient_failure(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    number = bare_number(required_text(data, "number"))
    try:
        failure = ProgrammedFailure(
            status=int(data.get("status", 400)),
            code=int(data["code"]),
            message=str(data.get("message") or f"sandbox programmed failure {data['code']}"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text="'code' (int) is required; 'status' must be an int") from exc
    request.app[TWILIO_STATE_KEY].failures[number] = failure
    return json_response({"number": number, **asdict(failure)})


async def clear_recipient_failures(request: web.Request) -> web.Response:
    request.app[TWILIO_STATE_KEY].failures.clear()
    return json_response({"cleared": True})


def check_sender_limit(state: TwilioSandboxState, message: TwilioMessage) -> None:
    sender = message.from_ or message.messaging_service_sid or ""
    if state.over_sender_limit(sender, time.monotonic()):
        state.counts.rate_limited += 1
        raise TwilioApiError(429, 20429, "Too Many Requests")


async def configure_sender_limit(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    state = request.app[TWILIO_STATE_KEY]

    def positive(name: str) -> float:
        value = data.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise web.HTTPBadRequest(text=f"'{name}' must be a positive number")
        return float(value)

    if "max_sends" in data:
        state.sender_limit = (int(positive("max_sends")), positive("window_s"))
    elif data.get("per_second") is None:
        state.sender_limit = None
    else:
        state.sender_limit = (max(1, int(positive("per_second"))), 1.0)
    state.recent_sends.clear()
    limit = state.sender_limit
    return json_response(None if limit is None else {"max_sends": limit[0], "window_s": limit[1]})


async def configure_callbacks(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    state = request.app[TWILIO_STATE_KEY]
    state.callbacks_enabled = bool(data.get("enabled", True))
    if "delay_s" in data:
        state.callback_delay_s = max(float(data["delay_s"]), 0.0)
    return json_response({"enabled": state.callbacks_enabled, "delay_s": state.callback_delay_s})


def inbound_auth_token(state: TwilioSandboxState, data: Mapping[str, Any], account_sid: str) -> str:
    token = data.get("auth_token") or state.token_for(account_sid)
    if not isinstance(token, str) or not token:
        raise web.HTTPBadRequest(text=f"no auth token for account {account_sid}: configure it or pass 'auth_token'")
    return token


async def simulate_inbound(request: web.Request) -> web.Response:
    """Post a signed incoming-message webhook to `url` and report what that endpoint answered."""
    state = request.app[TWILIO_STATE_KEY]
    data = await read_json_object(request)
    url = required_text(data, "url")
    account_sid = required_text(data, "account_sid")
    params = inbound_params(data, account_sid)
    token = inbound_auth_token(state, data, account_sid)
    assert state.session is not None, "the sandbox app has not started"
    try:
        status, body = await post_signed_form(state.session, url, params, token)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return json_response({"error": repr(exc), "message_sid": params["MessageSid"], "params": params}, status=502)
    state.counts.inbound_posted += 1
    return json_response({"status": status, "body": body, "message_sid": params["MessageSid"], "params": params})


async def list_created_messages(request: web.Request) -> web.Response:
    to = request.query.get("to")
    messages = request.app[TWILIO_STATE_KEY].messages.values()
    return json_response([m.sandbox_view() for m in messages if to is None or m.to == to])


async def show_stats(request: web.Request) -> web.Response:
    return json_response(request.app[TWILIO_STATE_KEY].stats())


async def reset_twilio(request: web.Request) -> web.Response:
    request.app[TWILIO_STATE_KEY].reset()
    return json_response({"reset": True})


# ----------------------------------------------------------------------------- app


def gauge_middleware(gauge: RequestGauge, path_prefix: str) -> Middleware:
    """Count in-flight requests under `path_prefix`; install it outermost so injected latency counts."""

    @web.middleware
    async def count_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(path_prefix):
            return await handler(request)
        gauge.enter()
        try:
            return await handler(request)
        finally:
            gauge.leave()

    return count_in_flight


def callback_session(state: TwilioSandboxState) -> Callable[[web.Application], AsyncIterator[None]]:
    """One shared ClientSession for callbacks and inbound posts, open for the app's lifetime."""

    async def open_and_close(_: web.Application) -> AsyncIterator[None]:
        state.session = aiohttp.ClientSession()
        yield
        for task in list(state.tasks):
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.session.close()
        state.session = None

    return open_and_close


def add_twilio_routes(app: web.Application) -> None:
    app.router.add_post(MESSAGES_PATH, create_message)
    app.router.add_get(MESSAGES_PATH, list_messages)
    app.router.add_get(MESSAGE_PATH, fetch_message)
    app.router.add_post("/_sandbox/twilio/recipients", program_recipient_failure)
    app.router.add_delete("/_sandbox/twilio/recipients", clear_recipient_failures)
    app.router.add_post("/_sandbox/twilio/callbacks", configure_callbacks)
    app.router.add_post("/_sandbox/twilio/sender-limit", configure_sender_limit)
    app.router.add_post("/_sandbox/twilio/inbound", simulate_inbound)
    app.router.add_get("/_sandbox/twilio/messages", list_created_messages)
    app.router.add_get("/_sandbox/twilio/stats", show_stats)
    app.router.add_post("/_sandbox/twilio/reset", reset_twilio)


def create_twilio_sandbox(
    accounts: dict[str, str] | None = None,
    control: SandboxControl | None = None,
    *,
    status_callbacks: bool = False,
    callback_delay_s: float = 0.0,
) -> web.Application:
    """A Twilio Messages API sandbox app; `accounts` maps AccountSid -> AuthToken (None accepts any pair)."""
    app = new_sandbox_app(control)
    state = TwilioSandboxState(
        accounts=dict(accounts) if accounts is not None else None,
        callbacks_enabled=status_callbacks,
        callback_delay_s=callback_delay_s,
    )
    app[TWILIO_STATE_KEY] = state
    app.middlewares.insert(0, gauge_middleware(state.gauge, API_PREFIX))
    app.middlewares.append(answer_twilio_errors)
    app.cleanup_ctx.append(callback_session(state))
    add_twilio_routes(app)
    return app
