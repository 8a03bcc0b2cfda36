"""The operator's read side of the conversations table (`comms conversation show|list`).

The table's partition key `primary_channel` is the recipient's number (or email), which a conversation id does
not contain: `find` looks the id up through `company-id-project-id-index` (company and project are the id's
first two parts), then reads the record with a consistent GetItem. `list_project` queries the same index, for a
projection (`LISTED`), not whole records: messages and context can be large. Records come out as
`conversation_codec` reads them; `summary` picks what `show` prints first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import get_item, query_items
from service.adapters.aws.dynamo_codec import attribute_values
from service.adapters.aws.resources import CONVERSATION_INDEXES
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

PROJECT_INDEX = next(index for index in CONVERSATION_INDEXES if index.partition_key == "company_id")
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
    def __init__(self, dynamodb: DynamoDBClient, table: str) -> None:
        self._dynamodb = dynamodb
        self._table = table

    async def get(self, key: ConversationKey) -> ConversationRecord | None:
        """The record, read consistently, or None; an operator is shown every stored attribute (`shared_fields`
        here includes the configuration and the kept status callbacks a hand-off leaves out)."""
        item = await get_item(self._dynamodb, TableName=self._table, Key=codec.item_key(key), ConsistentRead=True)
        return None if item is None else replace(codec.record_from_item(item), shared_fields=item)

    async def find(self, company_id: str, project_id: str, conversation_id: str) -> ConversationRecord | None:
        """The project's conversation with this id (found through the eventually consistent index, then read
        consistently), or None."""
        found = await self._query(company_id, project_id, {"conversation_id": conversation_id}, first_only=True)
        return await self.get(found[0].key) if found else None

    async def list_project(
        self, company_id: str, project_id: str, status: ConversationStatus | None = None, channel: str | None = None
    ) -> list[ConversationRecord]:
        """Every conversation of the project (in `status`, on `channel`), newest first, read as the `LISTED`
        projection: `shared_fields` holds those attributes only."""
        filters = {codec.STATUS: status.value if status else None, "channel_method": channel}
        records = await self._query(company_id, project_id, {k: v for k, v in filters.items() if v is not None})
        return sorted(records, key=lambda r: (r.created_at, r.key.conversation_id), reverse=True)

    async def _query(
        self, company_id: str, project_id: str, filters: Mapping[str, str], *, first_only: bool = False
    ) -> list[ConversationRecord]:
        """The projected items of one project's index partition where each filter attribute equals its value,
        every page (`first_only`: up to the first page that has some)."""
        names = {"#company": PROJECT_INDEX.partition_key, "#project": str(PROJECT_INDEX.sort_key)}
        names |= {f"#p{i}": name for i, name in enumerate(LISTED)}
        values = {":company": company_id, ":project": project_id}
        conditions = []
        for i, (attribute, value) in enumerate(filters.items()):
            names[f"#f{i}"], values[f":f{i}"] = attribute, value
            conditions.append(f"#f{i} = :f{i}")
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": PROJECT_INDEX.name,
            "KeyConditionExpression": "#company = :company AND #project = :project",
            "ProjectionExpression": ", ".join(f"#p{i}" for i in range(len(LISTED))),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": attribute_values(values),
            **({"FilterExpression": " AND ".join(conditions)} if conditions else {}),
        }
        items = await query_items(self._dynamodb, request, until_found=first_only)
        return [codec.record_from_item(item) for item in items]
