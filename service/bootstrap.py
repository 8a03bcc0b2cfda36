"""The composition root: builds every real adapter once, hands them out, closes them in reverse order.

`build(settings)` is an async context manager; the HTTP app and the consumers both
take the `Dependencies` it yields, and tests swap adapters here, not by patching.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from service.adapters.aws.api_key_store import DynamoApiKeyStore
from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.errors import AWS_FAILURES, error_code
from service.adapters.aws.opt_out_registry import DynamoOptOutRegistry
from service.adapters.aws.queue_publisher import SqsPublisher
from service.adapters.aws.request_ledger import DynamoRequestLedger
from service.config import CHANNELS, Settings
from service.domain.initiation import ConversationInitiator, InitiationPorts
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
        )
