"""`comms conversation show|list`: conversation records (SPEC §5), read through the table's indexes.

The table's partition key `primary_channel` is the recipient's number (or email), which a
conversation id does not contain. So `show` reads the record directly when `--recipient` is given,
and otherwise finds it through `company-id-project-id-index` (company and project are the first two
parts of the id), then reads it with a consistent GetItem. `list` queries the same index.
"""

from __future__ import annotations

import argparse
from typing import Any

from service.adapters.aws.dynamo_codec import from_item, to_attribute
from service.config import CHANNELS
from service.domain.conversation import ConversationStatus
from service.operator.output import Context, NotFound, UsageError
from service.resources import CONVERSATION_INDEXES

PROJECT_INDEX = next(index for index in CONVERSATION_INDEXES if index.partition_key == "company_id")
STATUSES = [status.value for status in ConversationStatus]
# What `list` reads and prints: a projection, not whole records (messages and context can be large).
_LIST_FIELDS = (
    "conversation_id",
    "primary_channel",
    "channel_method",
    "conversation_status",
    "recipient_first_name",
    "recipient_last_name",
    "created_at",
    "updated_at",
    "task_complete",
    "hand_off_to_human",
    "failure_reason",
)
_SUMMARY_FIELDS = (
    "conversation_id",
    "primary_channel",
    "channel_method",
    "conversation_status",
    "failure_reason",
    "company_id",
    "project_id",
    "company_name",
    "project_name",
    "request_id",
    "recipient_first_name",
    "recipient_last_name",
    "recipient_tel",
    "recipient_email",
    "comms_consent",
    "thread_id",
    "send_state",
    "provider_message_id",
    "task_complete",
    "hand_off_to_human",
    "processing_time_ms",
    "created_at",
    "updated_at",
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conversation = commands.add_parser(
        "conversation",
        help="show one conversation or list a project's conversations",
        description="Conversation records in the conversations table.",
    )
    actions = conversation.add_subparsers(dest="action", required=True, metavar="{show,list}")

    show = actions.add_parser(
        "show",
        help="one conversation with its messages",
        description=(
            "Show one conversation. With --recipient (the record's primary_channel: the recipient's E.164 number, "
            "or email) it is one read; without, it is found through the company/project index."
        ),
    )
    show.add_argument("conversation_id", help="company_id#project_id#request_id#component")
    show.add_argument("--recipient", "--primary-channel", dest="recipient", help="the recipient's number or email")
    show.add_argument("--channel", choices=CHANNELS, help="only a conversation on this channel")
    show.add_argument("--json", action="store_true", help="print the whole record as JSON")
    show.set_defaults(handler=show_conversation)

    listing = actions.add_parser(
        "list",
        help="a project's conversations, newest first",
        description="List a project's conversations (newest first) through the company/project index.",
    )
    listing.add_argument("--company-id", required=True)
    listing.add_argument("--project-id", required=True)
    listing.add_argument("--status", choices=STATUSES, help="only conversations in this status")
    listing.add_argument("--channel", choices=CHANNELS, help="only conversations on this channel")
    listing.add_argument("--limit", type=int, default=50, help="at most N conversations (default 50)")
    listing.add_argument("--json", action="store_true", help="print the conversations as JSON")
    listing.set_defaults(handler=list_conversations)


async def _query_project(
    ctx: Context,
    company_id: str,
    project_id: str,
    filters: dict[str, str],
    projection: tuple[str, ...] | None,
    first_only: bool = False,
) -> list[dict[str, Any]]:
    """Every item of one project's index partition matching `filters` (attribute = value), all pages."""
    names = {"#company": PROJECT_INDEX.partition_key, "#project": str(PROJECT_INDEX.sort_key)}
    values = {":company": to_attribute(company_id), ":project": to_attribute(project_id)}
    conditions = []
    for index, (attribute, value) in enumerate(filters.items()):
        names[f"#f{index}"] = attribute
        values[f":f{index}"] = to_attribute(value)
        conditions.append(f"#f{index} = :f{index}")
    request: dict[str, Any] = {
        "TableName": ctx.settings.conversations_table,
        "IndexName": PROJECT_INDEX.name,
        "KeyConditionExpression": "#company = :company AND #project = :project",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }
    if conditions:
        request["FilterExpression"] = " AND ".join(conditions)
    if projection:
        for index, attribute in enumerate(projection):
            names[f"#p{index}"] = attribute
        request["ProjectionExpression"] = ", ".join(f"#p{i}" for i in range(len(projection)))
    items: list[dict[str, Any]] = []
    while True:
        answer = await ctx.aws.dynamodb.query(**request)
        items += [from_item(item) for item in answer.get("Items", [])]
        last = answer.get("LastEvaluatedKey")
        if not last or (first_only and items):
            return items
        request["ExclusiveStartKey"] = last


async def _get(ctx: Context, primary_channel: str, conversation_id: str) -> dict[str, Any] | None:
    answer = await ctx.aws.dynamodb.get_item(
        TableName=ctx.settings.conversations_table,
        Key={"primary_channel": to_attribute(primary_channel), "conversation_id": to_attribute(conversation_id)},
        ConsistentRead=True,
    )
    item = answer.get("Item")
    return from_item(item) if item else None


async def find_conversation(
    ctx: Context, conversation_id: str, recipient: str | None, channel: str | None
) -> dict[str, Any] | None:
    if recipient:
        record = await _get(ctx, recipient, conversation_id)
    else:
        parts = conversation_id.split("#")
        if len(parts) < 4 or not all(parts):
            raise UsageError(f"{conversation_id!r} is not a conversation id (company_id#project_id#request_id#…)")
        found = await _query_project(
            ctx, parts[0], parts[1], {"conversation_id": conversation_id}, ("primary_channel",), first_only=True
        )
        # The index is eventually consistent; the table read is not.
        record = await _get(ctx, found[0]["primary_channel"], conversation_id) if found else None
    if record is not None and channel and record.get("channel_method") != channel:
        return None
    return record


def _token_text(message: dict[str, Any]) -> str:
    total = message.get("total_tokens")
    if total is None:
        return "-"
    return f"{total} ({message.get('prompt_tokens', '?')}+{message.get('completion_tokens', '?')})"


async def show_conversation(args: argparse.Namespace, ctx: Context) -> int:
    record = await find_conversation(ctx, args.conversation_id, args.recipient, args.channel)
    if record is None:
        where = f" for recipient {args.recipient}" if args.recipient else ""
        on = f" on {args.channel}" if args.channel else ""
        raise NotFound(f"conversation {args.conversation_id}{where}{on} not found")
    if args.json:
        ctx.out.json(record)
        return 0
    summary = {name: record[name] for name in _SUMMARY_FIELDS if name in record}
    ctx.out.fields("Conversation", summary)
    messages = record.get("messages") or []
    if not messages:
        ctx.out.line("no messages yet")
        return 0
    ctx.out.table(
        f"Messages ({len(messages)})",
        ["time", "role", "message id", "delivery", "tokens", "content"],
        (
            [
                m.get("timestamp"),
                m.get("role"),
                m.get("message_id"),
                m.get("delivery_status") or m.get("status"),
                _token_text(m),
                m.get("content"),
            ]
            for m in messages
            if isinstance(m, dict)
        ),
        no_wrap=False,
    )
    return 0


async def list_conversations(args: argparse.Namespace, ctx: Context) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    filters: dict[str, str] = {}
    if args.status:
        filters["conversation_status"] = args.status
    if args.channel:
        filters["channel_method"] = args.channel
    items = await _query_project(ctx, args.company_id, args.project_id, filters, _LIST_FIELDS)
    items.sort(key=lambda item: (str(item.get("created_at", "")), str(item.get("conversation_id"))), reverse=True)
    shown = items[: args.limit]
    if args.json:
        ctx.out.json(
            {
                "company_id": args.company_id,
                "project_id": args.project_id,
                "matched": len(items),
                "count": len(shown),
                "conversations": shown,
            }
        )
        return 0
    if not shown:
        ctx.out.line(f"no conversations for {args.company_id}/{args.project_id}" + _filter_text(args))
        return 0
    ctx.out.table(
        f"Conversations of {args.company_id}/{args.project_id}{_filter_text(args)} "
        f"({len(shown)} of {len(items)}, newest first)",
        ["conversation id", "channel", "recipient", "status", "created at", "updated at"],
        (
            [
                item.get("conversation_id"),
                item.get("channel_method"),
                item.get("primary_channel"),
                item.get("conversation_status"),
                item.get("created_at"),
                item.get("updated_at"),
            ]
            for item in shown
        ),
    )
    return 0


def _filter_text(args: argparse.Namespace) -> str:
    parts = [f"status {args.status}" if args.status else "", f"channel {args.channel}" if args.channel else ""]
    joined = ", ".join(p for p in parts if p)
    return f" ({joined})" if joined else ""
