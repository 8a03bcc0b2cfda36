"""The demo tenant of the embedded stack: company/project record, provider secrets, an API key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import ClientError

from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.clients import AwsClients
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.errors import error_code
from service.config import Settings
from service.domain.api_keys import issue_key
from service.domain.company import CompanyRecord
from service.domain.ports import ApiKeyRecord
from service.domain.secret_names import credentials_secret_name, openai_secret_name
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

DEMO_COMPANY_ID = "ci-demo-001"
DEMO_PROJECT_ID = "pi-demo-001"
DEMO_TWILIO_ACCOUNT_SID = "AC" + "0" * 31 + "1"
DEMO_TWILIO_AUTH_TOKEN = "local-demo-auth-token"
DEMO_SENDGRID_KEY = "SG.local-demo-key"
DEMO_OPENAI_KEY = "sk-local-demo"
DEMO_TEMPLATE_SID = "HX" + "0" * 31 + "1"


@dataclass(frozen=True, slots=True)
class DemoTenant:
    company_id: str
    project_id: str
    api_key: str
    secrets: dict[str, dict[str, str]]


def demo_secrets(prefix: str, env: str) -> dict[str, dict[str, str]]:
    twilio = {
        "twilio_account_sid": DEMO_TWILIO_ACCOUNT_SID,
        "twilio_auth_token": DEMO_TWILIO_AUTH_TOKEN,
        "twilio_template_sid": DEMO_TEMPLATE_SID,
    }
    company, project = DEMO_COMPANY_ID, DEMO_PROJECT_ID
    return {
        credentials_secret_name(prefix, "whatsapp", company, project, "twilio", env): twilio,
        credentials_secret_name(prefix, "sms", company, project, "twilio", env): twilio,
        credentials_secret_name(prefix, "email", company, project, "sendgrid", env): {
            "sendgrid_api_key": DEMO_SENDGRID_KEY,
            "from_email": "hello@demo-homes.example",
            "from_name": "Demo Homes",
        },
        **{
            openai_secret_name(prefix, channel, env): {"ai_api_key": DEMO_OPENAI_KEY}
            for channel in ("whatsapp", "sms", "email")
        },
    }


def _ai_channel_config(prefix: str, channel: str, env: str) -> dict[str, Any]:
    return {
        "api_key_reference": openai_secret_name(prefix, channel, env),
        "model": "gpt-4.1-mini",
        "mode": "foreground",
        "requests_per_second": 100,  # the sandbox's key: not an OpenAI account held to its tier's limit
        "template_sender": {
            "instructions": (
                "You write the first message of a conversation for Demo Homes. Fill the template variables: "
                "'1' is the recipient's first name, '2' is one friendly sentence about their enquiry."
            ),
            "variables": ["1", "2"],
        },
        "replies": {"instructions": "You answer the recipient's replies for Demo Homes, briefly and helpfully."},
    }


def demo_company(prefix: str, env: str, now: float) -> CompanyRecord:
    company, project = DEMO_COMPANY_ID, DEMO_PROJECT_ID
    stamp = utc_iso(now)
    return CompanyRecord.model_validate(
        {
            "company_id": company,
            "project_id": project,
            "company_name": "Demo Homes Ltd",
            "project_name": "Spring viewings",
            "project_status": "active",
            "allowed_channels": ["whatsapp", "sms", "email"],
            # No concurrent_conversations cap: a capped project pays two conditional writes per message for its
            # in-flight lease (docs/tenants.md); the demo and the benchmarks measure the uncapped path.
            "rate_limits": {"requests_per_minute": 1200, "burst": 100},
            "company_rep": {"company_rep_1": "Alex Example"},
            "channel_config": {
                "whatsapp": {
                    "company_whatsapp_number": "+447700900001",
                    "whatsapp_credentials_id": credentials_secret_name(
                        prefix, "whatsapp", company, project, "twilio", env
                    ),
                    "whatsapp_template_sid": DEMO_TEMPLATE_SID,
                },
                "sms": {
                    "company_sms_number": "+447700900002",
                    "sms_credentials_id": credentials_secret_name(prefix, "sms", company, project, "twilio", env),
                    # the sandbox's number: not a US long code held to 1 message a second
                    "sends_per_second": 100,
                },
                "email": {
                    "company_email": "hello@demo-homes.example",
                    "email_credentials_id": credentials_secret_name(prefix, "email", company, project, "sendgrid", env),
                    "from_name": "Demo Homes",
                },
            },
            "ai_config": {
                "openai_config": {c: _ai_channel_config(prefix, c, env) for c in ("whatsapp", "sms", "email")}
            },
            "auto_queue_reply_message": False,
            "auto_queue_reply_message_from_number": [],
            "auto_queue_reply_message_from_email": [],
            "created_at": stamp,
            "updated_at": stamp,
        }
    )


async def put_secret(secrets: SecretsManagerClient, name: str, value: dict[str, str]) -> None:
    payload = orjson.dumps(value).decode()
    try:
        await secrets.create_secret(Name=name, SecretString=payload)
    except ClientError as exc:
        if error_code(exc) != "ResourceExistsException":
            raise
        await secrets.put_secret_value(SecretId=name, SecretString=payload)


async def seed_demo_tenant(aws: AwsClients, settings: Settings) -> DemoTenant:
    """The demo company, its secrets and an API key, written through the service's own adapters."""
    companies = DynamoCompanyDirectory(aws.dynamodb, settings.company_table, 0)
    api_keys = DynamoApiKeyStore(aws.dynamodb, settings.api_keys_table, 0)
    prefix, env, secrets = settings.secrets_prefix, settings.environment, aws.secrets
    now = time.time()
    record = demo_company(prefix, env, now)
    await companies.put(record, overwrite=True)
    values = demo_secrets(prefix, env)
    for name, value in values.items():
        await put_secret(secrets, name, value)
    key = issue_key()
    await api_keys.put(
        ApiKeyRecord(key.key_id, key.secret_hash, record.company_id, record.project_id, "active"), utc_iso(now)
    )
    return DemoTenant(record.company_id, record.project_id, key.plaintext, values)
