"""DynamoDB write units of the service's writes, computed from what the counting proxy sees.

DynamoDB charges a write 1 unit per started KB of the item it writes, in the base table and again in every
global secondary index the item is in whose entry the write changes (index entry = the table's and the index's
keys plus the projected attributes: `resources.Index.included`, KEYS_ONLY when none, the whole item for ALL,
which no index here uses any more). moto does not
report consumed capacity, so the proxy keeps a shadow image of every item (primed with a Scan before the
service starts, then kept current from each successful write) and charges each write as DynamoDB documents it:

- PutItem / UpdateItem: the larger of the item before and after (an UpdateItem's after-image is the `ALL_NEW`
  answer when the service asked for it, else the shadow image with the UpdateExpression applied);
- DeleteItem: the deleted item; BatchWriteItem: each processed put or delete alone; TransactWriteItems: twice;
- a conditional write refused by its condition: the existing item (1 unit when there is none), base table only;
- each GSI: a new entry (put) or a removed one (delete) is one write of that entry (its projected size); an update
  that changes the entry's key is two (delete + put); one that changes a projected attribute is one (the larger
  entry); one that changes nothing the index holds is none.

Sizes follow DynamoDB's rules (`bench.update_expression.item_size`). A write this cannot model (an unknown table,
an expression the evaluator does not read) is counted in `unmodelled` and charges nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bench.update_expression import Item, UpdateError, apply_update, item_size
from service.adapters.aws.resources import table_specs
from service.config import Settings

WRITE_OPERATIONS = frozenset({"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"})
KB = 1024


@dataclass(frozen=True, slots=True)
class IndexShape:
    name: str
    keys: tuple[str, ...]
    table_keys: tuple[str, ...] = ()  # every entry holds the table's key too
    included: tuple[str, ...] | None = ()  # the non-key attributes projected (INCLUDE; () KEYS_ONLY; None ALL)

    def entry(self, item: Item) -> Item:
        """The index entry of `item`: what the index stores of it."""
        if self.included is None:
            return item
        wanted = {*self.table_keys, *self.keys, *self.included}
        return {name: value for name, value in item.items() if name in wanted}


@dataclass(frozen=True, slots=True)
class TableShape:
    name: str
    keys: tuple[str, ...]
    indexes: tuple[IndexShape, ...] = ()


def table_shapes(settings: Settings) -> dict[str, TableShape]:
    """Every table's key and GSIs with their projections, from the service's own resource definitions."""
    shapes = {}
    for spec in table_specs(settings):
        keys = (spec.partition_key, *([spec.sort_key] if spec.sort_key else []))
        indexes = tuple(
            IndexShape(
                index.name, (index.partition_key, *([index.sort_key] if index.sort_key else [])), keys, index.included
            )
            for index in spec.indexes
        )
        shapes[spec.name] = TableShape(spec.name, keys, indexes)
    return shapes


def units(size: int) -> int:
    """Write units of one write of an item of `size` bytes: one per started KB, at least one."""
    return max(1, math.ceil(size / KB))


def index_units(index: IndexShape, before: Item | None, after: Item | None) -> int:
    """Write units one base-table write costs `index`: entries as projected (`IndexShape.entry`)."""
    in_before = before is not None and all(key in before for key in index.keys)
    in_after = after is not None and all(key in after for key in index.keys)
    entry_before = index.entry(before) if in_before and before is not None else None
    entry_after = index.entry(after) if in_after and after is not None else None
    if entry_before is not None and entry_after is not None:
        if any(entry_before[key] != entry_after[key] for key in index.keys):
            return units(item_size(entry_before)) + units(item_size(entry_after))  # entry moves: delete + put
        if entry_before == entry_after:
            return 0
        return units(max(item_size(entry_before), item_size(entry_after)))
    if entry_after is not None:
        return units(item_size(entry_after))
    if entry_before is not None:
        return units(item_size(entry_before))
    return 0


class WriteUnitLedger:
    """Shadow images of the items and the write units charged so far, by `table` and `table / index`."""

    def __init__(self, shapes: Mapping[str, TableShape]) -> None:
        self.shapes = dict(shapes)
        self.items: dict[str, dict[bytes, Item]] = {name: {} for name in shapes}
        self.units: Counter[str] = Counter()  # the charges of the request being recorded
        self.writes: Counter[str] = Counter()  # item writes charged (batch entries one by one), by table
        self.unmodelled: Counter[str] = Counter()

    def prime(self, table: str, items: Iterable[Item]) -> None:
        """Items already in `table` (written before the proxy saw anything)."""
        shape = self.shapes[table]
        for item in items:
            self.items[table][self.key_of(shape, item)] = item

    # ---- one proxied request ----------------------------------------------------------------------------------

    def record(self, operation: str, request: bytes, status: int, response: bytes) -> Counter[str]:
        """The write units one DynamoDB request costs, by `table` and `table / index` (none unless a write)."""
        self.units = Counter()
        if operation not in WRITE_OPERATIONS:
            return self.units
        try:
            body = orjson.loads(request)
            answer = orjson.loads(response) if response else {}
        except orjson.JSONDecodeError:
            self.unmodelled[operation] += 1
            return self.units
        try:
            if status == 200:
                self._applied(operation, body, answer)
            elif status == 400 and "ConditionalCheckFailed" in str(answer.get("__type", "")):
                self._refused(body, answer)
            # other failures (throttling, validation, 5xx) write nothing
        except (UpdateError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.unmodelled[f"{operation}: {type(exc).__name__}"] += 1
        return self.units

    def _applied(self, operation: str, body: dict[str, Any], answer: dict[str, Any]) -> None:
        if operation == "BatchWriteItem":
            unprocessed = answer.get("UnprocessedItems") or {}
            for table, requests in body["RequestItems"].items():
                left = unprocessed.get(table, [])
                for request in requests:
                    if request in left:
                        continue
                    if "PutRequest" in request:
                        self._put(table, request["PutRequest"]["Item"])
                    else:
                        self._delete(table, request["DeleteRequest"]["Key"])
        elif operation == "TransactWriteItems":
            for action in body["TransactItems"]:
                kind, params = next(iter(action.items()))
                if kind == "Put":
                    self._put(params["TableName"], params["Item"], factor=2)
                elif kind == "Update":
                    self._update(params, None, factor=2)
                elif kind == "Delete":
                    self._delete(params["TableName"], params["Key"], factor=2)
        elif operation == "PutItem":
            self._put(body["TableName"], body["Item"])
        elif operation == "UpdateItem":
            exact = answer.get("Attributes") if body.get("ReturnValues") == "ALL_NEW" else None
            self._update(body, exact)
        else:
            self._delete(body["TableName"], body["Key"])

    def _refused(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        table = body["TableName"]
        shape = self.shapes[table]
        key = self.key_of(shape, body.get("Key") or body["Item"])
        existing = answer.get("Item")  # ReturnValuesOnConditionCheckFailure=ALL_OLD: the exact current item
        if existing is not None:
            self.items[table][key] = existing
        current = self.items[table].get(key)
        self._charge(table, units(item_size(current)) if current else 1)

    # ---- the three kinds of item writes -------------------------------------------------------------------------

    def _put(self, table: str, item: Item, factor: int = 1) -> None:
        shape = self.shapes[table]
        key = self.key_of(shape, item)
        before = self.items[table].get(key)
        self.items[table][key] = item
        self._write(shape, before, item, factor)

    def _update(self, params: dict[str, Any], exact: Item | None, factor: int = 1) -> None:
        table = params["TableName"]
        shape = self.shapes[table]
        key = self.key_of(shape, params["Key"])
        before = self.items[table].get(key)
        after = exact
        if after is None:
            start = dict(before) if before is not None else dict(params["Key"])
            expression = params.get("UpdateExpression", "")
            names, values = params.get("ExpressionAttributeNames", {}), params.get("ExpressionAttributeValues", {})
            after = apply_update(start, expression, names, values) if expression else start
        self.items[table][key] = after
        self._write(shape, before, after, factor)

    def _delete(self, table: str, key_attributes: Item, factor: int = 1) -> None:
        shape = self.shapes[table]
        before = self.items[table].pop(self.key_of(shape, key_attributes), None)
        self._write(shape, before, None, factor)

    def _write(self, shape: TableShape, before: Item | None, after: Item | None, factor: int) -> None:
        sizes = [item_size(image) for image in (before, after) if image is not None]
        self._charge(shape.name, factor * units(max(sizes, default=0)))
        for index in shape.indexes:
            cost = index_units(index, before, after)
            if cost:
                self.units[f"{shape.name} / {index.name}"] += factor * cost

    def _charge(self, table: str, cost: int) -> None:
        self.units[table] += cost
        self.writes[table] += 1

    @staticmethod
    def key_of(shape: TableShape, item: Mapping[str, Any]) -> bytes:
        """The identity of an item (or of a Key) in `shape`'s table."""
        return orjson.dumps([item[name] for name in shape.keys], option=orjson.OPT_SORT_KEYS)


def per_unit_of_work(window: Counter[str], done: int) -> dict[str, float]:
    """Write units in a window per unit of work (conversation, request, reply), by table and index, plus totals."""
    done = max(1, done)
    figures = {name: count / done for name, count in sorted(window.items())}
    base = sum(count for name, count in window.items() if " / " not in name)
    indexes = sum(count for name, count in window.items() if " / " in name)
    return {"total": (base + indexes) / done, "base tables": base / done, "GSIs": indexes / done, **figures}
