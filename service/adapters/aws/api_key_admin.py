"""What only `comms apikey` does with the api-keys table: read a key uncached (without its hash), list a
project's keys (a Scan, which the service's own role is not granted), revoke one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from service.adapters.aws.api_key_store import ACTIVE, DynamoApiKeyStore
from service.adapters.aws.dynamo_calls import send, update_if
from service.adapters.aws.dynamo_codec import attribute_values, from_item, to_attribute

REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class StoredApiKey:
    """A key as `comms apikey` shows it: everything but the hash, which never leaves the table."""

    key_id: str
    company_id: str
    project_id: str
    status: str = ACTIVE
    created_at: str | None = None
    revoked_at: str | None = None

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> StoredApiKey:
        return cls(**{name: data[name] for name in _SHOWN if name in data})

    def fields(self) -> dict[str, str]:
        return {name: value for name, value in asdict(self).items() if value is not None}


_SHOWN = tuple(StoredApiKey.__dataclass_fields__)


class DynamoApiKeyAdmin(DynamoApiKeyStore):
    async def get(self, key_id: str) -> StoredApiKey | None:
        """The key as stored now (a strongly consistent read, uncached), without its hash."""
        data = await self._get_item(key_id, consistent=True)
        return StoredApiKey.from_data(data) if data is not None else None

    async def revoke(self, key_id: str, company_id: str, project_id: str, at: str) -> bool:
        """Revoke the project's key at `at`; False when it is not that project's key, or already revoked."""
        revoked = await update_if(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key={"key_id": to_attribute(key_id)},
            UpdateExpression="SET #status = :revoked, revoked_at = :at",
            ConditionExpression=(
                "attribute_exists(key_id) AND company_id = :company AND project_id = :project AND #status <> :revoked"
            ),
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues=attribute_values(
                {":revoked": REVOKED, ":at": at, ":company": company_id, ":project": project_id}
            ),
        )
        self._cache.invalidate(key_id)
        return revoked

    async def list_keys(self, company_id: str, project_id: str) -> list[StoredApiKey]:
        """Every key of one project (a scan: the table is keyed by key id, a project holds a handful), newest
        first."""
        request: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": "company_id = :company AND project_id = :project",
            "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(_SHOWN))),
            "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(_SHOWN)},
            "ExpressionAttributeValues": attribute_values({":company": company_id, ":project": project_id}),
        }
        keys: list[StoredApiKey] = []
        while True:
            answer = await send(self._dynamodb.scan(**request), "Scan")
            keys += [StoredApiKey.from_data(from_item(item)) for item in answer.get("Items", [])]
            if not answer.get("LastEvaluatedKey"):
                break
            request["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
        keys.sort(key=lambda k: (k.created_at or "", k.key_id), reverse=True)
        return keys
