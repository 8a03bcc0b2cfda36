"""`comms dlq list|show|redrive`: the dead-letter queues of the channel, replies and hand-off queues.

A queue's URL comes from its `COMMS_<KIND>_QUEUE_URL` setting (else the queue named
`<prefix>-<kind>`); its DLQ is the one its RedrivePolicy names (else `<name>-dlq`).

`redrive` never loses a message: each batch is first copied to the source queue (body, message
attributes and trace header kept), and only the copies SQS accepted are deleted from the DLQ, right
after. A message whose copy failed is released at once and stays in the DLQ.

It ends, even while a worker dead-letters everything it is given (poison messages): it moves at most
what the DLQ held when it started (visible + in flight), each message once (by message id), and tags
every copy with the message attribute `commsRedriveRun` = this run's id; the consumers and SQS's own
redrive keep message attributes when they dead-letter, so a copy that comes back during the run is
recognised and left in the DLQ (released when the run ends). `moved` counts copies sent and deleted.
SIGINT/SIGTERM: the batch in hand is finished (copied and deleted), then the run stops. A run killed
outright (kill -9) between a copy and its delete leaves that message in both queues: harmless, the
conversation claim acknowledges and drops a repeat (a reply trigger answers only unanswered fragments).

Before a channel message goes back, its conversation, if it failed because retries ran out, is reopened
(`DynamoConversationClaims.reopen_exhausted`) so the redelivery can claim it. If the source queue then refuses
that copy, the reopen is undone (`close_reopened`: failed as exhausted again, only while the record is exactly as
the reopen left it), so the conversation matches the message left in the DLQ and a later redrive reopens it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consumers.sqs_messages import find_redrive_policy, resendable_attributes
from consumers.template_job import InvalidContext, parse_template_job
from service.adapters.aws.errors import error_code
from service.adapters.aws.resources import QUEUE_KINDS
from service.aws_failures import MISSING_QUEUE_CODES
from service.config import CHANNELS
from service.domain.conversation import ConversationKey, ConversationRecord
from service.domain.errors import DependencyUnavailable
from service.operator.output import Context, Refused, UsageError, cell_text

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import MessageSystemAttributeNameType, QueueAttributeNameType
    from types_aiobotocore_sqs.type_defs import MessageTypeDef, SendMessageBatchRequestEntryTypeDef

PEEK_VISIBILITY_S = 30  # `show` releases what it peeked at once; this only bounds a crash
REDRIVE_VISIBILITY_S = 120  # far longer than one copy-then-delete round trip
RECEIVE_WAIT_S = 1  # a short long-poll: sees every message server, ends quickly when the DLQ is empty
BODY_PREVIEW_CHARS = 160
_BATCH_TOO_LONG_CODES = ("AWS.SimpleQueueService.BatchRequestTooLong", "BatchRequestTooLong")
RUN_ATTRIBUTE = "commsRedriveRun"  # message attribute naming the redrive run that sent a copy
MAX_MESSAGE_ATTRIBUTES = 10  # SQS: a message with 10 attributes of its own cannot be tagged (it still moves)
MAX_IDLE_RECEIVES = 3  # receives in a row that bring nothing to move (only this run's returned copies): stop
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM (after the batch in hand)
REOPEN_FAILED = "ReopenFailed"  # not_sent code: the conversation could not be reopened, so the message stays
_COUNT_ATTRIBUTES: dict[str, QueueAttributeNameType] = {
    "messages": "ApproximateNumberOfMessages",
    "in_flight": "ApproximateNumberOfMessagesNotVisible",
    "delayed": "ApproximateNumberOfMessagesDelayed",
}


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
    moved: int = 0  # copies sent to the source queue and deleted from the DLQ
    not_sent: dict[str, int] = field(default_factory=dict)  # error code -> messages left in the DLQ
    not_deleted: int = 0  # copied, but still in the DLQ as well
    came_back: int = 0  # this run's copies dead-lettered again during the run: left in the DLQ
    reopened: int = 0  # conversations failed by exhausted retries, reopened for the redelivery
    not_closed: int = 0  # reopened, copy refused, and the reopen could not be undone: left `processing`
    stopped: bool = False  # a signal stopped the run after the batch in hand


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
            "Moves at most what the DLQ held at the start, each message once; copies that fail again during the "
            "run stay in the DLQ. Conversations that failed because retries ran out are reopened first. "
            "Without --queue every DLQ is redriven; --max applies per queue. Ctrl-C/SIGTERM: the batch in hand "
            "is finished, then it stops (exit 130). Killed outright, a message may be left in both queues: "
            "harmless, the consumer drops a repeat."
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


async def _queue_url(sqs: SQSClient, name: str) -> str | None:
    try:
        answer = await sqs.get_queue_url(QueueName=name)
    except ClientError as exc:
        if error_code(exc) in MISSING_QUEUE_CODES:
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
        dlq_url = (await find_redrive_policy(sqs, source_url)).dead_letter_url
    except ClientError as exc:
        if error_code(exc) not in MISSING_QUEUE_CODES:
            raise
        if exc.operation_name != "GetQueueUrl":  # the source queue is missing, not the DLQ its policy names
            raise UsageError(
                f"{kind} queue {source_url} does not exist (check COMMS_{kind.upper()}_QUEUE_URL)"
            ) from None
        dlq_url = None
    if dlq_url is None:
        dlq_url = await _queue_url(sqs, source_url.rstrip("/").rsplit("/", 1)[-1] + "-dlq")
    if dlq_url is None:
        raise UsageError(f"{kind} queue has no dead-letter queue (no RedrivePolicy and no <name>-dlq queue)")
    return QueuePair(kind, source_url, dlq_url)


async def _counts(sqs: SQSClient, url: str) -> dict[str, int]:
    answer = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(_COUNT_ATTRIBUTES.values()))
    attributes = answer.get("Attributes", {})
    return {count: int(attributes.get(attribute, 0)) for count, attribute in _COUNT_ATTRIBUTES.items()}


async def list_queues(args: argparse.Namespace, ctx: Context) -> int:
    queues: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    for kind in _kinds(args):
        pair = await resolve_queue(ctx, kind)
        source = {"name": pair.source_name, "url": pair.source_url, **await _counts(ctx.aws.sqs, pair.source_url)}
        dlq = {"name": pair.dlq_name, "url": pair.dlq_url, **await _counts(ctx.aws.sqs, pair.dlq_url)}
        queues.append({"queue": kind, "source": source, "dlq": dlq})
        source_cells = [source["name"], source["messages"], source["in_flight"], source["delayed"]]
        rows.append([kind, *source_cells, dlq["name"], dlq["messages"], dlq["in_flight"]])
    if args.json:
        ctx.out.json({"queues": queues})
        return 0
    ctx.out.table(
        "Queues (approximate counts)",
        ["queue", "source", "visible", "in flight", "delayed", "dead-letter queue", "DLQ visible", "DLQ in flight"],
        rows,
    )
    return 0


def _stamp(epoch_ms: str | None) -> str | None:
    if not epoch_ms:
        return None
    return datetime.fromtimestamp(int(epoch_ms) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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
        "attributes": {
            name: attribute["StringValue"] if "StringValue" in attribute else f"<{attribute.get('DataType', 'Binary')}>"
            for name, attribute in message.get("MessageAttributes", {}).items()
        },
        "body": parsed,
    }


async def _receive(
    sqs: SQSClient, url: str, count: int, visibility_s: int, system: list[MessageSystemAttributeNameType]
) -> list[MessageTypeDef]:
    answer = await sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=min(10, count),
        VisibilityTimeout=visibility_s,
        WaitTimeSeconds=RECEIVE_WAIT_S,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=system,
    )
    return answer.get("Messages", [])


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
            batch = await _receive(sqs, pair.dlq_url, limit - len(seen), PEEK_VISIBILITY_S, system=["All"])
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


def _copy_entry(index: int, message: MessageTypeDef, run_id: str) -> SendMessageBatchRequestEntryTypeDef:
    """The copy SendMessageBatch takes: body, message attributes, trace header, and this run's tag."""
    entry: SendMessageBatchRequestEntryTypeDef = {"Id": str(index), "MessageBody": message["Body"]}
    attributes = resendable_attributes(message)
    if RUN_ATTRIBUTE in attributes or len(attributes) < MAX_MESSAGE_ATTRIBUTES:
        attributes[RUN_ATTRIBUTE] = {"DataType": "String", "StringValue": run_id}
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


async def _delete(sqs: SQSClient, url: str, messages: list[MessageTypeDef]) -> list[MessageTypeDef]:
    """Delete from the DLQ (one retry for entries that failed); the messages still not deleted."""
    pending = messages
    for _ in range(2):
        if not pending:
            return []
        answer = await sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(pending)]
        )
        failed = {f["Id"] for f in answer.get("Failed", [])}
        pending = [m for i, m in enumerate(pending) if str(i) in failed]
    return pending


def _conversation_key(body: str) -> ConversationKey | None:
    """The conversation a channel-queue message is for; None for a context the consumer would reject anyway."""
    try:
        job = parse_template_job(body)
    except InvalidContext:
        return None
    return ConversationKey(job.recipient, job.conversation_id)


@dataclass(slots=True)
class _Run:
    """One queue's redrive: what it may still move and what it has seen."""

    pair: QueuePair
    run_id: str
    budget: int  # copies this run may send: what the DLQ held at the start, or --max if smaller
    result: RedriveResult = field(default_factory=RedriveResult)
    copied: set[str] = field(default_factory=set)  # DLQ message ids copied: never copied twice
    undeleted: set[str] = field(default_factory=set)  # copied ids whose DLQ delete has not succeeded yet
    came_back: dict[str, MessageTypeDef] = field(default_factory=dict)  # this run's copies, back: left alone

    @property
    def sent(self) -> int:
        return len(self.copied)


@dataclass(frozen=True, slots=True)
class _Reopened:
    """A conversation this batch reopened: enough to undo the reopen if its copy is refused."""

    key: ConversationKey
    before: ConversationRecord  # the record read just before the reopen
    stamp: str  # what the reopen returned


async def _reopen(
    ctx: Context, run: _Run, messages: list[MessageTypeDef]
) -> tuple[list[MessageTypeDef], dict[str, _Reopened]]:
    """Reopen exhausted conversations before their messages go back: the messages whose reopen failed, and
    what was reopened (by message id) so it can be undone for a copy the source queue refuses."""
    if run.pair.kind not in CHANNELS:
        return [], {}  # replies keep the conversation answerable (nothing to reopen); hand-off has no conversation
    keys = [(m, key) for m in messages if (key := _conversation_key(m.get("Body", ""))) is not None]
    if not keys:
        return [], {}
    store = ctx.conversation_claims
    failed: list[MessageTypeDef] = []
    reopened: dict[str, _Reopened] = {}
    for message, key in keys:
        try:
            before = await store.get(key)
            stamp = await store.reopen_exhausted(key)
            if stamp is not None:
                run.result.reopened += 1
                if before is not None:
                    reopened[message["MessageId"]] = _Reopened(key, before, stamp)
        except DependencyUnavailable:
            failed.append(message)  # sent now it would be dropped against the failed record: it stays
    return failed, reopened


async def _close_reopened(
    ctx: Context, run: _Run, reopened: dict[str, _Reopened], unsent: list[MessageTypeDef], sent: list[MessageTypeDef]
) -> None:
    """Undo the reopen for each copy the source queue did not take (unless another copy in this batch went for the
    same conversation). Conditional: a record changed since the reopen is left as it is (counted `not_closed`)."""
    going = {_conversation_key(m.get("Body", "")) for m in sent}
    undo = [r for m in unsent if (r := reopened.get(m["MessageId"])) is not None and r.key not in going]
    if not undo:
        return
    store = ctx.conversation_claims
    for reopen in undo:
        try:
            closed = await store.close_reopened(reopen.key, reopen.before, reopen.stamp)
        except DependencyUnavailable:
            closed = False
        if closed:
            run.result.reopened -= 1
        else:
            run.result.not_closed += 1


async def _move_batch(ctx: Context, run: _Run, fresh: list[MessageTypeDef]) -> bool:
    """Reopen, copy, then delete each copied message at once; False when some could not go (the source queue
    refused them, or their conversation could not be reopened): the run stops rather than spin on them."""
    sqs = ctx.aws.sqs
    result = run.result
    not_reopened, reopened = await _reopen(ctx, run, fresh)
    sendable = [m for m in fresh if m not in not_reopened]
    try:
        entries = [_copy_entry(i, m, run.run_id) for i, m in enumerate(sendable)]
        accepted, refused = await _send_copies(sqs, run.pair.source_url, entries) if entries else (set(), {})
    except Exception:  # no answer: treated as none sent (a copy that did go finds its record failed, and is dropped)
        await _close_reopened(ctx, run, reopened, sendable, [])
        raise
    sent = [m for i, m in enumerate(sendable) if str(i) in accepted]
    unsent = [m for i, m in enumerate(sendable) if str(i) not in accepted]
    await _close_reopened(ctx, run, reopened, unsent, sent)
    run.copied.update(m["MessageId"] for m in sent)
    run.undeleted.update(m["MessageId"] for m in sent)
    await _delete_copied(sqs, run, sent)
    codes = [refused.get(str(i), "NotAccepted") for i in range(len(sendable)) if str(i) not in accepted]
    for code in codes + [REOPEN_FAILED] * len(not_reopened):
        result.not_sent[code] = result.not_sent.get(code, 0) + 1
    if unsent or not_reopened:
        await _release(sqs, run.pair.dlq_url, unsent + not_reopened)
    return not unsent and not not_reopened


async def _delete_copied(sqs: SQSClient, run: _Run, messages: list[MessageTypeDef]) -> None:
    """Delete copied messages from the DLQ; each one deleted counts as moved (once)."""
    left = {m["MessageId"] for m in await _delete(sqs, run.pair.dlq_url, messages)}
    for message in messages:
        message_id = message["MessageId"]
        if message_id not in left and message_id in run.undeleted:
            run.undeleted.discard(message_id)
            run.result.moved += 1
    run.result.not_deleted = len(run.undeleted)


async def redrive(
    ctx: Context,
    pair: QueuePair,
    limit: int | None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> RedriveResult:
    """Move up to `limit` messages (all when None) from the DLQ to the source queue, as the module docstring says;
    `stop` set: the batch in hand is finished, then the run ends (`stopped`)."""
    sqs = ctx.aws.sqs
    counts = await _counts(sqs, pair.dlq_url)
    held = counts["messages"] + counts["in_flight"]
    run = _Run(pair, uuid.uuid4().hex, held if limit is None else min(limit, held))
    result = run.result
    if run.budget == 0:  # the counts may lag up to a minute: run again if some just arrived
        return result
    task = progress.add_task(pair.dlq_name, total=run.budget) if progress is not None else None
    idle = 0
    try:
        while run.sent < run.budget and idle < MAX_IDLE_RECEIVES:
            if stop is not None and stop.is_set():
                result.stopped = True
                break
            batch = await _receive(
                sqs, pair.dlq_url, run.budget - run.sent, REDRIVE_VISIBILITY_S, system=["AWSTraceHeader"]
            )
            if not batch:
                break
            for message in batch:
                tag = message.get("MessageAttributes", {}).get(RUN_ATTRIBUTE)
                if tag is not None and tag.get("StringValue") == run.run_id:
                    run.came_back[message["MessageId"]] = message
            repeats = [m for m in batch if m["MessageId"] in run.copied and m["MessageId"] not in run.came_back]
            fresh = [m for m in batch if m["MessageId"] not in run.copied and m["MessageId"] not in run.came_back]
            if repeats:  # copied earlier, delete failed, visible again: delete only
                await _delete_copied(sqs, run, repeats)
            if not fresh:
                idle += 1
                continue
            idle = 0
            moved_before = result.moved
            accepted_all = await _move_batch(ctx, run, fresh)
            if progress is not None and task is not None:
                progress.update(task, advance=result.moved - moved_before)
            if not accepted_all:
                break  # stop rather than spin on the same messages
    finally:
        result.came_back = len(run.came_back)
        if run.came_back:  # left alone, and visible again now rather than after the redrive visibility
            with contextlib.suppress(ClientError):
                await _release(sqs, pair.dlq_url, list(run.came_back.values()))
    return result


@contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` (the batch in hand finishes) instead of interrupting the run."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


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
            counts = await _counts(ctx.aws.sqs, pair.dlq_url)
            waiting = counts["messages"] + counts["in_flight"]  # what a redrive would take as its upper bound
            would = waiting if args.max is None else min(args.max, waiting)
            reports.append({"queue": pair.kind, "dlq": pair.dlq_name, "source": pair.source_name, "would_move": would})
            if not args.json:
                ctx.out.line(
                    f"dry run: would move {would} of ~{waiting} messages from {pair.dlq_name} to {pair.source_name}"
                )
        if args.json:
            ctx.out.json({"dry_run": True, "queues": reports})
        return 0
    stopped = False
    stop = asyncio.Event()
    with _stop_on_signals(stop), _progress(ctx) as progress:
        for pair in pairs:
            if stop.is_set():
                stopped = True
                break
            outcome = await redrive(ctx, pair, args.max, progress, stop)
            stopped = stopped or outcome.stopped
            reports.append({"queue": pair.kind, "dlq": pair.dlq_name, "source": pair.source_name, **asdict(outcome)})
    for report in reports:
        if report["not_deleted"]:
            ctx.out.warn(
                f"{report['not_deleted']} messages were copied to {report['source']} but are still in "
                f"{report['dlq']}; a later redrive would deliver them again"
            )
    for report in reports:
        if report["came_back"]:
            ctx.out.warn(
                f"{report['came_back']} of the messages moved to {report['source']} failed again and are back in "
                f"{report['dlq']}; left there (fix the cause, then redrive again)"
            )
    for report in reports:
        if report["not_closed"]:
            ctx.out.warn(
                f"{report['not_closed']} conversations were reopened but their messages stayed in {report['dlq']}, "
                "and the reopen could not be undone: they show `processing`; redrive again to move the messages"
            )
    if args.json:
        ctx.out.json({"dry_run": False, "stopped": stopped, "queues": reports})
    else:
        for report in reports:
            reopened = f" ({report['reopened']} conversations reopened)" if report["reopened"] else ""
            ctx.out.line(f"moved {report['moved']} messages from {report['dlq']} to {report['source']}{reopened}")
    if stopped:
        ctx.out.warn("stopped by a signal after finishing the batch in hand; run redrive again for the rest")
        return EXIT_INTERRUPTED
    if any(r["not_sent"] for r in reports):
        details = "; ".join(
            f"{r['dlq']}: {sum(r['not_sent'].values())} refused ({', '.join(r['not_sent'])})"
            for r in reports
            if r["not_sent"]
        )
        raise Refused(f"some messages could not be sent and were left in their DLQ: {details}")
    return 0
