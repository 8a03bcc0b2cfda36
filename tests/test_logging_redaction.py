"""Log lines never carry secrets whole, nor a recipient's phone number or email."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import structlog

from service.logging import configure_logging


def _log_line(capsys: pytest.CaptureFixture[str], **fields: Any) -> dict[str, Any]:
    configure_logging("INFO")
    structlog.get_logger("t").info("event", **fields)
    structlog.reset_defaults()
    line: dict[str, Any] = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return line


def test_secret_fields_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, x_api_key="mce_abc", twilio_auth_token="tok", headers={"Authorization": "Bearer s"})
    assert line["x_api_key"] == line["twilio_auth_token"] == line["headers"]["Authorization"] == "[REDACTED]"


def test_phone_numbers_and_emails_are_masked_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, detail="sent to whatsapp:+447700900123 and lee.hayton@example.com")
    assert "447700900123" not in line["detail"]
    assert "lee.hayton@" not in line["detail"]
    assert "+44" in line["detail"] and "@example.com" in line["detail"]


def test_reference_fields_naming_secrets_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, whatsapp_credentials_id="comms/whatsapp-credentials/c/p/twilio-dev")
    assert line["whatsapp_credentials_id"] == "comms/whatsapp-credentials/c/p/twilio-dev"


def test_request_ids_are_not_mistaken_for_phone_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, request_id="12345678-1234-4234-8234-123456789012")
    assert line["request_id"] == "12345678-1234-4234-8234-123456789012"


def test_token_counts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, prompt_tokens=12, completion_tokens=30, total_tokens=42)
    assert (line["prompt_tokens"], line["completion_tokens"], line["total_tokens"]) == (12, 30, 42)


def test_token_counts_nested_in_usage_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, usage={"input_tokens": 7, "output_tokens": 5, "max_tokens": 100})
    assert line["usage"] == {"input_tokens": 7, "output_tokens": 5, "max_tokens": 100}


def test_secrets_named_by_common_key_names_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    secrets = {
        "auth_token": "a",
        "access_token": "b",
        "refresh_token": "c",
        "token": "d",
        "api_key": "e",
        "apiKey": "f",
        "client_secret": "g",
        "webhook_secret": "h",
        "password": "i",
        "db_password": "j",
        "authorization": "k",
        "signature": "l",
        "x_twilio_signature": "m",
        "aws_secret_access_key": "n",
        "private_key": "o",
    }
    line = _log_line(capsys, **secrets)
    assert {key: line[key] for key in secrets} == dict.fromkeys(secrets, "[REDACTED]")


def test_secret_headers_are_redacted_whatever_their_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    headers = {"X-Api-Key": "mce_abc", "X-Twilio-Signature": "sig", "Cookie": "session=s", "Content-Type": "text/xml"}
    line = _log_line(capsys, headers=headers)
    assert line["headers"] == {
        "X-Api-Key": "[REDACTED]",
        "X-Twilio-Signature": "[REDACTED]",
        "Cookie": "[REDACTED]",
        "Content-Type": "text/xml",
    }


def test_numbers_and_booleans_under_secret_looking_keys_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    line = _log_line(capsys, signature_valid=True, has_api_key=False, token_count=3)
    assert (line["signature_valid"], line["has_api_key"], line["token_count"]) == (True, False, 3)


def test_a_value_without_an_email_keeps_everything_but_its_phone_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    conversation_id = "ci-demo-001#pi-demo-001#0e4f5a6b-1234-4abc-8def-0123456789ab#447700900001"
    line = _log_line(capsys, conversation_id=conversation_id)
    assert line["conversation_id"] == "ci-demo-001#pi-demo-001#0e4f5a6b-1234-4abc-8def-0123456789ab#447******001"


def test_a_secret_key_is_redacted_every_time_it_is_logged(capsys: pytest.CaptureFixture[str]) -> None:
    first = _log_line(capsys, api_key="mce_abc", request_id="r1")
    again = _log_line(capsys, api_key="mce_def", request_id="r2")
    assert (first["api_key"], again["api_key"]) == ("[REDACTED]", "[REDACTED]")
    assert (first["request_id"], again["request_id"]) == ("r1", "r2")
