"""DynamoDB calls the repositories make the same way: a request whose AWS failure becomes `DependencyUnavailable`
(503 / retry later), a conditional write that says whether it applied (or returns the item it wrote, or the item
that refused it), a read, and a query read to its last page."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from service.adapters.aws.dynamo_codec import from_item
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

T = TypeVar("T")


async def send(request: Awaitable[T], operation: str) -> T:
    """`request` is the client call itself (`dynamodb.put_item(...)`), written where the store makes it:
    tests/test_deploy_cloudformation.py finds the operations the service role needs by those calls."""
    try:
        return await request
    except AWS_FAILURES as exc:
        raise unavailable("dynamodb", operation, exc) from exc


def _refusing_item(exc: BaseException) -> dict[str, Any]:
    """The item sent back with ReturnValuesOnConditionCheckFailure=ALL_OLD, decoded; {} when there was none."""
    return from_item(getattr(exc, "response", {}).get("Item") or {})


async def refusal(request: Awaitable[object], operation: str) -> dict[str, Any] | None:
    """A conditional write: None when it applied, else the item that refused it (`_refusing_item`)."""
    try:
        await request
    except AWS_FAILURES as exc:
        if is_conditional_check_failure(exc):
            return _refusing_item(exc)
        raise unavailable("dynamodb", operation, exc) from exc
    return None


async def applied(request: Awaitable[object], operation: str) -> bool:
    """A conditional write: True when it applied, False when its condition refused it."""
    return await refusal(request, operation) is None


async def update_if(dynamodb: DynamoDBClient, operation: str, **params: Any) -> bool:
    return await applied(dynamodb.update_item(**params), operation)


async def update_or_refusal(dynamodb: DynamoDBClient, operation: str, **params: Any) -> tuple[bool, dict[str, Any]]:
    """A conditional UpdateItem that returns the item either way: (True, the item as written) or (False, the item
    that refused it, {} when there was none)."""
    try:
        answer = await dynamodb.update_item(
            **params, ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD"
        )
    except AWS_FAILURES as exc:
        if is_conditional_check_failure(exc):
            return False, _refusing_item(exc)
        raise unavailable("dynamodb", operation, exc) from exc
    return True, from_item(answer["Attributes"])


async def update_returning(dynamodb: DynamoDBClient, operation: str, **params: Any) -> dict[str, Any] | None:
    """A conditional UpdateItem: the item as written, or None when the condition refused it."""
    try:
        answer = await dynamodb.update_item(**params, ReturnValues="ALL_NEW")
    except AWS_FAILURES as exc:
        if is_conditional_check_failure(exc):
            return None
        raise unavailable("dynamodb", operation, exc) from exc
    return from_item(answer["Attributes"])


async def get_item(dynamodb: DynamoDBClient, **params: Any) -> dict[str, Any] | None:
    """The item, decoded, or None when there is none."""
    answer = await send(dynamodb.get_item(**params), "GetItem")
    item = answer.get("Item")
    return None if item is None else from_item(item)


async def query_items(
    dynamodb: DynamoDBClient, params: Mapping[str, Any], *, max_pages: int | None = None, until_found: bool = False
) -> list[dict[str, Any]]:
    """Every item the query finds, decoded, following LastEvaluatedKey (at most `max_pages` pages; `until_found`:
    up to the first page that has some)."""
    items: list[dict[str, Any]] = []
    start: dict[str, Any] | None = None
    pages = 0
    while max_pages is None or pages < max_pages:
        request = {**params, "ExclusiveStartKey": start} if start else dict(params)
        page = await send(dynamodb.query(**request), "Query")
        pages += 1
        items += [from_item(item) for item in page.get("Items", [])]
        start = page.get("LastEvaluatedKey")
        if not start or (until_found and items):
            break
    return items
