"""A stored conversation as tests read it: the conversations-table item with `messages` holding every message the
record counts (embedded ones of older records first, then the message items), as the operator CLI shows it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.message_items import MessageItems

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


async def with_messages(dynamodb: DynamoDBClient, messages_table: str, item: dict[str, Any]) -> dict[str, Any]:
    return {**item, codec.MESSAGES: await MessageItems(dynamodb, messages_table).stored(item)}
