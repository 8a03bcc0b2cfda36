"""The stage table and the trigger lock against moto: the end of a window deletes the fragments it dealt with and
the lock in one BatchWriteItem over both tables, however many fragments there are."""

from __future__ import annotations

import time
import uuid

import pytest

from service.adapters.aws.stage_store import BATCH_WRITE_LIMIT, DynamoReplyStage
from service.bootstrap import Dependencies
from service.domain.conversation import ConversationKey
from service.domain.inbound import Fragment

SENDER = "+447700900123"


async def staged_conversation(store: DynamoReplyStage, fragments: int) -> tuple[str, list[str]]:
    conversation_id = f"c-{uuid.uuid4().hex}"
    key, now = ConversationKey(SENDER, conversation_id), time.time()
    sids = [f"SM{i:03d}" for i in range(fragments)]
    for sid in sids:
        assert await store.stage(key, Fragment(sid, f"body {sid}", "2026-01-01T00:00:00.000Z"), int(now) + 70)
    assert await store.take_lock(conversation_id, sids[0] if sids else "SMnone", now, int(now) + 70)
    return conversation_id, sids


@pytest.mark.parametrize("fragments", [0, 1, BATCH_WRITE_LIMIT - 1, BATCH_WRITE_LIMIT, 2 * BATCH_WRITE_LIMIT + 3])
async def test_finishing_a_window_deletes_exactly_its_fragments_and_the_lock(
    deps: Dependencies, fragments: int
) -> None:
    store = DynamoReplyStage(deps.aws.dynamodb, deps.settings.stage_table, deps.settings.lock_table)
    conversation_id, sids = await staged_conversation(store, fragments + 1)
    answered, late = sids[:fragments], sids[fragments]

    await store.finish_window(conversation_id, answered)

    assert [f.message_sid for f in await store.staged(conversation_id)] == [late]
    now = time.time()  # the lock is gone: anyone may take it at once
    assert await store.take_lock(conversation_id, "SMother", now, int(now) + 70)


async def test_finishing_a_window_of_fragments_deleted_already_still_drops_the_lock(deps: Dependencies) -> None:
    store = DynamoReplyStage(deps.aws.dynamodb, deps.settings.stage_table, deps.settings.lock_table)
    conversation_id, sids = await staged_conversation(store, 2)
    await store.delete_staged(conversation_id, sids)

    await store.finish_window(conversation_id, sids)

    assert await store.staged(conversation_id) == []
    now = time.time()
    assert await store.take_lock(conversation_id, "SMother", now, int(now) + 70)
