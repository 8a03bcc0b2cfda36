"""Parsing a channel-queue context into a template job; every malformed shape names its reason."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from consumers.template_job import InvalidContext, new_conversation, parse_template_job
from local_stack.seed import demo_company
from service.domain.company import CompanyRecord
from service.domain.context import build_context
from service.domain.conversation import ConversationKey
from service.domain.initiate import validate_initiate_body
from service.versions import PROCESSOR_VERSION
from tests.bodies import initiate_body


def context_for(channel: str = "whatsapp", company_changes: dict[str, Any] | None = None) -> dict[str, Any]:
    request = validate_initiate_body(initiate_body(channel))
    data = demo_company("comms", "dev", time.time()).model_dump(mode="json")
    data.update(company_changes or {})
    company = CompanyRecord.model_validate(data)
    sender = company.sender_address(channel) or "x"
    component = sender if channel == "email" else sender.lstrip("+")
    conversation_id = f"{request.company_id}#{request.project_id}#{request.request_id}#{component}"
    context = build_context(request, company, conversation_id, router_version="r", trace_id="t", queue_timestamp="q")
    return context.model_dump(mode="json")


def parse(context: Any) -> Any:
    return parse_template_job(orjson.dumps(context).decode())


@pytest.mark.parametrize("channel", ["whatsapp", "sms", "email"])
def test_a_routed_context_parses_for_every_channel(channel):
    job = parse(context_for(channel))
    assert job.channel == channel
    assert job.recipient == ("lee@example.com" if channel == "email" else "+447700900123")
    assert job.ai.output_keys == {"whatsapp": ("1", "2"), "sms": ("body",), "email": ("subject", "body")}[channel]


def test_the_new_conversation_carries_the_company_address_of_its_channel_and_the_versions():
    job = parse(context_for("sms"))
    new = new_conversation(job)
    assert new.key == ConversationKey("+447700900123", job.conversation_id)
    assert (new.channel, new.company_address) == ("sms", "+447700900002")
    assert new.recipient["recipient_tel"] == "+447700900123"
    assert (new.router_version, new.processor_version, new.trace_id) == ("r", PROCESSOR_VERSION, "t")
    assert new.ai_config is not None and new.channel_config is not None


def test_body_that_is_not_json_is_invalid():
    with pytest.raises(InvalidContext, match="context_not_json"):
        parse_template_job("{oops")


def test_context_missing_a_section_is_invalid():
    context = context_for()
    del context["conversation_data"]
    with pytest.raises(InvalidContext, match="context_shape_invalid"):
        parse(context)


def test_recipient_without_a_valid_number_is_invalid():
    context = context_for()
    context["frontend_payload"]["recipient_data"]["recipient_tel"] = "12"
    with pytest.raises(InvalidContext, match="recipient_invalid"):
        parse(context)


def test_conversation_id_of_another_request_is_invalid_and_names_the_conversation():
    context = context_for()
    context["conversation_data"]["conversation_id"] = "ci-x#pi-y#z#1"
    with pytest.raises(InvalidContext) as raised:
        parse(context)
    assert (raised.value.reason, raised.value.primary_channel) == ("conversation_id_mismatch", "+447700900123")


@pytest.mark.parametrize("value", [1e200, 1e-200, "a\uffff"])
def test_a_value_the_stores_refuse_is_invalid_and_names_the_conversation(value):
    """Queued before the endpoint refused such values: dead-lettered at once, not retried as an outage."""
    context = context_for()
    context["frontend_payload"]["project_data"]["slot"] = value
    with pytest.raises(InvalidContext) as raised:
        parse(context)
    assert (raised.value.reason, raised.value.primary_channel) == ("unstorable_value", "+447700900123")


def test_missing_ai_instructions_are_invalid():
    context = context_for()
    del context["company_data_payload"]["ai_config"]["openai_config"]["whatsapp"]["template_sender"]
    with pytest.raises(InvalidContext, match="ai_config_missing_template_instructions"):
        parse(context)


def test_missing_channel_config_is_invalid():
    context = context_for()
    del context["company_data_payload"]["channel_config"]["whatsapp"]
    with pytest.raises(InvalidContext, match="channel_config_missing"):
        parse(context)
