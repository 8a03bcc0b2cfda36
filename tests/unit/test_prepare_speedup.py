"""botocore_speedups' request preparation gives exactly the prepared request botocore's own `prepare_request` gives
(method, URL, headers in order with their types, body, stream flag, context), for the service's signed requests and
for the unusual ones it hands back to botocore (no network: requests are built and signed, not sent)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from aiobotocore.endpoint import AioEndpoint
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

from service.adapters.aws import botocore_speedups
from tests.unit.test_sigv4_speedup import CREDENTIALS, SERVICE_REQUESTS, clients, from_dict, request_dict

__all__ = ["clients"]  # the fixture, shared with the SigV4 tests


def prepared_both_ways(client: Any, make: Callable[[], AWSRequest]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The same request prepared by botocore's Endpoint.prepare_request and by the speed-up."""
    endpoint = client._endpoint
    theirs = AioEndpoint.prepare_request(endpoint, make())
    assert botocore_speedups.prepare_faster(client)
    ours = endpoint.prepare_request(make())
    return described(theirs), described(ours)


def described(prepared: Any) -> tuple[Any, ...]:
    body = prepared.body.getvalue() if isinstance(prepared.body, io.BytesIO) else prepared.body
    headers = [(name, value, type(value)) for name, value in prepared.headers.items()]
    return type(prepared), prepared.method, prepared.url, headers, body, prepared.stream_output, prepared.context


def signed(make: Callable[[], AWSRequest], service: str) -> Callable[[], AWSRequest]:
    def make_signed() -> AWSRequest:
        request = make()
        SigV4Auth(CREDENTIALS, service, "eu-west-2").add_auth(request)
        return request

    return make_signed


@pytest.mark.parametrize(("service", "operation", "params"), SERVICE_REQUESTS, ids=[r[1] for r in SERVICE_REQUESTS])
async def test_a_signed_service_request_is_prepared_exactly_as_botocore_prepares_it(
    clients: dict[str, Any], service: str, operation: str, params: dict[str, Any]
) -> None:
    request = await request_dict(clients[service], operation, params)
    theirs, ours = prepared_both_ways(clients[service], signed(from_dict(request), service))
    assert ours == theirs
    assert ("Content-Length", str(len(ours[4])).encode(), bytes) not in ours[3]  # added last, as a str
    assert ours[3][-1][0] == "Content-Length"


async def test_a_repeated_header_keeps_its_last_value_as_botocore_does(clients: dict[str, Any]) -> None:
    request = await request_dict(clients["dynamodb"], *SERVICE_REQUESTS[0][1:])

    def make() -> AWSRequest:
        made = from_dict(request)()
        made.headers["X-Extra"] = "one"
        made.headers["x-extra"] = "two"
        return made

    theirs, ours = prepared_both_ways(clients["dynamodb"], make)
    assert ours == theirs


@pytest.mark.parametrize(
    "headers",
    [{"X_Trace": "naïve value"}, {"Content_Length": "3"}, {"Transfer_Encoding": "chunked"}],
    ids=["non-ascii value", "content-length given", "chunked"],
)
async def test_unusual_headers_are_prepared_exactly_as_botocore_prepares_them(
    clients: dict[str, Any], headers: dict[str, str]
) -> None:
    request = await request_dict(clients["dynamodb"], *SERVICE_REQUESTS[0][1:])
    theirs, ours = prepared_both_ways(clients["dynamodb"], from_dict(request, **headers))
    assert ours == theirs


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "https://sqs.eu-west-2.amazonaws.com/", b""),
        ("POST", "https://sqs.eu-west-2.amazonaws.com/", io.BytesIO(b'{"streamed": true}')),
        ("POST", "https://sqs.eu-west-2.amazonaws.com/", {"Action": "List", "Version": "1"}),
        ("GET", "https://sqs.eu-west-2.amazonaws.com/?a=1", None),
    ],
    ids=["empty", "stream", "form", "get"],
)
async def test_other_bodies_and_methods_are_prepared_exactly_as_botocore_prepares_them(
    clients: dict[str, Any], method: str, url: str, body: Any
) -> None:
    def make() -> AWSRequest:
        data = io.BytesIO(body.getvalue()) if isinstance(body, io.BytesIO) else body
        made = AWSRequest(method=method, url=url, data=data, params={"q": "1"} if method == "GET" else None)
        made.context = {"k": "v"}
        return made

    theirs, ours = prepared_both_ways(clients["sqs"], make)
    assert ours == theirs


def test_a_client_without_the_endpoint_botocore_builds_keeps_its_own_behaviour() -> None:
    assert botocore_speedups.prepare_faster(object()) is False
