"""botocore_speedups against moto: the User-Agent that reaches the server is, request by request, the one botocore
builds itself, and it still follows the feature ids registered during a request."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.useragent import UserAgentString, register_feature_id

from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.config import Settings

_USER_AGENT = re.compile(rb"\r\nUser-Agent: ([^\r\n]*)\r\n", re.IGNORECASE)


class RecordingProxy:
    """Forwards TCP to moto and keeps every byte the client sent (the requests as they went on the wire)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self.sent = bytearray()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    def user_agents(self) -> list[str]:
        return [found.decode() for found in _USER_AGENT.findall(bytes(self.sent))]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool) -> None:
            while chunk := await source.read(65536):
                if record:
                    self.sent += chunk
                sink.write(chunk)
                await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True)


@pytest.fixture
async def recorded(settings: Settings) -> AsyncIterator[tuple[RecordingProxy, AwsClients]]:
    async with RecordingProxy(settings.aws_endpoint_url or "") as proxy, AsyncExitStack() as stack:
        aws = await open_aws_clients(settings.model_copy(update={"aws_endpoint_url": proxy.url}), stack)
        yield proxy, aws


def botocore_user_agents(client: Any) -> list[str]:
    """What botocore's own UserAgentString.to_string builds for each request, right before it is sent."""
    built: list[str] = []
    creator = client._user_agent_creator

    def record(**_: Any) -> None:
        built.append(UserAgentString.to_string(creator))  # the class's method: not the reused string

    client.meta.events.register(f"before-send.{client.meta.service_model.service_id.hyphenize()}", record)
    return built


async def test_the_user_agent_on_the_wire_is_the_one_botocore_builds(
    recorded: tuple[RecordingProxy, AwsClients], settings: Settings
) -> None:
    proxy, aws = recorded
    dynamo_built = botocore_user_agents(aws.dynamodb)
    sqs_built = botocore_user_agents(aws.sqs)
    key = {"suppression_key": {"S": "c#p#whatsapp"}, "recipient": {"S": "+447700900001"}}
    for _ in range(2):
        await aws.dynamodb.get_item(TableName=settings.opt_out_table, Key=key, ConsistentRead=True)
        await aws.sqs.send_message(QueueUrl=settings.whatsapp_queue_url, MessageBody="{}")
    interleaved = [agent for pair in zip(dynamo_built, sqs_built, strict=True) for agent in pair]
    assert proxy.user_agents() == interleaved
    assert len(set(dynamo_built)) == 1 and dynamo_built[0].startswith("aiobotocore/")


async def test_the_user_agent_follows_a_feature_registered_during_the_request(
    recorded: tuple[RecordingProxy, AwsClients], settings: Settings
) -> None:
    proxy, aws = recorded
    built = botocore_user_agents(aws.dynamodb)
    event = "before-parameter-build.dynamodb.GetItem"

    def paginating(**_: Any) -> None:
        register_feature_id("PAGINATOR")  # botocore's feature id "C"

    key = {"suppression_key": {"S": "c#p#sms"}, "recipient": {"S": "+447700900002"}}
    await aws.dynamodb.get_item(TableName=settings.opt_out_table, Key=key)
    aws.dynamodb.meta.events.register(event, paginating)
    await aws.dynamodb.get_item(TableName=settings.opt_out_table, Key=key)
    aws.dynamodb.meta.events.unregister(event, paginating)
    await aws.dynamodb.get_item(TableName=settings.opt_out_table, Key=key)

    plain, with_feature, plain_again = proxy.user_agents()
    assert [plain, with_feature, plain_again] == built
    features = re.compile(r" m/([^ ]*)")
    assert "C" in features.findall(with_feature)[0].split(",")
    assert "C" not in features.findall(plain)[0].split(",")
    assert plain_again == plain
