"""The per-project, per-channel suppression list (opt-outs) in the opt-outs table.

Key: `suppression_key` = `company_id#project_id#channel` (PK), `recipient` (SK).
Read on every initiate without a cache: an opt-out must take effect at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.adapters.aws.dynamo_calls import get_item, send
from service.adapters.aws.dynamo_codec import to_attribute, to_item

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


def suppression_key(company_id: str, project_id: str, channel: str) -> str:
    return f"{company_id}#{project_id}#{channel}"


class DynamoOptOutRegistry:
    def __init__(self, dynamodb: DynamoDBClient, table: str) -> None:
        self._dynamodb = dynamodb
        self._table = table

    def _key(self, company_id: str, project_id: str, channel: str, recipient: str) -> dict[str, dict[str, str]]:
        return {
            "suppression_key": to_attribute(suppression_key(company_id, project_id, channel)),
            "recipient": to_attribute(recipient.lower() if channel == "email" else recipient),
        }

    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool:
        found = await get_item(
            self._dynamodb,
            TableName=self._table,
            Key=self._key(company_id, project_id, channel, recipient),
            ProjectionExpression="recipient",
            ConsistentRead=True,
        )
        return found is not None

    async def opt_out(self, company_id: str, project_id: str, channel: str, recipient: str, at: str) -> None:
        item = {**self._key(company_id, project_id, channel, recipient), **to_item({"opted_out_at": at})}
        await send(self._dynamodb.put_item(TableName=self._table, Item=item), "PutItem")

    async def opt_in(self, company_id: str, project_id: str, channel: str, recipient: str) -> None:
        key = self._key(company_id, project_id, channel, recipient)
        await send(self._dynamodb.delete_item(TableName=self._table, Key=key), "DeleteItem")
