"""The composition root: builds every adapter once, wires the use cases and consumers, closes them in reverse.

`build(settings, **overrides)` is an async context manager (the shape of cosmicpython's bootstrap): any port
named in `Adapters` may be given instead of the real adapter (`build(settings, ai=FakeAiWriter())`), so tests
and the benchmark wire nothing by hand. The HTTP app, the runner and the operator commands all take the
`Dependencies` it yields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from consumers.contracts import Processor
from consumers.metrics import ConsumerMetrics
from consumers.reply_sender import ReplyPorts, ReplySender, ReplySenderConfig
from consumers.runtime import ConsumerConfig, QueueConsumer
from consumers.sqs_messages import StartupRetry, read_redrive_policy
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from service import tracing
from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.conversation_lookup import DynamoConversationLookup
from service.adapters.aws.errors import AWS_FAILURES, error_code
from service.adapters.aws.inflight_leases import DynamoInflightLeases
from service.adapters.aws.opt_out_registry import DynamoOptOutRegistry
from service.adapters.aws.queue_publisher import SqsPublisher
from service.adapters.aws.reply_claims import DynamoReplyClaims
from service.adapters.aws.request_ledger import DynamoRequestLedger
from service.adapters.aws.secrets_store import SecretsManagerStore
from service.adapters.aws.stage_store import DynamoReplyStage
from service.adapters.aws.token_leases import DynamoTokenLeases
from service.adapters.providers.openai_writer import OpenAiWriter, pooled_http_client
from service.adapters.providers.sendgrid_sender import SendGridSender
from service.adapters.providers.twilio_client import build_async_http_client
from service.adapters.providers.twilio_sender import TwilioSender
from service.adapters.providers.twilio_signature import TwilioSignatureVerifier
from service.config import (
    CHANNELS,
    FINISH_TIMEOUT_S,
    HTTP_SHUTDOWN_S,
    PROTECTED_GRACE_S,
    RECEIVE_MARGIN_S,
    ConfigurationError,
    Settings,
)
from service.domain.ai_pacing import paced_ai_writer
from service.domain.concurrency_cap import ConcurrencyCap, InflightLeases
from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.inbound_intake import InboundIntake, IntakeConfig, IntakePorts
from service.domain.initiation import ConversationInitiator, InitiationPorts
from service.domain.pacing import SendPacing
from service.domain.ports import (
    AiWriter,
    ApiKeyStore,
    CompanyDirectory,
    ConversationClaims,
    ConversationLookup,
    MessagePublisher,
    MessageSender,
    OptOutRegistry,
    ReplyClaims,
    ReplyStage,
    RequestLedger,
    SecretStore,
    SignatureVerifier,
    TokenLeases,
)
from service.domain.rate_limit import KeyRateLimit, RateLimit, ReplicaRateLimiter
from service.metrics import ApiMetrics
from service.readiness import Readiness

OPENAI_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Adapters:
    """One implementation of every port, shared by the API side and the consumers of a process."""

    companies: CompanyDirectory
    api_keys: ApiKeyStore
    opt_outs: OptOutRegistry
    ledger: RequestLedger
    publisher: MessagePublisher
    secrets: SecretStore
    conversation_claims: ConversationClaims
    reply_claims: ReplyClaims
    conversations: ConversationLookup
    stage: ReplyStage
    signatures: SignatureVerifier
    token_leases: TokenLeases
    inflight_leases: InflightLeases
    ai: AiWriter | None = None  # built with the consumers (their connection pools are sized for them)
    senders: Mapping[str, MessageSender] | None = None


ADAPTER_NAMES = frozenset(f.name for f in fields(Adapters))


@dataclass(slots=True)
class Dependencies:
    settings: Settings
    aws: AwsClients
    adapters: Adapters
    initiator: ConversationInitiator
    intake: InboundIntake
    rate_limiter: KeyRateLimit
    default_rate_limit: RateLimit
    registry: CollectorRegistry
    api_metrics: ApiMetrics
    readiness: Readiness
    consumers: list[QueueConsumer]

    @property
    def companies(self) -> CompanyDirectory:
        return self.adapters.companies

    @property
    def api_keys(self) -> ApiKeyStore:
        return self.adapters.api_keys

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


def aws_adapters(settings: Settings, aws: AwsClients, clock: Callable[[], float] = time.time) -> Adapters:
    """The real adapter of every AWS-backed port (the provider clients come with the consumers)."""
    dynamodb = aws.dynamodb
    return Adapters(
        companies=DynamoCompanyDirectory(dynamodb, settings.company_table, settings.company_cache_ttl_s),
        api_keys=DynamoApiKeyStore(dynamodb, settings.api_keys_table, settings.api_key_cache_ttl_s),
        opt_outs=DynamoOptOutRegistry(dynamodb, settings.opt_out_table),
        ledger=DynamoRequestLedger(dynamodb, settings.idempotency_table, settings.request_idempotency_ttl_s),
        publisher=SqsPublisher(aws.sqs),
        secrets=SecretsManagerStore(aws.secrets, settings.secrets_cache_ttl_s),
        conversation_claims=DynamoConversationClaims(
            dynamodb,
            settings.conversations_table,
            clock,
            messages_table=settings.messages_table,
            index_shards=settings.conversation_index_shards,
        ),
        reply_claims=DynamoReplyClaims(
            dynamodb, settings.conversations_table, clock, messages_table=settings.messages_table
        ),
        conversations=DynamoConversationLookup(
            dynamodb, settings.conversations_table, clock=clock, messages_table=settings.messages_table
        ),
        stage=DynamoReplyStage(dynamodb, settings.stage_table, settings.lock_table),
        signatures=TwilioSignatureVerifier(),
        token_leases=DynamoTokenLeases(dynamodb, settings.rate_limits_table),
        inflight_leases=DynamoInflightLeases(dynamodb, settings.rate_limits_table),
    )


def send_pacing(settings: Settings, leases: TokenLeases) -> SendPacing:
    """Each sender number's pace, shared by every worker (the rate-limits table); channels at 0 are not paced."""
    defaults = {"whatsapp": settings.whatsapp_sends_per_second, "sms": settings.sms_sends_per_second}
    return SendPacing(
        FleetRateLimiter(leases, time.time),
        {channel: rate for channel, rate in defaults.items() if rate > 0},
        asyncio.sleep,
        max_wait_s=settings.send_pace_max_wait_s,
    )


def concurrency_cap(settings: Settings, adapters: Adapters) -> ConcurrencyCap:
    """Each project's concurrent_conversations across the fleet: company records from the cached directory, the
    in-flight leases in the rate-limits table, lasting as long as a claim (and refreshed with it)."""
    return ConcurrencyCap(
        adapters.companies,
        adapters.inflight_leases,
        time.time,
        lease_s=settings.claim_lease_s,
        defer_s=settings.concurrency_defer_s,
    )


def key_rate_limit(settings: Settings, leases: TokenLeases) -> KeyRateLimit:
    """The per-API-key limit: shared by the fleet (tokens leased from the rate-limits table), or per replica."""
    if settings.rate_limit_scope == "replica":
        return ReplicaRateLimiter(time.monotonic)
    return FleetRateLimiter(leases, time.time, horizon_s=settings.rate_limit_lease_horizon_s)


@asynccontextmanager
async def build(
    settings: Settings, *, expects_consumers: bool = False, startup: StartupRetry | None = None, **overrides: Any
) -> AsyncIterator[Dependencies]:
    """Every adapter and use case of one process; `overrides` replace adapters by their `Adapters` name.
    `startup` makes building the consumers wait for an SQS that does not answer (until its `stop` is set,
    then `StartupStopped`); without it such a queue's RedrivePolicy counts as unreadable."""
    unknown = set(overrides) - ADAPTER_NAMES
    if unknown:
        raise TypeError(f"build() got adapters it does not know: {', '.join(sorted(unknown))}")
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(settings, stack)
        if tracing.active_tracer() is not None:  # CLIENT spans for every AWS call (botocore events per client)
            for client in (aws.dynamodb, aws.sqs, aws.secrets):
                tracing.trace_aws_client(client)
        adapters = replace(aws_adapters(settings, aws), **overrides)
        registry = CollectorRegistry()
        consumers: list[QueueConsumer] = []
        if expects_consumers:
            adapters = await _with_providers(settings, adapters, stack)
            consumers = await build_consumers(settings, aws, adapters, registry, startup)
        initiator = ConversationInitiator(
            InitiationPorts(adapters.companies, adapters.opt_outs, adapters.ledger, adapters.publisher),
            {channel: settings.queue_url(channel) for channel in CHANNELS},
            lease_s=settings.request_claim_lease_s,
            clock=time.time,
            duplicate_wait_s=settings.duplicate_wait_s,
        )
        # Before the clients close: the request-ledger completions still running (none left when the runner
        # settled them already; a bench or a test building its own wiring gets the same wait).
        stack.push_async_callback(initiator.settle, HTTP_SHUTDOWN_S)
        yield Dependencies(
            settings=settings,
            aws=aws,
            adapters=adapters,
            initiator=initiator,
            intake=InboundIntake(
                IntakePorts(
                    conversations=adapters.conversations,
                    companies=adapters.companies,
                    secrets=adapters.secrets,
                    opt_outs=adapters.opt_outs,
                    stage=adapters.stage,
                    publisher=adapters.publisher,
                    signatures=adapters.signatures,
                ),
                IntakeConfig(settings.replies_queue_url, settings.handoff_queue_url, settings.batching_window_s),
            ),
            rate_limiter=key_rate_limit(settings, adapters.token_leases),
            default_rate_limit=RateLimit(settings.rate_limit_per_second, settings.rate_limit_burst),
            registry=registry,
            api_metrics=ApiMetrics(registry),
            readiness=Readiness(expects_consumers=expects_consumers),
            consumers=consumers,
        )


async def _with_providers(settings: Settings, adapters: Adapters, stack: AsyncExitStack) -> Adapters:
    """The OpenAI writer and the message senders, unless given: one pool per provider, sized for the consumers.

    Closing order (the stack unwinds in reverse): the runner stops the consumers first, then the OpenAI
    writer and the provider HTTP pools close, then the AWS clients.
    """
    pool = settings.consumer_concurrency * max(1, len(settings.consumed_queues))
    ai = adapters.ai
    if ai is None:
        # One aiohttp pool (httpcore2's costs CPU per request in proportion to its size), proxies from the
        # environment as before; tracing puts a transport making a CLIENT span per attempt in front of it.
        openai_http = pooled_http_client(
            pool,
            settings.ai_timeout_s,
            connect_timeout_s=OPENAI_CONNECT_TIMEOUT_S,
            wrap=lambda transport: tracing.traced_transport(transport, "openai"),
        )
        stack.push_async_callback(openai_http.aclose)  # closes the aiohttp session
        writer = OpenAiWriter(openai_http, settings.openai_base_url, settings.ai_max_attempts)
        stack.push_async_callback(writer.close)
        ai = paced_ai_writer(settings, adapters.token_leases, writer)  # per-key pace + fleet-wide 429 back-off
    senders = adapters.senders
    if senders is None:
        twilio = TwilioSender(
            build_async_http_client(settings.provider_timeout_s, pool),
            settings.twilio_base_url,
            settings.provider_timeout_s,
            owns_http_client=True,
        )
        stack.push_async_callback(twilio.close)
        email_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.consumer_concurrency),
            trace_configs=tracing.aiohttp_trace_configs("sendgrid") or None,
        )
        stack.push_async_callback(email_session.close)
        email = SendGridSender(email_session, settings.sendgrid_base_url, settings.provider_timeout_s)
        senders = {"whatsapp": twilio, "sms": twilio, "email": email}
    return replace(adapters, ai=ai, senders=senders)


async def build_consumers(
    settings: Settings,
    aws: AwsClients,
    adapters: Adapters,
    registry: CollectorRegistry,
    startup: StartupRetry | None = None,
) -> list[QueueConsumer]:
    """One `QueueConsumer` per consumed queue (channel queues and replies), each told its queue's redrive policy
    (read through `startup`, which waits while SQS does not answer)."""
    queues = settings.consumed_queues
    missing = [q for q in queues if not settings.queue_url(q)]
    if missing:
        raise ConfigurationError(
            f"consumers need queue URLs for {', '.join(missing)}: set "
            + ", ".join(f"COMMS_{q.upper()}_QUEUE_URL" for q in missing)
        )
    assert adapters.ai is not None and adapters.senders is not None  # `_with_providers` ran
    metrics = ConsumerMetrics(registry)
    callback = (
        f"{settings.public_base_url.rstrip('/')}/webhooks/twilio/status"
        if settings.public_base_url and settings.webhooks_enabled
        else None
    )
    consumer_config = ConsumerConfig(
        concurrency=settings.consumer_concurrency,
        visibility_timeout_s=settings.visibility_timeout_s,
        wait_time_s=settings.poll_wait_s,
        receive_margin_s=RECEIVE_MARGIN_S,
        protected_grace_s=PROTECTED_GRACE_S,
        finish_timeout_s=FINISH_TIMEOUT_S,
    )
    consumers: list[QueueConsumer] = []
    pacing = send_pacing(settings, adapters.token_leases)  # one per process: its shares serve every consumer
    cap = concurrency_cap(settings, adapters)  # one per process: its remembered refusals serve every consumer
    for queue in queues:
        queue_url = settings.queue_url(queue)
        assert queue_url is not None  # checked above
        redrive = await read_redrive_policy(aws.sqs, queue_url, queue, startup)
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
                    claims=adapters.reply_claims,
                    stage=adapters.stage,
                    secrets=adapters.secrets,
                    ai=adapters.ai,
                    senders=adapters.senders,
                    opt_outs=adapters.opt_outs,
                    publisher=adapters.publisher,
                ),
                metrics,
                pacing=pacing,
                cap=cap,
            )
        else:
            processor = TemplateSender(
                TemplateSenderConfig(
                    queue=queue,
                    claim_lease_s=settings.claim_lease_s,
                    ai_timeout_s=settings.ai_timeout_s,
                    status_callback_url=callback,
                    redrive=redrive,
                ),
                TemplatePorts(
                    claims=adapters.conversation_claims,
                    secrets=adapters.secrets,
                    ai=adapters.ai,
                    senders=adapters.senders,
                ),
                metrics,
                pacing=pacing,
                cap=cap,
            )
        queue_config = consumer_config.model_copy(update={"dead_letter_queue_url": redrive.dead_letter_url})
        consumers.append(QueueConsumer(aws.sqs, queue_url, queue, processor, metrics, queue_config))
    return consumers
