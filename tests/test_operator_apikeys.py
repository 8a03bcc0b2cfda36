"""`comms apikey issue|revoke|list` against the moto server: the key is shown once, only its hash is stored."""

from __future__ import annotations

import pytest

from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.dynamo_codec import from_item, to_attribute
from service.config import Settings
from service.domain.api_keys import hash_secret, parse_key, secret_matches
from tests.operator_support import Cli, company_data, unique, write_json


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(settings, capsys, monkeypatch)


@pytest.fixture
def company(cli: Cli, tmp_path) -> str:
    company_id = unique("ci-keys")
    assert cli("company", "create", "--file", write_json(tmp_path / "c.json", company_data(company_id))).code == 0
    return company_id


def stored_item(cli: Cli, key_id: str) -> dict:
    async def read(aws):
        answer = await aws.dynamodb.get_item(
            TableName=cli.settings.api_keys_table, Key={"key_id": to_attribute(key_id)}, ConsistentRead=True
        )
        return from_item(answer.get("Item") or {})

    return cli.aws(read)


def issue(cli: Cli, company: str, project: str = "pi-ops-001") -> str:
    result = cli("apikey", "issue", "--company-id", company, "--project-id", project)
    assert result.code == 0, result.err
    return result.out.strip()


def test_issue_prints_the_key_once_and_stores_only_its_hash(cli, company):
    result = cli("apikey", "issue", "--company-id", company, "--project-id", "pi-ops-001")

    assert result.code == 0, result.err
    plaintext = result.out.strip()
    parsed = parse_key(plaintext)
    assert parsed is not None
    assert "not shown again" in result.err and plaintext not in result.err
    item = stored_item(cli, parsed.key_id)
    assert item["secret_hash"] == hash_secret(parsed.key_id, parsed.secret)
    assert parsed.secret not in repr(item) and plaintext not in repr(item)
    assert (item["company_id"], item["project_id"], item["status"]) == (company, "pi-ops-001", "active")


def test_an_issued_key_is_accepted_by_the_service_key_store(cli, company):
    parsed = parse_key(issue(cli, company))

    async def find(aws):
        return await DynamoApiKeyStore(aws.dynamodb, cli.settings.api_keys_table, 0).find(parsed.key_id)

    record = cli.aws(find)
    assert record is not None and record.is_active and secret_matches(parsed, record.secret_hash)


def test_issue_json_shape(cli, company):
    result = cli("apikey", "issue", "--company-id", company, "--project-id", "pi-ops-001", "--json")

    assert result.code == 0
    body = result.json
    assert set(body) == {"api_key", "key_id", "company_id", "project_id", "status", "created_at"}
    assert parse_key(body["api_key"]).key_id == body["key_id"]


def test_issue_for_an_unknown_company_exits_1(cli):
    result = cli("apikey", "issue", "--company-id", unique("ci-nobody"), "--project-id", "pi-ops-001")

    assert result.code == 1
    assert "not found" in result.err and result.out == ""


def test_list_shows_the_project_keys_without_hashes(cli, company):
    first = parse_key(issue(cli, company)).key_id
    second = parse_key(issue(cli, company)).key_id

    result = cli("apikey", "list", "--company-id", company, "--project-id", "pi-ops-001", "--json")

    assert result.code == 0
    body = result.json
    assert (body["company_id"], body["project_id"]) == (company, "pi-ops-001")
    assert {k["key_id"] for k in body["keys"]} == {first, second}
    assert all(k["status"] == "active" and k["created_at"] for k in body["keys"])
    assert "secret_hash" not in result.out


def test_list_of_a_project_without_keys_is_empty(cli, company):
    result = cli("apikey", "list", "--company-id", company, "--project-id", "pi-ops-001")

    assert result.code == 0
    assert "no API keys" in result.out


def test_list_prints_a_table(cli, company):
    key_id = parse_key(issue(cli, company)).key_id

    result = cli("apikey", "list", "--company-id", company, "--project-id", "pi-ops-001")

    assert result.code == 0
    assert key_id in result.out and "active" in result.out


def test_revoke_marks_the_key_revoked(cli, company):
    key = issue(cli, company)
    key_id = parse_key(key).key_id

    result = cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-ops-001", "--key-id", key_id)

    assert result.code == 0, result.err
    assert f"revoked key {key_id}" in result.out
    item = stored_item(cli, key_id)
    assert item["status"] == "revoked" and item["revoked_at"]
    listed = cli("apikey", "list", "--company-id", company, "--project-id", "pi-ops-001", "--json").json
    assert [k["status"] for k in listed["keys"]] == ["revoked"]


def test_revoke_accepts_the_whole_key(cli, company):
    key = issue(cli, company)

    result = cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-ops-001", "--key-id", key, "--json")

    assert result.code == 0
    assert result.json["key_id"] == parse_key(key).key_id and result.json["already_revoked"] is False


def test_revoking_twice_reports_already_revoked(cli, company):
    key_id = parse_key(issue(cli, company)).key_id
    cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-ops-001", "--key-id", key_id)

    again = cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-ops-001", "--key-id", key_id, "--json")

    assert again.code == 0
    assert again.json["already_revoked"] is True


def test_revoke_refuses_another_projects_key(cli, company):
    key_id = parse_key(issue(cli, company)).key_id

    result = cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-other", "--key-id", key_id)

    assert result.code == 1
    assert "no key" in result.err
    assert stored_item(cli, key_id)["status"] == "active"


def test_revoke_of_an_unknown_key_exits_1(cli, company):
    result = cli("apikey", "revoke", "--company-id", company, "--project-id", "pi-ops-001", "--key-id", "0" * 16)

    assert result.code == 1
