"""Several items of one table by key in one request (BatchGetItem), following its unprocessed keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import send
from service.adapters.aws.dynamo_codec import from_item

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

BATCH_GET_LIMIT = 100  # keys per BatchGetItem
MAX_ROUNDS = 5  # unprocessed keys asked for again at most this often (throttling) before giving up on them


async def get_items(
    dynamodb: DynamoDBClient,
    table: str,
    keys: Sequence[Mapping[str, Any]],
    *,
    consistent: bool = True,
    projection: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The items (decoded) that exist among `keys` (encoded keys), in no particular order. `projection`:
    {"ProjectionExpression": ..., "ExpressionAttributeNames": ...} to read only some attributes."""
    found: list[dict[str, Any]] = []
    for start in range(0, len(keys), BATCH_GET_LIMIT):
        wanted: dict[str, Any] = {
            table: {
                "Keys": list(keys[start : start + BATCH_GET_LIMIT]),
                "ConsistentRead": consistent,
                **(projection or {}),
            }
        }
        for _ in range(MAX_ROUNDS):
            answer = await send(dynamodb.batch_get_item(RequestItems=wanted), "BatchGetItem")
            found += [from_item(item) for item in answer.get("Responses", {}).get(table, [])]
            wanted = answer.get("UnprocessedKeys") or {}
            if not wanted:
                break
    return found
