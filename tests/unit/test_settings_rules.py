"""Settings that contradict each other stop start-up with a message naming the problem."""

from __future__ import annotations

import pytest

from service.config import ConfigurationError, load_settings


def test_duplicate_wait_longer_than_the_request_deadline_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="duplicate_wait_s must be shorter than request_deadline_s"):
        load_settings(duplicate_wait_s=5.0, request_deadline_s=5.0)


def test_duplicate_wait_shorter_than_the_request_deadline_is_accepted() -> None:
    settings = load_settings(duplicate_wait_s=1.5, request_deadline_s=4.0)
    assert (settings.duplicate_wait_s, settings.request_deadline_s) == (1.5, 4.0)


def test_the_default_drain_grace_covers_an_ai_call_and_a_send() -> None:
    settings = load_settings()
    assert settings.drain_grace_s == 110.0
    assert settings.drain_grace_s >= settings.ai_timeout_s + settings.provider_timeout_s


def test_a_drain_grace_shorter_than_an_ai_call_and_a_send_is_refused() -> None:
    with pytest.raises(
        ConfigurationError, match=r"drain_grace_s \(25\).*ai_timeout_s \(90\).*provider_timeout_s \(15\)"
    ):
        load_settings(drain_grace_s=25.0)


def test_a_short_drain_grace_with_short_timeouts_is_accepted() -> None:
    settings = load_settings(drain_grace_s=3.0, ai_timeout_s=2.5, provider_timeout_s=0.5)
    assert settings.drain_grace_s == 3.0


def test_the_stop_budget_is_the_drain_and_protected_grace_or_the_open_poll_plus_http_shutdown_and_trace_flush() -> None:
    assert load_settings().stop_budget_s == max(110 + 10, 20 + 5) + 5 + 3
    assert load_settings(drain_grace_s=3.0, ai_timeout_s=2.0, provider_timeout_s=1.0).stop_budget_s == 20 + 5 + 5 + 3


def test_the_metrics_port_defaults_to_9090_and_must_differ_from_the_port() -> None:
    assert load_settings().metrics_port == 9090
    with pytest.raises(ConfigurationError, match="metrics_port must differ from port"):
        load_settings(port=9100, metrics_port=9100)
    with pytest.raises(ConfigurationError, match="COMMS_METRICS_PORT"):
        load_settings(metrics_port=0)


def test_webhooks_need_a_public_base_url() -> None:
    with pytest.raises(ConfigurationError, match="COMMS_PUBLIC_BASE_URL"):
        load_settings().require_public_base_url()
    load_settings(public_base_url="https://comms.example.com").require_public_base_url()
    load_settings(webhooks_enabled=False).require_public_base_url()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COMMS_IDEMPOTENCY_TABLE", "comms-idempotency\n"),
        ("COMMS_CONVERSATIONS_TABLE", " comms-conversations"),
        ("COMMS_WHATSAPP_QUEUE_URL", "http://127.0.0.1:4566/000000000000/comms-whatsapp\n"),
        ("COMMS_AWS_REGION", "eu-west-2\n"),
        ("COMMS_AWS_ENDPOINT_URL", "http://127.0.0.1:4566\n"),
        ("COMMS_PUBLIC_BASE_URL", "https://comms.example.com\r\n"),
        ("COMMS_HOST", "0.0.0.0\t"),
        ("COMMS_REQUEST_DEADLINE_S", "5\n"),
        ("COMMS_WEBHOOKS_ENABLED", "true\n"),
    ],
)
def test_a_value_with_whitespace_at_an_end_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """As a Kubernetes Secret or a ConfigMap block scalar hands it over: silently kept, a table name with a newline
    made every initiate a 503 while readiness said ready."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"{variable}: .*whitespace at an end"):
        load_settings()


def test_a_value_with_inner_spaces_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_CONSUMER_QUEUES", "whatsapp, sms")
    assert load_settings().consumed_queues == ["whatsapp", "sms"]


@pytest.mark.parametrize(
    "value", ["127.0.0.1:4566", "ftp://host", "http://", "not a url", "http://127.0.0.1:99999", "http://h:abc"]
)
def test_an_endpoint_that_is_not_an_http_url_stops_start_up(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("COMMS_AWS_ENDPOINT_URL", value)
    with pytest.raises(
        ConfigurationError, match=r"^invalid configuration: COMMS_AWS_ENDPOINT_URL: (must be|has a port)"
    ):
        load_settings()


def test_an_empty_endpoint_means_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_OPENAI_BASE_URL", "")
    assert not load_settings().openai_base_url
