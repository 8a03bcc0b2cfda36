"""DynamoDB attribute-value encoding for plain JSON-shaped Python data.

Numbers come back as int when integral, else float, so records round-trip to
JSON without Decimal leaking into the domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

AttributeValue = dict[str, Any]


def to_attribute(value: Any) -> AttributeValue:
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int | float | Decimal):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, Mapping):  # the domain's records hold read-only mappings too
        return {"M": {str(k): to_attribute(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [to_attribute(v) for v in value]}
    if isinstance(value, set | frozenset) and value and all(isinstance(v, str) for v in value):
        return {"SS": sorted(value)}  # string sets: non-empty by DynamoDB's rule
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def attribute_values(values: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """ExpressionAttributeValues (or any name -> value map) encoded."""
    return {name: to_attribute(value) for name, value in values.items()}


def from_attribute(attribute: Mapping[str, Any]) -> Any:
    ((kind, value),) = attribute.items()
    if kind == "S":
        return value
    if kind == "N":
        number = Decimal(value)
        return int(number) if number == number.to_integral_value() else float(number)
    if kind == "BOOL":
        return bool(value)
    if kind == "NULL":
        return None
    if kind == "M":
        return {k: from_attribute(v) for k, v in value.items()}
    if kind == "L":
        return [from_attribute(v) for v in value]
    if kind in ("SS", "NS"):
        return [from_attribute({kind[0]: v}) for v in value]
    raise TypeError(f"unsupported DynamoDB attribute type {kind}")


def to_item(data: dict[str, Any]) -> dict[str, AttributeValue]:
    return {k: to_attribute(v) for k, v in data.items() if v is not None}


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: from_attribute(v) for k, v in item.items()}
