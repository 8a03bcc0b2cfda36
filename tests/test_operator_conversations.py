"""`comms conversation show|list` against the moto server, over records shaped like the consumers write."""

from __future__ import annotations

import uuid

import pytest

from service.adapters.aws.conversation_codec import company_shard
from service.adapters.aws.dynamo_codec import to_item
from service.config import Settings
from tests.operator_support import Cli, unique

PROJECT = "pi-conv-001"


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(settings, capsys, monkeypatch)


def conversation(company: str, channel: str, status: str, created_at: str, **changes) -> dict:
    recipient = "lee@example.com" if channel == "email" else f"+4477009{uuid.uuid4().int % 100000:05d}"
    component = "hello@ops.example" if channel == "email" else "447700900111"
    conversation_id = f"{company}#{PROJECT}#{uuid.uuid4()}#{component}"
    record = {
        "primary_channel": recipient,
        "conversation_id": conversation_id,
        "company_id": company,
        "gsi_company_shard": company_shard(company, conversation_id, Settings().conversation_index_shards),
        "project_id": PROJECT,
        "channel_method": channel,
        "conversation_status": status,
        "recipient_first_name": "Lee",
        "created_at": created_at,
        "updated_at": created_at,
        "task_complete": 0,
        "thread_id": "conv_abc",
        "messages": [
            {
                "message_id": "SM" + "1" * 32,
                "timestamp": created_at,
                "role": "assistant",
                "content": "Hello Lee, about your viewing on Saturday",
                "prompt_tokens": 40,
                "completion_tokens": 12,
                "total_tokens": 52,
            }
        ],
        "project_data": {"property": "12 Acacia Avenue"},
    }
    record.update(changes)
    return record


def store(cli: Cli, *records: dict) -> None:
    async def put(aws):
        for record in records:
            await aws.dynamodb.put_item(TableName=cli.settings.conversations_table, Item=to_item(record))

    cli.aws(put)


def test_show_finds_a_conversation_by_its_id_alone(cli):
    record = conversation(unique("ci-conv"), "whatsapp", "initial_message_sent", "2026-01-02T10:00:00.000Z")
    store(cli, record)

    result = cli("conversation", "show", record["conversation_id"], "--json")

    assert result.code == 0, result.err
    assert result.json == record


def test_show_json_prints_every_stored_attribute_configuration_included(cli):
    record = conversation(
        unique("ci-conv"), "sms", "processing", "2026-01-02T10:00:00.000Z", channel_config={"sms_credentials_id": "x"}
    )
    store(cli, record)

    result = cli("conversation", "show", record["conversation_id"], "--json")

    assert result.code == 0, result.err
    assert result.json == record


def test_show_with_the_recipient_reads_the_record_directly(cli):
    record = conversation(unique("ci-conv"), "email", "processing", "2026-01-02T10:00:00.000Z")
    store(cli, record)

    result = cli("conversation", "show", record["conversation_id"], "--recipient", "lee@example.com", "--json")

    assert result.code == 0, result.err
    assert result.json["primary_channel"] == "lee@example.com"


def test_show_prints_the_record_and_its_messages(cli):
    record = conversation(unique("ci-conv"), "sms", "reply_sent", "2026-01-02T10:00:00.000Z")
    store(cli, record)

    result = cli("conversation", "show", record["conversation_id"])

    assert result.code == 0, result.err
    assert "reply_sent" in result.out and "Messages (1)" in result.out
    assert "about your viewing" in result.out and "52 (40+12)" in result.out


def test_show_of_an_unknown_conversation_exits_1(cli):
    result = cli("conversation", "show", f"{unique('ci-none')}#{PROJECT}#{uuid.uuid4()}#447700900111")

    assert result.code == 1
    assert "not found" in result.err and result.out == ""


def test_show_on_another_channel_exits_1(cli):
    record = conversation(unique("ci-conv"), "whatsapp", "processing", "2026-01-02T10:00:00.000Z")
    store(cli, record)

    result = cli("conversation", "show", record["conversation_id"], "--channel", "sms")

    assert result.code == 1


def test_show_of_something_that_is_not_a_conversation_id_is_a_usage_error(cli):
    result = cli("conversation", "show", "not-a-conversation-id")

    assert result.code == 2
    assert "not a conversation id" in result.err


def test_list_filters_by_status_newest_first(cli):
    company = unique("ci-conv")
    old = conversation(company, "whatsapp", "failed_to_send_message", "2026-01-01T09:00:00.000Z")
    new = conversation(company, "sms", "failed_to_send_message", "2026-01-03T09:00:00.000Z")
    other = conversation(company, "whatsapp", "initial_message_sent", "2026-01-02T09:00:00.000Z")
    store(cli, old, new, other)

    result = cli(
        "conversation",
        "list",
        "--company-id",
        company,
        "--project-id",
        PROJECT,
        "--status",
        "failed_to_send_message",
        "--json",
    )

    assert result.code == 0, result.err
    body = result.json
    assert (body["company_id"], body["project_id"], body["matched"], body["count"]) == (company, PROJECT, 2, 2)
    assert [c["conversation_id"] for c in body["conversations"]] == [new["conversation_id"], old["conversation_id"]]
    assert set(body["conversations"][0]) <= {
        "conversation_id",
        "primary_channel",
        "channel_method",
        "conversation_status",
        "recipient_first_name",
        "recipient_last_name",
        "created_at",
        "updated_at",
        "task_complete",
        "hand_off_to_human",
        "failure_reason",
    }
    assert "messages" not in body["conversations"][0]


def test_list_filters_by_channel(cli):
    company = unique("ci-conv")
    store(
        cli,
        conversation(company, "whatsapp", "processing", "2026-01-01T09:00:00.000Z"),
        conversation(company, "email", "processing", "2026-01-02T09:00:00.000Z"),
    )

    result = cli(
        "conversation", "list", "--company-id", company, "--project-id", PROJECT, "--channel", "email", "--json"
    )

    assert [c["channel_method"] for c in result.json["conversations"]] == ["email"]


def test_list_stops_at_the_limit(cli):
    company = unique("ci-conv")
    records = [conversation(company, "sms", "processing", f"2026-01-0{day}T09:00:00.000Z") for day in range(1, 6)]
    store(cli, *records)

    result = cli("conversation", "list", "--company-id", company, "--project-id", PROJECT, "--limit", "2", "--json")

    assert (result.json["matched"], result.json["count"]) == (5, 2)
    assert [c["created_at"][:10] for c in result.json["conversations"]] == ["2026-01-05", "2026-01-04"]


def test_list_prints_a_table(cli):
    company = unique("ci-conv")
    record = conversation(company, "whatsapp", "handed_off", "2026-01-01T09:00:00.000Z")
    store(cli, record)

    result = cli("conversation", "list", "--company-id", company, "--project-id", PROJECT)

    assert result.code == 0
    assert record["conversation_id"] in result.out and "handed_off" in result.out


def test_list_of_a_project_without_conversations_is_empty(cli):
    result = cli("conversation", "list", "--company-id", unique("ci-quiet"), "--project-id", PROJECT)

    assert result.code == 0
    assert "no conversations" in result.out


def test_list_refuses_an_unknown_status(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("conversation", "list", "--company-id", "c", "--project-id", "p", "--status", "lost")

    assert exit_.value.code == 2
