"""Create the service's tables and queues on an AWS endpoint and return settings that name them."""

from __future__ import annotations

from contextlib import AsyncExitStack

from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.provisioning import provision
from service.config import Settings
from service.resources import queue_specs, table_specs


async def provision_resources(settings: Settings, queue_prefix: str | None = None) -> Settings:
    """Idempotently create every resource; the returned settings carry the queue URLs."""
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(settings, stack)
        urls = await provision(
            aws.dynamodb,
            aws.sqs,
            table_specs(settings),
            queue_specs(queue_prefix or settings.secrets_prefix, settings.visibility_timeout_s),
        )
    return settings.model_copy(
        update={
            "whatsapp_queue_url": urls["whatsapp"],
            "sms_queue_url": urls["sms"],
            "email_queue_url": urls["email"],
            "replies_queue_url": urls["replies"],
            "handoff_queue_url": urls["handoff"],
        }
    )
