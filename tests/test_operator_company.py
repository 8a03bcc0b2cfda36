"""`comms company create|show|update` against the moto server."""

from __future__ import annotations

import re

import orjson
import pytest

from service.config import Settings
from tests.operator_support import Cli, company_data, unique, write_json

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(settings, capsys, monkeypatch)


def test_create_stores_a_validated_record_with_utc_timestamps(cli, tmp_path):
    company = unique("ci-create")
    created = cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))
    assert created.code == 0, created.err
    assert f"created company {company}/pi-ops-001" in created.out

    shown = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json")
    assert shown.code == 0
    record = shown.json
    assert record["company_name"] == "Ops Homes Ltd"
    assert record["channel_config"]["whatsapp"]["company_whatsapp_number"] == "+447700900111"
    assert ISO_UTC.match(record["created_at"]) and record["created_at"] == record["updated_at"]


def test_create_refuses_to_overwrite_an_existing_record_without_force(cli, tmp_path):
    company = unique("ci-exists")
    assert cli("company", "create", "--file", write_json(tmp_path / "a.json", company_data(company))).code == 0

    again = cli(
        "company", "create", "--file", write_json(tmp_path / "b.json", company_data(company, company_name="Other"))
    )

    assert again.code == 1
    assert "already exists" in again.err and "--force" in again.err
    shown = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json")
    assert shown.json["company_name"] == "Ops Homes Ltd"


def test_create_with_force_replaces_the_record_and_keeps_created_at(cli, tmp_path):
    company = unique("ci-force")
    cli("company", "create", "--file", write_json(tmp_path / "a.json", company_data(company)))
    first = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json").json

    replaced = cli(
        "company",
        "create",
        "--force",
        "--json",
        "--file",
        write_json(tmp_path / "b.json", company_data(company, company_name="Renamed Ltd")),
    )

    assert replaced.code == 0, replaced.err
    assert replaced.json["company_name"] == "Renamed Ltd"
    assert replaced.json["created_at"] == first["created_at"]
    assert replaced.json["updated_at"] >= first["updated_at"]


def test_create_refuses_a_file_that_is_not_json(cli, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"company_id": "ci-x", ')

    result = cli("company", "create", "--file", str(path))

    assert result.code == 1
    assert "not valid JSON" in result.err and result.out == ""


def test_create_refuses_a_record_that_breaks_the_company_model(cli, tmp_path):
    data = company_data(unique("ci-invalid"), allowed_channels=["whatsapp", "sms", "fax"])
    data["channel_config"]["whatsapp"]["company_whatsapp_number"] = "07700 900111"

    result = cli("company", "create", "--file", write_json(tmp_path / "c.json", data))

    assert result.code == 1
    assert "unknown channel 'fax'" in result.err
    assert "channel_config.sms: required" in result.err
    assert "company_whatsapp_number: must be an E.164 number" in result.err


def test_create_refuses_a_record_missing_its_identifiers(cli, tmp_path):
    data = company_data("ci-unused")
    del data["project_id"]

    result = cli("company", "create", "--file", write_json(tmp_path / "c.json", data))

    assert result.code == 1
    assert "project_id" in result.err


def test_create_refuses_api_key_hashes_in_the_record(cli, tmp_path):
    data = company_data(unique("ci-keys"), api_key_hashes=["abc"])

    result = cli("company", "create", "--file", write_json(tmp_path / "c.json", data))

    assert result.code == 1
    assert "comms apikey" in result.err


def test_create_reads_the_record_from_stdin(cli):
    company = unique("ci-stdin")

    result = cli("company", "create", "--file", "-", stdin=orjson.dumps(company_data(company)).decode())

    assert result.code == 0, result.err
    assert cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001").code == 0


def test_create_with_an_unreadable_file_is_a_usage_error(cli, tmp_path):
    result = cli("company", "create", "--file", str(tmp_path / "missing.json"))

    assert result.code == 2
    assert "cannot read" in result.err


def test_show_of_a_missing_record_exits_1(cli):
    result = cli("company", "show", "--company-id", unique("ci-none"), "--project-id", "pi-none")

    assert result.code == 1
    assert "not found" in result.err and result.out == ""


def test_show_prints_a_readable_table(cli, tmp_path):
    company = unique("ci-table")
    cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))

    result = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001")

    assert result.code == 0
    assert "Ops Homes Ltd" in result.out and "project_status" in result.out and "active" in result.out


def test_update_merges_the_patch_and_refreshes_updated_at(cli, tmp_path):
    company = unique("ci-update")
    cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))
    before = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json").json
    patch = {
        "company_id": company,
        "project_id": "pi-ops-001",
        "project_status": "paused",
        "rate_limits": {"burst": 5},
        "company_rep": None,
    }

    result = cli("company", "update", "--json", "--file", write_json(tmp_path / "p.json", patch))

    assert result.code == 0, result.err
    after = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json").json
    assert after["project_status"] == "paused"
    assert after["rate_limits"] == {"requests_per_minute": 600, "burst": 5}
    assert "company_rep" not in after or after["company_rep"] == {}
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] >= before["updated_at"]
    assert "requests are refused" in result.err  # warned: not active


def test_update_names_the_record_with_flags(cli, tmp_path):
    company = unique("ci-flags")
    cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))

    result = cli(
        "company",
        "update",
        "--company-id",
        company,
        "--project-id",
        "pi-ops-001",
        "--file",
        write_json(tmp_path / "p.json", {"project_name": "Winter viewings"}),
    )

    assert result.code == 0, result.err
    shown = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json")
    assert shown.json["project_name"] == "Winter viewings"


def test_update_of_a_missing_record_exits_1(cli, tmp_path):
    patch = {"company_id": unique("ci-ghost"), "project_id": "pi-ops-001", "project_name": "x"}

    result = cli("company", "update", "--file", write_json(tmp_path / "p.json", patch))

    assert result.code == 1
    assert "not found" in result.err


def test_update_refuses_a_patch_that_breaks_validation(cli, tmp_path):
    company = unique("ci-badpatch")
    cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))
    patch = {"company_id": company, "project_id": "pi-ops-001", "allowed_channels": ["whatsapp", "email"]}

    result = cli("company", "update", "--file", write_json(tmp_path / "p.json", patch))

    assert result.code == 1
    assert "channel_config.email: required" in result.err
    shown = cli("company", "show", "--company-id", company, "--project-id", "pi-ops-001", "--json")
    assert shown.json["allowed_channels"] == ["whatsapp"]


def test_update_refuses_to_change_the_identifiers(cli, tmp_path):
    company = unique("ci-rename")
    cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company)))
    patch = {"company_id": "ci-someone-else", "project_name": "x"}

    result = cli(
        "company",
        "update",
        "--company-id",
        company,
        "--project-id",
        "pi-ops-001",
        "--file",
        write_json(tmp_path / "p.json", patch),
    )

    assert result.code == 1
    assert "company_id cannot be changed" in result.err
