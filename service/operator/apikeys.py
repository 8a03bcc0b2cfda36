"""`comms apikey issue|revoke|list`: API keys of a company/project in the api-keys table.

`issue` prints the key once and stores only its SHA-256 hash (`service.domain.api_keys`, written
through `DynamoApiKeyStore`). `list` and `revoke` are operator-only reads and writes the service
never needs, so they talk to the table here: a scan filtered by company/project (the table is keyed
by key id only, and a project holds a handful of keys), and a conditional status update.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.dynamo_codec import from_item, to_attribute
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure
from service.domain.api_keys import issue_key, parse_key
from service.domain.ports import ApiKeyRecord
from service.domain.timefmt import utc_iso
from service.operator.companies import read_company
from service.operator.output import Context, NotFound, Refused

ACTIVE = "active"
REVOKED = "revoked"
# Everything but the hash, which never leaves the table.
_LISTED = ("key_id", "company_id", "project_id", "status", "created_at", "revoked_at")


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
    if await read_company(ctx, args.company_id, args.project_id) is None:
        raise NotFound(f"company {args.company_id}/{args.project_id} not found (create it with `comms company create`)")
    key = issue_key()
    created_at = utc_iso(time.time())
    store = DynamoApiKeyStore(ctx.aws.dynamodb, ctx.settings.api_keys_table, cache_ttl_s=0)
    await store.put(ApiKeyRecord(key.key_id, key.secret_hash, args.company_id, args.project_id, ACTIVE), created_at)
    if args.json:
        ctx.out.json(
            {
                "api_key": key.plaintext,
                "key_id": key.key_id,
                "company_id": args.company_id,
                "project_id": args.project_id,
                "status": ACTIVE,
                "created_at": created_at,
            }
        )
    else:
        ctx.out.line(key.plaintext)
    ctx.out.note(
        f"key {key.key_id} issued for {args.company_id}/{args.project_id}: store it now, it is not shown again"
    )
    return 0


def _key_id(given: str) -> str:
    parsed = parse_key(given)
    if parsed:
        return parsed.key_id
    return given.strip().removeprefix("mce_").split("_", 1)[0]


async def revoke_api_key(args: argparse.Namespace, ctx: Context) -> int:
    key_id = _key_id(args.key_id)
    table = ctx.settings.api_keys_table
    stamp = utc_iso(time.time())
    try:
        await ctx.aws.dynamodb.update_item(
            TableName=table,
            Key={"key_id": to_attribute(key_id)},
            UpdateExpression="SET #status = :revoked, revoked_at = :stamp",
            ConditionExpression=(
                "attribute_exists(key_id) AND company_id = :company AND project_id = :project AND #status <> :revoked"
            ),
            ExpressionAttributeNames={"#status": "status"},
            ExpressionAttributeValues={
                ":revoked": to_attribute(REVOKED),
                ":stamp": to_attribute(stamp),
                ":company": to_attribute(args.company_id),
                ":project": to_attribute(args.project_id),
            },
        )
        already = False
    except AWS_FAILURES as exc:
        if not is_conditional_check_failure(exc):
            raise
        answer = await ctx.aws.dynamodb.get_item(
            TableName=table, Key={"key_id": to_attribute(key_id)}, ConsistentRead=True
        )
        item = from_item(answer.get("Item") or {})
        if item.get("company_id") != args.company_id or item.get("project_id") != args.project_id:
            raise NotFound(f"no key {key_id} for {args.company_id}/{args.project_id}") from None
        if item.get("status") != REVOKED:  # changed between the two calls: let the operator look again
            raise Refused(f"key {key_id} changed while revoking it; run the command again") from None
        already, stamp = True, str(item.get("revoked_at", "-"))
    if args.json:
        ctx.out.json({"key_id": key_id, "status": REVOKED, "revoked_at": stamp, "already_revoked": already})
    elif already:
        ctx.out.line(f"key {key_id} was already revoked at {stamp}")
    else:
        ctx.out.line(f"revoked key {key_id} at {stamp}")
        ctx.out.note(f"running services stop accepting it within {ctx.settings.api_key_cache_ttl_s:g} s")
    return 0


async def project_keys(ctx: Context, company_id: str, project_id: str) -> list[dict[str, Any]]:
    """Every key of one project (hash excluded), newest first."""
    request: dict[str, Any] = {
        "TableName": ctx.settings.api_keys_table,
        "FilterExpression": "company_id = :company AND project_id = :project",
        "ProjectionExpression": ", ".join(f"#a{i}" for i in range(len(_LISTED))),
        "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(_LISTED)},
        "ExpressionAttributeValues": {":company": to_attribute(company_id), ":project": to_attribute(project_id)},
    }
    keys: list[dict[str, Any]] = []
    while True:
        answer = await ctx.aws.dynamodb.scan(**request)
        keys += [from_item(item) for item in answer.get("Items", [])]
        last = answer.get("LastEvaluatedKey")
        if not last:
            break
        request["ExclusiveStartKey"] = last
    keys.sort(key=lambda k: (str(k.get("created_at", "")), str(k.get("key_id", ""))), reverse=True)
    return keys


async def list_api_keys(args: argparse.Namespace, ctx: Context) -> int:
    keys = await project_keys(ctx, args.company_id, args.project_id)
    if args.json:
        ctx.out.json({"company_id": args.company_id, "project_id": args.project_id, "keys": keys})
        return 0
    if not keys:
        ctx.out.line(f"no API keys for {args.company_id}/{args.project_id}")
        return 0
    ctx.out.table(
        f"API keys of {args.company_id}/{args.project_id}",
        ["key id", "status", "created at", "revoked at"],
        ([k.get("key_id"), k.get("status", ACTIVE), k.get("created_at"), k.get("revoked_at")] for k in keys),
    )
    return 0
