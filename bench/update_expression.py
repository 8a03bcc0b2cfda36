"""DynamoDB UpdateExpression, evaluated on an item image in DynamoDB JSON (`{"S": "x"}`, `{"M": {...}}`, ...).

The write-unit accounting (`bench.write_units`) keeps a shadow image of every item the service writes, so that an
UpdateItem is charged for the larger of the item before and after it, as DynamoDB charges. This module computes
the after-image from the before-image and the request: SET (`=`, `+`, `-`, `if_not_exists`, `list_append`),
REMOVE (map keys and list elements), ADD (numbers and sets) and DELETE (sets), on nested paths
(`#a.b[2].#c`). Every operand is read from the before-image, as DynamoDB does. An expression this module cannot
apply raises `UpdateError` (the caller then counts the write as not modelled).
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

Item = dict[str, Any]  # attribute name -> AttributeValue (DynamoDB JSON)
PathStep = str | int  # a map key or a list index

_TOKEN = re.compile(
    r"\s*(?:(?P<name>#?[A-Za-z_][A-Za-z0-9_]*)|(?P<value>:[A-Za-z0-9_]+)|(?P<index>\[\d+\])|(?P<op>[.,()=+\-]))"
)
_CLAUSES = ("SET", "REMOVE", "ADD", "DELETE")
_FUNCTIONS = ("if_not_exists", "list_append")


class UpdateError(ValueError):
    """The expression (or the item) is outside what this evaluator models."""


@dataclass(frozen=True, slots=True)
class Path:
    steps: tuple[PathStep, ...]


@dataclass(frozen=True, slots=True)
class Placeholder:
    value: Any  # an AttributeValue


@dataclass(frozen=True, slots=True)
class Call:
    function: str
    arguments: tuple[Operand, ...]


@dataclass(frozen=True, slots=True)
class Arithmetic:
    left: Operand
    operator: str  # "+" or "-"
    right: Operand


Operand = Path | Placeholder | Call | Arithmetic


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expression):
        if expression[position:].strip() == "":
            break
        match = _TOKEN.match(expression, position)
        if match is None:
            raise UpdateError(f"cannot read the update expression at {expression[position:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, expression: str, names: Mapping[str, str], values: Mapping[str, Any]) -> None:
        self.tokens = _tokens(expression)
        self.at = 0
        self.names = names
        self.values = values

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise UpdateError("the update expression ends too early")
        self.at += 1
        return token

    def expect(self, text: str) -> None:
        _, got = self.take()
        if got != text:
            raise UpdateError(f"expected {text!r}, found {got!r}")

    def clause_keyword(self) -> str | None:
        token = self.peek()
        if token is not None and token[0] == "name" and token[1].upper() in _CLAUSES:
            return token[1].upper()
        return None

    def name(self, raw: str) -> str:
        if raw.startswith("#"):
            if raw not in self.names:
                raise UpdateError(f"no ExpressionAttributeNames entry for {raw}")
            return self.names[raw]
        return raw

    def path(self) -> Path:
        kind, raw = self.take()
        if kind != "name":
            raise UpdateError(f"expected an attribute path, found {raw!r}")
        steps: list[PathStep] = [self.name(raw)]
        while (token := self.peek()) is not None:
            if token[0] == "index":
                self.take()
                steps.append(int(token[1][1:-1]))
            elif token == ("op", "."):
                self.take()
                kind, raw = self.take()
                if kind != "name":
                    raise UpdateError(f"expected a name after '.', found {raw!r}")
                steps.append(self.name(raw))
            else:
                break
        return Path(tuple(steps))

    def operand(self) -> Operand:
        token = self.peek()
        if token is None:
            raise UpdateError("an operand is missing")
        kind, raw = token
        if kind == "value":
            self.take()
            if raw not in self.values:
                raise UpdateError(f"no ExpressionAttributeValues entry for {raw}")
            return Placeholder(self.values[raw])
        if (
            kind == "name"
            and raw in _FUNCTIONS
            and self.at + 1 < len(self.tokens)
            and self.tokens[self.at + 1][1] == "("
        ):
            self.take()
            self.expect("(")
            arguments = [self.value()]
            while self.peek() == ("op", ","):
                self.take()
                arguments.append(self.value())
            self.expect(")")
            return Call(raw, tuple(arguments))
        return self.path()

    def value(self) -> Operand:
        left = self.operand()
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in "+-":
            self.take()
            return Arithmetic(left, token[1], self.operand())
        return left


def parse(
    expression: str, names: Mapping[str, str], values: Mapping[str, Any]
) -> list[tuple[str, Path, Operand | None]]:
    """The actions of an UpdateExpression, in order: (clause, path, operand or None for REMOVE)."""
    parser = _Parser(expression, names, values)
    actions: list[tuple[str, Path, Operand | None]] = []
    while parser.peek() is not None:
        clause = parser.clause_keyword()
        if clause is None:
            raise UpdateError(f"expected SET, REMOVE, ADD or DELETE, found {parser.peek()!r}")
        parser.take()
        while True:
            path = parser.path()
            if clause == "SET":
                parser.expect("=")
                actions.append((clause, path, parser.value()))
            elif clause == "REMOVE":
                actions.append((clause, path, None))
            else:
                actions.append((clause, path, parser.operand()))
            if parser.peek() != ("op", ","):
                break
            parser.take()
    return actions


# -- evaluation ------------------------------------------------------------------------------------------------------


def _get(item: Item, steps: tuple[PathStep, ...]) -> Any | None:
    """The AttributeValue at `steps`, or None when the path does not exist."""
    current: Any = {"M": item}
    for step in steps:
        if isinstance(step, int):
            elements = current.get("L") if isinstance(current, dict) else None
            if elements is None or step >= len(elements):
                return None
            current = elements[step]
        else:
            members = current.get("M") if isinstance(current, dict) else None
            if members is None or step not in members:
                return None
            current = members[step]
    return current


def _number(value: Any) -> Decimal:
    if not isinstance(value, dict) or "N" not in value:
        raise UpdateError("arithmetic on a value that is not a number")
    return Decimal(value["N"])


def _format_number(number: Decimal) -> str:
    text = format(number.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".")


def _evaluate(operand: Operand, before: Item) -> Any:
    if isinstance(operand, Placeholder):
        return operand.value
    if isinstance(operand, Path):
        found = _get(before, operand.steps)
        if found is None:
            raise UpdateError("the update reads an attribute the item does not have")
        return found
    if isinstance(operand, Arithmetic):
        left, right = _number(_evaluate(operand.left, before)), _number(_evaluate(operand.right, before))
        return {"N": _format_number(left + right if operand.operator == "+" else left - right)}
    if operand.function == "if_not_exists":
        path, fallback = operand.arguments
        if not isinstance(path, Path):
            raise UpdateError("if_not_exists needs a path first")
        found = _get(before, path.steps)
        return found if found is not None else _evaluate(fallback, before)
    first, second = (_evaluate(argument, before) for argument in operand.arguments)
    if "L" not in first or "L" not in second:
        raise UpdateError("list_append of something that is not a list")
    return {"L": [*first["L"], *second["L"]]}


def _parent(item: Item, steps: tuple[PathStep, ...]) -> Any:
    """The container (a map's members dict or a list) that holds the last step of `steps`."""
    if len(steps) == 1:
        return item
    holder = _get(item, steps[:-1])
    if holder is None:
        raise UpdateError("the document path to update is not valid for this item")
    if isinstance(steps[-1], int):
        if "L" not in holder:
            raise UpdateError("a list index on something that is not a list")
        return holder["L"]
    if "M" not in holder:
        raise UpdateError("a map key on something that is not a map")
    return holder["M"]


def _set(item: Item, steps: tuple[PathStep, ...], value: Any) -> None:
    holder, last = _parent(item, steps), steps[-1]
    if isinstance(last, int):
        if last < len(holder):
            holder[last] = value
        else:
            holder.append(value)  # DynamoDB appends an index past the end
    else:
        holder[last] = value


_SET_TYPES = ("SS", "NS", "BS")


def _add(item: Item, steps: tuple[PathStep, ...], value: Any) -> None:
    current = _get(item, steps)
    if current is None:
        _set(item, steps, copy.deepcopy(value))
    elif "N" in value:
        _set(item, steps, {"N": _format_number(_number(current) + _number(value))})
    else:
        kind = next((k for k in _SET_TYPES if k in value), None)
        if kind is None or kind not in current:
            raise UpdateError("ADD needs a number or a set of the same type")
        _set(item, steps, {kind: [*current[kind], *(v for v in value[kind] if v not in current[kind])]})


def _delete(item: Item, steps: tuple[PathStep, ...], value: Any) -> None:
    current = _get(item, steps)
    kind = next((k for k in _SET_TYPES if k in value), None)
    if current is None or kind is None or kind not in current:
        return
    kept = [v for v in current[kind] if v not in value[kind]]
    if kept:
        _set(item, steps, {kind: kept})
    else:
        _remove_paths(item, [steps])  # an empty set is no attribute at all


def _remove_paths(item: Item, paths: list[tuple[PathStep, ...]]) -> None:
    # List elements go from the highest index down, so each index still names the element the expression meant.
    for steps in sorted(paths, key=lambda s: [(0, x) if isinstance(x, int) else (1, x) for x in s], reverse=True):
        holder: Any = _get(item, steps[:-1]) if len(steps) > 1 else {"M": item}
        if holder is None:
            continue
        last = steps[-1]
        if isinstance(last, int):
            elements = holder.get("L")
            if elements is not None and last < len(elements):
                del elements[last]
        else:
            members = holder.get("M")
            if members is not None:
                members.pop(last, None)


def apply_update(before: Item, expression: str, names: Mapping[str, str], values: Mapping[str, Any]) -> Item:
    """The item after `expression` (DynamoDB semantics: every operand is read from `before`)."""
    actions = parse(expression, names, values)
    evaluated = [
        (clause, path, None if operand is None else _evaluate(operand, before)) for clause, path, operand in actions
    ]
    after = copy.deepcopy(before)
    removals: list[tuple[PathStep, ...]] = []
    for clause, path, value in evaluated:
        if clause == "SET":
            _set(after, path.steps, copy.deepcopy(value))
        elif clause == "REMOVE":
            removals.append(path.steps)
        elif clause == "ADD":
            _add(after, path.steps, value)
        else:
            _delete(after, path.steps, value)
    _remove_paths(after, removals)
    return after


# -- sizes (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html) ---------


def _number_size(text: str) -> int:
    digits = text.lstrip("+-").lower().split("e", 1)[0].replace(".", "").lstrip("0").rstrip("0")
    return (max(1, len(digits)) + 1) // 2 + 1


def value_size(value: Any) -> int:
    """Bytes of one AttributeValue, without its name."""
    kind, content = next(iter(value.items()))
    if kind == "S":
        return len(content.encode())
    if kind == "N":
        return _number_size(content)
    if kind == "B":
        return len(base64.b64decode(content))
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "L":
        return 3 + sum(1 + value_size(element) for element in content)
    if kind == "M":
        return 3 + sum(1 + len(name.encode()) + value_size(element) for name, element in content.items())
    if kind == "SS":
        return sum(len(element.encode()) for element in content)
    if kind == "NS":
        return sum(_number_size(element) for element in content)
    if kind == "BS":
        return sum(len(base64.b64decode(element)) for element in content)
    raise UpdateError(f"unknown attribute type {kind}")


def item_size(item: Mapping[str, Any]) -> int:
    """Bytes of an item: every attribute name plus its value (DynamoDB's documented size rules)."""
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())
