"""API key records (hash only) in the api-keys table, keyed by key id, behind a TTL cache.

A revoked key stops working within `api_key_cache_ttl_s` on every replica.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.adapters.aws.dynamo_codec import from_item, to_attribute, to_item
from service.adapters.aws.errors import AWS_FAILURES, unavailable
from service.adapters.ttl_cache import TtlCache
from service.domain.ports import ApiKeyRecord

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class DynamoApiKeyStore:
    def __init__(self, dynamodb: DynamoDBClient, table: str, cache_ttl_s: float) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._cache: TtlCache[str, ApiKeyRecord | None] = TtlCache(cache_ttl_s)

    async def find(self, key_id: str) -> ApiKeyRecord | None:
        return await self._cache.get(key_id, lambda: self._read(key_id))

    async def _read(self, key_id: str) -> ApiKeyRecord | None:
        try:
            answer = await self._dynamodb.get_item(TableName=self._table, Key={"key_id": to_attribute(key_id)})
        except AWS_FAILURES as exc:
            raise unavailable("dynamodb", "GetItem", exc) from exc
        item = answer.get("Item")
        if item is None:
            return None
        data = from_item(item)
        return ApiKeyRecord(
            key_id=data["key_id"],
            secret_hash=data["secret_hash"],
            company_id=data["company_id"],
            project_id=data["project_id"],
            status=data.get("status", "active"),
        )

    async def put(self, record: ApiKeyRecord, created_at: str) -> None:
        item = {
            "key_id": record.key_id,
            "secret_hash": record.secret_hash,
            "company_id": record.company_id,
            "project_id": record.project_id,
            "status": record.status,
            "created_at": created_at,
        }
        try:
            await self._dynamodb.put_item(TableName=self._table, Item=to_item(item))
        except AWS_FAILURES as exc:
            raise unavailable("dynamodb", "PutItem", exc) from exc
        self._cache.invalidate(record.key_id)
