"""The composition root: builds every real adapter once, hands them out, closes them in reverse order.

`build(settings)` is an async context manager; the HTTP app and the consumers both
take the `Dependencies` it yields, and tests swap adapters here, not by patching.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp
import httpx2
from prometheus_client import CollectorRegistry

from consumers.metrics import ConsumerMetrics
from consumers.runtime import ConsumerConfig, QueueConsumer
from consumers.template_sender import TemplateSender, TemplateSenderConfig
from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.conversation_store import DynamoConversationStore
from service.adapters.aws.errors import AWS_FAILURES, error_code
from service.adapters.aws.opt_out_registry import DynamoOptOutRegistry
from service.adapters.aws.queue_publisher import SqsPublisher
from service.adapters.aws.request_ledger import DynamoRequestLedger
from service.adapters.aws.secrets_store import SecretsManagerStore
from service.adapters.providers.openai_writer import OpenAiWriter
from service.adapters.providers.sendgrid_sender import SendGridSender
from service.adapters.providers.twilio_client import build_async_http_client
from service.adapters.providers.twilio_sender import TwilioSender
from service.config import CHANNELS, ConfigurationError, Settings
from service.domain.initiation import ConversationInitiator, InitiationPorts
from service.domain.provider_ports import MessageSender
from service.domain.rate_limit import RateLimit, RateLimiter
from service.metrics import ApiMetrics
from service.readiness import Readiness


@dataclass(slots=True)
class Dependencies:
    settings: Settings
    aws: AwsClients
    companies: DynamoCompanyDirectory
    api_keys: DynamoApiKeyStore
    opt_outs: DynamoOptOutRegistry
    ledger: DynamoRequestLedger
    publisher: SqsPublisher
    initiator: ConversationInitiator
    rate_limiter: RateLimiter
    default_rate_limit: RateLimit
    registry: CollectorRegistry
    api_metrics: ApiMetrics
    readiness: Readiness
    stack: AsyncExitStack
    consumers: list[QueueConsumer]

    async def probe_aws(self) -> list[str]:
        """Problems reaching DynamoDB and SQS, empty when both answer."""
        problems: list[str] = []
        try:
            await self.aws.dynamodb.describe_table(TableName=self.settings.company_table)
        except AWS_FAILURES as exc:
            problems.append(f"dynamodb: {error_code(exc) or type(exc).__name__}")
        queue_url = next((u for c in CHANNELS if (u := self.settings.queue_url(c))), None)
        if queue_url:
            try:
                await self.aws.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
            except AWS_FAILURES as exc:
                problems.append(f"sqs: {error_code(exc) or type(exc).__name__}")
        return problems


@asynccontextmanager
async def build(settings: Settings, *, expects_consumers: bool = False) -> AsyncIterator[Dependencies]:
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(settings, stack)
        companies = DynamoCompanyDirectory(aws.dynamodb, settings.company_table, settings.company_cache_ttl_s)
        opt_outs = DynamoOptOutRegistry(aws.dynamodb, settings.opt_out_table)
        ledger = DynamoRequestLedger(aws.dynamodb, settings.idempotency_table, settings.request_idempotency_ttl_s)
        publisher = SqsPublisher(aws.sqs)
        initiator = ConversationInitiator(
            InitiationPorts(companies=companies, opt_outs=opt_outs, ledger=ledger, publisher=publisher),
            {channel: settings.queue_url(channel) for channel in CHANNELS},
            router_version=settings.router_version,
            lease_s=settings.request_claim_lease_s,
            clock=time.time,
        )
        registry = CollectorRegistry()
        consumers = await build_consumers(settings, aws, registry, stack) if expects_consumers else []
        yield Dependencies(
            settings=settings,
            aws=aws,
            companies=companies,
            api_keys=DynamoApiKeyStore(aws.dynamodb, settings.api_keys_table, settings.api_key_cache_ttl_s),
            opt_outs=opt_outs,
            ledger=ledger,
            publisher=publisher,
            initiator=initiator,
            rate_limiter=RateLimiter(),
            default_rate_limit=RateLimit(settings.rate_limit_per_second, settings.rate_limit_burst),
            registry=registry,
            api_metrics=ApiMetrics(registry),
            readiness=Readiness(expects_consumers=expects_consumers),
            stack=stack,
            consumers=consumers,
        )


async def build_consumers(
    settings: Settings, aws: AwsClients, registry: CollectorRegistry, stack: AsyncExitStack
) -> list[QueueConsumer]:
    """One `QueueConsumer` per consumed channel queue, sharing one pool per provider.

    Closing order (the stack unwinds in reverse): consumers stop first (the runner drains them),
    then the OpenAI writer, then the provider HTTP pools, then the AWS clients.
    """
    channels = settings.consumed_channels
    missing = [c for c in channels if not settings.queue_url(c)]
    if missing:
        raise ConfigurationError(
            f"consumers need queue URLs for {', '.join(missing)}: set "
            + ", ".join(f"COMMS_{c.upper()}_QUEUE_URL" for c in missing)
        )
    pool = settings.consumer_concurrency * max(1, len(channels))
    openai_http = httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=pool, max_keepalive_connections=pool),
        timeout=httpx2.Timeout(settings.ai_timeout_s, connect=5.0),
    )
    stack.push_async_callback(openai_http.aclose)
    writer = OpenAiWriter(openai_http, settings.openai_base_url, settings.ai_max_attempts)
    stack.push_async_callback(writer.close)
    twilio = TwilioSender(
        build_async_http_client(settings.provider_timeout_s, pool),
        settings.twilio_base_url,
        settings.provider_timeout_s,
        owns_http_client=True,
    )
    stack.push_async_callback(twilio.close)
    email_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.consumer_concurrency))
    stack.push_async_callback(email_session.close)
    senders: dict[str, MessageSender] = {
        "whatsapp": twilio,
        "sms": twilio,
        "email": SendGridSender(email_session, settings.sendgrid_base_url, settings.provider_timeout_s),
    }
    store = DynamoConversationStore(aws.dynamodb, settings.conversations_table)
    secrets = SecretsManagerStore(aws.secrets, settings.secrets_cache_ttl_s)
    metrics = ConsumerMetrics(registry)
    callback = f"{settings.public_base_url.rstrip('/')}/webhooks/twilio/status" if settings.public_base_url else None
    consumer_config = ConsumerConfig(
        concurrency=settings.consumer_concurrency,
        visibility_timeout_s=settings.visibility_timeout_s,
    )
    consumers: list[QueueConsumer] = []
    for channel in channels:
        processor = TemplateSender(
            TemplateSenderConfig(
                queue=channel,
                processor_version=settings.processor_version,
                claim_lease_s=settings.claim_lease_s,
                ai_timeout_s=settings.ai_timeout_s,
                status_callback_url=callback,
            ),
            store,
            secrets,
            writer,
            senders,
            metrics,
        )
        queue_url = settings.queue_url(channel)
        assert queue_url is not None  # checked above
        consumers.append(QueueConsumer(aws.sqs, queue_url, channel, processor, metrics, consumer_config))
    return consumers
