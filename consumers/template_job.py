"""A channel-queue message parsed into everything the template sender needs, or why it cannot be.

Pure: `parse_template_job(body)` either returns a `TemplateJob` or raises `InvalidContext` naming the reason
(and the conversation, when the body names one); `new_conversation(job)` is the record its first claim creates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from service.domain.company import CompanyRecord, ai_requests_per_second
from service.domain.context import QueueContext
from service.domain.conversation import ConversationKey, NewConversation
from service.domain.initiate import SUPPORTED_CHANNELS, is_valid_e164, is_valid_email, unstorable_reason
from service.versions import PROCESSOR_VERSION

DEFAULT_WHATSAPP_VARIABLES = ("1", "2")
OUTPUT_KEYS = {"sms": ("body",), "email": ("subject", "body")}


class InvalidContext(Exception):
    def __init__(self, reason: str, *, primary_channel: str | None = None, conversation_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.primary_channel = primary_channel
        self.conversation_id = conversation_id


@dataclass(frozen=True, slots=True)
class AiSettings:
    api_key_reference: str
    model: str
    instructions: str
    output_keys: tuple[str, ...]
    background: bool
    requests_per_second: float | None = None  # the project's pace for this key (None: the default)


@dataclass(frozen=True, slots=True)
class TemplateJob:
    conversation_id: str
    channel: str
    recipient: str  # primary_channel: the E.164 number, or the email for email
    company: CompanyRecord
    frontend_payload: dict[str, Any]
    sender: str  # the company's number or email on this channel
    credentials_id: str
    content_sid: str | None
    ai: AiSettings
    trace_id: str
    router_version: str

    @property
    def recipient_data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.frontend_payload.get("recipient_data") or {}
        return data

    @property
    def project_data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.frontend_payload.get("project_data") or {}
        return data

    @property
    def key(self) -> ConversationKey:
        return ConversationKey(self.recipient, self.conversation_id)

    @property
    def request_id(self) -> str:
        return str(self.frontend_payload["request_data"]["request_id"])


def _decode(body: str) -> QueueContext:
    try:
        return QueueContext.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise InvalidContext("context_not_json") from exc
    except ValidationError as exc:
        raise InvalidContext(f"context_shape_invalid: {exc.error_count()} errors") from exc


def _recipient(channel: str, payload: dict[str, Any]) -> str | None:
    recipient = payload.get("recipient_data") or {}
    value = recipient.get("recipient_email" if channel == "email" else "recipient_tel")
    valid = is_valid_email if channel == "email" else is_valid_e164
    return value if isinstance(value, str) and valid(value) else None


def _ai_settings(company: CompanyRecord, channel: str) -> AiSettings:
    openai_config = (company.ai_config.get("openai_config") or {}).get(channel) or {}
    sender_config = openai_config.get("template_sender") or {}
    reference = openai_config.get("api_key_reference")
    instructions = sender_config.get("instructions")
    if not isinstance(reference, str) or not reference:
        raise InvalidContext("ai_config_missing_api_key_reference")
    if not isinstance(instructions, str) or not instructions.strip():
        raise InvalidContext("ai_config_missing_template_instructions")
    if channel == "whatsapp":
        variables = sender_config.get("variables") or DEFAULT_WHATSAPP_VARIABLES
        keys = tuple(str(v) for v in variables)
    else:
        keys = OUTPUT_KEYS[channel]
    return AiSettings(
        api_key_reference=reference,
        model=str(openai_config.get("model") or "gpt-4.1-mini"),
        instructions=instructions,
        output_keys=keys,
        background=openai_config.get("mode") == "background",
        requests_per_second=ai_requests_per_second(openai_config),
    )


def _credentials_id(company: CompanyRecord, channel: str) -> str | None:
    config = getattr(company.channel_config, channel)
    value = getattr(config, f"{channel}_credentials_id", None) if config else None
    return value if isinstance(value, str) and value else None


def parse_template_job(body: str) -> TemplateJob:
    context = _decode(body)
    payload = context.frontend_payload
    channel = str((payload.get("request_data") or {}).get("channel_method", "")).lower()
    conversation_id = context.conversation_data.conversation_id
    if channel not in SUPPORTED_CHANNELS:
        raise InvalidContext("unsupported_channel", conversation_id=conversation_id)
    recipient = _recipient(channel, payload)
    if recipient is None:
        raise InvalidContext("recipient_invalid", conversation_id=conversation_id)

    def invalid(reason: str) -> InvalidContext:
        return InvalidContext(reason, primary_channel=recipient, conversation_id=conversation_id)

    if unstorable_reason(payload):  # queued before the endpoint refused it (or by another producer): never storable
        raise invalid("unstorable_value")

    try:
        company = CompanyRecord.model_validate(context.company_data_payload)
    except ValidationError as exc:
        raise invalid("company_data_invalid") from exc
    request_id = (payload.get("request_data") or {}).get("request_id")
    if not isinstance(request_id, str) or not conversation_id.startswith(
        f"{company.company_id}#{company.project_id}#{request_id}#"
    ):
        raise invalid("conversation_id_mismatch")
    sender = company.sender_address(channel)
    credentials_id = _credentials_id(company, channel)
    if not sender or not credentials_id:
        raise invalid("channel_config_missing")
    try:
        ai = _ai_settings(company, channel)
    except InvalidContext as exc:
        raise invalid(exc.reason) from exc
    whatsapp = company.channel_config.whatsapp
    return TemplateJob(
        conversation_id=conversation_id,
        channel=channel,
        recipient=recipient,
        company=company,
        frontend_payload=payload,
        sender=sender,
        credentials_id=credentials_id,
        content_sid=whatsapp.whatsapp_template_sid if channel == "whatsapp" and whatsapp else None,
        ai=ai,
        trace_id=context.metadata.trace_id,
        router_version=context.metadata.router_version,
    )


def new_conversation(job: TemplateJob) -> NewConversation:
    """The SPEC §5 initial record the template sender creates on its first claim."""
    channel_config = getattr(job.company.channel_config, job.channel)
    return NewConversation(
        key=job.key,
        request_id=job.request_id,
        channel=job.channel,
        company_id=job.company.company_id,
        project_id=job.company.project_id,
        company_address=job.sender,
        company_name=job.company.company_name,
        project_name=job.company.project_name,
        company_rep=job.company.company_rep,
        recipient=job.recipient_data,
        project_data=job.project_data,
        ai_config=(job.company.ai_config.get("openai_config") or {}).get(job.channel),
        channel_config=channel_config.model_dump(mode="json", exclude_none=True) if channel_config else None,
        router_version=job.router_version,
        processor_version=PROCESSOR_VERSION,
        trace_id=job.trace_id,
    )
