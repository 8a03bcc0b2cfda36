"""SPEC §2 validation: every shape rule answers its own error code and status, and queues nothing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from service.domain.errors import ErrorCode
from tests.conftest import initiate_body


def _without(section: str, field: str | None = None) -> dict[str, Any]:
    body = initiate_body()
    if field is None:
        del body[section]
    else:
        del body[section][field]
    return body


CASES: list[tuple[str, Any, int, ErrorCode]] = [
    ("body is a JSON array", [1, 2], 400, ErrorCode.INVALID_REQUEST),
    ("company_data missing", _without("company_data"), 400, ErrorCode.MISSING_COMPANY_DATA),
    ("company_data not an object", initiate_body(company_data="ci"), 400, ErrorCode.INVALID_COMPANY_DATA_TYPE),
    ("company_id empty", initiate_body(company_data={"company_id": ""}), 400, ErrorCode.MISSING_IDENTIFIERS),
    ("project_id missing", _without("company_data", "project_id"), 400, ErrorCode.MISSING_IDENTIFIERS),
    ("recipient_data missing", _without("recipient_data"), 400, ErrorCode.MISSING_RECIPIENT_DATA),
    ("recipient_data a list", initiate_body(recipient_data=[]), 400, ErrorCode.INVALID_RECIPIENT_DATA_TYPE),
    ("request_data missing", _without("request_data"), 400, ErrorCode.MISSING_REQUEST_DATA),
    ("request_data a string", initiate_body(request_data="x"), 400, ErrorCode.INVALID_REQUEST_DATA_TYPE),
    ("project_data a number", initiate_body(project_data=5), 400, ErrorCode.INVALID_PROJECT_DATA_TYPE),
    ("request_id missing", _without("request_data", "request_id"), 400, ErrorCode.MISSING_REQUEST_ID),
    ("request_id a number", initiate_body(request_data={"request_id": 7}), 400, ErrorCode.INVALID_REQUEST_ID_FORMAT),
    ("request_id blank", initiate_body(request_data={"request_id": " "}), 400, ErrorCode.INVALID_REQUEST_ID_FORMAT),
    ("request_id not a uuid", initiate_body(request_data={"request_id": "abc"}), 400, ErrorCode.INVALID_REQUEST_ID),
    (
        "request_id uppercase",
        initiate_body(request_data={"request_id": str(uuid.uuid4()).upper()}),
        400,
        ErrorCode.INVALID_REQUEST_ID,
    ),
    (
        "request_id a uuid1",
        initiate_body(request_data={"request_id": str(uuid.uuid1())}),
        400,
        ErrorCode.INVALID_REQUEST_ID,
    ),
    ("channel missing", _without("request_data", "channel_method"), 400, ErrorCode.MISSING_CHANNEL_METHOD),
    (
        "channel a list",
        initiate_body(request_data={"channel_method": ["sms"]}),
        400,
        ErrorCode.INVALID_CHANNEL_METHOD_FORMAT,
    ),
    ("channel fax", initiate_body(request_data={"channel_method": "fax"}), 400, ErrorCode.UNSUPPORTED_CHANNEL),
    (
        "timestamp missing",
        _without("request_data", "initial_request_timestamp"),
        400,
        ErrorCode.MISSING_INITIAL_REQUEST_TIMESTAMP,
    ),
    (
        "timestamp a number",
        initiate_body(request_data={"initial_request_timestamp": 1714196756}),
        400,
        ErrorCode.INVALID_INITIAL_REQUEST_TIMESTAMP_FORMAT,
    ),
    (
        "timestamp without a zone",
        initiate_body(request_data={"initial_request_timestamp": "2025-04-27T05:45:56"}),
        400,
        ErrorCode.INVALID_TIMESTAMP,
    ),
    (
        "timestamp not a date",
        initiate_body(request_data={"initial_request_timestamp": "yesterday"}),
        400,
        ErrorCode.INVALID_TIMESTAMP,
    ),
    ("whatsapp without tel", _without("recipient_data", "recipient_tel"), 400, ErrorCode.MISSING_RECIPIENT_TEL),
    (
        "whatsapp tel not E.164",
        initiate_body(recipient_data={"recipient_tel": "07700900123"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "sms tel too short",
        initiate_body("sms", recipient_data={"recipient_tel": "+1234567"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "email without address",
        initiate_body("email", recipient_data={"recipient_email": None}),
        400,
        ErrorCode.MISSING_RECIPIENT_EMAIL,
    ),
    (
        "email address invalid",
        initiate_body("email", recipient_data={"recipient_email": "lee@"}),
        400,
        ErrorCode.INVALID_RECIPIENT_EMAIL,
    ),
    ("consent missing", _without("recipient_data", "comms_consent"), 400, ErrorCode.MISSING_COMMS_CONSENT),
    (
        "consent a string",
        initiate_body(recipient_data={"comms_consent": "yes"}),
        400,
        ErrorCode.INVALID_COMMS_CONSENT_TYPE,
    ),
    ("consent false", initiate_body(recipient_data={"comms_consent": False}), 422, ErrorCode.CONSENT_REQUIRED),
]

# Values are taken as sent, never trimmed: whitespace at either end or a control character anywhere is refused.
_UUID = "550e8400-e29b-41d4-a716-446655440001"
UNCLEAN_CASES: list[tuple[str, Any, int, ErrorCode]] = [
    (
        "company_id with a trailing newline",
        initiate_body(company_data={"company_id": "ci-demo-001\n"}),
        400,
        ErrorCode.INVALID_REQUEST,
    ),
    (
        "project_id with a leading space",
        initiate_body(company_data={"project_id": " pi-demo-001"}),
        400,
        ErrorCode.INVALID_REQUEST,
    ),
    (
        "company_id with a control character inside",
        initiate_body(company_data={"company_id": "ci-demo\x00-001"}),
        400,
        ErrorCode.INVALID_REQUEST,
    ),
    ("company_id only spaces", initiate_body(company_data={"company_id": "   "}), 400, ErrorCode.MISSING_IDENTIFIERS),
    (
        "request_id with a trailing newline",
        initiate_body(request_data={"request_id": _UUID + "\n"}),
        400,
        ErrorCode.INVALID_REQUEST_ID,
    ),
    (
        "channel with surrounding spaces",
        initiate_body(request_data={"channel_method": " whatsapp "}),
        400,
        ErrorCode.UNSUPPORTED_CHANNEL,
    ),
    (
        "channel with a trailing newline",
        initiate_body(request_data={"channel_method": "sms\n"}),
        400,
        ErrorCode.UNSUPPORTED_CHANNEL,
    ),
    (
        "timestamp with a trailing newline",
        initiate_body(request_data={"initial_request_timestamp": "2025-04-27T05:45:56Z\n"}),
        400,
        ErrorCode.INVALID_TIMESTAMP,
    ),
    (
        "timestamp with a newline before its zone",
        initiate_body(request_data={"initial_request_timestamp": "2025-04-27T05:45:56\nZ"}),
        400,
        ErrorCode.INVALID_TIMESTAMP,
    ),
    (
        "timestamp with a space before its zone",
        initiate_body(request_data={"initial_request_timestamp": "2025-04-27T05:45:56 Z"}),
        400,
        ErrorCode.INVALID_TIMESTAMP,
    ),
    (
        "whatsapp tel with a trailing newline",
        initiate_body(recipient_data={"recipient_tel": "+447700900123\n"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "sms tel with a leading space",
        initiate_body("sms", recipient_data={"recipient_tel": " +447700900123"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "whatsapp tel in arabic-indic digits",
        initiate_body(recipient_data={"recipient_tel": "+\u0664\u0664\u0667\u0667\u0660\u0660\u0669\u0660\u0660"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "email address with a trailing newline",
        initiate_body("email", recipient_data={"recipient_email": "lee@example.com\n"}),
        400,
        ErrorCode.INVALID_RECIPIENT_EMAIL,
    ),
    (
        "email request with a tel that is not E.164",
        initiate_body("email", recipient_data={"recipient_tel": "+447700900123\r"}),
        400,
        ErrorCode.INVALID_RECIPIENT_TEL,
    ),
    (
        "sms request with an email that is not valid",
        initiate_body("sms", recipient_data={"recipient_email": " lee@example.com"}),
        400,
        ErrorCode.INVALID_RECIPIENT_EMAIL,
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_invalid_body_is_refused_with_its_error_code(api, tenant, case, body, status, code):
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    payload = await response.json()
    assert (response.status, payload["error_code"]) == (status, code.value)
    assert payload["status"] == "error"
    assert payload["message"]


@pytest.mark.parametrize(("case", "body", "status", "code"), UNCLEAN_CASES, ids=[c[0] for c in UNCLEAN_CASES])
async def test_value_with_surrounding_whitespace_or_control_characters_is_refused(
    api, tenant, case, body, status, code
):
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    payload = await response.json()
    assert (response.status, payload["error_code"]) == (status, code.value)


async def test_email_request_without_a_tel_is_accepted(api, tenant):
    body = initiate_body("email", recipient_data={"recipient_tel": None})
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    assert response.status == 200


async def test_body_that_is_not_json_is_an_invalid_request(api, tenant):
    response = await api.post(
        "/initiate-conversation",
        data=b"{not json",
        headers={"x-api-key": tenant.api_key, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error_code"] == "INVALID_REQUEST"


async def test_error_body_echoes_the_callers_request_id(api, tenant):
    body = initiate_body(request_data={"channel_method": "fax"})
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    assert (await response.json())["request_id"] == body["request_data"]["request_id"]


@pytest.mark.parametrize("request_id", ["x" * 60_000, "a\u0000b", "5f0c7d4e-1111-4222-8333-444455556666\n"])
async def test_error_body_never_echoes_a_request_id_that_is_not_one(api, tenant, request_id):
    body = initiate_body(request_data={"request_id": request_id})
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    answer = await response.json()
    assert answer["error_code"] == "INVALID_REQUEST_ID"
    assert answer["request_id"] == response.headers["X-Request-Id"] != request_id


async def test_error_body_without_a_request_id_gets_a_generated_one(api, tenant):
    response = await api.post(
        "/initiate-conversation", json=_without("request_data", "request_id"), headers={"x-api-key": tenant.api_key}
    )
    generated = (await response.json())["request_id"]
    assert uuid.UUID(generated)
    assert response.headers["X-Request-Id"] == generated


async def test_channel_method_is_case_insensitive(api, tenant):
    body = initiate_body(request_data={"channel_method": "WhatsApp"})
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    assert response.status == 200
