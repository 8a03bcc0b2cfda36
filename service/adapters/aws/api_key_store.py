"""API key records (hash only) in the api-keys table, keyed by key id.

The service reads them through `find`, behind a TTL cache: a revoked key stops working within
`api_key_cache_ttl_s` on every replica; `put` issues one. What only `comms apikey` does (read uncached, list,
revoke) is `service.adapters.aws.api_key_admin`, so the service's own role needs no Scan.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import get_item, send
from service.adapters.aws.dynamo_codec import to_attribute, to_item
from service.adapters.ttl_cache import TtlCache
from service.domain.ports import ApiKeyRecord

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

ACTIVE = "active"


class DynamoApiKeyStore:
    def __init__(self, dynamodb: DynamoDBClient, table: str, cache_ttl_s: float) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._cache: TtlCache[str, ApiKeyRecord | None] = TtlCache(cache_ttl_s)

    async def find(self, key_id: str) -> ApiKeyRecord | None:
        return await self._cache.get(key_id, lambda: self._read(key_id))

    async def _get_item(self, key_id: str, *, consistent: bool) -> dict[str, Any] | None:
        key = {"key_id": to_attribute(key_id)}
        return await get_item(self._dynamodb, TableName=self._table, Key=key, ConsistentRead=consistent)

    async def _read(self, key_id: str) -> ApiKeyRecord | None:
        data = await self._get_item(key_id, consistent=False)
        if data is None:
            return None
        return ApiKeyRecord(
            key_id=data["key_id"],
            secret_hash=data["secret_hash"],
            company_id=data["company_id"],
            project_id=data["project_id"],
            status=data.get("status", ACTIVE),
        )

    async def put(self, record: ApiKeyRecord, created_at: str) -> None:
        item = {**asdict(record), "created_at": created_at}
        await send(self._dynamodb.put_item(TableName=self._table, Item=to_item(item)), "PutItem")
        self._cache.invalidate(record.key_id)
