"""Idempotent creation of the tables and queues of `service.adapters.aws.resources` (bootstrap, local stack).

Existing resources are left as they are; the result maps each queue kind to its URL.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from botocore.exceptions import ClientError

from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.errors import error_code
from service.adapters.aws.resources import (
    DLQ_MAX_RECEIVE_COUNT,
    DLQ_RETENTION_S,
    QUEUE_RETENTION_S,
    QueueSpec,
    TableSpec,
    queue_specs,
    table_specs,
)
from service.config import Settings

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeNameType


def _key_schema(partition: str, sort: str | None) -> list[dict[str, str]]:
    schema = [{"AttributeName": partition, "KeyType": "HASH"}]
    if sort:
        schema.append({"AttributeName": sort, "KeyType": "RANGE"})
    return schema


async def ensure_table(dynamodb: DynamoDBClient, spec: TableSpec) -> bool:
    """Create the table (on-demand billing) if absent; True when it was created."""
    request: dict[str, Any] = {
        "TableName": spec.name,
        "BillingMode": "PAY_PER_REQUEST",
        "KeySchema": _key_schema(spec.partition_key, spec.sort_key),
        "AttributeDefinitions": [{"AttributeName": a, "AttributeType": "S"} for a in spec.key_attributes],
    }
    if spec.indexes:
        request["GlobalSecondaryIndexes"] = [
            {
                "IndexName": index.name,
                "KeySchema": _key_schema(index.partition_key, index.sort_key),
                "Projection": index.projection,
            }
            for index in spec.indexes
        ]
    try:
        await dynamodb.create_table(**request)
    except ClientError as exc:
        if error_code(exc) != "ResourceInUseException":
            raise
        await ensure_indexes(dynamodb, spec)
        return False
    await dynamodb.get_waiter("table_exists").wait(TableName=spec.name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    if spec.ttl_attribute:
        await dynamodb.update_time_to_live(
            TableName=spec.name, TimeToLiveSpecification={"Enabled": True, "AttributeName": spec.ttl_attribute}
        )
    return True


async def ensure_indexes(dynamodb: DynamoDBClient, spec: TableSpec) -> list[str]:
    """Add to an existing table the indexes it lacks (UpdateTable, one at a time as DynamoDB requires, each waited
    for until ACTIVE), with their projection; return their names. An index present under a name keeps its
    projection (DynamoDB cannot change it in place: a changed projection is a new index name, docs/deploying.md)."""
    described = (await dynamodb.describe_table(TableName=spec.name))["Table"]
    present = {index["IndexName"]: index for index in described.get("GlobalSecondaryIndexes", [])}
    added = []
    for index in spec.indexes:
        if index.name in present:
            if present[index.name].get("Projection", {}).get("ProjectionType") != index.projection["ProjectionType"]:
                log.warning("index_projection_differs", table=spec.name, index=index.name)
            continue
        keys = [index.partition_key, *([index.sort_key] if index.sort_key else [])]
        create: dict[str, Any] = {
            "IndexName": index.name,
            "KeySchema": _key_schema(index.partition_key, index.sort_key),
            "Projection": index.projection,
        }
        update: dict[str, Any] = {
            "TableName": spec.name,
            "AttributeDefinitions": [{"AttributeName": name, "AttributeType": "S"} for name in keys],
            "GlobalSecondaryIndexUpdates": [{"Create": create}],
        }
        await dynamodb.update_table(**update)
        await _index_active(dynamodb, spec.name, index.name)
        added.append(index.name)
    return added


async def _index_active(dynamodb: DynamoDBClient, table: str, index: str, attempts: int = 600) -> None:
    for _ in range(attempts):
        described = (await dynamodb.describe_table(TableName=table))["Table"]
        states = {i["IndexName"]: i.get("IndexStatus") for i in described.get("GlobalSecondaryIndexes", [])}
        if states.get(index) == "ACTIVE":
            return
        await asyncio.sleep(1)
    raise TimeoutError(f"index {index} of {table} is not ACTIVE yet: bootstrap again to wait for it")


async def ensure_queue(sqs: SQSClient, spec: QueueSpec) -> str:
    """Create the queue and its DLQ with redrive (maxReceiveCount 3); return the queue URL."""
    dlq = await sqs.create_queue(
        QueueName=spec.dead_letter_name, Attributes={"MessageRetentionPeriod": str(DLQ_RETENTION_S)}
    )
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq["QueueUrl"], AttributeNames=["QueueArn"]))["Attributes"][
        "QueueArn"
    ]
    redrive = orjson.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": DLQ_MAX_RECEIVE_COUNT}).decode()
    attributes: dict[QueueAttributeNameType, str] = {
        "VisibilityTimeout": str(spec.visibility_timeout_s),
        "MessageRetentionPeriod": str(QUEUE_RETENTION_S),
        "ReceiveMessageWaitTimeSeconds": "20",
        "RedrivePolicy": redrive,
    }
    try:
        queue = await sqs.create_queue(QueueName=spec.name, Attributes=attributes)
    except ClientError as exc:
        if error_code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
            raise
        queue = await sqs.get_queue_url(QueueName=spec.name)
        await sqs.set_queue_attributes(QueueUrl=queue["QueueUrl"], Attributes=attributes)
    return queue["QueueUrl"]


async def provision(
    dynamodb: DynamoDBClient, sqs: SQSClient, tables: list[TableSpec], queues: list[QueueSpec]
) -> dict[str, str]:
    await asyncio.gather(*(ensure_table(dynamodb, spec) for spec in tables))
    urls = await asyncio.gather(*(ensure_queue(sqs, spec) for spec in queues))
    return {spec.kind: url for spec, url in zip(queues, urls, strict=True)}


async def provision_resources(settings: Settings, queue_prefix: str | None = None) -> Settings:
    """Idempotently create every resource; the returned settings carry the queue URLs."""
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(settings, stack)
        urls = await provision(
            aws.dynamodb,
            aws.sqs,
            table_specs(settings),
            queue_specs(queue_prefix or settings.secrets_prefix, settings.visibility_timeout_s),
        )
    return settings.model_copy(update={f"{kind}_queue_url": url for kind, url in urls.items()})
