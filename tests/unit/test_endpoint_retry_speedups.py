"""botocore_speedups' endpoint-parameter and retry-check speed-ups give exactly what botocore gives: the same endpoint
parameters, endpoint and feature ids for every kind of parameter source, and, against a local server answering
scripted DynamoDB responses, the same requests (attempt headers included), results, errors and retries."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiobotocore.regions import AioEndpointRulesetResolver
from aiobotocore.session import get_session
from aiohttp import web
from botocore.context import get_context, start_as_current_context
from botocore.exceptions import ClientError, UnknownEndpointResolutionBuiltInName
from botocore.regions import EndpointResolverBuiltins

from service.adapters.aws import botocore_speedups
from service.adapters.aws.clients import client_config
from service.config import Settings

# One session: its loader keeps the service models, so each client is quick to make.
SESSION: Any = get_session()  # Any: the stubs' overloads want each service name as a literal
ACCOUNT = "123456789012"
TABLE_ARN = f"arn:aws:dynamodb:eu-west-2:{ACCOUNT}:table/t2"


async def make_client(stack: AsyncExitStack, service: str, endpoint_url: str | None, attempts: int = 3) -> Any:
    return await stack.enter_async_context(
        SESSION.create_client(
            service,
            region_name="eu-west-2",
            endpoint_url=endpoint_url,
            aws_access_key_id="local",
            aws_secret_access_key="local",
            aws_account_id=ACCOUNT,
            config=client_config(Settings(), max_attempts=attempts),
        )
    )


async def resolved(client: Any, operation: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """The provider parameters, the endpoint and the feature ids registered while resolving, for one call."""
    resolver = client._ruleset_resolver
    model = client.meta.service_model.operation_model(operation)
    with start_as_current_context():
        provider_params = await resolver._get_provider_params(model, params, {})
        endpoint = await resolver.construct_endpoint(model, params, {})
        context = get_context()
        assert context is not None
        features = sorted(context.features)
    return provider_params, endpoint.url, endpoint.headers, endpoint.properties, features


def botocore_params(client: Any) -> None:
    """Back to botocore's own parameter resolution (the speed-up is an instance attribute)."""
    del client._ruleset_resolver._get_provider_params


CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("dynamodb", "GetItem", {"TableName": "t", "Key": {"k": {"S": "v"}}}),  # call argument (ResourceArn)
    ("dynamodb", "GetItem", {"TableName": TABLE_ARN, "Key": {"k": {"S": "v"}}}),
    ("dynamodb", "BatchGetItem", {"RequestItems": {"t1": {"Keys": []}, TABLE_ARN: {"Keys": []}}}),  # JMESPath
    ("dynamodb", "ListTables", {}),  # builtins only
    ("sqs", "SendMessage", {"QueueUrl": "https://sqs.eu-west-2.amazonaws.com/1/q", "MessageBody": "x"}),
]


@pytest.mark.parametrize("endpoint_url", [None, "http://127.0.0.1:9"], ids=["aws", "local"])
@pytest.mark.parametrize(("service", "operation", "params"), CALLS, ids=[f"{s}.{o}" for s, o, _ in CALLS])
async def test_the_endpoint_of_a_call_is_resolved_exactly_as_botocore_resolves_it(
    service: str, operation: str, params: dict[str, Any], endpoint_url: str | None
) -> None:
    async with AsyncExitStack() as stack:
        client = await make_client(stack, service, endpoint_url)
        assert botocore_speedups.resolve_endpoints_faster(client)
        fast = [await resolved(client, operation, params) for _ in range(2)]  # planned, then from the plan
        botocore_params(client)
        theirs = await resolved(client, operation, params)
    assert fast == [theirs, theirs]


async def test_a_builtin_changed_by_a_before_endpoint_resolution_hook_is_honoured_as_botocore_does() -> None:
    def fips(builtins: dict[Any, Any], **_: Any) -> None:
        builtins[EndpointResolverBuiltins.AWS_USE_FIPS] = True

    async with AsyncExitStack() as stack:
        client = await make_client(stack, "dynamodb", None)
        client.meta.events.register("before-endpoint-resolution.dynamodb", fips)
        assert botocore_speedups.resolve_endpoints_faster(client)
        fast = await resolved(client, "GetItem", CALLS[0][2])
        botocore_params(client)
        theirs = await resolved(client, "GetItem", CALLS[0][2])
    assert fast == theirs
    assert "fips" in fast[1]


async def test_an_unknown_builtin_is_refused_with_botocores_own_error() -> None:
    async with AsyncExitStack() as stack:
        client = await make_client(stack, "dynamodb", None)
        resolver = client._ruleset_resolver
        definitions = dict(resolver._param_definitions)
        unknown = next(iter(definitions.values()))
        unknown = type(unknown)(name="Nope", parameter_type="string", builtIn="AWS::Nope")
        resolver._param_definitions = {**definitions, "Nope": unknown}
        assert botocore_speedups.resolve_endpoints_faster(client)
        model = client.meta.service_model.operation_model("ListTables")
        with pytest.raises(UnknownEndpointResolutionBuiltInName):
            await resolver._get_provider_params(model, {}, {})


def test_a_resolver_of_another_kind_keeps_its_own_behaviour() -> None:
    class Client:
        _ruleset_resolver = object.__new__(AioEndpointRulesetResolver)  # no attributes: not what it expects

    assert botocore_speedups.resolve_endpoints_faster(Client()) is False
    assert "_get_provider_params" not in vars(Client._ruleset_resolver)


# --- retries, against a server answering scripted DynamoDB responses -------------------------------------------------

_TTL = re.compile(r"ttl=[0-9TZ]+; ")
Answer = tuple[int, dict[str, Any], str]  # status, JSON body, CRC32 header: "ok" (right), "bad" (wrong) or "none"
ITEM: Answer = (200, {"Item": {"k": {"S": "v"}}}, "ok")


def error(code: str, status: int = 400) -> Answer:
    return status, {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": code}, "ok"


class ScriptedDynamo:
    """Answers each request with the next scripted answer (the last one repeats); keeps each request's attempt
    header (`amz-sdk-request`, where botocore's retry state shows) and body."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.requests: list[tuple[str, bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        # A retry's attempt header also carries a `ttl=` of the wall clock (to the second): left out.
        attempt = _TTL.sub("", request.headers.get("amz-sdk-request", ""))
        self.requests.append((attempt, await request.read()))
        status, body, crc = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": "R"}
        if crc != "none":
            headers["x-amz-crc32"] = str((zlib.crc32(payload) + (crc == "bad")) & 0xFFFFFFFF)
        return web.Response(status=status, body=payload, headers=headers)


@pytest.fixture
async def dynamo() -> AsyncIterator[ScriptedDynamo]:
    server = ScriptedDynamo()
    await server.start()
    yield server
    await server.stop()


async def outcome(server: ScriptedDynamo, client: Any, script: list[Answer]) -> tuple[Any, ...]:
    """What a GetItem gives (its result, or its error and response) and what reached the server."""
    server.script, server.requests = list(script), []
    try:
        answer = await client.get_item(TableName="t", Key={"k": {"S": "v"}})
        result: Any = ("ok", answer)
    except ClientError as exc:
        result = ("error", type(exc).__name__, str(exc), exc.response)
    for part in result[1:]:
        if isinstance(part, dict):
            part.get("ResponseMetadata", {}).get("HTTPHeaders", {}).pop("date", None)
    return result, server.requests


async def no_sleep(_: float) -> None:
    return None


SCRIPTS = {
    "success": [ITEM],
    "success without a checksum": [(200, ITEM[1], "none")],
    "5xx then success": [error("InternalServerError", 500), ITEM],
    "5xx then success on the last attempt": [error("InternalServerError", 500), error("Unavailable", 503), ITEM],
    "5xx every time": [error("InternalServerError", 500)],
    "throttled then success": [error("ThrottlingException"), ITEM],
    "throughput exceeded every time": [error("ProvisionedThroughputExceededException")],
    "conditional check failed": [error("ConditionalCheckFailedException")],
    "a success whose checksum is wrong, then a right one": [(200, ITEM[1], "bad"), ITEM],
    "a wrong checksum every time": [(200, ITEM[1], "bad")],
}


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
async def test_a_call_is_retried_exactly_as_botocore_retries_it(dynamo: ScriptedDynamo, script: list[Answer]) -> None:
    async with AsyncExitStack() as stack:
        theirs, ours = [await make_client(stack, "dynamodb", dynamo.url) for _ in range(2)]
        assert botocore_speedups.check_retries_faster(ours)
        for client in (theirs, ours):
            client._endpoint._sleep = no_sleep
        expected = [await outcome(dynamo, theirs, script) for _ in range(2)]
        got = [await outcome(dynamo, ours, script) for _ in range(2)]
    assert got == expected


async def test_the_retry_speedup_answers_through_the_same_handler_registration(dynamo: ScriptedDynamo) -> None:
    async with AsyncExitStack() as stack:
        client = await make_client(stack, "dynamodb", dynamo.url)
        assert botocore_speedups.check_retries_faster(client)
        assert botocore_speedups.check_retries_faster(client)  # applied once
        handlers = list(client.meta.events._emitter._handlers.prefix_search("needs-retry.dynamodb.GetItem"))
    assert [handler.__name__ for handler in handlers] == ["_needs_retry_fast"]


def test_a_client_without_the_standard_retry_handler_keeps_its_own_behaviour() -> None:
    class Events:
        _emitter = None

    class Client:
        class meta:
            events = Events()

            class service_model:
                class service_id:
                    @staticmethod
                    def hyphenize() -> str:
                        return "dynamodb"

    assert botocore_speedups.check_retries_faster(Client()) is False
