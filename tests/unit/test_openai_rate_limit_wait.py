"""How long the OpenAI writer says to wait after a 429 (service/adapters/providers/openai_writer.py): the wait
OpenAI names in `retry-after-ms` / `Retry-After`, else the reset of the limit that refused, from the
`x-ratelimit-reset-requests` / `-tokens` headers (Go-style durations)."""

from __future__ import annotations

import httpx2
import openai
import pytest

from service.adapters.providers.openai_writer import classify_openai_failure, duration_s
from service.domain.provider_ports import PermanentProviderError, ProviderRateLimited


def refusal(kind: str | None, headers: dict[str, str], code: str = "rate_limit_exceeded") -> openai.RateLimitError:
    request = httpx2.Request("POST", "https://api.openai.example/v1/responses")
    response = httpx2.Response(429, headers=headers, request=request)
    body = {"message": "Rate limit reached", "type": kind, "param": None, "code": code}
    return openai.RateLimitError("Rate limit reached", response=response, body=body)


def wait_after(exc: openai.RateLimitError) -> float | None:
    failure = classify_openai_failure(exc)
    assert isinstance(failure, ProviderRateLimited)
    return failure.retry_after_s


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("20ms", 0.02), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("2", 2.0), ("0s", 0.0)],
)
def test_go_durations_are_read_as_seconds(raw: str, seconds: float) -> None:
    assert duration_s(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "soon", "1x", "s", "1s junk"])
def test_what_is_not_a_duration_is_none(raw: str) -> None:
    assert duration_s(raw) is None


def test_a_request_limit_refusal_waits_for_the_request_reset() -> None:
    headers = {"x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "6m0s"}
    assert wait_after(refusal("requests", headers)) == pytest.approx(0.12)


def test_a_token_limit_refusal_waits_for_the_token_reset() -> None:
    headers = {"x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "1.5s"}
    assert wait_after(refusal("tokens", headers)) == pytest.approx(1.5)


def test_retry_after_when_sent_comes_first() -> None:
    headers = {"retry-after-ms": "250", "x-ratelimit-reset-requests": "5s"}
    assert wait_after(refusal("requests", headers)) == pytest.approx(0.25)


def test_an_unnamed_limit_waits_for_the_reset_of_whichever_is_exhausted() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "100ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "3s",
    }
    assert wait_after(refusal(None, headers)) == pytest.approx(3.0)


def test_a_refusal_naming_no_wait_leaves_it_to_the_pace() -> None:
    assert wait_after(refusal("requests", {})) is None


def test_insufficient_quota_stays_permanent() -> None:
    failure = classify_openai_failure(refusal("insufficient_quota", {}, code="insufficient_quota"))
    assert isinstance(failure, PermanentProviderError)
