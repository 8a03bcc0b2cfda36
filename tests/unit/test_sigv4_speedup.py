"""botocore_speedups' SigV4 signer writes exactly the headers botocore's own SigV4Auth writes, for the requests the
service makes and for the unusual ones it hands back to botocore (no network: requests are built, not sent)."""

from __future__ import annotations

import datetime
import io
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore import auth as botocore_auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, create_request_object
from botocore.credentials import Credentials

from service.adapters.aws import botocore_speedups
from service.adapters.aws.botocore_speedups import speed_up
from service.adapters.aws.clients import client_config
from service.config import Settings

CREDENTIALS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
WITH_TOKEN = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token")
DAY_ONE = datetime.datetime(2026, 3, 1, 23, 59, 58)
DAY_TWO = datetime.datetime(2026, 3, 2, 0, 0, 1)


@pytest.fixture
async def clients() -> AsyncIterator[dict[str, Any]]:
    """Real DynamoDB and SQS clients (nothing is sent): their serialisers build the requests to sign."""
    settings = Settings(aws_endpoint_url="https://aws.example.test")
    async with AsyncExitStack() as stack:
        session = get_session()
        made = {}
        for service in ("dynamodb", "sqs"):
            made[service] = await stack.enter_async_context(
                session.create_client(
                    service,
                    region_name="eu-west-2",
                    endpoint_url=settings.aws_endpoint_url,
                    aws_access_key_id="local",
                    aws_secret_access_key="local",
                    config=client_config(settings),
                )
            )
        yield made


async def request_dict(client: Any, operation: str, params: dict[str, Any]) -> dict[str, Any]:
    model = client.meta.service_model.operation_model(operation)
    context = {"client_region": "eu-west-2", "client_config": client.meta.config, "has_streaming_input": False}
    url, headers, _ = await client._resolve_endpoint_ruleset(model, params, context)
    converted: dict[str, Any] = await client._convert_to_request_dict(
        api_params=params, operation_model=model, endpoint_url=url, context=context, headers=headers
    )
    return converted


def signed_both_ways(
    make: Callable[[], AWSRequest], service: str, when: datetime.datetime, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The headers of the same request signed by botocore's SigV4Auth and by the speed-up, at the same instant."""
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: when)
    credentials = kw.get("credentials", CREDENTIALS)
    theirs, ours = make(), make()
    SigV4Auth(credentials, service, "eu-west-2").add_auth(theirs)
    fast = SigV4Auth(credentials, service, "eu-west-2")
    fast.__class__ = botocore_speedups._SigV4Auth
    fast.add_auth(ours)
    return list(theirs.headers.items()), list(ours.headers.items())


def from_dict(request: dict[str, Any], **headers: str) -> Callable[[], AWSRequest]:
    def make() -> AWSRequest:
        made: AWSRequest = create_request_object(request)
        for name, value in headers.items():
            made.headers[name.replace("_", "-")] = value
        return made

    return make


SERVICE_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "dynamodb",
        "GetItem",
        {
            "TableName": "opt-outs",
            "Key": {"suppression_key": {"S": "c#p#whatsapp"}, "recipient": {"S": "+447700900123"}},
            "ProjectionExpression": "recipient",
            "ConsistentRead": True,
        },
    ),
    (
        "dynamodb",
        "PutItem",
        {
            "TableName": "idempotency",
            "Item": {"idempotency_key": {"S": "k"}, "name": {"S": "Zoë Ångström 名前"}, "n": {"N": "1"}},
            "ConditionExpression": "attribute_not_exists(idempotency_key)",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        },
    ),
    (
        "sqs",
        "SendMessage",
        {
            "QueueUrl": "https://sqs.eu-west-2.amazonaws.com/123456789012/whatsapp",
            "MessageBody": '{"text": "héllo"}',
            "MessageAttributes": {"channelMethod": {"DataType": "String", "StringValue": "whatsapp"}},
        },
    ),
    (
        "sqs",
        "DeleteMessageBatch",
        {"QueueUrl": "https://sqs.eu-west-2.amazonaws.com/1/q", "Entries": [{"Id": "0", "ReceiptHandle": "r"}]},
    ),
]


@pytest.mark.parametrize(("service", "operation", "params"), SERVICE_REQUESTS, ids=[r[1] for r in SERVICE_REQUESTS])
async def test_a_service_request_is_signed_exactly_as_botocore_signs_it(
    clients: dict[str, Any], service: str, operation: str, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = await request_dict(clients[service], operation, params)
    for when in (DAY_ONE, DAY_TWO):  # the cached signing key follows the date
        theirs, ours = signed_both_ways(from_dict(request), service, when, monkeypatch)
        assert ours == theirs
        assert dict(ours)["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/2026030")


async def test_a_session_token_is_signed_exactly_as_botocore_signs_it(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = await request_dict(clients["dynamodb"], *SERVICE_REQUESTS[0][1:])
    theirs, ours = signed_both_ways(from_dict(request), "dynamodb", DAY_ONE, monkeypatch, credentials=WITH_TOKEN)
    assert ours == theirs
    assert ("X-Amz-Security-Token", "session-token") in ours


async def test_a_header_botocore_would_sanitise_is_signed_its_way(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = await request_dict(clients["dynamodb"], *SERVICE_REQUESTS[0][1:])
    theirs, ours = signed_both_ways(from_dict(request, X_Trace="naïve  value"), "dynamodb", DAY_ONE, monkeypatch)
    assert ours == theirs


async def test_a_repeated_header_is_signed_with_both_values_as_botocore_does(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = await request_dict(clients["dynamodb"], *SERVICE_REQUESTS[0][1:])

    def make() -> AWSRequest:
        made = from_dict(request)()
        made.headers["X-Extra"] = "one"
        made.headers["x-extra"] = "two"  # HTTPHeaders keeps both: botocore signs "x-extra:one,two"
        return made

    theirs, ours = signed_both_ways(make, "dynamodb", DAY_ONE, monkeypatch)
    assert ours == theirs


@pytest.mark.parametrize("body", [b"", io.BytesIO(b'{"streamed": true}'), {"Action": "List", "Version": "1"}])
async def test_an_empty_streamed_or_form_body_is_signed_exactly_as_botocore_signs_it(
    body: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make() -> AWSRequest:
        data = io.BytesIO(body.getvalue()) if isinstance(body, io.BytesIO) else body
        made = AWSRequest(method="POST", url="https://sqs.eu-west-2.amazonaws.com/", data=data)
        made.context = {}
        return made

    theirs, ours = signed_both_ways(make, "sqs", DAY_ONE, monkeypatch)
    assert ours == theirs


async def test_an_unsigned_payload_request_is_signed_exactly_as_botocore_signs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def make() -> AWSRequest:
        made = AWSRequest(method="PUT", url="https://bucket.example.test/key?b=2&a=1", data=b"data")
        made.context = {"payload_signing_enabled": False}
        return made

    theirs, ours = signed_both_ways(make, "s3", DAY_ONE, monkeypatch)
    assert ours == theirs


async def test_every_speedup_applies_to_the_clients_of_this_botocore(clients: dict[str, Any]) -> None:
    """Fails after a botocore upgrade that removed what a speed-up relies on (it would fall back silently)."""
    for client in clients.values():
        assert speed_up(client) == ["user-agent", "sigv4", "endpoint", "retry-check", "prepare"]
        assert speed_up(client) == ["user-agent", "sigv4", "endpoint", "retry-check", "prepare"]  # twice: harmless


async def test_the_client_signer_hands_out_the_faster_sigv4(clients: dict[str, Any]) -> None:
    client = clients["sqs"]
    speed_up(client)
    auth = await client._request_signer.get_auth_instance(signing_name="sqs", region_name="eu-west-2")
    assert type(auth) is botocore_speedups._SigV4Auth


def test_an_object_without_botocore_internals_keeps_its_own_behaviour() -> None:
    assert speed_up(object()) == []
