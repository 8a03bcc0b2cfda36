"""`comms company create|show|update`: company/project records (SPEC §3) in the company-data table.

`create` refuses to replace an existing record unless `--force` (which keeps its `created_at`);
`update` applies a JSON merge patch (RFC 7386: `null` removes a field) to the stored record.
Every write is validated against `CompanyRecord` plus the rules the consumers rely on, and stamps
`updated_at` (and `created_at` on create) as ISO 8601 UTC.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from pydantic import ValidationError

from service.config import CHANNELS
from service.domain.company import CompanyRecord
from service.domain.initiate import is_valid_e164, is_valid_email
from service.domain.timefmt import utc_iso
from service.operator.output import Context, NotFound, Refused, UsageError, read_json_object

# Managed by `comms apikey` in their own table; never written through a company record.
_KEY_ATTRIBUTES = ("api_key_hashes", "api_keys")
_SENDER_FIELDS = {
    "whatsapp": ("company_whatsapp_number", is_valid_e164, "an E.164 number such as +447700900001"),
    "sms": ("company_sms_number", is_valid_e164, "an E.164 number such as +447700900002"),
    "email": ("company_email", is_valid_email, "an email address"),
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    company = commands.add_parser(
        "company",
        help="create, show or update a company/project record",
        description="Company/project records in the company-data table (SPEC §3).",
    )
    actions = company.add_subparsers(dest="action", required=True, metavar="{create,show,update}")

    create = actions.add_parser(
        "create",
        help="store a new record from a JSON file",
        description="Validate and store a new company/project record. Refuses to replace one without --force.",
    )
    create.add_argument("--file", required=True, help="JSON object with company_id, project_id, … ('-' for stdin)")
    create.add_argument("--force", action="store_true", help="replace an existing record (keeps its created_at)")
    create.add_argument("--json", action="store_true", help="print the stored record as JSON")
    create.set_defaults(handler=create_company)

    show = actions.add_parser("show", help="print one record", description="Print one company/project record.")
    _identity_arguments(show, required=True)
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    show.set_defaults(handler=show_company)

    update = actions.add_parser(
        "update",
        help="change a stored record with a JSON merge patch",
        description=(
            "Apply a JSON merge patch (RFC 7386: objects merge, null removes a field) to a stored record, "
            "validate the result and store it with a fresh updated_at."
        ),
    )
    update.add_argument("--file", required=True, help="JSON object with the fields to change ('-' for stdin)")
    _identity_arguments(update, required=False)
    update.add_argument("--json", action="store_true", help="print the stored record as JSON")
    update.set_defaults(handler=update_company)


def _identity_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    suffix = "" if required else " (default: the file's)"
    parser.add_argument("--company-id", required=required, help=f"company id{suffix}")
    parser.add_argument("--project-id", required=required, help=f"project id{suffix}")


def validate_company(data: dict[str, Any]) -> tuple[CompanyRecord, list[str]]:
    """The record, and warnings; `Refused` listing every problem when it cannot be stored."""
    try:
        record = CompanyRecord.model_validate(data)
    except ValidationError as exc:
        errors = [f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}" for err in exc.errors()]
        raise Refused("invalid company record: " + "; ".join(errors)) from None
    warnings: list[str] = []
    channels = [c.lower() for c in record.allowed_channels]
    problems = [
        f"allowed_channels: unknown channel {c!r} (use {', '.join(CHANNELS)})" for c in channels if c not in CHANNELS
    ]
    openai_config = record.ai_config.get("openai_config")
    for channel, (field, valid, shape) in _SENDER_FIELDS.items():
        config = getattr(record.channel_config, channel)
        if config is None:
            if channel in channels:
                problems.append(f"channel_config.{channel}: required because allowed_channels lists {channel}")
            continue
        value = getattr(config, field)
        if not valid(value):
            problems.append(f"channel_config.{channel}.{field}: must be {shape}")
        if channel in channels:
            ai = openai_config.get(channel) if isinstance(openai_config, dict) else None
            if not isinstance(ai, dict) or not ai.get("api_key_reference"):
                warnings.append(
                    f"ai_config.openai_config.{channel}.api_key_reference is missing: "
                    f"{channel} messages will fail until it is set"
                )
    if problems:
        raise Refused("invalid company record: " + "; ".join(problems))
    if not record.is_active:
        warnings.append(f"project_status is {record.project_status!r}: requests are refused until it is 'active'")
    return record, warnings


def refuse_key_attributes(data: dict[str, Any]) -> None:
    named = [name for name in _KEY_ATTRIBUTES if name in data]
    if named:
        raise Refused(f"{', '.join(named)}: API keys are managed with `comms apikey`, not in the company record")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _report_stored(ctx: Context, record: CompanyRecord, warnings: list[str], verb: str, json_mode: bool) -> int:
    for warning in warnings:
        ctx.out.warn(warning)
    if json_mode:
        ctx.out.json(record.model_dump(mode="json", exclude_none=True))
    else:
        ctx.out.line(f"{verb} company {record.company_id}/{record.project_id} at {record.updated_at}")
    return 0


async def create_company(args: argparse.Namespace, ctx: Context) -> int:
    data = read_json_object(args.file, "company record")
    refuse_key_attributes(data)
    stamp = utc_iso(time.time())
    data = {**data, "created_at": stamp, "updated_at": stamp}
    record, warnings = validate_company(data)
    directory = ctx.companies
    if args.force:
        existing = await directory.read(record.company_id, record.project_id)
        if existing and existing.get("created_at"):
            record = record.model_copy(update={"created_at": existing["created_at"]})
        await directory.put(record, overwrite=True)
    elif not await directory.put(record, overwrite=False):
        raise Refused(
            f"company {record.company_id}/{record.project_id} already exists "
            "(use `comms company update` to change it, or --force to replace it)"
        )
    return _report_stored(ctx, record, warnings, "stored" if args.force else "created", args.json)


async def show_company(args: argparse.Namespace, ctx: Context) -> int:
    stored = await ctx.companies.read(args.company_id, args.project_id)
    if stored is None:
        raise NotFound(f"company {args.company_id}/{args.project_id} not found in {ctx.settings.company_table}")
    try:
        validate_company(stored)
    except Refused as exc:
        ctx.out.warn(f"the stored record does not validate: {exc.message}")
    shown = {k: v for k, v in stored.items() if k not in _KEY_ATTRIBUTES}  # hashes stay in the table
    if args.json:
        ctx.out.json(shown)
    else:
        ctx.out.fields(f"{args.company_id}/{args.project_id}", shown)
    return 0


async def update_company(args: argparse.Namespace, ctx: Context) -> int:
    patch = read_json_object(args.file, "company patch")
    refuse_key_attributes(patch)
    company_id = args.company_id or patch.get("company_id")
    project_id = args.project_id or patch.get("project_id")
    if not isinstance(company_id, str) or not isinstance(project_id, str) or not company_id or not project_id:
        raise UsageError("company update: name the record with company_id/project_id in the file or the flags")
    for name, value in (("company_id", company_id), ("project_id", project_id)):
        if name in patch and patch[name] != value:
            raise Refused(f"company update: {name} cannot be changed (create a new record instead)")
    stored = await ctx.companies.read(company_id, project_id)
    if stored is None:
        raise NotFound(f"company {company_id}/{project_id} not found (create it with `comms company create`)")
    merged = merge_patch(stored, {k: v for k, v in patch.items() if k not in ("created_at", "updated_at")})
    merged["updated_at"] = utc_iso(time.time())
    merged.setdefault("created_at", merged["updated_at"])
    record, warnings = validate_company(merged)
    await ctx.companies.put(record, overwrite=True)
    return _report_stored(ctx, record, warnings, "updated", args.json)
