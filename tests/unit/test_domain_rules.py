"""Pure domain rules, no I/O: token buckets, request-claim verdicts, API keys, conversation ids, timestamps."""

from __future__ import annotations

import pytest

from service.domain.access import rate_limit_for
from service.domain.api_keys import issue_key, parse_key, secret_matches
from service.domain.company import CompanyRecord, RateLimits
from service.domain.conversation import conversation_id
from service.domain.initiate import is_iso8601_with_zone, is_valid_e164, is_valid_email
from service.domain.rate_limit import RateLimit, RateLimiter
from service.domain.timefmt import utc_iso

LIMIT = RateLimit(per_second=2.0, burst=3)


def test_bucket_allows_the_burst_then_refuses():
    limiter = RateLimiter()
    assert [limiter.check("k", LIMIT, 100.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.check("k", LIMIT, 100.0) == 1


def test_bucket_refills_at_the_configured_rate():
    limiter = RateLimiter()
    for _ in range(3):
        limiter.check("k", LIMIT, 100.0)
    assert limiter.check("k", LIMIT, 100.2) == 1
    assert limiter.check("k", LIMIT, 100.7) == 0


def test_retry_after_rounds_up_to_whole_seconds():
    limiter = RateLimiter()
    slow = RateLimit(per_second=0.25, burst=1)
    limiter.check("k", slow, 0.0)
    assert limiter.check("k", slow, 0.0) == 4


def test_limiter_forgets_the_least_recently_used_keys():
    limiter = RateLimiter(max_keys=2)
    tight = RateLimit(per_second=0.001, burst=1)
    limiter.check("a", tight, 0.0)
    limiter.check("b", tight, 0.0)
    limiter.check("c", tight, 0.0)
    assert limiter.check("a", tight, 0.0) == 0  # "a" was evicted, so it starts with a full bucket


def test_project_limit_per_minute_becomes_per_second():
    company = CompanyRecord(company_id="c", project_id="p", rate_limits=RateLimits(requests_per_minute=120))
    assert rate_limit_for(company, RateLimit(10, 20)) == RateLimit(per_second=2.0, burst=20)


def test_project_without_limits_gets_the_default():
    assert rate_limit_for(CompanyRecord(company_id="c", project_id="p"), RateLimit(10, 20)) == RateLimit(10, 20)


def test_issued_key_verifies_against_its_hash_only():
    issued = issue_key()
    parsed = parse_key(issued.plaintext)
    assert parsed is not None and parsed.key_id == issued.key_id
    assert secret_matches(parsed, issued.secret_hash)
    assert not secret_matches(parsed, issue_key().secret_hash)
    assert issued.plaintext not in issued.secret_hash


def test_malformed_keys_do_not_parse():
    assert parse_key("") is None
    assert parse_key("mce_short_x") is None
    assert parse_key("Bearer something") is None


def test_conversation_id_uses_the_number_without_plus_or_the_email():
    assert conversation_id("c", "p", "r", "whatsapp", "+447700900001") == "c#p#r#447700900001"
    assert conversation_id("c", "p", "r", "email", "hi@x.example") == "c#p#r#hi@x.example"


def test_timestamps_have_exactly_one_zone_designator():
    assert utc_iso(0) == "1970-01-01T00:00:00.000Z"


def test_iso_timestamp_needs_a_time_and_a_zone():
    assert is_iso8601_with_zone("2025-04-27T05:45:56Z")
    assert is_iso8601_with_zone("2025-04-27T05:45:56.123+01:00")
    assert not is_iso8601_with_zone("2025-04-27T05:45:56")
    assert not is_iso8601_with_zone("2025-04-27")


# -- address and timestamp shapes: the whole value must match, ASCII digits only, no whitespace or control characters --

VALID_TEL = "+447700900123"
TEL_VARIANTS = {
    "trailing newline": VALID_TEL + "\n",
    "trailing carriage return": VALID_TEL + "\r",
    "leading space": " " + VALID_TEL,
    "trailing line separator": VALID_TEL + "\u2028",
    "fullwidth digits": "+\uff14\uff14\uff17\uff17\uff10\uff10\uff19\uff10\uff10\uff11\uff12\uff13",
    "arabic-indic digits": "+\u0664\u0664\u0667\u0667\u0660\u0660\u0669\u0660\u0660\u0661\u0662\u0663",
}


def test_e164_check_accepts_a_plain_number():
    assert is_valid_e164(VALID_TEL)


@pytest.mark.parametrize("tel", TEL_VARIANTS.values(), ids=TEL_VARIANTS.keys())
def test_e164_check_refuses_anything_but_the_whole_ascii_number(tel):
    assert not is_valid_e164(tel)


@pytest.mark.parametrize("suffix", ["\n", "\r", " ", "\u2028"])
def test_email_check_refuses_trailing_whitespace(suffix):
    assert is_valid_email("lee@example.com")
    assert not is_valid_email("lee@example.com" + suffix)


@pytest.mark.parametrize(
    "value",
    [
        "2025-04-27T05:45:56Z\n",
        "2025-04-27T05:45:56\nZ",
        "2025-04-27T05:45:56 Z",
        "2025-04-27T05:45:56\x00Z",
        "2025-04-27T05:45\x0bZ",
        "2025-04-27T05:45:56\n+01:00",
        " 2025-04-27T05:45:56Z",
    ],
)
def test_iso_timestamp_with_whitespace_or_control_characters_is_refused(value):
    assert not is_iso8601_with_zone(value)
