"""DynamoDB calls the repositories make the same way: a conditional update that says whether it applied (or
returns the new item), the item that refused a conditional write, and a query read to its last page. AWS
failures become `DependencyUnavailable` (503 / retry later)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_codec import from_item
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


async def update_if(dynamodb: DynamoDBClient, operation: str, **params: Any) -> bool:
    """UpdateItem with a ConditionExpression: True when it applied, False when the condition refused it."""
    try:
        await dynamodb.update_item(**params)
    except AWS_FAILURES as exc:
        if is_conditional_check_failure(exc):
            return False
        raise unavailable("dynamodb", operation, exc) from exc
    return True


async def update_returning(dynamodb: DynamoDBClient, operation: str, **params: Any) -> dict[str, Any] | None:
    """UpdateItem with a ConditionExpression and ReturnValues=ALL_NEW: the item as written, decoded, or None
    when the condition refused it."""
    try:
        answer = await dynamodb.update_item(**params, ReturnValues="ALL_NEW")
    except AWS_FAILURES as exc:
        if is_conditional_check_failure(exc):
            return None
        raise unavailable("dynamodb", operation, exc) from exc
    return from_item(answer["Attributes"])


def refusing_item(exc: BaseException) -> dict[str, Any]:
    """The item that refused a conditional write sent with ReturnValuesOnConditionCheckFailure=ALL_OLD,
    decoded; {} when there was none."""
    return from_item(getattr(exc, "response", {}).get("Item") or {})


async def query_items(
    dynamodb: DynamoDBClient, params: Mapping[str, Any], *, max_pages: int | None = None
) -> list[dict[str, Any]]:
    """Every item the query finds, decoded, following LastEvaluatedKey (at most `max_pages` pages)."""
    items: list[dict[str, Any]] = []
    start: dict[str, Any] | None = None
    pages = 0
    while max_pages is None or pages < max_pages:
        request = {**params, "ExclusiveStartKey": start} if start else dict(params)
        try:
            page = await dynamodb.query(**request)
        except AWS_FAILURES as exc:
            raise unavailable("dynamodb", "Query", exc) from exc
        pages += 1
        items += [from_item(item) for item in page.get("Items", [])]
        start = page.get("LastEvaluatedKey")
        if not start:
            break
    return items
