"""A local stand-in for SendGrid's v3 mail send API (`POST /v3/mail/send`).

Owns Bearer-key auth, SendGrid's body validation and `{"errors": [...]}` shapes, 202 + X-Message-Id,
the accepted-mail log, programmable per-recipient failures and its `/_sandbox/sendgrid/*` controls.

Controls (on top of sandbox_http's latency/faults/requests/reset):
    POST   /_sandbox/sendgrid/recipients {"email": "x@example.com", "status": 400, "message": "...", "field": null}
    DELETE /_sandbox/sendgrid/recipients                 (forget every programmed failure)
    GET    /_sandbox/sendgrid/messages   [?to=...]        every accepted mail
    GET    /_sandbox/sendgrid/stats                       counts and peak in-flight API requests
    POST   /_sandbox/sendgrid/reset                       forget mails, programmed failures and counts
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

from local_stack.sandbox_http import SandboxControl, json_response, new_sandbox_app
from local_stack.twilio_sandbox import RequestGauge, gauge_middleware, read_json_object, required_text

__all__ = [
    "SENDGRID_STATE_KEY",
    "AcceptedMail",
    "FieldError",
    "SendGridSandboxState",
    "create_sendgrid_sandbox",
    "validate_mail",
]

MAIL_SEND_PATH = "/v3/mail/send"
HELP_BASE = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
MAX_PERSONALIZATIONS = 1000
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

FROM_REQUIRED = (
    "The from object must be provided for every email send. It is an object that requires the email "
    'parameter, but may also contain a name parameter.  e.g. {"email" : "example@example.com"}  or '
    '{"email" : "example@example.com", "name" : "Example Recipient"}.'
)
SUBJECT_REQUIRED = (
    "The subject is required. You can get around this requirement if you use a template with a subject "
    "defined or if every personalization has a subject defined."
)
CONTENT_REQUIRED = (
    "Unless a valid template_id is provided, the content parameter is required. There must be at least one "
    "defined content block. We typically suggest both text/plain and text/html blocks are included, but only "
    "one block is required."
)
TO_REQUIRED = (
    "The to array is required for all personalization objects, and must have at least one email object "
    "with a valid email address."
)


# ----------------------------------------------------------------------------- errors and state


@dataclass(slots=True, frozen=True)
class FieldError:
    """One entry of SendGrid's `{"errors": [...]}` body."""

    message: str
    field: str | None = None
    help: str | None = None


def errors_response(errors: list[FieldError], status: int) -> web.Response:
    return json_response({"errors": [asdict(error) for error in errors]}, status=status)


@dataclass(slots=True)
class ProgrammedMailFailure:
    """How every send to one address fails, as programmed through /_sandbox/sendgrid/recipients."""

    status: int
    message: str
    field: str | None = None


@dataclass(slots=True)
class AcceptedMail:
    message_id: str
    received_at: float
    recipients: list[str]
    request: dict[str, Any]

    def sandbox_view(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "received_at": self.received_at, "to": self.recipients, **self.request}


@dataclass(slots=True)
class SendGridCounts:
    accepted: int = 0
    rejected: int = 0
    unauthorized: int = 0


@dataclass(slots=True)
class SendGridSandboxState:
    """Everything one SendGrid sandbox remembers; lives under `SENDGRID_STATE_KEY` on its app."""

    api_keys: set[str] | None = None
    mails: list[AcceptedMail] = field(default_factory=list)
    failures: dict[str, ProgrammedMailFailure] = field(default_factory=dict)
    counts: SendGridCounts = field(default_factory=SendGridCounts)
    gauge: RequestGauge = field(default_factory=RequestGauge)

    def accepts_key(self, key: str) -> bool:
        if not key:
            return False
        if self.api_keys is None:
            return True
        return any(hmac.compare_digest(key.encode(), known.encode()) for known in self.api_keys)

    def failure_for(self, recipients: list[str]) -> ProgrammedMailFailure | None:
        return next((self.failures[r] for r in recipients if r in self.failures), None)

    def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.counts),
            "stored": len(self.mails),
            "programmed_failures": len(self.failures),
            **asdict(self.gauge),
        }

    def reset(self) -> None:
        self.mails.clear()
        self.failures.clear()
        self.counts = SendGridCounts()
        self.gauge.reset_peak()


SENDGRID_STATE_KEY = web.AppKey("sendgrid_sandbox_state", SendGridSandboxState)


# ----------------------------------------------------------------------------- validation


def is_email(value: Any) -> bool:
    return isinstance(value, str) and bool(_EMAIL.match(value))


def address_errors(address: Any, path: str, what: str, anchor: str) -> list[FieldError]:
    """Errors for an `{"email": ..., "name": ...}` object at `path`."""
    if not isinstance(address, dict) or "email" not in address:
        return [FieldError(f"The {what} object must contain an email.", f"{path}.email", f"{HELP_BASE}#{anchor}")]
    if not is_email(address["email"]):
        return [
            FieldError(f"The {what} email does not contain a valid address.", f"{path}.email", f"{HELP_BASE}#{anchor}")
        ]
    return []


def recipient_list_errors(recipients: Any, path: str) -> list[FieldError]:
    if not isinstance(recipients, list):
        return [
            FieldError(
                f"The {path.rsplit('.', 1)[-1]} field must be an array.", path, f"{HELP_BASE}#message.personalizations"
            )
        ]
    return [
        FieldError("Does not contain a valid address.", f"{path}.{j}.email", f"{HELP_BASE}#message.personalizations")
        for j, recipient in enumerate(recipients)
        if not isinstance(recipient, dict) or not is_email(recipient.get("email"))
    ]


def string_map_errors(value: Any, path: str) -> list[FieldError]:
    if value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        return []
    return [FieldError(f"The {path} must be an object of string key/value pairs.", path, f"{HELP_BASE}#message.{path}")]


def personalization_errors(personalization: Any, index: int) -> list[FieldError]:
    path = f"personalizations.{index}"
    if not isinstance(personalization, dict):
        return [FieldError("Each personalization must be an object.", path, f"{HELP_BASE}#-Personalizations-Errors")]
    to = personalization.get("to")
    if not isinstance(to, list) or not to:
        errors = [FieldError(TO_REQUIRED, f"{path}.to", f"{HELP_BASE}#message.personalizations.to")]
    else:
        errors = recipient_list_errors(to, f"{path}.to")
    for kind in ("cc", "bcc"):
        if kind in personalization:
            errors += recipient_list_errors(personalization[kind], f"{path}.{kind}")
    return errors + string_map_errors(personalization.get("custom_args"), f"{path}.custom_args")


def personalizations_errors(personalizations: Any) -> list[FieldError]:
    if not isinstance(personalizations, list) or not personalizations:
        message = "The personalizations field is required and must have at least one personalization."
        return [FieldError(message, "personalizations", f"{HELP_BASE}#-Personalizations-Errors")]
    if len(personalizations) > MAX_PERSONALIZATIONS:
        message = "The personalizations field is limited to 1000 objects per request."
        return [FieldError(message, "personalizations", f"{HELP_BASE}#-Personalizations-Errors")]
    return [error for i, p in enumerate(personalizations) for error in personalization_errors(p, i)]


def subject_errors(body: dict[str, Any]) -> list[FieldError]:
    if "template_id" in body or (isinstance(body.get("subject"), str) and body["subject"]):
        return []
    personalizations = body.get("personalizations")
    if (
        isinstance(personalizations, list)
        and personalizations
        and all(isinstance(p, dict) and isinstance(p.get("subject"), str) and p["subject"] for p in personalizations)
    ):
        return []
    return [FieldError(SUBJECT_REQUIRED, "subject", f"{HELP_BASE}#message.subject")]


def content_block_errors(block: Any, index: int) -> list[FieldError]:
    block = block if isinstance(block, dict) else {}
    errors = []
    if not isinstance(block.get("type"), str) or not block["type"]:
        message = "The content type must be a string at least one character in length."
        errors.append(FieldError(message, f"content.{index}.type", f"{HELP_BASE}#message.content.type"))
    if not isinstance(block.get("value"), str) or not block["value"]:
        message = "The content value must be a string at least one character in length."
        errors.append(FieldError(message, f"content.{index}.value", f"{HELP_BASE}#message.content.value"))
    return errors


def content_errors(body: dict[str, Any]) -> list[FieldError]:
    content = body.get("content")
    if content is None and "template_id" in body:
        return []
    if not isinstance(content, list) or not content:
        return [FieldError(CONTENT_REQUIRED, "content", f"{HELP_BASE}#message.content")]
    errors = [error for i, block in enumerate(content) for error in content_block_errors(block, i)]
    types = [block.get("type") for block in content if isinstance(block, dict)]
    if "text/plain" in types and types[0] != "text/plain":
        message = "If present, text/plain content must be first, followed by text/html, followed by any other content."
        errors.append(FieldError(message, "content", f"{HELP_BASE}#message.content"))
    return errors


def from_errors(body: dict[str, Any]) -> list[FieldError]:
    if not isinstance(body.get("from"), dict) or "email" not in body["from"]:
        return [FieldError(FROM_REQUIRED, "from.email", f"{HELP_BASE}#message.from")]
    return address_errors(body["from"], "from", "from", "message.from")


def validate_mail(body: dict[str, Any]) -> list[FieldError]:
    """Every problem SendGrid would report for this v3 mail send body, in its field order."""
    errors = personalizations_errors(body.get("personalizations")) + from_errors(body)
    if "reply_to" in body:
        errors += address_errors(body["reply_to"], "reply_to", "reply_to", "message.reply_to")
    errors += subject_errors(body) + content_errors(body)
    errors += string_map_errors(body.get("custom_args"), "custom_args")
    if "template_id" in body and not isinstance(body["template_id"], str):
        errors.append(
            FieldError("The template_id must be a string.", "template_id", f"{HELP_BASE}#message.template_id")
        )
    return errors


def all_recipients(body: dict[str, Any]) -> Iterator[str]:
    for personalization in body["personalizations"]:
        for kind in ("to", "cc", "bcc"):
            for recipient in personalization.get(kind) or []:
                yield str(recipient["email"]).lower()


# ----------------------------------------------------------------------------- handlers


def bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def authorization_error(request: web.Request, state: SendGridSandboxState) -> web.Response | None:
    key = bearer_key(request)
    if key is None:
        return errors_response([FieldError("authorization required")], status=401)
    if not state.accepts_key(key):
        return errors_response(
            [FieldError("The provided authorization grant is invalid, expired, or revoked")], status=401
        )
    return None


def parse_mail_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


async def send_mail(request: web.Request) -> web.Response:
    state = request.app[SENDGRID_STATE_KEY]
    unauthorized = authorization_error(request, state)
    if unauthorized is not None:
        state.counts.unauthorized += 1
        return unauthorized
    body = parse_mail_body(await request.read())
    errors = [FieldError("Bad Request")] if body is None else validate_mail(body)
    if body is None or errors:
        state.counts.rejected += 1
        return errors_response(errors, status=400)
    recipients = list(all_recipients(body))
    failure = state.failure_for(recipients)
    if failure is not None:
        state.counts.rejected += 1
        return errors_response([FieldError(failure.message, failure.field)], status=failure.status)
    mail = AcceptedMail(secrets.token_urlsafe(16), time.time(), recipients, body)
    state.mails.append(mail)
    state.counts.accepted += 1
    return web.Response(status=202, headers={"X-Message-Id": mail.message_id})


async def program_recipient_failure(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    email = required_text(data, "email").lower()
    try:
        status = int(data.get("status", 400))
    except (TypeError, ValueError) as exc:
        raise web.HTTPBadRequest(text="'status' must be an int") from exc
    message = str(data.get("message") or f"sandbox programmed failure for {email}")
    field_name = data.get("field")
    failure = ProgrammedMailFailure(status, message, str(field_name) if field_name is not None else None)
    request.app[SENDGRID_STATE_KEY].failures[email] = failure
    return json_response({"email": email, **asdict(failure)})


async def clear_recipient_failures(request: web.Request) -> web.Response:
    request.app[SENDGRID_STATE_KEY].failures.clear()
    return json_response({"cleared": True})


async def list_accepted_mails(request: web.Request) -> web.Response:
    to = request.query.get("to")
    mails = request.app[SENDGRID_STATE_KEY].mails
    return json_response([m.sandbox_view() for m in mails if to is None or to.lower() in m.recipients])


async def show_stats(request: web.Request) -> web.Response:
    return json_response(request.app[SENDGRID_STATE_KEY].stats())


async def reset_sendgrid(request: web.Request) -> web.Response:
    request.app[SENDGRID_STATE_KEY].reset()
    return json_response({"reset": True})


# ----------------------------------------------------------------------------- app


def add_sendgrid_routes(app: web.Application) -> None:
    app.router.add_post(MAIL_SEND_PATH, send_mail)
    app.router.add_post("/_sandbox/sendgrid/recipients", program_recipient_failure)
    app.router.add_delete("/_sandbox/sendgrid/recipients", clear_recipient_failures)
    app.router.add_get("/_sandbox/sendgrid/messages", list_accepted_mails)
    app.router.add_get("/_sandbox/sendgrid/stats", show_stats)
    app.router.add_post("/_sandbox/sendgrid/reset", reset_sendgrid)


def create_sendgrid_sandbox(api_keys: set[str] | None = None, control: SandboxControl | None = None) -> web.Application:
    """A SendGrid v3 mail send sandbox app; `api_keys` are the accepted Bearer keys (None accepts any)."""
    app = new_sandbox_app(control)
    state = SendGridSandboxState(api_keys=set(api_keys) if api_keys is not None else None)
    app[SENDGRID_STATE_KEY] = state
    app.middlewares.insert(0, gauge_middleware(state.gauge, "/v3/"))
    add_sendgrid_routes(app)
    return app
