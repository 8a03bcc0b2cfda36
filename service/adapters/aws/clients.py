"""The long-lived aiobotocore clients: opened once per process, sized from consumer concurrency.

`open_aws_clients` enters every client on an AsyncExitStack so they close in
reverse order at shutdown; nothing else in the service creates an AWS client.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from service.adapters.aws.botocore_speedups import speed_up
from service.config import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_secretsmanager import SecretsManagerClient
    from types_aiobotocore_sqs import SQSClient


@dataclass(frozen=True, slots=True)
class AwsClients:
    dynamodb: DynamoDBClient
    sqs: SQSClient
    secrets: SecretsManagerClient


def client_config(settings: Settings, *, max_attempts: int | None = None) -> AioConfig:
    """Timeouts, standard retry mode (bounded, jittered backoff on throttling/5xx/network) and pool size.

    Client-side parameter validation is off: every request is built by this service's adapters (tested against
    moto, which validates as AWS does), and walking each request against the service model cost a tenth to a
    fifth of each request's client CPU. A malformed request now fails at AWS (ValidationException) or while
    serialising, rather than as botocore's ParamValidationError, which nothing here catches."""
    return AioConfig(
        max_pool_connections=settings.aws_pool_size,
        connect_timeout=settings.aws_connect_timeout_s,
        read_timeout=settings.aws_read_timeout_s,
        # total_max_attempts counts the first call too (botocore's max_attempts counts only retries).
        retries={"mode": "standard", "total_max_attempts": max_attempts or settings.aws_max_attempts},
        tcp_keepalive=True,
        parameter_validation=False,
    )


async def open_aws_clients(settings: Settings, stack: AsyncExitStack) -> AwsClients:
    session = get_session()
    region = settings.aws_region
    dynamodb = await stack.enter_async_context(
        session.create_client(
            "dynamodb",
            region_name=region,
            endpoint_url=settings.endpoint_url("dynamodb"),
            config=client_config(settings),
        )
    )
    sqs = await stack.enter_async_context(
        session.create_client(
            "sqs",
            region_name=region,
            endpoint_url=settings.endpoint_url("sqs"),
            config=client_config(settings, max_attempts=settings.sqs_send_attempts),
        )
    )
    secrets = await stack.enter_async_context(
        session.create_client(
            "secretsmanager",
            region_name=region,
            endpoint_url=settings.endpoint_url("secretsmanager"),
            config=client_config(settings),
        )
    )
    for client in (dynamodb, sqs, secrets):
        speed_up(client)
    return AwsClients(dynamodb=dynamodb, sqs=sqs, secrets=secrets)
