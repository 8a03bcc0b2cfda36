"""Log lines never carry secrets whole, nor a recipient's phone number or email."""

from __future__ import annotations

import orjson
import structlog

from service.logging import configure_logging


def _log_line(capsys, **fields) -> dict:
    configure_logging("INFO")
    structlog.get_logger("t").info("event", **fields)
    structlog.reset_defaults()
    return orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_secret_fields_are_redacted(capsys):
    line = _log_line(capsys, x_api_key="mce_abc", twilio_auth_token="tok", headers={"Authorization": "Bearer s"})
    assert line["x_api_key"] == line["twilio_auth_token"] == line["headers"]["Authorization"] == "[REDACTED]"


def test_phone_numbers_and_emails_are_masked_anywhere(capsys):
    line = _log_line(capsys, detail="sent to whatsapp:+447700900123 and lee.hayton@example.com")
    assert "447700900123" not in line["detail"]
    assert "lee.hayton@" not in line["detail"]
    assert "+44" in line["detail"] and "@example.com" in line["detail"]


def test_reference_fields_naming_secrets_are_kept(capsys):
    line = _log_line(capsys, whatsapp_credentials_id="comms/whatsapp-credentials/c/p/twilio-dev")
    assert line["whatsapp_credentials_id"] == "comms/whatsapp-credentials/c/p/twilio-dev"


def test_request_ids_are_not_mistaken_for_phone_numbers(capsys):
    line = _log_line(capsys, request_id="12345678-1234-4234-8234-123456789012")
    assert line["request_id"] == "12345678-1234-4234-8234-123456789012"
