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

from consumers.contracts import Processor
from consumers.metrics import ConsumerMetrics
from consumers.reply_sender import ReplyPorts, ReplySender, ReplySenderConfig
from consumers.runtime import ConsumerConfig, QueueConsumer
from consumers.sqs_messages import read_redrive_policy
from consumers.template_sender import TemplateSender, TemplateSenderConfig
from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.conversation_store import DynamoConversationStore
from service.adapters.aws.errors import AWS_FAILURES, error_code
from service.adapters.aws.opt_out_registry import DynamoOptOutRegistry
from service.adapters.aws.queue_publisher import SqsPublisher
from service.adapters.aws.reply_store import DynamoReplyStore
from service.adapters.aws.request_ledger import DynamoRequestLedger
from service.adapters.aws.secrets_store import SecretsManagerStore
from service.adapters.aws.stage_store import DynamoStageStore
from service.adapters.providers.openai_writer import OpenAiWriter
from service.adapters.providers.sendgrid_sender import SendGridSender
from service.adapters.providers.twilio_client import build_async_http_client
from service.adapters.providers.twilio_sender import TwilioSender
from service.adapters.providers.twilio_signature import TwilioSignatureVerifier
from service.config import CHANNELS, ConfigurationError, Settings
from service.domain.inbound_intake import InboundIntake, IntakeConfig, IntakePorts
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
    intake: InboundIntake
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


@dataclass(frozen=True, slots=True)
class Shared:
    """Adapters the API side and the consumers both use (one instance per process)."""

    aws: AwsClients
    opt_outs: DynamoOptOutRegistry
    publisher: SqsPublisher
    secrets: SecretsManagerStore
    stage: DynamoStageStore
    replies: DynamoReplyStore


@asynccontextmanager
async def build(settings: Settings, *, expects_consumers: bool = False) -> AsyncIterator[Dependencies]:
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(settings, stack)
        shared = Shared(
            aws=aws,
            opt_outs=DynamoOptOutRegistry(aws.dynamodb, settings.opt_out_table),
            publisher=SqsPublisher(aws.sqs),
            secrets=SecretsManagerStore(aws.secrets, settings.secrets_cache_ttl_s),
            stage=DynamoStageStore(aws.dynamodb, settings.stage_table, settings.lock_table),
            replies=DynamoReplyStore(aws.dynamodb, settings.conversations_table),
        )
        companies = DynamoCompanyDirectory(aws.dynamodb, settings.company_table, settings.company_cache_ttl_s)
        ledger = DynamoRequestLedger(aws.dynamodb, settings.idempotency_table, settings.request_idempotency_ttl_s)
        initiator = ConversationInitiator(
            InitiationPorts(companies=companies, opt_outs=shared.opt_outs, ledger=ledger, publisher=shared.publisher),
            {channel: settings.queue_url(channel) for channel in CHANNELS},
            router_version=settings.router_version,
            lease_s=settings.request_claim_lease_s,
            clock=time.time,
            duplicate_wait_s=settings.duplicate_wait_s,
        )
        intake = InboundIntake(
            IntakePorts(
                conversations=shared.replies,
                companies=companies,
                secrets=shared.secrets,
                suppressions=shared.opt_outs,
                stage=shared.stage,
                publisher=shared.publisher,
                signatures=TwilioSignatureVerifier(),
            ),
            IntakeConfig(settings.replies_queue_url, settings.handoff_queue_url, settings.batching_window_s),
        )
        registry = CollectorRegistry()
        consumers = await build_consumers(settings, shared, registry, stack) if expects_consumers else []
        yield Dependencies(
            settings=settings,
            aws=aws,
            companies=companies,
            api_keys=DynamoApiKeyStore(aws.dynamodb, settings.api_keys_table, settings.api_key_cache_ttl_s),
            opt_outs=shared.opt_outs,
            ledger=ledger,
            publisher=shared.publisher,
            initiator=initiator,
            intake=intake,
            rate_limiter=RateLimiter(),
            default_rate_limit=RateLimit(settings.rate_limit_per_second, settings.rate_limit_burst),
            registry=registry,
            api_metrics=ApiMetrics(registry),
            readiness=Readiness(expects_consumers=expects_consumers),
            stack=stack,
            consumers=consumers,
        )


async def build_consumers(
    settings: Settings, shared: Shared, registry: CollectorRegistry, stack: AsyncExitStack
) -> list[QueueConsumer]:
    """One `QueueConsumer` per consumed queue (channel queues and replies), sharing one pool per provider.

    Closing order (the stack unwinds in reverse): consumers stop first (the runner drains them),
    then the OpenAI writer, then the provider HTTP pools, then the AWS clients.
    """
    queues = settings.consumed_queues
    missing = [q for q in queues if not settings.queue_url(q)]
    if missing:
        raise ConfigurationError(
            f"consumers need queue URLs for {', '.join(missing)}: set "
            + ", ".join(f"COMMS_{q.upper()}_QUEUE_URL" for q in missing)
        )
    pool = settings.consumer_concurrency * max(1, len(queues))
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
    metrics = ConsumerMetrics(registry)
    callback = f"{settings.public_base_url.rstrip('/')}/webhooks/twilio/status" if settings.public_base_url else None
    consumer_config = ConsumerConfig(
        concurrency=settings.consumer_concurrency,
        visibility_timeout_s=settings.visibility_timeout_s,
        wait_time_s=settings.poll_wait_s,
    )
    store = DynamoConversationStore(shared.aws.dynamodb, settings.conversations_table)
    consumers: list[QueueConsumer] = []
    for queue in queues:
        queue_url = settings.queue_url(queue)
        assert queue_url is not None  # checked above
        redrive = await read_redrive_policy(shared.aws.sqs, queue_url, queue)
        processor: Processor
        if queue == "replies":
            processor = ReplySender(
                ReplySenderConfig(
                    queue_url=queue_url,
                    claim_lease_s=settings.claim_lease_s,
                    ai_timeout_s=settings.ai_timeout_s,
                    batching_window_s=settings.batching_window_s,
                    status_callback_url=callback,
                    redrive=redrive,
                ),
                ReplyPorts(
                    conversations=shared.replies,
                    stage=shared.stage,
                    secrets=shared.secrets,
                    ai=writer,
                    senders=senders,
                    suppressions=shared.opt_outs,
                    publisher=shared.publisher,
                ),
                metrics,
            )
        else:
            processor = TemplateSender(
                TemplateSenderConfig(
                    queue=queue,
                    processor_version=settings.processor_version,
                    claim_lease_s=settings.claim_lease_s,
                    ai_timeout_s=settings.ai_timeout_s,
                    status_callback_url=callback,
                    redrive=redrive,
                ),
                store,
                shared.secrets,
                writer,
                senders,
                metrics,
            )
        queue_config = consumer_config.model_copy(update={"dead_letter_queue_url": redrive.dead_letter_url})
        consumers.append(QueueConsumer(shared.aws.sqs, queue_url, queue, processor, metrics, queue_config))
    return consumers
