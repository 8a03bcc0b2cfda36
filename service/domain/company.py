"""The company-data record (SPEC §3) as a typed model, and the view of it that may leave the service.

Unknown attributes are kept (`extra="allow"`) so operators can add project settings without a code change.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Attributes never copied into a queue message or a log line.
_PRIVATE_ATTRIBUTES = frozenset({"api_key_hashes", "api_keys"})
_AUTO_QUEUE_ATTRIBUTES = frozenset(
    {"auto_queue_reply_message", "auto_queue_reply_message_from_number", "auto_queue_reply_message_from_email"}
)

# Operators write the hand-off rules by hand: an odd value means "no rule", never an unreadable company.
_OnlyTrue = Annotated[bool, BeforeValidator(lambda value: value is True)]
_Addresses = Annotated[
    list[str], BeforeValidator(lambda value: [str(v) for v in value] if isinstance(value, list | tuple | set) else [])
]


class RateLimits(BaseModel):
    model_config = ConfigDict(extra="allow")

    requests_per_second: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    requests_per_day: int | None = Field(None, gt=0)
    concurrent_conversations: int | None = Field(None, gt=0)
    max_message_length: int | None = Field(None, gt=0)


class WhatsAppConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    company_whatsapp_number: str
    whatsapp_credentials_id: str
    whatsapp_template_sid: str | None = None
    sends_per_second: float | None = Field(None, gt=0)  # this sender's pace (None: COMMS_WHATSAPP_SENDS_PER_SECOND)


class SmsConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    company_sms_number: str
    sms_credentials_id: str
    sends_per_second: float | None = Field(None, gt=0)  # this sender's pace (None: COMMS_SMS_SENDS_PER_SECOND)


class EmailConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    company_email: str
    email_credentials_id: str
    from_name: str | None = None


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    whatsapp: WhatsAppConfig | None = None
    sms: SmsConfig | None = None
    email: EmailConfig | None = None

    def sends_per_second(self, channel: str) -> float | None:
        """The project's pace for its `channel` sender, when it sets one."""
        return getattr(getattr(self, channel, None), "sends_per_second", None)


class CompanyRecord(BaseModel):
    """One company/project row of the company-data table."""

    model_config = ConfigDict(extra="allow")

    company_id: str = Field(min_length=1)
    project_id: str = Field(min_length=1)
    company_name: str = ""
    project_name: str = ""
    project_status: str = "inactive"
    allowed_channels: list[str] = Field(default_factory=list)
    rate_limits: RateLimits | None = None
    company_rep: dict[str, Any] = Field(default_factory=dict)
    channel_config: ChannelConfig = Field(default_factory=ChannelConfig)
    ai_config: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    updated_at: str | None = None
    # SPEC §7 step 5: every reply, or the replies of these senders, go to a human instead of the AI.
    auto_queue_reply_message: _OnlyTrue = False
    auto_queue_reply_message_from_number: _Addresses = Field(default_factory=list)
    auto_queue_reply_message_from_email: _Addresses = Field(default_factory=list)

    @property
    def is_active(self) -> bool:
        return self.project_status == "active"

    def allows(self, channel: str) -> bool:
        return channel in {c.lower() for c in self.allowed_channels}

    def sender_address(self, channel: str) -> str | None:
        """The company's own number or email on a channel, or None when that channel is not configured."""
        config = self.channel_config
        if channel == "whatsapp" and config.whatsapp:
            return config.whatsapp.company_whatsapp_number
        if channel == "sms" and config.sms:
            return config.sms.company_sms_number
        if channel == "email" and config.email:
            return config.email.company_email
        return None

    def public_view(self) -> dict[str, Any]:
        """The record as it may travel in a queue message: no key hashes, no secrets."""
        # Hand-off rules the stored record lacks stay absent, as they were before they were declared.
        data = self.model_dump(
            mode="json", exclude_none=True, exclude=set(_AUTO_QUEUE_ATTRIBUTES - self.model_fields_set)
        )
        return {k: v for k, v in data.items() if k not in _PRIVATE_ATTRIBUTES}


def ai_requests_per_second(openai_config: object) -> float | None:
    """The pace a project sets for the API key of one channel (`ai_config.openai_config.<channel>
    .requests_per_second`): AI calls a second with that key across the fleet, instead of
    COMMS_AI_REQUESTS_PER_SECOND. The pace belongs to the key: projects sharing a key should set the same one.
    None when absent or not a positive number (operators write ai_config by hand: an odd value means the
    default, never an unreadable company)."""
    value = openai_config.get("requests_per_second") if isinstance(openai_config, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


# What SQS accepts in a MessageGroupId: 1-128 of ASCII letters, digits and punctuation.
_GROUP_ID = re.compile(r"[!-~]{1,128}", re.ASCII)


def tenant_group(company_id: str, project_id: str) -> str:
    """The tenant a queued message belongs to, as its SQS `MessageGroupId` (SQS fair queues keep one tenant's
    backlog from holding the others back): `company#project`, or a digest of the pair when that would not be a
    valid group id (too long, or characters SQS refuses), so every tenant still has one stable group."""
    group = f"{company_id}#{project_id}"
    if "#" not in company_id and _GROUP_ID.fullmatch(group):
        return group
    return "t-" + hashlib.sha256(f"{company_id}\0{project_id}".encode()).hexdigest()[:40]
