"""Company/project records from the company-data table: the service reads them behind a short TTL cache,
`comms company` reads them as stored (`read`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.adapters.aws.dynamo_calls import applied, get_item
from service.adapters.aws.dynamo_codec import to_attribute, to_item
from service.adapters.ttl_cache import TtlCache
from service.domain.company import CompanyRecord
from service.domain.errors import InvalidStoredRecord

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class DynamoCompanyDirectory:
    def __init__(self, dynamodb: DynamoDBClient, table: str, cache_ttl_s: float) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._cache: TtlCache[tuple[str, str], CompanyRecord | None] = TtlCache(cache_ttl_s)

    async def get(self, company_id: str, project_id: str) -> CompanyRecord | None:
        return await self._cache.get((company_id, project_id), lambda: self._load(company_id, project_id))

    async def read(self, company_id: str, project_id: str, *, consistent: bool = True) -> dict[str, Any] | None:
        """The stored record as plain data, valid or not (so an operator can see and repair a broken one);
        uncached, strongly consistent unless told otherwise."""
        key = {"company_id": to_attribute(company_id), "project_id": to_attribute(project_id)}
        return await get_item(self._dynamodb, TableName=self._table, Key=key, ConsistentRead=consistent)

    async def _load(self, company_id: str, project_id: str) -> CompanyRecord | None:
        data = await self.read(company_id, project_id, consistent=False)
        if data is None:
            return None
        try:
            return CompanyRecord.model_validate(data)
        except ValidationError as exc:
            raise InvalidStoredRecord(
                f"company-data {company_id}/{project_id}: {exc.error_count()} invalid fields"
            ) from exc

    async def put(self, record: CompanyRecord, *, overwrite: bool) -> bool:
        """Store a record; without `overwrite` refuse (return False) when it already exists."""
        item = to_item(record.model_dump(mode="json", exclude_none=True))
        params: dict[str, Any] = {"TableName": self._table, "Item": item}
        if not overwrite:
            params["ConditionExpression"] = "attribute_not_exists(company_id)"
        stored = await applied(self._dynamodb.put_item(**params), "PutItem")
        if stored:
            self._cache.invalidate((record.company_id, record.project_id))
        return stored
