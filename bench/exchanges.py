"""DynamoDB write units of one long conversation, exchange by exchange (issue 14 §4): `python -m bench exchanges`.

One conversation is driven through the service's own DynamoDB stores (the template sender's claim, ledger entry and
final update; then, per exchange, the reply claim, ledger entry and final update with a user and an assistant
message), against a moto server behind the counting proxy, which charges every write in write units as DynamoDB
documents it (`bench.write_units`: item size x copies written, GSIs included). No AI, no Twilio, no SQS: only what
the conversation's length can change. Printed: the template's units, and each reply's at the exchanges asked for
(default the 1st and the 200th), by table and index, and the conversation item's size there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bench.aws_proxy import CountingProxy
from bench.update_expression import item_size
from bench.write_units import WriteUnitLedger, table_shapes
from local_stack.moto_server import LOCAL_CREDENTIALS, start_moto_server
from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.provisioning import provision_resources
from service.adapters.aws.reply_claims import DynamoReplyClaims
from service.config import Settings
from service.domain.conversation import (
    ConversationKey,
    Message,
    NewConversation,
    ReplyAttempt,
    TemplateDraft,
    TokenUsage,
)
from service.domain.timefmt import utc_iso

DEFAULT_AT = (1, 200)
# A realistic exchange: a two-line question, a three-sentence answer, token counts as a small model reports them.
QUESTION = "Hi, is the viewing still on for Saturday? And is there parking nearby?"
ANSWER = (
    "Yes, your viewing at 12 Acacia Avenue is still on for Saturday at 10am. There is free parking on the street "
    "in front of the house. Reply here if you need to move it."
)
INSTRUCTIONS = "You answer the recipient's replies for Demo Homes, briefly and helpfully. " * 8


@dataclass(frozen=True, slots=True)
class Charge:
    units: Counter[str]
    conversation_item_bytes: int

    @property
    def total(self) -> int:
        return sum(self.units.values())


def new_conversation() -> NewConversation:
    tel = f"+4477{uuid.uuid4().int % 10**8:08d}"
    request_id = str(uuid.uuid4())
    return NewConversation(
        key=ConversationKey(tel, f"ci-bench#pi-bench#{request_id}#447700900001"),
        request_id=request_id,
        channel="whatsapp",
        company_id="ci-bench",
        project_id="pi-bench",
        company_address="+447700900001",
        company_name="Demo Homes Ltd",
        project_name="Spring viewings",
        company_rep={"company_rep_1": "Alex Example"},
        recipient={"recipient_tel": tel, "recipient_first_name": "Lee", "recipient_last_name": "Hayton"},
        project_data={"property": "12 Acacia Avenue", "viewing": "Saturday 10am"},
        ai_config={
            "api_key_reference": "comms/openai-api-key/whatsapp-dev",
            "model": "gpt-4.1-mini",
            "template_sender": {"instructions": INSTRUCTIONS, "variables": ["1", "2"]},
            "replies": {"instructions": INSTRUCTIONS},
        },
        channel_config={
            "company_whatsapp_number": "+447700900001",
            "whatsapp_credentials_id": "comms/whatsapp-credentials/ci-bench/pi-bench/twilio-dev",
        },
        router_version="bench",
        processor_version="bench",
        trace_id=uuid.uuid4().hex,
    )


def sid() -> str:
    return f"SM{uuid.uuid4().hex}"


class Driver:
    def __init__(self, dynamodb: Any, settings: Settings, ledger: WriteUnitLedger, proxy: CountingProxy) -> None:
        self.dynamodb, self.settings, self.ledger, self.proxy = dynamodb, settings, ledger, proxy
        self.now = 1_800_000_000.0
        clock = self.clock
        self.claims = DynamoConversationClaims(
            dynamodb,
            settings.conversations_table,
            clock,
            messages_table=settings.messages_table,
            index_shards=settings.conversation_index_shards,
        )
        self.replies = DynamoReplyClaims(
            dynamodb, settings.conversations_table, clock, messages_table=settings.messages_table
        )

    def clock(self) -> float:
        return self.now

    def units(self) -> Counter[str]:
        return Counter(self.proxy.counter.snapshot().write_units)

    async def item_bytes(self, key: ConversationKey) -> int:
        answer = await self.dynamodb.get_item(
            TableName=self.settings.conversations_table, Key=codec.item_key(key), ConsistentRead=True
        )
        return item_size(answer["Item"])

    async def template(self, new: NewConversation) -> Charge:
        before = self.units()
        owner = "template-1"
        await self.claims.claim(new, owner, self.now + 60, self.now)
        draft = TemplateDraft(
            "resp_000000", {"1": "Lee", "2": "Your viewing is on Saturday."}, TokenUsage(900, 40, 940), self.now
        )
        assert await self.claims.record_attempt(new.key, owner, draft)
        sent = Message(sid(), "assistant", '{"1": "Lee", "2": "Your viewing is on Saturday."}', utc_iso(self.now))
        assert await self.claims.finalise(new.key, sent, "resp_000000", 1200)
        return Charge(self.units() - before, await self.item_bytes(new.key))

    async def exchange(self, key: ConversationKey, n: int) -> Charge:
        self.now += 60.0
        before = self.units()
        owner = "replier-1"
        answer = await self.replies.claim(key, owner, self.now + 60, self.now)
        assert answer.record is not None and answer.record.reply_claim.owner == owner, answer.verdict
        user_sid = sid()
        attempt = ReplyAttempt(
            (user_sid,), QUESTION, utc_iso(self.now), ANSWER, TokenUsage(1200, 45, 1245), f"resp_{n:06d}", self.now
        )
        assert await self.replies.record_attempt(key, owner, attempt)
        messages = [
            Message(user_sid, "user", QUESTION, utc_iso(self.now)),
            Message(sid(), "assistant", ANSWER, utc_iso(self.now), TokenUsage(1200, 45, 1245), "queued"),
        ]
        finalised = await self.replies.finalise(
            key, owner, messages, [user_sid], f"resp_{n:06d}", 1500, claimed=answer.record
        )
        assert finalised is not None
        return Charge(self.units() - before, await self.item_bytes(key))


def _line(label: str, charge: Charge) -> str:
    parts = ", ".join(f"{where} {units}" for where, units in sorted(charge.units.items()))
    return f"{label:<22} {charge.total:>4} write units  (item {charge.conversation_item_bytes:>6} B)  {parts}"


async def run(at: Sequence[int]) -> dict[str, Any]:
    for name, value in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    moto = start_moto_server()
    try:
        settings = await provision_resources(Settings(aws_endpoint_url=moto.url, aws_max_attempts=2))
        ledger = WriteUnitLedger(table_shapes(settings))
        proxy = CountingProxy(moto.url, ledger)
        await proxy.start()
        try:
            async with AsyncExitStack() as stack:
                aws = await open_aws_clients(settings.model_copy(update={"aws_endpoint_url": proxy.url}), stack)
                driver = Driver(aws.dynamodb, settings, ledger, proxy)
                new = new_conversation()
                template = await driver.template(new)
                charges: dict[int, Charge] = {}
                for n in range(1, max(at) + 1):
                    charge = await driver.exchange(new.key, n)
                    if n in at:
                        charges[n] = charge
        finally:
            await proxy.close()
    finally:
        moto.stop()
    print(_line("template (claim..final)", template))
    for n, charge in charges.items():
        print(_line(f"reply at exchange {n}", charge))
    unmodelled = sum(ledger.unmodelled.values())
    if unmodelled:
        print(f"unmodelled writes: {dict(ledger.unmodelled)}")
    return {
        "unmodelled": dict(ledger.unmodelled),
        "template": dict(template.units),
        "replies": {
            n: {"total": c.total, "by_table": dict(c.units), "item_bytes": c.conversation_item_bytes}
            for n, c in charges.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.exchanges", description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, nargs="+", default=list(DEFAULT_AT), help="exchanges to report")
    args = parser.parse_args(argv)
    asyncio.run(run(sorted(set(args.at))))


if __name__ == "__main__":
    main()
