"""A project's pace for its OpenAI key (service/domain/company.py): `ai_config.openai_config.<channel>
.requests_per_second`, read leniently, as operators write ai_config by hand."""

from __future__ import annotations

import time
from typing import Any

import pytest

from local_stack.seed import demo_company
from service.domain.company import CompanyRecord, ai_requests_per_second


def with_whatsapp_ai(**changes: Any) -> CompanyRecord:
    record = demo_company("comms", "dev", time.time())
    openai_config = record.ai_config["openai_config"]
    whatsapp = {**openai_config["whatsapp"], **changes}
    return record.model_copy(update={"ai_config": {"openai_config": {**openai_config, "whatsapp": whatsapp}}})


def test_a_channel_s_key_pace_is_read_from_its_openai_config() -> None:
    record = with_whatsapp_ai(requests_per_second=40)
    assert record.ai_requests_per_second("whatsapp") == 40.0
    assert record.ai_requests_per_second("sms") == 100.0  # that channel's key keeps its own (the demo seed's)


def test_a_key_without_its_own_pace_keeps_the_default() -> None:
    assert with_whatsapp_ai(requests_per_second=None).ai_requests_per_second("whatsapp") is None


@pytest.mark.parametrize("value", [0, -1, "8", True, None, float("nan"), float("inf"), [8]])
def test_an_odd_pace_means_the_default(value: object) -> None:
    assert ai_requests_per_second({"requests_per_second": value}) is None


@pytest.mark.parametrize("config", [None, "openai", [], {}])
def test_a_missing_or_odd_openai_config_means_the_default(config: object) -> None:
    assert ai_requests_per_second(config) is None


def test_a_company_without_ai_config_has_no_pace_of_its_own() -> None:
    record = demo_company("comms", "dev", time.time()).model_copy(update={"ai_config": {}})
    assert record.ai_requests_per_second("whatsapp") is None
