"""Correctness after the run: every conversation `initial_message_sent`, and exactly one Twilio message each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from local_stack.twilio_sandbox import TwilioSandboxState
from service.domain.conversation import ConversationStatus

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


@dataclass(frozen=True, slots=True)
class Verification:
    expected: int
    statuses: dict[str, int]  # conversation_status -> count, over the benchmark's conversations
    twilio_messages: int  # to the benchmark's recipients
    twilio_distinct_recipients: int
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


async def conversation_statuses(dynamodb: DynamoDBClient, table: str, conversation_ids: set[str]) -> Counter[str]:
    """Scan the conversations table (directly on moto, outside the measured window)."""
    statuses: Counter[str] = Counter()
    seen: set[str] = set()
    start: dict[str, Any] | None = None
    while True:
        scan: dict[str, Any] = {"TableName": table, "ProjectionExpression": "conversation_id, conversation_status"}
        if start:
            scan["ExclusiveStartKey"] = start
        page = await dynamodb.scan(**scan)
        for item in page.get("Items", []):
            conversation_id = item["conversation_id"]["S"]
            if conversation_id in conversation_ids:
                seen.add(conversation_id)
                statuses[item.get("conversation_status", {}).get("S", "<none>")] += 1
        start = page.get("LastEvaluatedKey")
        if not start:
            break
    statuses["<no record>"] = len(conversation_ids - seen)
    return +statuses  # drop zero counts


def bare(address: str) -> str:
    return address.removeprefix("whatsapp:")


async def verify(
    dynamodb: DynamoDBClient,
    table: str,
    conversation_ids: Iterable[str],
    recipients: Iterable[str],
    twilio: TwilioSandboxState,
) -> Verification:
    ids = set(conversation_ids)
    wanted = set(recipients)
    statuses = await conversation_statuses(dynamodb, table, ids)
    sent_to = Counter(bare(m.to) for m in twilio.messages.values() if bare(m.to) in wanted)
    problems: list[str] = []
    done = statuses.get(ConversationStatus.INITIAL_MESSAGE_SENT.value, 0)
    if done != len(ids):
        problems.append(f"{done}/{len(ids)} conversations reached initial_message_sent: {dict(statuses)}")
    messages = sum(sent_to.values())
    if messages != len(ids):
        problems.append(f"the Twilio sandbox saw {messages} messages for {len(ids)} conversations")
    duplicated = {to: n for to, n in sent_to.items() if n > 1}
    if duplicated:
        problems.append(f"{len(duplicated)} recipients got more than one message")
    missing = len(wanted - set(sent_to))
    if missing:
        problems.append(f"{missing} recipients got no message")
    return Verification(len(ids), dict(statuses), messages, len(sent_to), problems)
