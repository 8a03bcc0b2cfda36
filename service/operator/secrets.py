"""`comms secrets create|create-openai`: provider credentials in Secrets Manager, named by convention.

Names (the same functions the local stack seeds with):
  <prefix>/<channel>-credentials/<company>/<project>/<provider>-<env>   Twilio or SendGrid credentials
  <prefix>/openai-api-key/<channel>-<env>                              the OpenAI key for a channel

The value is a JSON object of strings read from `--from-file` or stdin, never from the command line, and
is never printed. An existing secret is refused unless `--force`, which stores a new version.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

import orjson
from botocore.exceptions import ClientError

from service.adapters.aws.errors import error_code
from service.config import CHANNELS
from service.domain.initiate import is_valid_email
from service.domain.secret_names import credentials_secret_name, openai_secret_name
from service.operator.output import Context, Refused, UsageError, read_json_object

PROVIDERS = ("twilio", "sendgrid")
PROVIDER_FOR_CHANNEL = {"whatsapp": "twilio", "sms": "twilio", "email": "sendgrid"}

# A name segment: what Secrets Manager allows in a name, minus the "/" that separates segments.
_SEGMENT = re.compile(r"^[A-Za-z0-9_+=.@-]+$")
_TWILIO_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_TWILIO_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")


def _non_empty(value: str) -> bool:
    return bool(value.strip())


# secret kind -> field -> (required, check, shape shown in the error)
Shape = dict[str, tuple[bool, Callable[[str], bool], str]]
SECRET_SHAPES: dict[str, Shape] = {
    "twilio": {
        "twilio_account_sid": (True, lambda v: bool(_TWILIO_ACCOUNT_SID.match(v)), "AC followed by 32 hex digits"),
        "twilio_auth_token": (True, _non_empty, "a non-empty string"),
        "twilio_template_sid": (False, lambda v: bool(_TWILIO_CONTENT_SID.match(v)), "HX followed by 32 hex digits"),
    },
    "sendgrid": {
        "sendgrid_api_key": (True, _non_empty, "a non-empty string"),
        "from_email": (False, is_valid_email, "an email address"),
        "from_name": (False, _non_empty, "a non-empty string"),
    },
    "openai": {"ai_api_key": (True, _non_empty, "a non-empty string")},
}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    secrets = commands.add_parser(
        "secrets",
        help="store provider credentials in Secrets Manager",
        description="Store provider credentials under the naming convention. Values come from stdin or a file.",
    )
    actions = secrets.add_subparsers(dest="action", required=True, metavar="{create,create-openai}")

    create = actions.add_parser(
        "create",
        help="Twilio/SendGrid credentials for a company/project channel",
        description=(
            "Store <prefix>/<channel>-credentials/<company>/<project>/<provider>-<env>. "
            'Twilio: {"twilio_account_sid","twilio_auth_token"[,"twilio_template_sid"]}; '
            'SendGrid: {"sendgrid_api_key"[,"from_email","from_name"]}.'
        ),
    )
    create.add_argument("--company-id", required=True)
    create.add_argument("--project-id", required=True)
    create.add_argument("--channel", required=True, choices=CHANNELS)
    create.add_argument("--provider", choices=PROVIDERS, help="default: twilio for whatsapp/sms, sendgrid for email")
    _value_arguments(create)
    create.set_defaults(handler=create_credentials)

    openai = actions.add_parser(
        "create-openai",
        help="the OpenAI API key for a channel",
        description='Store <prefix>/openai-api-key/<channel>-<env> holding {"ai_api_key": "..."}.',
    )
    openai.add_argument("--channel", required=True, choices=CHANNELS)
    _value_arguments(openai)
    openai.set_defaults(handler=create_openai)


def _value_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-file", metavar="FILE", help="JSON file with the value (default: read stdin)")
    parser.add_argument("--force", action="store_true", help="store a new version when the secret exists")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def validate_secret(kind: str, value: dict[str, Any], what: str) -> None:
    """`Refused` naming every problem with a secret value, by field name only (never the value)."""
    shape = SECRET_SHAPES[kind]
    problems = [f"{field}: unknown field (expected {', '.join(shape)})" for field in value if field not in shape]
    for field, (required, check, description) in shape.items():
        if field not in value:
            if required:
                problems.append(f"{field}: required")
            continue
        item = value[field]
        if not isinstance(item, str) or not check(item):
            problems.append(f"{field}: must be {description}")
    if problems:
        raise Refused(f"invalid {what}: " + "; ".join(problems))


def _segment(name: str, value: str) -> str:
    if not _SEGMENT.match(value):
        raise UsageError(f"--{name}: {value!r} cannot be part of a secret name (letters, digits and _+=.@- only)")
    return value


async def _store(
    ctx: Context, name: str, value: dict[str, Any], *, force: bool, tags: dict[str, str]
) -> dict[str, Any]:
    payload = orjson.dumps(value).decode()
    secrets = ctx.aws.secrets
    try:
        created = await secrets.create_secret(
            Name=name,
            SecretString=payload,
            Description="AI Multi-Comms Engine provider credentials (comms secrets)",
            Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        )
        return {"name": name, "arn": created.get("ARN"), "version_id": created.get("VersionId"), "created": True}
    except ClientError as exc:
        code = error_code(exc)
        if code == "InvalidRequestException":
            # e.g. scheduled for deletion; AWS's message names the secret, never its value.
            raise Refused(f"secret {name}: {exc.response.get('Error', {}).get('Message', code)}") from None
        if code != "ResourceExistsException":
            raise
    if not force:
        raise Refused(f"secret {name} already exists (use --force to store a new version)")
    updated = await secrets.put_secret_value(SecretId=name, SecretString=payload)
    return {"name": name, "arn": updated.get("ARN"), "version_id": updated.get("VersionId"), "created": False}


def _report(ctx: Context, result: dict[str, Any], json_mode: bool) -> int:
    if json_mode:
        ctx.out.json(result)
    else:
        verb = "created" if result["created"] else "stored a new version of"
        ctx.out.line(f"{verb} secret {result['name']} (version {result['version_id']})")
    return 0


async def create_credentials(args: argparse.Namespace, ctx: Context) -> int:
    channel: str = args.channel
    provider: str = args.provider or PROVIDER_FOR_CHANNEL[channel]
    if provider != PROVIDER_FOR_CHANNEL[channel]:
        raise UsageError(f"--provider {provider} does not serve {channel} (use {PROVIDER_FOR_CHANNEL[channel]})")
    company_id = _segment("company-id", args.company_id)
    project_id = _segment("project-id", args.project_id)
    value = read_json_object(args.from_file, f"{provider} credentials")
    validate_secret(provider, value, f"{provider} credentials")
    if channel == "whatsapp" and "twilio_template_sid" not in value:
        ctx.out.warn("no twilio_template_sid: channel_config.whatsapp.whatsapp_template_sid must name the template")
    settings = ctx.settings
    name = credentials_secret_name(
        settings.secrets_prefix, channel, company_id, project_id, provider, settings.environment
    )
    tags = {
        "company_id": company_id,
        "project_id": project_id,
        "channel": channel,
        "provider": provider,
        "environment": settings.environment,
    }
    result = await _store(ctx, name, value, force=args.force, tags=tags)
    await _check_company_points_at(ctx, company_id, project_id, channel, name)
    return _report(ctx, result, args.json)


async def create_openai(args: argparse.Namespace, ctx: Context) -> int:
    value = read_json_object(args.from_file, "OpenAI key")
    validate_secret("openai", value, "OpenAI key secret")
    settings = ctx.settings
    name = openai_secret_name(settings.secrets_prefix, args.channel, settings.environment)
    tags = {"channel": args.channel, "provider": "openai", "environment": settings.environment}
    result = await _store(ctx, name, value, force=args.force, tags=tags)
    return _report(ctx, result, args.json)


async def _check_company_points_at(ctx: Context, company_id: str, project_id: str, channel: str, name: str) -> None:
    """Warn when the company record does not (yet) name this secret, so the operator knows what to set."""
    field = f"channel_config.{channel}.{channel}_credentials_id"
    record = await ctx.companies.read(company_id, project_id)
    if record is None:
        ctx.out.warn(f"company {company_id}/{project_id} does not exist yet: set {field} to {name} when creating it")
        return
    config = (record.get("channel_config") or {}).get(channel) or {}
    if config.get(f"{channel}_credentials_id") != name:
        ctx.out.warn(f"{company_id}/{project_id} {field} does not name this secret: set it to {name}")
