"""The operator's read side of the conversations table (`comms conversation show|list`).

The table's partition key `primary_channel` is the recipient's number (or email), which a conversation id does
not contain: `find` looks the id up through the per-company index (company and project are the id's first two
parts; the index is sharded by a hash of the id, `resources.CONVERSATION_INDEXES`), then reads the record with a
consistent GetItem. `list_project` queries every shard of the same index (KEYS_ONLY) and reads a projection of
each record (`LISTED`), not whole records: context can be large. Records come out as `conversation_codec` reads
them; `summary` picks what `show` prints first.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.batch_reads import get_items
from service.adapters.aws.dynamo_calls import get_item, query_items
from service.adapters.aws.dynamo_codec import attribute_values
from service.adapters.aws.message_items import MessageItems
from service.adapters.aws.resources import COMPANY_SHARD, CONVERSATION_INDEXES
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

PROJECT_INDEX = next(index for index in CONVERSATION_INDEXES if index.partition_key == COMPANY_SHARD)
LISTED = (
    "conversation_id",
    "primary_channel",
    "channel_method",
    codec.STATUS,
    "recipient_first_name",
    "recipient_last_name",
    "created_at",
    "updated_at",
    "task_complete",
    "hand_off_to_human",
    "failure_reason",
)
SUMMARY = (
    "conversation_id",
    "primary_channel",
    "channel_method",
    codec.STATUS,
    "failure_reason",
    "company_id",
    "project_id",
    "company_name",
    "project_name",
    "request_id",
    "recipient_first_name",
    "recipient_last_name",
    "recipient_tel",
    "recipient_email",
    "comms_consent",
    "thread_id",
    "send_state",
    "provider_message_id",
    "task_complete",
    "hand_off_to_human",
    "processing_time_ms",
    "created_at",
    "updated_at",
)


def summary(record: ConversationRecord) -> dict[str, Any]:
    """The record's identity, status and bookkeeping, without messages and context (stored names, as stored)."""
    return {name: record.shared_fields[name] for name in SUMMARY if name in record.shared_fields}


class ConversationAdmin:
    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table: str,
        *,
        messages_table: str,
        index_shards: int,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._messages = MessageItems(dynamodb, messages_table)
        self._shards = index_shards  # settings.conversation_index_shards: only ever raised, so 0..N-1 covers all

    async def get(self, key: ConversationKey) -> ConversationRecord | None:
        """The record, read consistently, with all its messages (embedded ones first, then the items), or None; an
        operator is shown every stored attribute (`shared_fields` here includes the configuration and the kept
        status callbacks a hand-off leaves out, and `messages` the whole conversation)."""
        item = await get_item(self._dynamodb, TableName=self._table, Key=codec.item_key(key), ConsistentRead=True)
        if item is None:
            return None
        elements = await self._messages.stored(item)
        record = codec.record_from_item({**item, codec.MESSAGES: elements})  # all of them, as if embedded
        return replace(record, shared_fields={**item, codec.MESSAGES: elements})

    async def find(self, company_id: str, project_id: str, conversation_id: str) -> ConversationRecord | None:
        """The project's conversation with this id (its key found through the eventually consistent index: the
        shard the id hashes to first, then the others, for a conversation created before the shards were raised),
        then read consistently; or None."""
        likely = codec.company_shard(company_id, conversation_id, self._shards)
        shards = [likely, *(shard for shard in self._shard_keys(company_id) if shard != likely)]
        for shard in shards:
            found = await self._query(shard, project_id, conversation_id)
            if found:
                return await self.get(codec.key_of(found[0]))
        return None

    async def list_project(
        self, company_id: str, project_id: str, status: ConversationStatus | None = None, channel: str | None = None
    ) -> list[ConversationRecord]:
        """Every conversation of the project (in `status`, on `channel`), newest first: the keys from every shard
        of the index (KEYS_ONLY), then the `LISTED` attributes of each record (BatchGetItem, 100 a request);
        `shared_fields` holds those attributes only."""
        pages = await asyncio.gather(*(self._query(shard, project_id) for shard in self._shard_keys(company_id)))
        keys = [codec.item_key(codec.key_of(entry)) for page in pages for entry in page]
        names = {f"#p{i}": name for i, name in enumerate(LISTED)}
        projection = {"ProjectionExpression": ", ".join(names), "ExpressionAttributeNames": names}
        items = await get_items(self._dynamodb, self._table, keys, consistent=False, projection=projection)
        records = [codec.record_from_item(item) for item in items]
        wanted = [
            r for r in records if (status is None or r.status is status) and (channel is None or r.channel == channel)
        ]
        return sorted(wanted, key=lambda r: (r.created_at, r.key.conversation_id), reverse=True)

    def _shard_keys(self, company_id: str) -> list[str]:
        return [f"{company_id}#{n}" for n in range(self._shards)]

    async def _query(self, shard: str, project_id: str, conversation_id: str | None = None) -> list[dict[str, Any]]:
        """The index entries (keys) of one shard of the project: every page, or (`conversation_id`) up to the
        first page that has that conversation."""
        names = {"#shard": PROJECT_INDEX.partition_key, "#project": str(PROJECT_INDEX.sort_key)}
        values = {":shard": shard, ":project": project_id}
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": PROJECT_INDEX.name,
            "KeyConditionExpression": "#shard = :shard AND #project = :project",
        }
        if conversation_id is not None:
            request["FilterExpression"] = "conversation_id = :id"
            values[":id"] = conversation_id
        request["ExpressionAttributeNames"] = names
        request["ExpressionAttributeValues"] = attribute_values(values)
        return await query_items(self._dynamodb, request, until_found=conversation_id is not None)
