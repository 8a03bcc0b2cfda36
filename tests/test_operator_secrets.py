"""`comms secrets create|create-openai` against the moto server: naming convention, shapes, never echoing values."""

from __future__ import annotations

import orjson
import pytest

from service.adapters.aws.secrets_store import parse_secret
from service.config import Settings
from service.domain.secret_names import credentials_secret_name, openai_secret_name
from tests.operator_support import Cli, company_data, unique, write_json

AUTH_TOKEN = "tok-" + "9f" * 12
TWILIO = {
    "twilio_account_sid": "AC" + "1" * 32,
    "twilio_auth_token": AUTH_TOKEN,
    "twilio_template_sid": "HX" + "2" * 32,
}


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Each test gets its own secret-name prefix, so names never collide on the shared server."""
    own = Cli(settings, capsys, monkeypatch)
    own.use(settings.model_copy(update={"secrets_prefix": unique("ops")}))
    return own


def stored_secret(cli: Cli, name: str) -> dict[str, str]:
    async def read(aws):
        return (await aws.secrets.get_secret_value(SecretId=name))["SecretString"]

    return parse_secret(name, cli.aws(read))


def credentials(cli: Cli, *args: str, stdin: dict | None = None, file: str | None = None):
    argv = ["secrets", "create", "--company-id", "ci-sec-001", "--project-id", "pi-sec-001", *args]
    if file:
        argv += ["--from-file", file]
    return cli(*argv, stdin=orjson.dumps(stdin).decode() if stdin is not None else None)


def test_create_stores_twilio_credentials_under_the_naming_convention(cli, tmp_path):
    result = credentials(
        cli, "--channel", "whatsapp", "--provider", "twilio", file=write_json(tmp_path / "s.json", TWILIO)
    )

    assert result.code == 0, result.err
    name = credentials_secret_name(cli.settings.secrets_prefix, "whatsapp", "ci-sec-001", "pi-sec-001", "twilio", "dev")
    assert name == f"{cli.settings.secrets_prefix}/whatsapp-credentials/ci-sec-001/pi-sec-001/twilio-dev"
    assert f"created secret {name}" in result.out
    assert stored_secret(cli, name) == TWILIO
    assert AUTH_TOKEN not in result.out + result.err


def test_create_reads_the_value_from_stdin(cli):
    value = {"sendgrid_api_key": "SG.test-key", "from_email": "hello@ops.example", "from_name": "Ops"}

    result = credentials(cli, "--channel", "email", "--json", stdin=value)

    assert result.code == 0, result.err
    name = credentials_secret_name(cli.settings.secrets_prefix, "email", "ci-sec-001", "pi-sec-001", "sendgrid", "dev")
    assert result.json["name"] == name and result.json["created"] is True and result.json["version_id"]
    assert stored_secret(cli, name) == value


def test_create_refuses_an_existing_secret_without_force(cli):
    assert credentials(cli, "--channel", "sms", stdin=TWILIO).code == 0

    again = credentials(cli, "--channel", "sms", stdin={**TWILIO, "twilio_auth_token": "changed"})

    assert again.code == 1
    assert "already exists" in again.err and "--force" in again.err
    name = credentials_secret_name(cli.settings.secrets_prefix, "sms", "ci-sec-001", "pi-sec-001", "twilio", "dev")
    assert stored_secret(cli, name)["twilio_auth_token"] == AUTH_TOKEN


def test_create_with_force_stores_a_new_version(cli):
    first = credentials(cli, "--channel", "sms", "--json", stdin=TWILIO)

    second = credentials(cli, "--channel", "sms", "--force", "--json", stdin={**TWILIO, "twilio_auth_token": "rotated"})

    assert second.code == 0, second.err
    assert second.json["created"] is False
    assert second.json["version_id"] != first.json["version_id"]
    assert stored_secret(cli, second.json["name"])["twilio_auth_token"] == "rotated"


def test_create_refuses_a_wrong_shape_without_echoing_values(cli):
    value = {"twilio_account_sid": "not-a-sid-" + AUTH_TOKEN, "twilio_auth_tokn": AUTH_TOKEN}

    result = credentials(cli, "--channel", "whatsapp", stdin=value)

    assert result.code == 1
    assert "twilio_account_sid: must be AC followed by 32 hex digits" in result.err
    assert "twilio_auth_token: required" in result.err
    assert "twilio_auth_tokn: unknown field" in result.err
    assert AUTH_TOKEN not in result.out + result.err


def test_create_refuses_values_that_are_not_strings(cli):
    result = credentials(cli, "--channel", "email", stdin={"sendgrid_api_key": 12345})

    assert result.code == 1
    assert "sendgrid_api_key: must be a non-empty string" in result.err


def test_create_refuses_input_that_is_not_json(cli):
    result = cli(
        "secrets", "create", "--company-id", "c", "--project-id", "p", "--channel", "sms", stdin="token=" + AUTH_TOKEN
    )

    assert result.code == 1
    assert "not valid JSON" in result.err and AUTH_TOKEN not in result.err


def test_a_provider_that_does_not_serve_the_channel_is_a_usage_error(cli):
    result = credentials(cli, "--channel", "email", "--provider", "twilio", stdin=TWILIO)

    assert result.code == 2
    assert "sendgrid" in result.err


def test_an_id_that_cannot_be_part_of_a_secret_name_is_a_usage_error(cli):
    result = cli("secrets", "create", "--company-id", "ci/evil", "--project-id", "p", "--channel", "sms", stdin="{}")

    assert result.code == 2
    assert "cannot be part of a secret name" in result.err


def test_without_a_file_or_piped_stdin_it_refuses_to_wait_for_a_terminal(cli, monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal())

    result = cli("secrets", "create-openai", "--channel", "sms")

    assert result.code == 2
    assert "pipe the JSON on stdin" in result.err


def test_create_warns_when_the_company_record_names_another_secret(cli, tmp_path):
    company = unique("ci-sec")
    data = company_data(company, "pi-sec-001")
    assert cli("company", "create", "--file", write_json(tmp_path / "c.json", data)).code == 0

    result = cli(
        "secrets",
        "create",
        "--company-id",
        company,
        "--project-id",
        "pi-sec-001",
        "--channel",
        "whatsapp",
        stdin=orjson.dumps(TWILIO).decode(),
    )

    assert result.code == 0, result.err
    assert "whatsapp_credentials_id does not name this secret" in result.err


def test_create_openai_stores_the_key_for_the_channel_and_environment(cli):
    cli.use(cli.settings.model_copy(update={"environment": "staging"}))

    result = cli("secrets", "create-openai", "--channel", "sms", "--json", stdin='{"ai_api_key": "sk-ops-test"}')

    assert result.code == 0, result.err
    name = openai_secret_name(cli.settings.secrets_prefix, "sms", "staging")
    assert name == f"{cli.settings.secrets_prefix}/openai-api-key/sms-staging"
    assert result.json["name"] == name
    assert stored_secret(cli, name) == {"ai_api_key": "sk-ops-test"}
    assert "sk-ops-test" not in result.out + result.err


def test_create_openai_refuses_a_missing_key(cli):
    result = cli("secrets", "create-openai", "--channel", "email", stdin='{"api_key": "sk-wrong-field"}')

    assert result.code == 1
    assert "ai_api_key: required" in result.err and "sk-wrong-field" not in result.err
