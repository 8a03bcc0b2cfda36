"""Test helpers: extra tenants at the composition-root boundary, and reading what landed on a queue."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from local_stack.seed import demo_company
from service.api.app import create_app
from service.bootstrap import Dependencies, build
from service.config import Settings
from service.domain.api_keys import issue_key
from service.domain.company import CompanyRecord
from service.domain.ports import ApiKeyRecord
from service.domain.timefmt import utc_iso


async def add_tenant(
    deps: Dependencies, company_id: str, project_id: str, *, store_company: bool = True, **changes: Any
) -> str:
    """Store a company/project like the demo one with `changes` applied; return a fresh API key for it."""
    if store_company:
        data = demo_company(deps.settings.secrets_prefix, "dev", time.time()).model_dump(mode="json")
        data.update(company_id=company_id, project_id=project_id, **changes)
        await deps.companies.put(CompanyRecord.model_validate(data), overwrite=True)
    key = issue_key()
    await deps.api_keys.put(
        ApiKeyRecord(key.key_id, key.secret_hash, company_id, project_id, "active"), utc_iso(time.time())
    )
    return key.plaintext


async def drained_messages(deps: Dependencies, queue_url: str) -> list[dict[str, Any]]:
    """Every message that was on the queue, received and deleted: its parsed body, string attributes and group."""
    found: list[dict[str, Any]] = []
    while True:
        answer = await deps.aws.sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["MessageGroupId"],
        )
        messages = answer.get("Messages", [])
        if not messages:
            return found
        for message in messages:
            attributes = {k: v["StringValue"] for k, v in message.get("MessageAttributes", {}).items()}
            group = message.get("Attributes", {}).get("MessageGroupId")
            found.append({"body": orjson.loads(message["Body"]), "attributes": attributes, "group": group})
            await deps.aws.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


async def queued_messages(deps: Dependencies, queue_url: str, conversation_id: str) -> list[dict[str, Any]]:
    """Every message on the queue for this conversation (received and deleted); others are deleted too."""
    drained = await drained_messages(deps, queue_url)
    return [message for message in drained if message["attributes"].get("conversationId") == conversation_id]


@asynccontextmanager
async def api_client(
    settings: Settings, adapters: Mapping[str, Any] | None = None, **changes: Any
) -> AsyncIterator[tuple[TestClient[Any, Any], Dependencies]]:
    """A separate app over settings with `changes` (e.g. a dead endpoint), with its own clients; `adapters`
    replace ports by name (`build`'s overrides)."""
    async with build(settings.model_copy(update=changes), **(adapters or {})) as deps:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(deps)))
        await client.start_server()
        try:
            yield client, deps
        finally:
            await client.close()
