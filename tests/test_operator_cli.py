"""What every operator command shares: `--help`, exit codes for configuration errors and unreachable AWS."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from local_stack.moto_server import free_port
from service.adapters.aws.errors import unavailable
from service.config import Settings
from service.operator.output import EXIT_REFUSED, classify_failure
from tests.operator_support import Cli, unique

COMMANDS = [
    ["company"],
    ["company", "create"],
    ["company", "show"],
    ["company", "update"],
    ["secrets"],
    ["secrets", "create"],
    ["secrets", "create-openai"],
    ["apikey"],
    ["apikey", "issue"],
    ["apikey", "revoke"],
    ["apikey", "list"],
    ["dlq"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "redrive"],
    ["conversation"],
    ["conversation", "show"],
    ["conversation", "list"],
]


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(settings, capsys, monkeypatch)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(cli, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli(*command, "--help")

    assert exit_.value.code == 0
    assert f"usage: comms {' '.join(command)}" in capsys.readouterr().out


def test_a_missing_subcommand_is_a_usage_error(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("apikey")

    assert exit_.value.code == 2


def test_invalid_configuration_exits_2(cli, monkeypatch):
    monkeypatch.setenv("COMMS_AWS_MAX_ATTEMPTS", "0")

    result = cli("company", "show", "--company-id", "c", "--project-id", "p")

    assert result.code == 2
    assert "COMMS_AWS_MAX_ATTEMPTS" in result.err


def test_unreachable_aws_exits_3(cli, monkeypatch):
    monkeypatch.setenv("COMMS_AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("COMMS_AWS_MAX_ATTEMPTS", "1")

    result = cli("conversation", "list", "--company-id", "c", "--project-id", "p")

    assert result.code == 3
    assert "unreachable" in result.err.lower() and result.out == ""


def test_a_table_that_was_never_bootstrapped_is_a_configuration_error(cli, monkeypatch):
    monkeypatch.setenv("COMMS_API_KEYS_TABLE", unique("no-such-table"))

    result = cli("apikey", "list", "--company-id", "c", "--project-id", "p")

    assert result.code == 2
    assert "ResourceNotFoundException" in result.err and "comms bootstrap" in result.err


def test_an_adapter_failure_is_classified_by_the_aws_error_it_wraps():
    cause = ClientError({"Error": {"Code": "ValidationException"}}, "Scan")
    wrapped = unavailable("dynamodb", "Scan", cause)
    wrapped.__cause__ = cause

    failure = classify_failure(wrapped)

    assert failure.exit_code == EXIT_REFUSED
    assert failure.message == "Scan: AWS refused the request (ValidationException)"
