"""Every claim lapses at its expiry, in DynamoDB as in `service.domain.claims` (`Lease.is_live`): a claim whose
lease ends exactly now is taken over by the real adapters' conditional writes, against moto."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_codec import attribute_values
from service.domain.claims import Claim, RequestRecord, RequestState
from service.domain.conversation import ConversationKey, ConversationStatus, Lease
from service.domain.ports import ClaimAnswer
from tests.fakes import new_conversation


def fresh_key() -> ConversationKey:
    return ConversationKey(f"+4477009{uuid.uuid4().int % 100_000:05d}", f"ci-lease#pi-lease#{uuid.uuid4().hex}#4477")


async def test_a_conversation_claim_ending_exactly_now_is_taken_over(deps):
    claims, now = deps.adapters.conversation_claims, time.time()
    key = fresh_key()
    new = replace(new_conversation("sms", recipient=key.primary_channel), key=key)
    assert (await claims.claim(new, "crashed", now, now - 30)).verdict is Claim.TAKE

    taken: ClaimAnswer = await claims.claim(new, "second", now + 30, now)

    assert taken.verdict is Claim.TAKE
    assert taken.record is not None and taken.record.claim.owner == "second"


async def test_a_reply_claim_ending_exactly_now_is_taken_over(deps):
    claims, replies, now = deps.adapters.conversation_claims, deps.adapters.reply_claims, time.time()
    key = fresh_key()
    new = replace(new_conversation("sms", recipient=key.primary_channel), key=key)
    await claims.claim(new, "template", now + 30, now - 30)
    await _set_status(deps, key, ConversationStatus.INITIAL_MESSAGE_SENT)  # as the template's final update leaves it
    assert (await replies.claim(key, "crashed", now, now - 30)).verdict is Claim.TAKE

    taken = await replies.claim(key, "second", now + 30, now)

    assert taken.verdict is Claim.TAKE
    assert taken.record is not None and taken.record.reply_claim.owner == "second"


async def test_a_request_claim_ending_exactly_now_is_taken_over(deps):
    ledger, now = deps.adapters.ledger, float(int(time.time()))
    key = f"ci-lease#pi-lease#{uuid.uuid4().hex}"
    crashed = RequestRecord(key, RequestState.IN_PROGRESS, "c", Lease(expires_at=now), body_hash="h")
    assert await ledger.claim(crashed, now - 30) is None

    retry = RequestRecord(key, RequestState.IN_PROGRESS, "c", Lease(expires_at=now + 30), body_hash="h")

    assert await ledger.claim(retry, now) is None


async def test_a_trigger_lock_ending_exactly_now_is_taken(deps):
    stage, now = deps.adapters.stage, int(time.time())
    conversation_id = f"ci-lease#pi-lease#{uuid.uuid4().hex}"
    assert await stage.take_lock(conversation_id, "SMfirst", now - 30, now)
    await stage.mark_queued(conversation_id, "SMfirst")

    assert await stage.take_lock(conversation_id, "SMnext", now, now + 70)


async def _set_status(deps, key: ConversationKey, status: ConversationStatus) -> None:
    """Put the record in `status` (a raw write: the test needs a state, not a use case)."""
    await deps.aws.dynamodb.update_item(
        TableName=deps.settings.conversations_table,
        Key=codec.item_key(key),
        UpdateExpression="SET #status = :status",
        ExpressionAttributeNames={"#status": codec.STATUS},
        ExpressionAttributeValues=attribute_values({":status": status.value}),
    )
