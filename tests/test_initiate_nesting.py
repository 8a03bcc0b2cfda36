"""Nesting limits: a body nested deeper than the stores and the serialiser can take is refused at the endpoint.

project_data may be nested at most MAX_PROJECT_DATA_DEPTH (16) levels (a flat object is 1): the conversation
record keeps it one level below a DynamoDB item, whose limit is 32, and orjson refuses to write past ~254.
Deeper: 400 INVALID_PROJECT_DATA. Any other part of the body nested deeper than 16: 400 INVALID_REQUEST.
Past orjson's parse limit (1024) the body is not JSON the service reads: 400 INVALID_REQUEST.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.domain.errors import ApiError, ErrorCode
from service.domain.initiate import MAX_PROJECT_DATA_DEPTH, validate_initiate_body
from tests.conftest import initiate_body
from tests.support import drained_messages


def nested_dicts(depth: int, leaf: Any = "v") -> Any:
    """`depth` levels of {"k": ...} around `leaf`, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_lists(depth: int) -> Any:
    value: Any = "v"
    for _ in range(depth):
        value = [value]
    return value


def _code_for(body: Any) -> ErrorCode | None:
    try:
        validate_initiate_body(body)
    except ApiError as exc:
        return exc.code
    return None


class _MustNotBeOpened(dict[str, Any]):
    """A container past the limit: the depth check must refuse before it looks inside."""

    def __iter__(self) -> Any:
        raise AssertionError("the depth check walked past the limit")

    def items(self) -> Any:
        raise AssertionError("the depth check walked past the limit")

    def values(self) -> Any:
        raise AssertionError("the depth check walked past the limit")


# -- the rule, without HTTP ---------------------------------------------------------------------------------------


def test_project_data_at_the_limit_is_accepted():
    assert MAX_PROJECT_DATA_DEPTH == 16
    assert _code_for(initiate_body(project_data=nested_dicts(16))) is None


def test_flat_project_data_counts_as_one_level():
    assert _code_for(initiate_body(project_data=nested_dicts(1))) is None
    assert _code_for(initiate_body(project_data={})) is None


@pytest.mark.parametrize("depth", [17, 40, 250, 400])
def test_project_data_objects_past_the_limit_are_invalid_project_data(depth):
    assert _code_for(initiate_body(project_data=nested_dicts(depth))) is ErrorCode.INVALID_PROJECT_DATA


def test_lists_count_as_levels_of_project_data():
    assert _code_for(initiate_body(project_data={"k": nested_lists(15)})) is None
    assert _code_for(initiate_body(project_data={"k": nested_lists(16)})) is ErrorCode.INVALID_PROJECT_DATA


def test_project_data_ten_thousand_deep_is_refused_without_recursion():
    assert _code_for(initiate_body(project_data=nested_dicts(10_000))) is ErrorCode.INVALID_PROJECT_DATA


def test_depth_check_stops_at_the_first_level_past_the_limit():
    beyond = nested_dicts(16, leaf=_MustNotBeOpened(k="v"))
    assert _code_for(initiate_body(project_data=beyond)) is ErrorCode.INVALID_PROJECT_DATA


def test_project_data_of_the_wrong_type_is_still_reported_first():
    assert _code_for(initiate_body(project_data=nested_lists(400))) is ErrorCode.INVALID_PROJECT_DATA_TYPE


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipient_data": {"recipient_notes": nested_dicts(16)}},
        {"request_data": {"extra": nested_lists(16)}},
        {"company_data": {"extra": nested_dicts(300)}},
        {"unexpected_section": nested_dicts(17)},
    ],
    ids=["recipient_data", "request_data", "company_data", "extra section"],
)
def test_other_parts_of_the_body_past_the_limit_are_an_invalid_request(overrides):
    assert _code_for(initiate_body(**overrides)) is ErrorCode.INVALID_REQUEST


def test_other_parts_of_the_body_at_the_limit_are_accepted():
    assert _code_for(initiate_body(recipient_data={"recipient_notes": nested_dicts(15)})) is None


# -- through HTTP: raw JSON, since the client's own encoder recurses ----------------------------------------------


def _raw_body_with_deep_project_data(depth: int) -> tuple[bytes, str]:
    body = initiate_body(project_data="__deep__")
    deep = "{" + '"k":{' * (depth - 1) + '"k":"v"' + "}" * depth
    raw = orjson.dumps(body).replace(b'"__deep__"', deep.encode())
    return raw, body["request_data"]["request_id"]


async def _queued_conversation_ids(deps, queue_url) -> set[str]:
    """Drain the queue; the conversation ids of every message that was on it."""
    return {message["attributes"].get("conversationId", "") for message in await drained_messages(deps, queue_url)}


async def test_deep_project_data_is_refused_with_400_and_nothing_is_queued(api, deps, tenant):
    expected = {
        17: ErrorCode.INVALID_PROJECT_DATA,
        40: ErrorCode.INVALID_PROJECT_DATA,
        250: ErrorCode.INVALID_PROJECT_DATA,
        400: ErrorCode.INVALID_PROJECT_DATA,
        2000: ErrorCode.INVALID_REQUEST,  # past orjson's own parse limit
    }
    answers: dict[int, tuple[int, str]] = {}
    request_ids = []
    for depth in expected:
        raw, request_id = _raw_body_with_deep_project_data(depth)
        request_ids.append(request_id)
        response = await api.post(
            "/initiate-conversation",
            data=raw,
            headers={"x-api-key": tenant.api_key, "Content-Type": "application/json"},
        )
        answers[depth] = (response.status, (await response.json())["error_code"])
    assert answers == {depth: (400, code.value) for depth, code in expected.items()}
    queued = await _queued_conversation_ids(deps, deps.settings.whatsapp_queue_url)
    assert not [cid for cid in queued if any(request_id in cid for request_id in request_ids)]


async def test_project_data_at_the_limit_is_queued_intact(api, deps, tenant):
    raw, request_id = _raw_body_with_deep_project_data(MAX_PROJECT_DATA_DEPTH)
    response = await api.post(
        "/initiate-conversation", data=raw, headers={"x-api-key": tenant.api_key, "Content-Type": "application/json"}
    )
    assert response.status == 200
    conversation = (await response.json())["conversation_id"]
    assert conversation in await _queued_conversation_ids(deps, deps.settings.whatsapp_queue_url)
    assert request_id in conversation
