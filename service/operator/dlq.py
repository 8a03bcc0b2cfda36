"""`comms dlq list|show|redrive`: the dead-letter queues of the channel, replies and hand-off queues.

A queue's URL comes from its `COMMS_<KIND>_QUEUE_URL` setting (else the queue named
`<prefix>-<kind>`); its DLQ is the one its RedrivePolicy names (else `<name>-dlq`).

`redrive` never loses a message: each batch is first copied to the source queue (body, message
attributes and trace header kept), and only the copies SQS accepted are deleted from the DLQ. A
message whose copy failed is released at once and stays in the DLQ; one whose delete failed is
copied at most once per run (a later run may copy it again: consumers are idempotent).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.adapters.aws.errors import error_code
from service.operator.output import Context, Refused, UsageError, cell_text
from service.resources import QUEUE_KINDS

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef, SendMessageBatchRequestEntryTypeDef

PEEK_VISIBILITY_S = 30  # `show` releases what it peeked at once; this only bounds a crash
REDRIVE_VISIBILITY_S = 120  # far longer than one copy-then-delete round trip
RECEIVE_WAIT_S = 1  # a short long-poll: sees every message server, ends quickly when the DLQ is empty
BODY_PREVIEW_CHARS = 160
_MISSING_QUEUE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
_BATCH_TOO_LONG_CODES = ("AWS.SimpleQueueService.BatchRequestTooLong", "BatchRequestTooLong")


@dataclass(frozen=True, slots=True)
class QueuePair:
    kind: str
    source_url: str
    dlq_url: str

    @property
    def source_name(self) -> str:
        return self.source_url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def dlq_name(self) -> str:
        return self.dlq_url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(slots=True)
class RedriveResult:
    moved: int = 0
    not_sent: dict[str, int] = field(default_factory=dict)  # error code -> messages left in the DLQ
    not_deleted: int = 0  # copied, but still in the DLQ as well


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect dead-letter queues and move their messages back",
        description="Dead-letter queues of the whatsapp, sms, email, replies and handoff queues.",
    )
    actions = dlq.add_subparsers(dest="action", required=True, metavar="{list,show,redrive}")

    listing = actions.add_parser(
        "list", help="message counts per queue and DLQ", description="Approximate message counts per queue and DLQ."
    )
    _queue_argument(listing)
    listing.add_argument("--json", action="store_true", help="print the counts as JSON")
    listing.set_defaults(handler=list_queues)

    show = actions.add_parser(
        "show",
        help="peek at DLQ messages without removing them",
        description="Receive up to --max DLQ messages, print them, and release them at once (visibility 0).",
    )
    _queue_argument(show)
    show.add_argument("--max", type=_positive, default=10, help="messages per queue (default 10)")
    show.add_argument("--full", action="store_true", help="print whole bodies, not a preview")
    show.add_argument("--json", action="store_true", help="print the messages as JSON")
    show.set_defaults(handler=show_messages)

    redrive = actions.add_parser(
        "redrive",
        help="move DLQ messages back to their source queue",
        description=(
            "Copy DLQ messages to their source queue, then delete them from the DLQ; a message is never lost. "
            "Without --queue every DLQ is redriven; --max applies per queue."
        ),
    )
    _queue_argument(redrive)
    redrive.add_argument("--max", type=_positive, default=None, help="move at most N messages per queue (default all)")
    redrive.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    redrive.add_argument("--json", action="store_true", help="print the result as JSON")
    redrive.set_defaults(handler=redrive_messages)


def _queue_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", choices=QUEUE_KINDS, help="one queue (default: all)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _kinds(args: argparse.Namespace) -> list[str]:
    return [args.queue] if args.queue else list(QUEUE_KINDS)


async def _queue_url(sqs: SQSClient, name: str, owner: str | None = None) -> str | None:
    try:
        if owner:
            answer = await sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=owner)
        else:
            answer = await sqs.get_queue_url(QueueName=name)
    except ClientError as exc:
        if error_code(exc) in _MISSING_QUEUE_CODES:
            return None
        raise
    return answer["QueueUrl"]


async def resolve_queue(ctx: Context, kind: str) -> QueuePair:
    """The source queue and its DLQ; `UsageError` when either cannot be found."""
    sqs = ctx.aws.sqs
    configured: str | None = getattr(ctx.settings, f"{kind}_queue_url")
    source_url = configured or await _queue_url(sqs, f"{ctx.settings.secrets_prefix}-{kind}")
    if source_url is None:
        raise UsageError(
            f"{kind} queue: COMMS_{kind.upper()}_QUEUE_URL is not set and no queue "
            f"{ctx.settings.secrets_prefix}-{kind} exists (run `comms bootstrap`)"
        )
    try:
        attributes = (await sqs.get_queue_attributes(QueueUrl=source_url, AttributeNames=["RedrivePolicy"])).get(
            "Attributes", {}
        )
    except ClientError as exc:
        if error_code(exc) in _MISSING_QUEUE_CODES:
            raise UsageError(
                f"{kind} queue {source_url} does not exist (check COMMS_{kind.upper()}_QUEUE_URL)"
            ) from None
        raise
    dlq_url: str | None = None
    if "RedrivePolicy" in attributes:
        target = str(orjson.loads(attributes["RedrivePolicy"]).get("deadLetterTargetArn", ""))
        parts = target.split(":")  # arn:aws:sqs:<region>:<account>:<name>
        if len(parts) == 6:
            dlq_url = await _queue_url(sqs, parts[5], parts[4] or None)
    if dlq_url is None:
        dlq_url = await _queue_url(sqs, source_url.rstrip("/").rsplit("/", 1)[-1] + "-dlq")
    if dlq_url is None:
        raise UsageError(f"{kind} queue has no dead-letter queue (no RedrivePolicy and no <name>-dlq queue)")
    return QueuePair(kind, source_url, dlq_url)


async def _counts(sqs: SQSClient, url: str) -> dict[str, int]:
    answer = await sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )
    attributes = answer.get("Attributes", {})
    return {
        "messages": int(attributes.get("ApproximateNumberOfMessages", 0)),
        "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        "delayed": int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
    }


# ---- list ---------------------------------------------------------------------------------------


async def list_queues(args: argparse.Namespace, ctx: Context) -> int:
    rows: list[dict[str, Any]] = []
    for kind in _kinds(args):
        pair = await resolve_queue(ctx, kind)
        rows.append(
            {
                "queue": kind,
                "source": {
                    "name": pair.source_name,
                    "url": pair.source_url,
                    **await _counts(ctx.aws.sqs, pair.source_url),
                },
                "dlq": {"name": pair.dlq_name, "url": pair.dlq_url, **await _counts(ctx.aws.sqs, pair.dlq_url)},
            }
        )
    if args.json:
        ctx.out.json({"queues": rows})
        return 0
    ctx.out.table(
        "Queues (approximate counts)",
        ["queue", "source", "visible", "in flight", "delayed", "dead-letter queue", "DLQ visible", "DLQ in flight"],
        (
            [
                r["queue"],
                r["source"]["name"],
                r["source"]["messages"],
                r["source"]["in_flight"],
                r["source"]["delayed"],
                r["dlq"]["name"],
                r["dlq"]["messages"],
                r["dlq"]["in_flight"],
            ]
            for r in rows
        ),
    )
    return 0


# ---- show ---------------------------------------------------------------------------------------


def _stamp(epoch_ms: str | None) -> str | None:
    if not epoch_ms:
        return None
    return datetime.fromtimestamp(int(epoch_ms) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _attribute_values(message: MessageTypeDef) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, attribute in message.get("MessageAttributes", {}).items():
        if "StringValue" in attribute:
            values[name] = attribute["StringValue"]
        else:
            values[name] = f"<{attribute.get('DataType', 'Binary')}>"
    return values


def _describe(message: MessageTypeDef) -> dict[str, Any]:
    body = message.get("Body", "")
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = body
    system = message.get("Attributes", {})
    return {
        "message_id": message.get("MessageId"),
        "sent_at": _stamp(system.get("SentTimestamp")),
        "receive_count": int(system.get("ApproximateReceiveCount", 0)),
        "attributes": _attribute_values(message),
        "body": parsed,
    }


async def _release(sqs: SQSClient, url: str, messages: Sequence[MessageTypeDef]) -> None:
    """Make received messages visible again now (visibility 0)."""
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        await sqs.change_message_visibility_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0} for i, m in enumerate(chunk)
            ],
        )


async def peek(ctx: Context, pair: QueuePair, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` DLQ messages, described; every one received is released before returning."""
    sqs = ctx.aws.sqs
    received: list[MessageTypeDef] = []
    seen: set[str] = set()
    if (await _counts(sqs, pair.dlq_url))["messages"] == 0:
        return []
    try:
        while len(seen) < limit:
            answer = await sqs.receive_message(
                QueueUrl=pair.dlq_url,
                MaxNumberOfMessages=min(10, limit - len(seen)),
                VisibilityTimeout=PEEK_VISIBILITY_S,
                WaitTimeSeconds=RECEIVE_WAIT_S,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
            batch = answer.get("Messages", [])
            if not batch:
                break
            received += batch
            seen.update(m["MessageId"] for m in batch)
    finally:
        await _release(sqs, pair.dlq_url, received)
    described: dict[str, dict[str, Any]] = {}
    for message in received:
        described.setdefault(message["MessageId"], _describe(message))
    return list(described.values())[:limit]


async def show_messages(args: argparse.Namespace, ctx: Context) -> int:
    results: list[dict[str, Any]] = []
    for kind in _kinds(args):
        pair = await resolve_queue(ctx, kind)
        results.append({"queue": kind, "dlq": pair.dlq_name, "messages": await peek(ctx, pair, args.max)})
    if args.json:
        ctx.out.json({"queues": results})
        return 0
    for result in results:
        if not result["messages"]:
            ctx.out.line(f"{result['dlq']}: empty")
            continue
        rows = []
        for message in result["messages"]:
            body = cell_text(message["body"])
            if not args.full and len(body) > BODY_PREVIEW_CHARS:
                body = body[:BODY_PREVIEW_CHARS] + "…"
            rows.append(
                [message["message_id"], message["sent_at"], message["receive_count"], message["attributes"], body]
            )
        ctx.out.table(
            f"{result['dlq']} ({len(rows)} shown)",
            ["message id", "sent at", "receives", "attributes", "body"],
            rows,
            no_wrap=False,
        )
    return 0


# ---- redrive ------------------------------------------------------------------------------------


def _copy_entry(index: int, message: MessageTypeDef) -> SendMessageBatchRequestEntryTypeDef:
    entry: SendMessageBatchRequestEntryTypeDef = {"Id": str(index), "MessageBody": message["Body"]}
    attributes: dict[str, Any] = {}
    for name, attribute in message.get("MessageAttributes", {}).items():
        value: dict[str, Any] = {"DataType": attribute["DataType"]}
        if "StringValue" in attribute:
            value["StringValue"] = attribute["StringValue"]
        if "BinaryValue" in attribute:
            value["BinaryValue"] = attribute["BinaryValue"]
        attributes[name] = value
    if attributes:
        entry["MessageAttributes"] = attributes
    trace = message.get("Attributes", {}).get("AWSTraceHeader")
    if trace:
        entry["MessageSystemAttributes"] = {"AWSTraceHeader": {"DataType": "String", "StringValue": trace}}
    return entry


async def _send_copies(
    sqs: SQSClient, url: str, entries: list[SendMessageBatchRequestEntryTypeDef]
) -> tuple[set[str], dict[str, str]]:
    """Entry ids SQS accepted, and the error code of each it did not."""
    try:
        answer = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
    except ClientError as exc:
        if error_code(exc) not in _BATCH_TOO_LONG_CODES:
            raise
        accepted: set[str] = set()
        refused: dict[str, str] = {}
        for entry in entries:  # together over the batch size limit: one at a time
            single: dict[str, Any] = {k: v for k, v in entry.items() if k != "Id"}
            try:
                await sqs.send_message(QueueUrl=url, **single)
                accepted.add(entry["Id"])
            except ClientError as single_exc:
                refused[entry["Id"]] = error_code(single_exc) or "ClientError"
        return accepted, refused
    return (
        {s["Id"] for s in answer.get("Successful", [])},
        {f["Id"]: f.get("Code", "Failed") for f in answer.get("Failed", [])},
    )


async def _delete(sqs: SQSClient, url: str, messages: list[MessageTypeDef]) -> int:
    """Delete from the DLQ (one retry for entries that failed); the number still not deleted."""
    pending = messages
    for _ in range(2):
        if not pending:
            return 0
        answer = await sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(pending)]
        )
        failed = {f["Id"] for f in answer.get("Failed", [])}
        pending = [m for i, m in enumerate(pending) if str(i) in failed]
    return len(pending)


async def redrive(ctx: Context, pair: QueuePair, limit: int | None, progress: Progress | None = None) -> RedriveResult:
    """Move up to `limit` messages (all when None) from the DLQ to the source queue; copy first, then delete."""
    sqs = ctx.aws.sqs
    result = RedriveResult()
    copied: set[str] = set()  # message ids copied in this run: never copied twice
    waiting = (await _counts(sqs, pair.dlq_url))["messages"]
    if waiting == 0:  # nothing to long-poll for; the count may lag up to a minute: run again if some just arrived
        return result
    task = None
    if progress is not None:
        task = progress.add_task(pair.dlq_name, total=waiting if limit is None else min(limit, waiting))
    while limit is None or result.moved < limit:
        want = 10 if limit is None else min(10, limit - result.moved)
        answer = await sqs.receive_message(
            QueueUrl=pair.dlq_url,
            MaxNumberOfMessages=want,
            VisibilityTimeout=REDRIVE_VISIBILITY_S,
            WaitTimeSeconds=RECEIVE_WAIT_S,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["AWSTraceHeader"],
        )
        batch = answer.get("Messages", [])
        if not batch:
            break
        repeats = [m for m in batch if m["MessageId"] in copied]
        fresh = [m for m in batch if m["MessageId"] not in copied]
        accepted, refused = (
            await _send_copies(sqs, pair.source_url, [_copy_entry(i, m) for i, m in enumerate(fresh)])
            if fresh
            else (set(), {})
        )
        sent = [m for i, m in enumerate(fresh) if str(i) in accepted]
        unsent = [m for i, m in enumerate(fresh) if str(i) not in accepted]
        copied.update(m["MessageId"] for m in sent)
        result.not_deleted += await _delete(sqs, pair.dlq_url, sent + repeats)
        result.moved += len(sent)
        if progress is not None and task is not None:
            progress.update(task, advance=len(sent))
        if unsent:
            await _release(sqs, pair.dlq_url, unsent)
            for index in range(len(fresh)):
                if str(index) not in accepted:
                    code = refused.get(str(index), "NotAccepted")
                    result.not_sent[code] = result.not_sent.get(code, 0) + 1
            break  # the source queue refuses: stop rather than spin on the same messages
    return result


def _progress(ctx: Context) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=ctx.out.errors,
        disable=not ctx.out.errors.is_terminal,
    )


async def redrive_messages(args: argparse.Namespace, ctx: Context) -> int:
    pairs = [await resolve_queue(ctx, kind) for kind in _kinds(args)]
    reports: list[dict[str, Any]] = []
    if args.dry_run:
        for pair in pairs:
            waiting = (await _counts(ctx.aws.sqs, pair.dlq_url))["messages"]
            would = waiting if args.max is None else min(args.max, waiting)
            reports.append({"queue": pair.kind, "dlq": pair.dlq_name, "source": pair.source_name, "would_move": would})
            if not args.json:
                ctx.out.line(
                    f"dry run: would move {would} of ~{waiting} messages from {pair.dlq_name} to {pair.source_name}"
                )
        if args.json:
            ctx.out.json({"dry_run": True, "queues": reports})
        return 0
    failed = False
    with _progress(ctx) as progress:
        for pair in pairs:
            outcome = await redrive(ctx, pair, args.max, progress)
            failed = failed or bool(outcome.not_sent)
            reports.append(
                {
                    "queue": pair.kind,
                    "dlq": pair.dlq_name,
                    "source": pair.source_name,
                    "moved": outcome.moved,
                    "not_sent": outcome.not_sent,
                    "not_deleted": outcome.not_deleted,
                }
            )
    for report in reports:
        if report["not_deleted"]:
            ctx.out.warn(
                f"{report['not_deleted']} messages were copied to {report['source']} but are still in "
                f"{report['dlq']}; a later redrive would deliver them again"
            )
    if args.json:
        ctx.out.json({"dry_run": False, "queues": reports})
    else:
        for report in reports:
            ctx.out.line(f"moved {report['moved']} messages from {report['dlq']} to {report['source']}")
    if failed:
        details = "; ".join(
            f"{r['dlq']}: {sum(r['not_sent'].values())} refused ({', '.join(r['not_sent'])})"
            for r in reports
            if r["not_sent"]
        )
        raise Refused(f"some messages could not be sent and were left in their DLQ: {details}")
    return 0
