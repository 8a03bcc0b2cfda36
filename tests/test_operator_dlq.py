"""`comms dlq list|show|redrive` against the moto server: each test has its own queues and DLQs.

Redrive must move exactly what was asked and lose nothing: every test counts source + DLQ before and after.
"""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError
from rich.console import Console
from rich.progress import Progress

from consumers.sqs_messages import resendable_attributes
from consumers.template_job import parse_template_job
from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.conversation_codec import item_key
from service.adapters.aws.dynamo_codec import from_item, to_attribute
from service.adapters.aws.provisioning import provision_resources
from service.config import Settings
from service.domain.conversation import ConversationKey
from service.operator.dlq import RUN_ATTRIBUTE, QueuePair, redrive, redrive_messages, resolve_queue
from service.operator.output import Context, Output
from tests.operator_support import Cli, unique
from tests.unit.test_template_job_parsing import context_for


@pytest.fixture
def cli(settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    own = Cli(settings, capsys, monkeypatch)
    own.with_own_queues()
    return own


def dlq_url(cli: Cli, kind: str) -> str:
    source = getattr(cli.settings, f"{kind}_queue_url")

    async def lookup(aws):
        return (await aws.sqs.get_queue_url(QueueName=source.rsplit("/", 1)[-1] + "-dlq"))["QueueUrl"]

    return cli.aws(lookup)


def fill_dlq(cli: Cli, kind: str, count: int) -> list[str]:
    """`count` dead-lettered messages with bodies and attributes like the router's."""
    url = dlq_url(cli, kind)
    bodies = [orjson.dumps({"conversation_data": {"conversation_id": f"c#{i}"}, "n": i}).decode() for i in range(count)]

    async def send(aws):
        for i, body in enumerate(bodies):
            await aws.sqs.send_message(
                QueueUrl=url,
                MessageBody=body,
                MessageAttributes={
                    "conversationId": {"DataType": "String", "StringValue": f"c#{i}"},
                    "channelMethod": {"DataType": "String", "StringValue": kind},
                    "attempt": {"DataType": "Number", "StringValue": str(i)},
                },
            )

    cli.aws(send)
    return bodies


def visible(cli: Cli, url: str) -> int:
    async def count(aws):
        answer = await aws.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
        attributes = answer["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])

    return cli.aws(count)


def drain(cli: Cli, url: str) -> list[dict]:
    """Receive and delete everything on a queue; each message as body + attribute values."""

    async def receive_all(aws):
        found = []
        while True:
            answer = await aws.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, MessageAttributeNames=["All"]
            )
            messages = answer.get("Messages", [])
            if not messages:
                return found
            for m in messages:
                found.append(
                    {
                        "body": m["Body"],
                        "attributes": {
                            k: (v["DataType"], v["StringValue"]) for k, v in m.get("MessageAttributes", {}).items()
                        },
                    }
                )
                await aws.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    return cli.aws(receive_all)


def test_list_counts_messages_per_queue_and_dlq(cli):
    fill_dlq(cli, "sms", 3)

    result = cli("dlq", "list", "--json")

    assert result.code == 0, result.err
    rows = {row["queue"]: row for row in result.json["queues"]}
    assert set(rows) == {"whatsapp", "sms", "email", "replies", "handoff"}
    assert rows["sms"]["dlq"]["messages"] == 3 and rows["sms"]["source"]["messages"] == 0
    assert rows["sms"]["dlq"]["name"].endswith("-sms-dlq")
    assert set(rows["sms"]["source"]) == {"name", "url", "messages", "in_flight", "delayed"}
    assert rows["whatsapp"]["dlq"]["messages"] == 0


def test_list_prints_a_table(cli):
    fill_dlq(cli, "email", 2)

    result = cli("dlq", "list", "--queue", "email")

    assert result.code == 0
    assert "-email-dlq" in result.out and "whatsapp" not in result.out


def test_show_peeks_without_removing_anything(cli):
    bodies = fill_dlq(cli, "whatsapp", 4)

    result = cli("dlq", "show", "--queue", "whatsapp", "--max", "3", "--json")

    assert result.code == 0, result.err
    [queue] = result.json["queues"]
    assert len(queue["messages"]) == 3
    first = queue["messages"][0]
    assert set(first) == {"message_id", "sent_at", "receive_count", "attributes", "body"}
    assert orjson.dumps(first["body"]).decode() in [orjson.dumps(orjson.loads(b)).decode() for b in bodies]
    assert first["attributes"]["channelMethod"] == "whatsapp"
    # Released at once: all four are visible again, none moved.
    again = cli("dlq", "list", "--queue", "whatsapp", "--json").json["queues"][0]
    assert again["dlq"]["messages"] == 4 and again["dlq"]["in_flight"] == 0
    assert again["source"]["messages"] == 0


def test_show_of_an_empty_dlq_says_so(cli):
    result = cli("dlq", "show", "--queue", "replies")

    assert result.code == 0
    assert "empty" in result.out


def test_redrive_moves_exactly_max_messages_and_loses_none(cli):
    fill_dlq(cli, "whatsapp", 13)
    source, dead = cli.settings.whatsapp_queue_url, dlq_url(cli, "whatsapp")

    result = cli("dlq", "redrive", "--queue", "whatsapp", "--max", "11", "--json")

    assert result.code == 0, result.err
    [report] = result.json["queues"]
    assert report["moved"] == 11 and report["not_sent"] == {} and report["not_deleted"] == 0
    assert visible(cli, source) == 11
    assert visible(cli, dead) == 2


def test_redrive_keeps_bodies_and_message_attributes(cli):
    bodies = fill_dlq(cli, "sms", 5)

    result = cli("dlq", "redrive", "--queue", "sms")

    assert result.code == 0, result.err
    assert "moved 5 messages" in result.out
    moved = drain(cli, cli.settings.sms_queue_url)
    assert sorted(m["body"] for m in moved) == sorted(bodies)
    runs = {m["attributes"].pop(RUN_ATTRIBUTE) for m in moved}
    assert len(runs) == 1  # every copy names the one run that sent it
    for message in moved:
        n = orjson.loads(message["body"])["n"]
        assert message["attributes"] == {
            "conversationId": ("String", f"c#{n}"),
            "channelMethod": ("String", "sms"),
            "attempt": ("Number", str(n)),
        }
    assert visible(cli, dlq_url(cli, "sms")) == 0


def test_redrive_without_queue_empties_every_dlq(cli):
    fill_dlq(cli, "email", 2)
    fill_dlq(cli, "handoff", 1)

    result = cli("dlq", "redrive", "--json")

    assert result.code == 0, result.err
    moved = {r["queue"]: r["moved"] for r in result.json["queues"]}
    assert moved == {"whatsapp": 0, "sms": 0, "email": 2, "replies": 0, "handoff": 1}
    assert visible(cli, cli.settings.email_queue_url) == 2 and visible(cli, cli.settings.handoff_queue_url) == 1


def test_dry_run_moves_nothing(cli):
    fill_dlq(cli, "whatsapp", 4)

    result = cli("dlq", "redrive", "--queue", "whatsapp", "--max", "3", "--dry-run", "--json")

    assert result.code == 0
    assert result.json == {
        "dry_run": True,
        "queues": [
            {
                "queue": "whatsapp",
                "dlq": dlq_url(cli, "whatsapp").rsplit("/", 1)[-1],
                "source": cli.settings.whatsapp_queue_url.rsplit("/", 1)[-1],
                "would_move": 3,
            }
        ],
    }
    assert visible(cli, dlq_url(cli, "whatsapp")) == 4
    assert visible(cli, cli.settings.whatsapp_queue_url) == 0


def test_a_queue_url_that_does_not_exist_is_a_configuration_error(cli, monkeypatch):
    monkeypatch.setenv("COMMS_SMS_QUEUE_URL", cli.settings.sms_queue_url + "-gone")

    result = cli("dlq", "list", "--queue", "sms")

    assert result.code == 2
    assert "does not exist" in result.err


def test_max_must_be_positive(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("dlq", "redrive", "--max", "0")

    assert exit_.value.code == 2


async def test_redrive_shows_progress_on_a_terminal(settings):
    own = await provision_resources(settings, queue_prefix=unique("op"))
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(own, stack)
        ctx = Context(own, aws, Output())
        pair = await resolve_queue(ctx, "replies")
        for i in range(12):
            await aws.sqs.send_message(QueueUrl=pair.dlq_url, MessageBody=f"m{i}")
        screen = io.StringIO()
        with Progress(console=Console(file=screen, force_terminal=True, width=100)) as progress:
            result = await redrive(ctx, pair, None, progress)

    assert result.moved == 12
    [task] = progress.tasks
    assert task.completed == 12 and task.total == 12
    assert pair.dlq_name in screen.getvalue()


class RefusingSqs:
    """An SQS whose source queue refuses every other copy: what was refused must stay in the DLQ."""

    def __init__(self, count: int) -> None:
        self.dlq = {f"id{i}": f"body{i}" for i in range(count)}
        self.source: list[str] = []
        self.released: list[str] = []

    async def get_queue_attributes(self, QueueUrl, AttributeNames):
        return {"Attributes": {"ApproximateNumberOfMessages": str(len(self.dlq))}}

    async def receive_message(self, **request):
        waiting = [k for k in self.dlq if k not in self.released][: request["MaxNumberOfMessages"]]
        return {"Messages": [{"MessageId": k, "ReceiptHandle": k, "Body": self.dlq[k]} for k in waiting]}

    async def send_message_batch(self, QueueUrl, Entries):
        ok, failed = [], []
        for entry in Entries:
            if int(entry["MessageBody"][4:]) % 2:
                failed.append({"Id": entry["Id"], "Code": "KmsThrottled", "SenderFault": False})
            else:
                self.source.append(entry["MessageBody"])
                ok.append({"Id": entry["Id"]})
        return {"Successful": ok, "Failed": failed}

    async def delete_message_batch(self, QueueUrl, Entries):
        for entry in Entries:
            del self.dlq[entry["ReceiptHandle"]]
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}

    async def change_message_visibility_batch(self, QueueUrl, Entries):
        self.released += [e["ReceiptHandle"] for e in Entries]
        return {"Successful": [{"Id": e["Id"]} for e in Entries], "Failed": []}


async def test_redrive_deletes_only_what_the_source_queue_accepted(settings):
    sqs = RefusingSqs(6)
    ctx = Context(settings, SimpleNamespace(sqs=sqs), Output())

    result = await redrive(ctx, QueuePair("sms", "https://q/src", "https://q/src-dlq"), None)

    assert result.moved == 3 and result.not_sent == {"KmsThrottled": 3}
    assert sorted(sqs.source) == ["body0", "body2", "body4"]
    assert sorted(sqs.dlq.values()) == ["body1", "body3", "body5"]  # nothing lost
    assert sorted(sqs.released) == ["id1", "id3", "id5"]  # and visible again at once


# -- redrive with a worker that dead-letters everything again (poison messages) -------------------------------------


class PoisonWorker:
    """A consumer for which every message is malformed: it dead-letters each one at once, copying its message
    attributes as the consumer runtime does (`resendable_attributes`), up to `limit` times in all."""

    def __init__(self, sqs: Any, source_url: str, dlq_url: str, limit: int = 200) -> None:
        self.sqs = sqs
        self.source_url = source_url
        self.dlq_url = dlq_url
        self.limit = limit
        self.bodies: list[str] = []  # every message it received, in order

    async def run(self, stopped: Callable[[], bool]) -> None:
        while not stopped() and len(self.bodies) < self.limit:
            answer = await self.sqs.receive_message(
                QueueUrl=self.source_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
            )
            for raw in answer.get("Messages", []):
                self.bodies.append(raw["Body"])
                await self.sqs.send_message(
                    QueueUrl=self.dlq_url, MessageBody=raw["Body"], MessageAttributes=resendable_attributes(raw)
                )
                await self.sqs.delete_message(QueueUrl=self.source_url, ReceiptHandle=raw["ReceiptHandle"])


async def _own_pair(settings: Settings, stack: AsyncExitStack, kind: str) -> tuple[Context, QueuePair]:
    own = await provision_resources(settings, queue_prefix=unique("op"))
    aws = await open_aws_clients(own, stack)
    ctx = Context(own, aws, Output())
    return ctx, await resolve_queue(ctx, kind)


async def _fill(sqs: Any, url: str, count: int) -> list[str]:
    bodies = [f"poison-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    for i, body in enumerate(bodies):
        await sqs.send_message(
            QueueUrl=url,
            MessageBody=body,
            MessageAttributes={"conversationId": {"DataType": "String", "StringValue": f"c#{i}"}},
        )
    return bodies


async def _depth(sqs: Any, url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))["Attributes"]
    return sum(int(attributes[name]) for name in names)


async def _settled(worker: PoisonWorker, sqs: Any, source_url: str, expected: int) -> None:
    """Poll (bounded) until the worker has handled `expected` messages and the source queue is empty."""
    for _ in range(200):
        if len(worker.bodies) >= expected and await _depth(sqs, source_url) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker handled {len(worker.bodies)} of {expected}")


async def test_redrive_of_poison_messages_with_a_worker_running_ends_and_moves_each_once(settings):
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "sms")
        sqs = ctx.aws.sqs
        bodies = await _fill(sqs, pair.dlq_url, 4)
        worker = PoisonWorker(sqs, pair.source_url, pair.dlq_url)
        done = asyncio.Event()
        running = asyncio.create_task(worker.run(done.is_set))
        try:
            result = await redrive(ctx, pair, None)
            await _settled(worker, sqs, pair.source_url, 4)
        finally:
            done.set()
            await running

        assert result.moved == 4 and result.not_sent == {} and result.not_deleted == 0
        assert sorted(worker.bodies) == sorted(bodies)  # each moved once, none again
        assert await _depth(sqs, pair.dlq_url) == 4  # back where they were, nothing lost or doubled


async def test_redrive_leaves_copies_that_come_back_during_the_run_and_moves_every_original_once(settings):
    # More than one batch: the first batch's copies come back while later batches are still being moved.
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "whatsapp")
        sqs = ctx.aws.sqs
        bodies = await _fill(sqs, pair.dlq_url, 25)
        worker = PoisonWorker(sqs, pair.source_url, pair.dlq_url)
        done = asyncio.Event()
        running = asyncio.create_task(worker.run(done.is_set))
        try:
            result = await redrive(ctx, pair, None)
            await _settled(worker, sqs, pair.source_url, 25)
        finally:
            done.set()
            await running

        assert result.moved == 25
        assert sorted(worker.bodies) == sorted(bodies)
        assert await _depth(sqs, pair.dlq_url) == 25
        again = await redrive(ctx, pair, 100)  # a later run moves them again (a new run id)
        assert again.moved == 25


def test_redrive_max_larger_than_the_dlq_with_a_worker_running_reports_what_the_dlq_held(cli):
    fill_dlq(cli, "whatsapp", 6)
    source, dead = cli.settings.whatsapp_queue_url, dlq_url(cli, "whatsapp")
    stop = threading.Event()
    worker: list[PoisonWorker] = []

    async def work() -> None:
        async with AsyncExitStack() as stack:
            aws = await open_aws_clients(cli.settings, stack)
            worker.append(PoisonWorker(aws.sqs, source, dead, limit=300))
            await worker[0].run(stop.is_set)

    thread = threading.Thread(target=asyncio.run, args=(work(),))
    thread.start()
    try:
        result = cli("dlq", "redrive", "--queue", "whatsapp", "--max", "100", "--json")
        for _ in range(200):  # bounded: the six copies reach the worker and are dead-lettered again
            if len(worker[0].bodies) >= 6 and visible(cli, source) == 0:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()

    assert result.code == 0, result.err
    [report] = result.json["queues"]
    assert report["moved"] == 6 and report["not_deleted"] == 0
    assert len(worker[0].bodies) == 6 and len(set(worker[0].bodies)) == 6
    assert visible(cli, dead) == 6


class StoppingSqs:
    """The real SQS, but `on_first_copy` runs as the first batch of copies is sent (a signal arriving mid-batch)."""

    def __init__(self, sqs: Any, on_first_copy: Callable[[], None]) -> None:
        self._sqs = sqs
        self._on_first_copy = on_first_copy
        self.copies_sent = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sqs, name)

    async def send_message_batch(self, **request: Any) -> Any:
        if self.copies_sent == 0:
            self._on_first_copy()
        answer = await self._sqs.send_message_batch(**request)
        self.copies_sent += len(answer.get("Successful", []))
        return answer


async def test_redrive_stopped_mid_run_finishes_the_batch_in_hand_and_leaves_no_duplicate(settings):
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "handoff")
        await _fill(ctx.aws.sqs, pair.dlq_url, 25)
        stop = asyncio.Event()
        stopping = StoppingSqs(ctx.aws.sqs, stop.set)
        own = Context(ctx.settings, SimpleNamespace(sqs=stopping, dynamodb=ctx.aws.dynamodb), Output())

        result = await redrive(own, pair, None, None, stop)

        assert result.stopped
        assert result.moved == stopping.copies_sent and 0 < result.moved <= 10
        assert await _depth(ctx.aws.sqs, pair.source_url) == result.moved
        assert await _depth(ctx.aws.sqs, pair.dlq_url) == 25 - result.moved


async def test_sigint_during_redrive_finishes_the_batch_then_exits_130(settings):
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: interrupted.append(number))
    try:
        async with AsyncExitStack() as stack:
            ctx, pair = await _own_pair(settings, stack, "replies")
            await _fill(ctx.aws.sqs, pair.dlq_url, 25)
            stopping = StoppingSqs(ctx.aws.sqs, lambda: signal.raise_signal(signal.SIGINT))
            own = Context(ctx.settings, SimpleNamespace(sqs=stopping, dynamodb=ctx.aws.dynamodb), Output())
            args = SimpleNamespace(queue="replies", max=None, dry_run=False, json=True)

            code = await redrive_messages(args, own)

            assert code == 130
            assert interrupted == []  # the redrive took the signal: no KeyboardInterrupt, the batch was finished
            moved = stopping.copies_sent
            assert 0 < moved <= 10
            assert await _depth(ctx.aws.sqs, pair.source_url) == moved
            assert await _depth(ctx.aws.sqs, pair.dlq_url) == 25 - moved
    finally:
        signal.signal(signal.SIGINT, previous)


# -- a reopened conversation whose copy the source queue refuses ----------------------------------------------------

EXHAUSTED_REASON = "retries_exhausted: ai_transient (500)"


class SourceRefusingSqs:
    """The real SQS, but the source queue refuses every copy: reported as failed entries, or an AWS error."""

    def __init__(self, sqs: Any, *, raise_error: bool = False) -> None:
        self._sqs = sqs
        self._raise_error = raise_error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sqs, name)

    async def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:
        if self._raise_error:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "SendMessageBatch")
        return {
            "Successful": [],
            "Failed": [{"Id": e["Id"], "Code": "KmsThrottled", "SenderFault": False} for e in Entries],
        }


async def _stored(ctx: Context, key: ConversationKey) -> dict[str, Any] | None:
    """The conversation item as stored (a consistent read), or None."""
    answer = await ctx.aws.dynamodb.get_item(
        TableName=ctx.settings.conversations_table, Key=item_key(key), ConsistentRead=True
    )
    return from_item(answer["Item"]) if "Item" in answer else None


async def _exhausted_in_dlq(ctx: Context, pair: QueuePair) -> ConversationKey:
    """A channel message in the DLQ whose conversation failed because retries ran out."""
    body = orjson.dumps(context_for("whatsapp")).decode()
    job = parse_template_job(body)
    key = ConversationKey(job.recipient, job.conversation_id)
    record = {
        "conversation_status": "failed_to_process_ai",
        "failure_reason": EXHAUSTED_REASON,
        "failure_kind": "retries_exhausted",
        "claim_owner": "worker-1",
        "claim_expires_at": 0,
        "send_state": "not_sent",
        "updated_at": "2025-01-01T00:00:00.000Z",
    }
    await ctx.aws.dynamodb.put_item(
        TableName=ctx.settings.conversations_table,
        Item={**item_key(key), **{k: to_attribute(v) for k, v in record.items()}},
    )
    await ctx.aws.sqs.send_message(QueueUrl=pair.dlq_url, MessageBody=body)
    return key


async def test_a_refused_copy_leaves_its_conversation_failed_as_exhausted_and_a_later_redrive_reopens_it(settings):
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "whatsapp")
        key = await _exhausted_in_dlq(ctx, pair)
        refusing = Context(
            ctx.settings, SimpleNamespace(sqs=SourceRefusingSqs(ctx.aws.sqs), dynamodb=ctx.aws.dynamodb), Output()
        )

        result = await redrive(refusing, pair, None)

        record = await _stored(ctx, key)
        assert record is not None
        assert record["conversation_status"] == "failed_to_process_ai"
        assert record["failure_kind"] == "retries_exhausted" and record["failure_reason"] == EXHAUSTED_REASON
        assert "last_failure_reason" not in record and "reopen_count" not in record
        assert record["claim_owner"] == "worker-1" and record["claim_expires_at"] == 0
        assert (result.moved, result.not_sent, result.reopened, result.not_closed) == (0, {"KmsThrottled": 1}, 0, 0)
        assert await _depth(ctx.aws.sqs, pair.dlq_url) == 1 and await _depth(ctx.aws.sqs, pair.source_url) == 0

        again = await redrive(ctx, pair, None)  # the source queue healthy again: reopened and moved

        assert (again.moved, again.not_sent, again.reopened) == (1, {}, 1)
        assert await _depth(ctx.aws.sqs, pair.dlq_url) == 0 and await _depth(ctx.aws.sqs, pair.source_url) == 1
        reopened = await _stored(ctx, key)
        assert reopened is not None and reopened["conversation_status"] == "processing"
        assert "failure_kind" not in reopened and reopened["last_failure_reason"] == EXHAUSTED_REASON


async def test_an_aws_error_sending_the_copy_leaves_its_conversation_failed_as_exhausted(settings):
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "whatsapp")
        key = await _exhausted_in_dlq(ctx, pair)
        failing = SourceRefusingSqs(ctx.aws.sqs, raise_error=True)
        own = Context(ctx.settings, SimpleNamespace(sqs=failing, dynamodb=ctx.aws.dynamodb), Output())

        with pytest.raises(ClientError):
            await redrive(own, pair, None)

        assert await _depth(ctx.aws.sqs, pair.dlq_url) == 1 and await _depth(ctx.aws.sqs, pair.source_url) == 0
        record = await _stored(ctx, key)
        assert record is not None and record["conversation_status"] == "failed_to_process_ai"
        assert record["failure_kind"] == "retries_exhausted" and record["failure_reason"] == EXHAUSTED_REASON


async def test_a_reopen_is_not_undone_once_the_record_changed_after_it(settings):
    async with AsyncExitStack() as stack:
        ctx, pair = await _own_pair(settings, stack, "whatsapp")
        key = await _exhausted_in_dlq(ctx, pair)
        claims = ctx.conversation_claims
        before = await claims.get(key)
        assert before is not None
        reopened_at = await claims.reopen_exhausted(key)
        assert reopened_at is not None
        await ctx.aws.dynamodb.update_item(  # a worker took the claim meanwhile
            TableName=ctx.settings.conversations_table,
            Key=item_key(key),
            UpdateExpression="SET claim_owner = :owner, claim_expires_at = :lease",
            ExpressionAttributeValues={":owner": to_attribute("worker-2"), ":lease": to_attribute(time.time() + 60)},
        )

        assert not await claims.close_reopened(key, before, reopened_at)

        record = await _stored(ctx, key)
        assert record is not None and record["conversation_status"] == "processing"
        assert record["claim_owner"] == "worker-2" and "failure_kind" not in record
