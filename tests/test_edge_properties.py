"""Properties of the endpoint's edge: untrusted strings are refused with a SPEC §2 code, or accepted exactly clean.

Generated values include control characters, whitespace of every kind, the newline variants a regex `$`
or `str.splitlines` treats as line ends, and lookalike digits (fullwidth, Arabic-Indic) that `\\d` would take.
Values are never normalised: a value that is not clean as sent is refused with its field's code.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.errors import ApiError, ErrorCode
from service.domain.initiate import SUPPORTED_CHANNELS, InitiateRequest, validate_initiate_body
from service.domain.timefmt import utc_iso
from tests.support import add_tenant, queued_messages

ASCII_E164 = re.compile(r"\+[1-9][0-9]{7,14}\Z", re.ASCII)
ASCII_EMAIL = re.compile(r"[!-~]+@[A-Za-z0-9.-]+\Z", re.ASCII)

# The codes validation may answer with (SPEC §2); anything else from the pure rule is a defect.
VALIDATION_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.MISSING_IDENTIFIERS,
        ErrorCode.MISSING_COMPANY_DATA,
        ErrorCode.MISSING_RECIPIENT_DATA,
        ErrorCode.MISSING_REQUEST_DATA,
        ErrorCode.INVALID_COMPANY_DATA_TYPE,
        ErrorCode.INVALID_RECIPIENT_DATA_TYPE,
        ErrorCode.INVALID_REQUEST_DATA_TYPE,
        ErrorCode.INVALID_PROJECT_DATA_TYPE,
        ErrorCode.INVALID_PROJECT_DATA,
        ErrorCode.MISSING_REQUEST_ID,
        ErrorCode.MISSING_CHANNEL_METHOD,
        ErrorCode.MISSING_INITIAL_REQUEST_TIMESTAMP,
        ErrorCode.INVALID_REQUEST_ID_FORMAT,
        ErrorCode.INVALID_CHANNEL_METHOD_FORMAT,
        ErrorCode.INVALID_INITIAL_REQUEST_TIMESTAMP_FORMAT,
        ErrorCode.INVALID_REQUEST_ID,
        ErrorCode.UNSUPPORTED_CHANNEL,
        ErrorCode.INVALID_TIMESTAMP,
        ErrorCode.MISSING_RECIPIENT_TEL,
        ErrorCode.INVALID_RECIPIENT_TEL,
        ErrorCode.MISSING_RECIPIENT_EMAIL,
        ErrorCode.INVALID_RECIPIENT_EMAIL,
        ErrorCode.MISSING_COMMS_CONSENT,
        ErrorCode.INVALID_COMMS_CONSENT_TYPE,
        ErrorCode.CONSENT_REQUIRED,
    }
)

NEWLINES = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
OTHER_WHITESPACE = [" ", "\t", "\u00a0", "\u1680", "\u2003", "\u3000"]
CONTROLS = ["\x00", "\x07", "\x1b", "\x7f", "\x9b", "\u200b", "\u200e", "\u202e", "\u2066", "\ufeff"]
UNCLEAN = NEWLINES + OTHER_WHITESPACE + CONTROLS
# Digit sets `\d` accepts besides 0-9: fullwidth, Arabic-Indic, Extended Arabic-Indic, Devanagari.
LOOKALIKE_DIGITS = ["\uff10", "\u0660", "\u06f0", "\u0966"]

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

# -- strategies ---------------------------------------------------------------------------------------------------

unclean_char = st.sampled_from(UNCLEAN)
control_char = st.sampled_from(NEWLINES + CONTROLS)


def with_char_inserted(valid: st.SearchStrategy[str], chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with one unclean character put in it: at the end (where `$` is fooled), the start, or inside."""

    def insert(value: str, char: str, at: int | None) -> str:
        at = len(value) if at is None else at % (len(value) + 1)
        return value[:at] + char + value[at:]

    return st.builds(insert, valid, chars, st.one_of(st.none(), st.just(0), st.integers(0, 200)))


def surrounded(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with unclean characters before it, after it, or both."""
    return st.builds(
        lambda before, value, after: before + value + after,
        st.sampled_from(["", *UNCLEAN]),
        valid,
        st.sampled_from(["", *UNCLEAN]),
    ).filter(lambda v: v != v.strip() or any(c in v for c in NEWLINES + CONTROLS))


def with_lookalike_digits(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with at least one ASCII digit swapped for the same digit of another script."""

    def swap(value: str, zero: str, picks: list[bool]) -> str:
        digits = [i for i, c in enumerate(value) if c.isascii() and c.isdigit()]
        chosen = [i for i, pick in zip(digits, picks, strict=False) if pick] or digits[:1]
        chars = list(value)
        for i in chosen:
            chars[i] = chr(ord(zero) + int(chars[i]))
        return "".join(chars)

    return st.builds(swap, valid, st.sampled_from(LOOKALIKE_DIGITS), st.lists(st.booleans(), max_size=20))


def junk_text() -> st.SearchStrategy[str]:
    alphabet = st.one_of(
        st.sampled_from(
            [*(c for c in UNCLEAN if len(c) == 1), *LOOKALIKE_DIGITS, "\uff0b", *"+0123456789abcdef-@.TZ:"]
        ),
        st.characters(codec="utf-8"),
    )
    return st.text(alphabet, max_size=40)


json_non_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

valid_tel = st.from_regex(r"\+[1-9][0-9]{7,14}", fullmatch=True)
valid_email = st.from_regex(r"[a-z][a-z0-9.]{0,8}@[a-z]{1,10}\.(com|org|example)", fullmatch=True)
valid_request_id = st.uuids(version=4).map(str)
valid_channel = st.sampled_from(["whatsapp", "sms", "email", "WhatsApp", "SMS", "Email"])
valid_identifier = st.from_regex(r"[a-z]{2}-[a-z0-9-]{1,16}[a-z0-9]", fullmatch=True)
valid_timestamp = st.builds(
    lambda moment, offset_minutes, zulu: (
        moment.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if zulu
        else moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes))).isoformat()
    ),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(-14 * 60, 14 * 60),
    st.booleans(),
)

VALID: dict[str, st.SearchStrategy[Any]] = {
    "company_id": valid_identifier,
    "project_id": valid_identifier,
    "request_id": valid_request_id,
    "channel_method": valid_channel,
    "initial_request_timestamp": valid_timestamp,
    "recipient_tel": valid_tel,
    "recipient_email": valid_email,
    "comms_consent": st.just(True),
}


def spoilt(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        with_char_inserted(valid, unclean_char),
        surrounded(valid),
        with_lookalike_digits(valid),
        junk_text(),
        json_non_strings,
    )


SPOILT: dict[str, st.SearchStrategy[Any]] = {
    name: spoilt(strategy) for name, strategy in VALID.items() if name != "comms_consent"
} | {"comms_consent": st.one_of(st.booleans(), json_non_strings, junk_text())}

free_text = st.text(st.characters(codec="utf-8"), max_size=30)


def nested_dicts(depth: int) -> Any:
    value: Any = "v"
    for _ in range(depth):
        value = {"k": value}
    return value


project_data = st.one_of(
    st.dictionaries(free_text, st.one_of(free_text, st.integers(), st.none()), max_size=4),
    st.integers(1, 60).map(nested_dicts),
)


def assemble(values: dict[str, Any], project: Any, first_name: str) -> dict[str, Any]:
    return {
        "company_data": {"company_id": values["company_id"], "project_id": values["project_id"]},
        "recipient_data": {
            "recipient_first_name": first_name,
            "recipient_tel": values["recipient_tel"],
            "recipient_email": values["recipient_email"],
            "comms_consent": values["comms_consent"],
        },
        "project_data": project,
        "request_data": {
            "request_id": values["request_id"],
            "channel_method": values["channel_method"],
            "initial_request_timestamp": values["initial_request_timestamp"],
        },
    }


@st.composite
def bodies(draw: st.DrawFn, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A body with a few (maybe no) fields spoilt and the rest valid, so every rule gets reached."""
    fixed = fixed or {}
    spoil = draw(st.sets(st.sampled_from(sorted(set(VALID) - set(fixed))), max_size=2))
    values = {
        name: fixed[name] if name in fixed else draw(SPOILT[name] if name in spoil else VALID[name]) for name in VALID
    }
    return assemble(values, draw(project_data), draw(free_text))


@st.composite
def body_with(draw: st.DrawFn, field: str, value: st.SearchStrategy[Any], channel: str | None = None) -> dict[str, Any]:
    """A valid body except for `field`."""
    values = {name: draw(strategy) for name, strategy in VALID.items()}
    values[field] = draw(value)
    if channel is not None:
        values["channel_method"] = channel
    return assemble(values, {"property": "12 Acacia Avenue"}, "Lee")


def outcome(body: Any) -> InitiateRequest | ErrorCode:
    try:
        return validate_initiate_body(body)
    except ApiError as exc:
        return exc.code


def is_clean(value: str) -> bool:
    """No whitespace at either end, no control, format or line/paragraph separator character anywhere."""
    return value == value.strip() and not any(unicodedata.category(c) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for c in value)


def assert_accepted_request_is_clean(request: InitiateRequest) -> None:
    assert uuid.UUID(request.request_id).version == 4
    assert str(uuid.UUID(request.request_id)) == request.request_id
    assert request.channel in SUPPORTED_CHANNELS
    assert request.recipient_tel is None or ASCII_E164.match(request.recipient_tel)
    assert request.recipient_email is None or ASCII_EMAIL.match(request.recipient_email)
    assert request.initial_request_timestamp.isascii() and request.initial_request_timestamp.isprintable()
    assert " " not in request.initial_request_timestamp
    assert is_clean(request.company_id) and is_clean(request.project_id)
    assert request.recipient == (request.recipient_email if request.channel == "email" else request.recipient_tel)


# -- (a) the pure rule ------------------------------------------------------------------------------------------


@SETTINGS
@given(body=bodies())
def test_any_body_is_refused_with_a_validation_code_or_accepted_clean(body):
    result = outcome(body)
    if isinstance(result, ErrorCode):
        assert result in VALIDATION_CODES
    else:
        assert_accepted_request_is_clean(result)


@SETTINGS
@given(
    body=st.one_of(
        json_non_strings,
        junk_text(),
        st.dictionaries(
            st.sampled_from(["company_data", "recipient_data", "request_data", "project_data"]),
            st.one_of(json_non_strings, junk_text()),
        ),
    )
)
def test_a_body_of_any_shape_is_refused_with_a_validation_code(body):
    result = outcome(body)
    assert isinstance(result, ErrorCode) and result in VALIDATION_CODES


@SETTINGS
@given(
    body=st.sampled_from(["whatsapp", "sms"]).flatmap(
        lambda channel: body_with(
            "recipient_tel",
            st.one_of(
                with_char_inserted(valid_tel, unclean_char), surrounded(valid_tel), with_lookalike_digits(valid_tel)
            ),
            channel,
        )
    )
)
def test_tel_with_an_unclean_character_or_lookalike_digits_is_invalid_recipient_tel(body):
    assert outcome(body) is ErrorCode.INVALID_RECIPIENT_TEL


@SETTINGS
@given(body=body_with("recipient_tel", junk_text(), "sms"))
def test_an_accepted_tel_is_an_ascii_e164_number(body):
    result = outcome(body)
    assert result in (ErrorCode.INVALID_RECIPIENT_TEL, ErrorCode.MISSING_RECIPIENT_TEL) or (
        isinstance(result, InitiateRequest) and ASCII_E164.match(result.recipient)
    )


@SETTINGS
@given(
    body=body_with(
        "request_id", st.one_of(with_char_inserted(valid_request_id, unclean_char), surrounded(valid_request_id))
    )
)
def test_request_id_with_an_unclean_character_is_invalid_request_id(body):
    assert outcome(body) is ErrorCode.INVALID_REQUEST_ID


@SETTINGS
@given(body=body_with("request_id", junk_text()))
def test_an_accepted_request_id_is_canonical(body):
    result = outcome(body)
    assert isinstance(result, ErrorCode) or str(uuid.UUID(result.request_id)) == result.request_id


@SETTINGS
@given(
    body=body_with(
        "channel_method", st.one_of(with_char_inserted(valid_channel, unclean_char), surrounded(valid_channel))
    )
)
def test_channel_with_an_unclean_character_is_unsupported(body):
    assert outcome(body) is ErrorCode.UNSUPPORTED_CHANNEL


@SETTINGS
@given(body=body_with("channel_method", valid_channel))
def test_channel_is_case_insensitive_and_normalised_to_lowercase(body):
    result = outcome(body)
    assert isinstance(result, InitiateRequest)
    assert result.channel == body["request_data"]["channel_method"].lower()


@SETTINGS
@given(
    body=body_with(
        "initial_request_timestamp",
        st.one_of(
            with_char_inserted(valid_timestamp, unclean_char),
            surrounded(valid_timestamp),
            with_lookalike_digits(valid_timestamp),
        ),
    )
)
def test_timestamp_with_an_unclean_character_or_lookalike_digits_is_invalid(body):
    assert outcome(body) is ErrorCode.INVALID_TIMESTAMP


@SETTINGS
@given(body=body_with("initial_request_timestamp", valid_timestamp))
def test_iso_timestamps_with_a_zone_are_accepted(body):
    assert isinstance(outcome(body), InitiateRequest)


@SETTINGS
@given(
    body=body_with(
        "recipient_email", st.one_of(with_char_inserted(valid_email, unclean_char), surrounded(valid_email)), "email"
    )
)
def test_email_with_an_unclean_character_is_invalid_recipient_email(body):
    assert outcome(body) is ErrorCode.INVALID_RECIPIENT_EMAIL


@SETTINGS
@given(
    field=st.sampled_from(["company_id", "project_id"]),
    data=st.data(),
)
def test_identifier_with_unclean_ends_or_a_control_character_is_an_invalid_request(field, data):
    value = st.one_of(surrounded(valid_identifier), with_char_inserted(valid_identifier, control_char))
    assert outcome(data.draw(body_with(field, value))) is ErrorCode.INVALID_REQUEST


@SETTINGS
@given(field=st.sampled_from(["company_id", "project_id"]), data=st.data())
def test_blank_identifier_is_missing(field, data):
    blank = st.text(st.sampled_from([" ", "\t", "\n", "\u3000"]), max_size=5)
    assert outcome(data.draw(body_with(field, blank))) is ErrorCode.MISSING_IDENTIFIERS


not_a_boolean = st.one_of(json_non_strings, junk_text()).filter(lambda v: v is not None and not isinstance(v, bool))


@SETTINGS
@given(body=body_with("comms_consent", not_a_boolean))
def test_consent_that_is_not_a_boolean_is_refused_as_its_type(body):
    assert outcome(body) is ErrorCode.INVALID_COMMS_CONSENT_TYPE


@SETTINGS
@given(depth=st.integers(1, 300))
def test_project_data_is_accepted_up_to_sixteen_levels_and_refused_deeper(depth):
    body = assemble(
        {
            "company_id": "ci-demo-001",
            "project_id": "pi-demo-001",
            "request_id": str(uuid.UUID(int=depth, version=4)),
            "channel_method": "sms",
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
            "recipient_tel": "+447700900123",
            "recipient_email": None,
            "comms_consent": True,
        },
        nested_dicts(depth),
        "Lee",
    )
    result = outcome(body)
    assert (result is ErrorCode.INVALID_PROJECT_DATA) == (depth > 16)
    assert isinstance(result, InitiateRequest) == (depth <= 16)


@SETTINGS
@given(name=st.text(max_size=40), notes=st.text(max_size=40))
def test_free_text_in_any_script_is_accepted_and_kept_as_sent(name, notes):
    body = assemble(
        {
            "company_id": "ci-demo-001",
            "project_id": "pi-demo-001",
            "request_id": "550e8400-e29b-41d4-a716-446655440001",
            "channel_method": "whatsapp",
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
            "recipient_tel": "+447700900123",
            "recipient_email": "lee@example.com",
            "comms_consent": True,
        },
        {notes: notes},
        name,
    )
    result = outcome(body)
    assert isinstance(result, InitiateRequest)
    assert result.body["recipient_data"]["recipient_first_name"] == name
    assert result.body["project_data"] == {notes: notes}


# -- every newline variant, every field: the field's own code --------------------------------------------------

FIELD_CODES: dict[str, tuple[str, ErrorCode]] = {
    "company_id": ("ci-demo-001", ErrorCode.INVALID_REQUEST),
    "project_id": ("pi-demo-001", ErrorCode.INVALID_REQUEST),
    "request_id": ("550e8400-e29b-41d4-a716-446655440001", ErrorCode.INVALID_REQUEST_ID),
    "channel_method": ("whatsapp", ErrorCode.UNSUPPORTED_CHANNEL),
    "initial_request_timestamp": ("2025-04-27T05:45:56Z", ErrorCode.INVALID_TIMESTAMP),
    "recipient_tel": ("+447700900123", ErrorCode.INVALID_RECIPIENT_TEL),
    "recipient_email": ("lee@example.com", ErrorCode.INVALID_RECIPIENT_EMAIL),
}
PLACEMENTS: dict[str, Callable[[str, str], str]] = {
    "after": lambda value, nl: value + nl,
    "before": lambda value, nl: nl + value,
}


@pytest.mark.parametrize("newline", NEWLINES, ids=[repr(n) for n in NEWLINES])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("field", FIELD_CODES)
def test_a_newline_at_either_end_of_a_field_is_refused_with_the_fields_code(field, placement, newline):
    values = {name: value for name, (value, _) in FIELD_CODES.items()} | {"comms_consent": True}
    values[field] = PLACEMENTS[placement](values[field], newline)
    if field == "recipient_email":
        values["channel_method"] = "email"
    assert outcome(assemble(values, {}, "Lee")) is FIELD_CODES[field][1]


# -- (b) through HTTP -------------------------------------------------------------------------------------------

EDGE_COMPANY, EDGE_PROJECT = "ci-edge-001", "pi-edge-001"
OPTED_OUT_TEL = "+447700030000"


@pytest.fixture(scope="module")
async def edge_key(deps) -> AsyncIterator[str]:
    """A tenant of its own, rate limit lifted so a run of examples is never throttled; its queued messages go after."""
    yield await add_tenant(
        deps, EDGE_COMPANY, EDGE_PROJECT, rate_limits={"requests_per_second": 10_000, "burst": 10_000}
    )
    for channel in SUPPORTED_CHANNELS:
        await queued_messages(deps, deps.settings.queue_url(channel), "")


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=bodies(fixed={"company_id": EDGE_COMPANY, "project_id": EDGE_PROJECT}))
async def test_any_body_over_http_answers_a_spec_error_or_200_with_a_clean_recipient(api, edge_key, body):
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": edge_key})
    answer = await response.json()
    assert response.status < 500, answer
    if response.status == 200:
        assert answer["status"] == "success"
        channel = body["request_data"]["channel_method"].lower()
        recipient = body["recipient_data"]["recipient_email" if channel == "email" else "recipient_tel"]
        assert is_clean(recipient)
        assert channel == "email" or ASCII_E164.match(recipient)
        assert answer["request_id"] == body["request_data"]["request_id"]
    else:
        assert answer["status"] == "error"
        code = ErrorCode(answer["error_code"])
        assert code.http_status == response.status


@pytest.mark.parametrize("variant", [OPTED_OUT_TEL + "\n", " " + OPTED_OUT_TEL, OPTED_OUT_TEL + "\r"], ids=repr)
async def test_opted_out_number_with_unclean_ends_is_refused_and_not_queued(api, deps, edge_key, variant):
    await deps.adapters.opt_outs.opt_out(EDGE_COMPANY, EDGE_PROJECT, "whatsapp", OPTED_OUT_TEL, utc_iso(0))
    body = _edge_body(variant)
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": edge_key})
    assert (response.status, (await response.json())["error_code"]) == (400, "INVALID_RECIPIENT_TEL")
    conversation = f"{EDGE_COMPANY}#{EDGE_PROJECT}#{body['request_data']['request_id']}#447700900001"
    assert await queued_messages(deps, deps.settings.whatsapp_queue_url, conversation) == []


async def test_opted_out_number_as_stored_is_refused_as_opted_out(api, deps, edge_key):
    await deps.adapters.opt_outs.opt_out(EDGE_COMPANY, EDGE_PROJECT, "whatsapp", OPTED_OUT_TEL, utc_iso(0))
    response = await api.post("/initiate-conversation", json=_edge_body(OPTED_OUT_TEL), headers={"x-api-key": edge_key})
    assert (response.status, (await response.json())["error_code"]) == (422, "RECIPIENT_OPTED_OUT")


def _edge_body(tel: str) -> dict[str, Any]:
    return assemble(
        {
            "company_id": EDGE_COMPANY,
            "project_id": EDGE_PROJECT,
            "request_id": str(uuid.uuid4()),
            "channel_method": "whatsapp",
            "initial_request_timestamp": "2025-04-27T05:45:56Z",
            "recipient_tel": tel,
            "recipient_email": "lee@example.com",
            "comms_consent": True,
        },
        {},
        "Lee",
    )
