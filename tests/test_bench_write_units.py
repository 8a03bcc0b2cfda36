"""The benchmark's DynamoDB write-unit accounting: item sizes, UpdateExpressions on item images, and the units each
write costs in the base table and its GSIs (bench/write_units.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import orjson
import pytest

from bench.update_expression import UpdateError, apply_update, item_size
from bench.write_units import WriteUnitLedger, index_units, table_shapes
from service.config import Settings

SETTINGS = Settings()
TABLE = SETTINGS.conversations_table
COMPANY_INDEX = f"{TABLE} / company-shard-project-id-index"
WHATSAPP_INDEX = f"{TABLE} / company-whatsapp-number-recipient-tel-index"
REFUSED = orjson.dumps({"__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"})


def s(text: str) -> dict[str, str]:
    return {"S": text}


def conversation(blob_bytes: int, recipient: str = "+447700900123") -> dict[str, Any]:
    """A whatsapp conversation item (in both of its GSIs) padded to about `blob_bytes` (an attribute neither index
    holds)."""
    return {
        "primary_channel": s(recipient),
        "conversation_id": s("ci#pi#req#447700900001"),
        "company_id": s("ci"),
        "gsi_company_shard": s("ci#3"),
        "project_id": s("pi"),
        "created_at": s("2026-01-01T00:00:00.000Z"),
        "gsi_company_whatsapp_number": s("+447700900001"),
        "gsi_recipient_tel": s(recipient),
        "blob": s("x" * blob_bytes),
    }


def key_of(item: dict[str, Any]) -> dict[str, Any]:
    return {"primary_channel": item["primary_channel"], "conversation_id": item["conversation_id"]}


def ledger_with(*items: dict[str, Any]) -> WriteUnitLedger:
    ledger = WriteUnitLedger(table_shapes(SETTINGS))
    ledger.prime(TABLE, items)
    return ledger


def record(
    ledger: WriteUnitLedger, operation: str, body: dict[str, Any], status: int = 200, answer: bytes = b"{}"
) -> Counter[str]:
    return ledger.record(operation, orjson.dumps(body), status, answer)


# -- sizes -----------------------------------------------------------------------------------------------------------


def test_a_string_attribute_is_its_name_plus_its_utf8_bytes() -> None:
    assert item_size({"name": s("Lee")}) == 4 + 3
    assert item_size({"name": s("Zoë")}) == 4 + 4


def test_a_number_is_one_byte_per_two_significant_digits_plus_one() -> None:
    assert item_size({"n": {"N": "12345"}}) == 1 + 3 + 1
    assert item_size({"n": {"N": "1000"}}) == 1 + 1 + 1  # trailing zeros are trimmed


def test_maps_and_lists_cost_three_bytes_plus_one_per_element() -> None:
    assert item_size({"m": {"M": {"a": s("xy")}}}) == 1 + 3 + (1 + 1 + 2)
    assert item_size({"l": {"L": [s("a"), {"BOOL": True}]}}) == 1 + 3 + (1 + 1) + (1 + 1)


# -- update expressions ----------------------------------------------------------------------------------------------


def test_set_reads_every_operand_from_the_item_before_the_update() -> None:
    after = apply_update({"a": s("old")}, "SET a = :new, b = a", {}, {":new": s("new")})
    assert after == {"a": s("new"), "b": s("old")}


def test_if_not_exists_list_append_and_arithmetic_are_applied() -> None:
    update = "SET #m = list_append(if_not_exists(#m, :empty), :one), c = if_not_exists(c, :zero) + :inc"
    values = {":empty": {"L": []}, ":one": {"L": [s("hi")]}, ":zero": {"N": "0"}, ":inc": {"N": "1"}}
    assert apply_update({}, update, {"#m": "messages"}, values) == {"messages": {"L": [s("hi")]}, "c": {"N": "1"}}


def test_remove_takes_nested_keys_and_list_elements_by_their_original_index() -> None:
    before = {"l": {"L": [s("0"), s("1"), s("2")]}, "m": {"M": {"k": s("v"), "keep": s("v")}}, "x": s("x")}
    after = apply_update(before, "SET y = x REMOVE l[0], l[2], #m.k", {"#m": "m"}, {})
    assert after == {"l": {"L": [s("1")]}, "m": {"M": {"keep": s("v")}}, "x": s("x"), "y": s("x")}


def test_an_expression_that_reads_a_missing_attribute_is_not_modelled() -> None:
    with pytest.raises(UpdateError):
        apply_update({}, "SET a = b", {}, {})


# -- units -----------------------------------------------------------------------------------------------------------


def test_a_new_item_is_charged_per_started_kb_in_the_table_and_per_projected_entry_in_each_gsi_it_is_in() -> None:
    item = conversation(2500)
    ledger = ledger_with()
    charged = record(ledger, "PutItem", {"TableName": TABLE, "Item": item})
    assert charged == Counter({TABLE: 3, COMPANY_INDEX: 1, WHATSAPP_INDEX: 1})  # entries: keys (+ created_at)


def test_an_index_projecting_all_holds_the_whole_item() -> None:
    shape = table_shapes(SETTINGS)[TABLE]
    whatsapp = next(i for i in shape.indexes if "whatsapp" in i.name)
    as_all = replace(whatsapp, included=None)
    assert (index_units(whatsapp, None, conversation(2500)), index_units(as_all, None, conversation(2500))) == (1, 3)


def test_an_update_of_an_attribute_an_index_includes_is_charged_there_only() -> None:
    item = conversation(2500)
    ledger = ledger_with(item)
    body = {
        "TableName": TABLE,
        "Key": key_of(item),
        "UpdateExpression": "SET created_at = :v",
        "ExpressionAttributeValues": {":v": s("2026-01-02T00:00:00.000Z")},
    }
    assert record(ledger, "UpdateItem", body) == Counter({TABLE: 3, WHATSAPP_INDEX: 1})  # KEYS_ONLY: not the company's


def test_an_update_is_charged_for_the_larger_of_the_item_before_and_after() -> None:
    item = conversation(2500)
    ledger = ledger_with(item)
    body = {
        "TableName": TABLE,
        "Key": key_of(item),
        "UpdateExpression": "SET blob = :v",
        "ExpressionAttributeValues": {":v": s("small")},
    }
    assert record(ledger, "UpdateItem", body) == Counter({TABLE: 3})  # nothing the GSIs hold changed
    assert record(ledger, "UpdateItem", body) == Counter({TABLE: 1})


def test_an_update_that_moves_a_gsi_key_costs_that_index_a_delete_and_a_put() -> None:
    item = conversation(1500)
    ledger = ledger_with(item)
    body = {
        "TableName": TABLE,
        "Key": key_of(item),
        "UpdateExpression": "SET gsi_recipient_tel = :tel",
        "ExpressionAttributeValues": {":tel": s("+447700900999")},
    }
    assert record(ledger, "UpdateItem", body) == Counter({TABLE: 2, WHATSAPP_INDEX: 2})  # delete + put of the entry


def test_a_refused_conditional_write_is_charged_for_the_existing_item_in_the_table_only() -> None:
    item = conversation(2500)
    ledger = ledger_with(item)
    body = {
        "TableName": TABLE,
        "Item": conversation(10),
        "ConditionExpression": "attribute_not_exists(conversation_id)",
    }
    assert record(ledger, "PutItem", body, status=400, answer=REFUSED) == Counter({TABLE: 3})
    assert item_size(ledger.items[TABLE][ledger.key_of(ledger.shapes[TABLE], item)]) == item_size(item)


def test_the_all_new_answer_is_taken_as_the_item_after_an_update() -> None:
    item = conversation(100)
    ledger = ledger_with(item)
    written = conversation(2500)
    body = {"TableName": TABLE, "Key": key_of(item), "UpdateExpression": "SET opaque = :v", "ReturnValues": "ALL_NEW"}
    answer = orjson.dumps({"Attributes": written})
    assert record(ledger, "UpdateItem", body, answer=answer)[TABLE] == 3
    assert ledger.items[TABLE][ledger.key_of(ledger.shapes[TABLE], item)] == written


def test_unprocessed_batch_entries_are_not_charged() -> None:
    stage = SETTINGS.stage_table
    written = {"conversation_id": s("c1"), "message_sid": s("SM1"), "body": s("hi")}
    left = {"conversation_id": s("c1"), "message_sid": s("SM2"), "body": s("there")}
    body = {"RequestItems": {stage: [{"PutRequest": {"Item": written}}, {"PutRequest": {"Item": left}}]}}
    answer = orjson.dumps({"UnprocessedItems": {stage: [{"PutRequest": {"Item": left}}]}})
    ledger = ledger_with()
    assert record(ledger, "BatchWriteItem", body, answer=answer) == Counter({stage: 1})


def test_a_delete_removes_the_entry_from_every_index_the_item_was_in() -> None:
    item = conversation(1500)
    ledger = ledger_with(item)
    assert record(ledger, "DeleteItem", {"TableName": TABLE, "Key": key_of(item)}) == Counter(
        {TABLE: 2, COMPANY_INDEX: 1, WHATSAPP_INDEX: 1}
    )


def test_an_item_without_an_index_key_costs_that_index_nothing() -> None:
    shape = table_shapes(SETTINGS)[TABLE]
    sms_index = next(i for i in shape.indexes if "sms" in i.name)
    assert index_units(sms_index, None, conversation(100)) == 0
