"""`comms apikey issue|revoke|list`: API keys of a company/project in the api-keys table.

`issue` prints the key once and stores only its SHA-256 hash (`service.domain.api_keys`). Every read and
write goes through `DynamoApiKeyAdmin`; `list` never shows the hash.
"""

from __future__ import annotations

import argparse
import time

from service.adapters.aws.api_key_admin import REVOKED, StoredApiKey
from service.adapters.aws.api_key_store import ACTIVE
from service.domain.api_keys import issue_key, parse_key
from service.domain.ports import ApiKeyRecord
from service.domain.timefmt import utc_iso
from service.operator.output import Context, NotFound, Refused


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apikey = commands.add_parser(
        "apikey",
        help="issue, revoke or list API keys of a company/project",
        description="API keys for POST /initiate-conversation. Only a hash of each key is stored.",
    )
    actions = apikey.add_subparsers(dest="action", required=True, metavar="{issue,revoke,list}")

    issue = actions.add_parser(
        "issue",
        help="issue a new key and print it once",
        description="Issue a key bound to one company/project. The key is printed once; only its hash is stored.",
    )
    _identity(issue)
    issue.add_argument("--json", action="store_true", help="print the key and its id as JSON")
    issue.set_defaults(handler=issue_api_key)

    revoke = actions.add_parser(
        "revoke",
        help="revoke a key",
        description="Revoke a key. Running services stop accepting it within COMMS_API_KEY_CACHE_TTL_S.",
    )
    _identity(revoke)
    revoke.add_argument("--key-id", required=True, help="the key id (the part after mce_), or the whole key")
    revoke.add_argument("--json", action="store_true", help="print the result as JSON")
    revoke.set_defaults(handler=revoke_api_key)

    listing = actions.add_parser("list", help="list a project's keys", description="List a project's keys.")
    _identity(listing)
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    listing.set_defaults(handler=list_api_keys)


def _identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--company-id", required=True)
    parser.add_argument("--project-id", required=True)


async def issue_api_key(args: argparse.Namespace, ctx: Context) -> int:
    if await ctx.companies.read(args.company_id, args.project_id) is None:
        raise NotFound(f"company {args.company_id}/{args.project_id} not found (create it with `comms company create`)")
    key, created_at = issue_key(), utc_iso(time.time())
    record = ApiKeyRecord(key.key_id, key.secret_hash, args.company_id, args.project_id, ACTIVE)
    await ctx.api_keys.put(record, created_at)
    if args.json:
        shown = StoredApiKey(key.key_id, args.company_id, args.project_id, ACTIVE, created_at)
        ctx.out.json({"api_key": key.plaintext, **shown.fields()})
    else:
        ctx.out.line(key.plaintext)
    ctx.out.note(
        f"key {key.key_id} issued for {args.company_id}/{args.project_id}: store it now, it is not shown again"
    )
    return 0


async def revoke_api_key(args: argparse.Namespace, ctx: Context) -> int:
    parsed = parse_key(args.key_id)  # the whole key, or only its id
    key_id = parsed.key_id if parsed else args.key_id.strip().removeprefix("mce_").split("_", 1)[0]
    store = ctx.api_keys
    stamp = utc_iso(time.time())
    already = not await store.revoke(key_id, args.company_id, args.project_id, stamp)
    if already:
        stored = await store.get(key_id)
        if stored is None or (stored.company_id, stored.project_id) != (args.company_id, args.project_id):
            raise NotFound(f"no key {key_id} for {args.company_id}/{args.project_id}")
        if stored.status != REVOKED:  # changed between the two calls: let the operator look again
            raise Refused(f"key {key_id} changed while revoking it; run the command again")
        stamp = stored.revoked_at or "-"
    if args.json:
        ctx.out.json({"key_id": key_id, "revoked_at": stamp, "already_revoked": already, "status": REVOKED})
    elif already:
        ctx.out.line(f"key {key_id} was already revoked at {stamp}")
    else:
        ctx.out.line(f"revoked key {key_id} at {stamp}")
        ctx.out.note(f"running services stop accepting it within {ctx.settings.api_key_cache_ttl_s:g} s")
    return 0


async def list_api_keys(args: argparse.Namespace, ctx: Context) -> int:
    keys = await ctx.api_keys.list_keys(args.company_id, args.project_id)
    if args.json:
        ctx.out.json({"company_id": args.company_id, "project_id": args.project_id, "keys": [k.fields() for k in keys]})
        return 0
    if not keys:
        ctx.out.line(f"no API keys for {args.company_id}/{args.project_id}")
        return 0
    ctx.out.table(
        f"API keys of {args.company_id}/{args.project_id}",
        ["key id", "status", "created at", "revoked at"],
        ([k.key_id, k.status, k.created_at, k.revoked_at] for k in keys),
    )
    return 0
