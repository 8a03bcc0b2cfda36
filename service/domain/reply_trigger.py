"""The delayed reply trigger: one per batching window, queued by whoever takes the conversation's trigger lock
(the first fragment of a window at intake, or the reply sender looking again after a reply).

The trigger lock is `claims.decide_trigger_lock`; this is the one place that takes it, queues the trigger and
gives the lock back when queueing fails (a lock held with no trigger queued would leave fragments unanswered).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from service.domain.conversation import ConversationKey
from service.domain.errors import DependencyUnavailable
from service.domain.ports import MessagePublisher, ReplyStage

log = structlog.get_logger(__name__)

LOCK_MARGIN_S = 60  # SPEC §7: stage and lock expire W + 60 s after the fragment


class ReplyTrigger(BaseModel):
    """The replies-queue message body (SPEC §7)."""

    model_config = ConfigDict(extra="ignore")

    conversation_id: str = Field(min_length=1)
    primary_channel: str = Field(min_length=1)

    @property
    def key(self) -> ConversationKey:
        return ConversationKey(self.primary_channel, self.conversation_id)


def lock_expiry(now: float, window_s: int) -> int:
    """When a fragment staged now, its lock and its window's trigger lock expire (TTL, epoch seconds)."""
    return int(now + window_s + LOCK_MARGIN_S)


class QueuedMark:
    """When to write the mark that a holder's trigger is queued (`ReplyStage.mark_queued`).

    The mark has one reader: a retry by the same holder, which must not queue a second trigger (one would be
    harmless, the reply claim deduplicates, but costs a consumer round). The reply sender always writes it: its
    retries are redeliveries. A webhook is retried by Twilio only when it was not answered 200, that is when the
    request deadline cut it (the work runs on, shielded): the intake writes the mark only then, and saves a DynamoDB
    write on every window it answers 200. (A crash after queueing, before answering, leaves no mark: the retry
    queues a second trigger, answered by nothing.)"""

    def __init__(self, *, always: bool) -> None:
        self._needed = always
        self._owed: Callable[[], Awaitable[None]] | None = None

    async def queued(self, write: Callable[[], Awaitable[None]]) -> None:
        if self._needed:
            await write()
        else:
            self._owed = write

    def cut(self) -> Callable[[], Awaitable[None]] | None:
        """The request will be answered 503 (Twilio retries it): the mark is needed from now on; returns the write
        owed by a trigger queued before the cut, if any."""
        self._needed = True
        owed, self._owed = self._owed, None
        return owed


async def queue_reply_trigger(
    stage: ReplyStage,
    publisher: MessagePublisher,
    queue_url: str,
    key: ConversationKey,
    *,
    holder: str,
    now: float,
    window_s: int,
    mark: QueuedMark | None = None,
    group: str | None = None,
) -> bool:
    """Take the trigger lock as `holder` and queue the trigger, visible after the window; True when queued,
    False when the lock is held (a trigger is already queued for this window). The trigger is then marked queued
    as `mark` says (None: always). `group` is the tenant (`company.tenant_group`), for SQS fair queues."""
    if not await stage.take_lock(key.conversation_id, holder, now, lock_expiry(now, window_s)):
        return False
    body = ReplyTrigger(conversation_id=key.conversation_id, primary_channel=key.primary_channel)
    try:
        await publisher.publish(
            queue_url,
            orjson.dumps(body.model_dump()).decode(),
            {"conversationId": key.conversation_id},
            delay_s=window_s,
            group=group,
        )
    except DependencyUnavailable:
        await stage.release_lock(key.conversation_id, holder)
        raise
    log.info("reply_trigger_queued", conversation_id=key.conversation_id, delay_s=window_s)

    async def write_mark() -> None:
        try:  # unmarked, a retry of the same holder re-takes the lock and queues a (harmless) second trigger
            await stage.mark_queued(key.conversation_id, holder)
        except DependencyUnavailable as exc:
            log.warning("reply_trigger_not_marked_queued", conversation_id=key.conversation_id, detail=str(exc))

    await (mark.queued(write_mark) if mark is not None else write_mark())
    return True
