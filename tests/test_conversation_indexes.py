"""The conversations table's indexes on moto: the per-company index is sharded (a tenant's conversations spread over
every shard, and listing and finding read them all back, also after the shard count is raised), no index projects
ALL, and bootstrap adds an index an existing table lacks, with its projection."""

from __future__ import annotations

import uuid

from service.adapters.aws.conversation_admin import ConversationAdmin
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.conversation_codec import company_shard
from service.adapters.aws.provisioning import ensure_table
from service.adapters.aws.resources import CONVERSATION_INDEXES, Index, TableSpec, table_specs
from service.bootstrap import Dependencies
from service.domain.claims import Claim
from service.domain.conversation import ConversationKey, ConversationStatus, NewConversation

CONVERSATIONS = 24


def new_conversation(company_id: str, n: int) -> NewConversation:
    tel = f"+4477{uuid.uuid4().int % 10**8:08d}"
    request_id = str(uuid.uuid4())
    return NewConversation(
        key=ConversationKey(tel, f"{company_id}#pi-shards#{request_id}#447700900002"),
        request_id=request_id,
        channel="sms",
        company_id=company_id,
        project_id="pi-shards",
        company_address="+447700900002",
        recipient={"recipient_tel": tel, "recipient_first_name": f"Lee {n}"},
        channel_config={"sms_credentials_id": "comms/sms-credentials/x"},
    )


async def created(deps: Dependencies, shards: int) -> tuple[str, list[NewConversation]]:
    company_id = f"ci-shards-{uuid.uuid4().hex[:8]}"
    settings = deps.settings
    claims = DynamoConversationClaims(
        deps.aws.dynamodb, settings.conversations_table, messages_table=settings.messages_table, index_shards=shards
    )
    conversations = [new_conversation(company_id, n) for n in range(CONVERSATIONS)]
    for n, new in enumerate(conversations):
        answer = await claims.claim(new, "worker-1", 1e10, float(n))
        assert answer.verdict is Claim.TAKE
    return company_id, conversations


def admin(deps: Dependencies, shards: int) -> ConversationAdmin:
    settings = deps.settings
    return ConversationAdmin(
        deps.aws.dynamodb, settings.conversations_table, messages_table=settings.messages_table, index_shards=shards
    )


async def test_a_company_s_conversations_spread_over_the_shards_and_are_all_listed(deps: Dependencies) -> None:
    company_id, conversations = await created(deps, shards=4)

    listed = await admin(deps, 4).list_project(company_id, "pi-shards")

    assert {r.key for r in listed} == {new.key for new in conversations}
    used = {company_shard(company_id, new.key.conversation_id, 4) for new in conversations}
    assert len(used) > 1  # one tenant's writes no longer land on one index partition
    assert all(r.status is ConversationStatus.PROCESSING for r in listed)
    assert [r.created_at for r in listed] == sorted((r.created_at for r in listed), reverse=True)


async def test_listing_filters_by_status_and_channel_after_reading_the_records(deps: Dependencies) -> None:
    company_id, _ = await created(deps, shards=4)
    lister = admin(deps, 4)

    assert await lister.list_project(company_id, "pi-shards", ConversationStatus.REPLY_SENT) == []
    assert await lister.list_project(company_id, "pi-shards", channel="whatsapp") == []
    assert (
        len(await lister.list_project(company_id, "pi-shards", ConversationStatus.PROCESSING, "sms")) == CONVERSATIONS
    )


async def test_conversations_created_before_the_shards_were_raised_are_still_found_and_listed(
    deps: Dependencies,
) -> None:
    company_id, conversations = await created(deps, shards=2)
    raised = admin(deps, 8)

    found = [await raised.find(company_id, "pi-shards", new.key.conversation_id) for new in conversations[:6]]

    assert [record.key if record else None for record in found] == [new.key for new in conversations[:6]]
    assert len(await raised.list_project(company_id, "pi-shards")) == CONVERSATIONS


async def test_no_conversations_index_projects_every_attribute(deps: Dependencies) -> None:
    described = await deps.aws.dynamodb.describe_table(TableName=deps.settings.conversations_table)

    projections = {
        i["IndexName"]: i["Projection"]["ProjectionType"] for i in described["Table"]["GlobalSecondaryIndexes"]
    }

    assert projections == {index.name: index.projection["ProjectionType"] for index in CONVERSATION_INDEXES}
    assert "ALL" not in projections.values()


async def test_bootstrap_adds_an_index_an_existing_table_lacks_with_its_projection(deps: Dependencies) -> None:
    conversations = next(s for s in table_specs(deps.settings) if s.name == deps.settings.conversations_table)
    name = f"comms-test-indexes-{uuid.uuid4().hex[:8]}"
    old = Index("company-id-project-id-index", "company_id", "project_id")
    assert await ensure_table(
        deps.aws.dynamodb, TableSpec(name, conversations.partition_key, conversations.sort_key, (old,))
    )

    assert not await ensure_table(
        deps.aws.dynamodb, TableSpec(name, "primary_channel", "conversation_id", (old, *CONVERSATION_INDEXES))
    )

    described = await deps.aws.dynamodb.describe_table(TableName=name)
    indexes = {i["IndexName"]: i["Projection"] for i in described["Table"]["GlobalSecondaryIndexes"]}
    assert indexes["company-shard-project-id-index"] == {"ProjectionType": "KEYS_ONLY"}
    assert indexes["company-sms-number-recipient-tel-index"]["ProjectionType"] == "INCLUDE"
    assert set(indexes) == {old.name, *(index.name for index in CONVERSATION_INDEXES)}
