"""`comms conversation show|list`: conversation records (SPEC §5), read through `ConversationAdmin`.

`show` reads the record directly when `--recipient` (its partition key) is given, and otherwise finds it
through the company/project index (company and project are the first two parts of the id). `list` queries
the same index.
"""

from __future__ import annotations

import argparse

from service.adapters.aws.conversation_admin import summary
from service.config import CHANNELS
from service.domain.conversation import ConversationKey, ConversationStatus, Message
from service.operator.output import Context, NotFound, UsageError

STATUSES = [status.value for status in ConversationStatus]


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
    show.add_argument("--json", action="store_true", help="print the stored record as JSON")
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


def _token_text(message: Message) -> str:
    usage = message.usage
    return "-" if usage is None else f"{usage.total_tokens} ({usage.prompt_tokens}+{usage.completion_tokens})"


async def show_conversation(args: argparse.Namespace, ctx: Context) -> int:
    conversation_id: str = args.conversation_id
    if args.recipient:
        record = await ctx.conversations.get(ConversationKey(args.recipient, conversation_id))
    else:
        parts = conversation_id.split("#")
        if len(parts) < 4 or not all(parts):
            raise UsageError(f"{conversation_id!r} is not a conversation id (company_id#project_id#request_id#…)")
        record = await ctx.conversations.find(parts[0], parts[1], conversation_id)
    if record is None or (args.channel and record.channel != args.channel):
        where = f" for recipient {args.recipient}" if args.recipient else ""
        on = f" on {args.channel}" if args.channel else ""
        raise NotFound(f"conversation {conversation_id}{where}{on} not found")
    if args.json:
        ctx.out.json(record.shared_fields)
        return 0
    ctx.out.fields("Conversation", summary(record))
    if not record.messages:
        ctx.out.line("no messages yet")
        return 0
    ctx.out.table(
        f"Messages ({len(record.messages)})",
        ["time", "role", "message id", "delivery", "tokens", "content"],
        ([m.timestamp, m.role, m.message_id, m.delivery_status, _token_text(m), m.content] for m in record.messages),
        no_wrap=False,
    )
    return 0


async def list_conversations(args: argparse.Namespace, ctx: Context) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    status = ConversationStatus(args.status) if args.status else None
    records = await ctx.conversations.list_project(args.company_id, args.project_id, status, args.channel)
    shown = records[: args.limit]
    if args.json:
        ctx.out.json(
            {
                "company_id": args.company_id,
                "project_id": args.project_id,
                "matched": len(records),
                "count": len(shown),
                "conversations": [record.shared_fields for record in shown],
            }
        )
        return 0
    if not shown:
        ctx.out.line(f"no conversations for {args.company_id}/{args.project_id}" + _filter_text(args))
        return 0
    ctx.out.table(
        f"Conversations of {args.company_id}/{args.project_id}{_filter_text(args)} "
        f"({len(shown)} of {len(records)}, newest first)",
        ["conversation id", "channel", "recipient", "status", "created at", "updated at"],
        (
            [r.key.conversation_id, r.channel, r.key.primary_channel, r.status.value, r.created_at, r.updated_at]
            for r in shown
        ),
    )
    return 0


def _filter_text(args: argparse.Namespace) -> str:
    parts = [f"{name} {value}" for name, value in (("status", args.status), ("channel", args.channel)) if value]
    return f" ({', '.join(parts)})" if parts else ""
