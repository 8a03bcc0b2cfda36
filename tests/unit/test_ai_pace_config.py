"""A project's pace for its OpenAI key: `ai_config.openai_config.<channel>.requests_per_second`, read leniently
(operators write ai_config by hand), as it reaches the AI call: the template job's AiSettings (consumers/template_job
.py), the stored conversation's AiProfile the reply sender reads (conversation_codec), and the AiRequest the template
sender writes. None there means the default, COMMS_AI_REQUESTS_PER_SECOND."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumers.template_job import TemplateJob, new_conversation, parse_template_job
from service.adapters.aws import conversation_codec as codec
from tests.fakes import record_from_new
from tests.unit.test_template_sender import context, make_rig

SMS_TEXT = "Hi Lee, see you on Saturday."


def body_with_paces(channel: str, **paces: object) -> str:
    """The channel-queue message for a `channel` job whose company sets `requests_per_second` per channel key
    (`paces`, e.g. sms=40); the other keys set none."""
    data = context(channel)
    openai_config: dict[str, Any] = data["company_data_payload"]["ai_config"]["openai_config"]
    for key_channel, pace in paces.items():
        openai_config[key_channel]["requests_per_second"] = pace
    return orjson.dumps(data).decode()


def job_with_paces(channel: str, **paces: object) -> TemplateJob:
    return parse_template_job(body_with_paces(channel, **paces))


def test_a_template_job_is_paced_at_its_channel_key_s_pace() -> None:
    assert job_with_paces("sms", sms=40).ai.requests_per_second == 40.0


def test_a_template_job_is_not_paced_at_another_channel_key_s_pace() -> None:
    assert job_with_paces("whatsapp", sms=40, whatsapp=7).ai.requests_per_second == 7.0


def test_a_template_job_whose_key_sets_no_pace_is_paced_at_the_default() -> None:
    assert job_with_paces("sms").ai.requests_per_second is None


@pytest.mark.parametrize("value", [0, -1, "8", True, None, float("nan"), float("inf"), [8]])
def test_an_odd_pace_means_the_default(value: object) -> None:
    assert job_with_paces("sms", sms=value).ai.requests_per_second is None


def test_a_stored_conversation_is_answered_at_its_key_s_pace() -> None:
    new = new_conversation(job_with_paces("sms", sms=40))
    assert record_from_new(new, "owner", 0.0, "2026-01-01T00:00:00.000Z").ai.requests_per_second == 40.0


def test_a_stored_conversation_whose_key_sets_no_pace_is_answered_at_the_default() -> None:
    new = new_conversation(job_with_paces("sms"))
    assert record_from_new(new, "owner", 0.0, "2026-01-01T00:00:00.000Z").ai.requests_per_second is None


@pytest.mark.parametrize("ai_config", [None, "openai", [], {}])
def test_a_stored_conversation_with_a_missing_or_odd_ai_config_is_answered_at_the_default(ai_config: object) -> None:
    item = {"primary_channel": "+447700900123", "conversation_id": "c#p#r#1", "ai_config": ai_config}
    assert codec.record_from_item(item).ai.requests_per_second is None


async def test_the_template_s_ai_call_carries_its_key_s_pace() -> None:
    rig = make_rig("sms", body_with_paces("sms", sms=40))
    rig.world.ai.answer_next({"body": SMS_TEXT})
    await rig.deliver()
    assert [request.requests_per_second for request in rig.world.ai.requests] == [40.0]


async def test_the_template_s_ai_call_without_a_pace_of_its_key_carries_the_default() -> None:
    rig = make_rig("sms", body_with_paces("sms"))
    rig.world.ai.answer_next({"body": SMS_TEXT})
    await rig.deliver()
    assert [request.requests_per_second for request in rig.world.ai.requests] == [None]
