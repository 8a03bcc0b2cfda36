"""The context object a channel queue message carries (SPEC §4), and its SQS message attributes.

Built once by the router (initiate endpoint), parsed and validated by the consumers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.domain.company import CompanyRecord
from service.domain.conversation import ConversationStatus
from service.domain.initiate import InitiateRequest


class ConversationData(BaseModel):
    model_config = ConfigDict(extra="allow")

    conversation_id: str = Field(min_length=1)
    conversation_status: str = ConversationStatus.INITIATED.value


class ContextMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    router_version: str
    trace_id: str
    queue_timestamp: str | None = None


class QueueContext(BaseModel):
    """The whole queue message body."""

    model_config = ConfigDict(extra="allow")

    frontend_payload: dict[str, Any]
    company_data_payload: dict[str, Any]
    conversation_data: ConversationData
    metadata: ContextMetadata


def build_context(
    request: InitiateRequest,
    company: CompanyRecord,
    conversation_id: str,
    *,
    router_version: str,
    trace_id: str,
    queue_timestamp: str,
) -> QueueContext:
    return QueueContext(
        frontend_payload=request.body,
        company_data_payload=company.public_view(),
        conversation_data=ConversationData(conversation_id=conversation_id),
        metadata=ContextMetadata(router_version=router_version, trace_id=trace_id, queue_timestamp=queue_timestamp),
    )


def message_attributes(request: InitiateRequest, conversation_id: str, router_timestamp: str) -> dict[str, str]:
    attributes = {
        "channelMethod": request.channel,
        "conversationId": conversation_id,
        "routerTimestamp": router_timestamp,
    }
    if request.channel == "email":
        attributes["recipientEmail"] = request.recipient
    else:
        attributes["recipientTel"] = request.recipient
    return attributes
