"""Requests a careless or hostile client sends, written byte for byte on a socket: each is answered with a clear
error or served, never dropped without an answer, never a 500, and nothing is lost or blocked by it.

Found from outside (a probe of the running local stack): one byte that is not UTF-8 in a trace header left the
request with no answer at all (the log line carrying it could not be written) and kept its request_id claimed
for the lease; bodies the server could not decode (a Content-Encoding the body does not have, a form in an
unknown charset or not UTF-8, a broken multipart) were 500s with a traceback, webhooks included, before any
signature check; a second x-api-key header was ignored (the first one won); numbers outside DynamoDB's range and
characters SQS refuses were accepted, then lost on the way (the consumer's write refused: three receives, then
the dead-letter queue).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from local_stack.seed import DemoTenant
from service.bootstrap import Dependencies
from tests.conftest import initiate_body, serving
from tests.fault_proxy import RawResponse, exchange, http_request, parse_response

INITIATE = "/initiate-conversation"


def raw_request(method: str, path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A whole request, its header values sent exactly as the bytes given (not necessarily UTF-8)."""
    pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers or []]
    return http_request(method, path, body, pairs) + body


async def send(served: tuple[str, int], request: bytes) -> RawResponse:
    """One request written on a socket to the server the service runs (`served`), the whole answer read."""
    return await exchange(*served, [request])


def _initiate(api_key: str, body: dict[str, Any], *extra: tuple[bytes, bytes]) -> bytes:
    headers = [(b"x-api-key", api_key.encode()), (b"Content-Type", b"application/json"), *extra]
    return raw_request("POST", INITIATE, orjson.dumps(body), headers)


def _error_code(response: RawResponse) -> tuple[int, str]:
    return response.status, response.json()["error_code"]


# --- trace headers that are not UTF-8 ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"X-Request-Id", b"traceparent", b"X-Amzn-Trace-Id"])
async def test_an_initiate_with_a_trace_header_that_is_not_utf8_is_answered(
    served: tuple[str, int], tenant: DemoTenant, header: bytes
) -> None:
    body = initiate_body()
    response = await send(served, _initiate(tenant.api_key, body, (header, b"ab\xffcd")))
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_a_repeat_after_a_trace_header_that_is_not_utf8_answers_the_same_conversation(
    served: tuple[str, int], tenant: DemoTenant
) -> None:
    body = initiate_body()
    first = await send(served, _initiate(tenant.api_key, body, (b"X-Request-Id", b"\xc3\x28")))
    again = await send(served, _initiate(tenant.api_key, body))
    assert again.status == 200
    assert again.json()["conversation_id"] == first.json()["conversation_id"]


async def test_an_unknown_path_with_a_traceparent_that_is_not_utf8_is_404(served: tuple[str, int]) -> None:
    response = await send(served, raw_request("GET", "/nope", headers=[(b"traceparent", b"\x80")]))
    assert _error_code(response) == (404, "NOT_FOUND")


async def test_a_webhook_with_headers_that_are_not_utf8_is_403(served: tuple[str, int]) -> None:
    form = b"MessageSid=SM1&From=%2B447700900001&To=%2B447700900002&Body=hi"
    headers = [
        (b"Content-Type", b"application/x-www-form-urlencoded"),
        (b"X-Amzn-Trace-Id", b"\xc3\x28"),
        (b"X-Forwarded-Host", b"h\xffst"),
        (b"X-Twilio-Signature", b"c2ln"),
    ]
    response = await send(served, raw_request("POST", "/webhooks/twilio/sms", form, headers))
    assert _error_code(response) == (403, "AUTHORIZATION_ERROR")


# --- bodies the server cannot decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br"])
async def test_an_initiate_body_that_does_not_have_its_content_encoding_is_400(
    served: tuple[str, int], tenant: DemoTenant, encoding: bytes
) -> None:
    response = await send(served, _initiate(tenant.api_key, initiate_body(), (b"Content-Encoding", encoding)))
    assert _error_code(response) == (400, "INVALID_REQUEST")


WEBHOOK_FORM = b"MessageSid=SM1&From=%2B447700900001&To=%2B447700900002&Body=hi"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"application/x-www-form-urlencoded; charset=bogus", WEBHOOK_FORM),
        (b"application/x-www-form-urlencoded; charset=utf-16", WEBHOOK_FORM + b"x"),
        (b"application/x-www-form-urlencoded", WEBHOOK_FORM + b"&Extra=\xff"),
        (b"multipart/form-data; boundary=zz", b"--zz\r\nbroken"),
        (b"multipart/form-data", WEBHOOK_FORM),
        (b"application/json", b'{"MessageSid": "SM1"}'),
    ],
    ids=["unknown-charset", "odd-utf16", "not-utf8", "broken-multipart", "multipart-no-boundary", "json"],
)
@pytest.mark.parametrize("route", ["/webhooks/twilio/sms", "/webhooks/twilio/whatsapp", "/webhooks/twilio/status"])
async def test_a_webhook_body_that_is_not_a_readable_form_is_400(
    served: tuple[str, int], content_type: bytes, body: bytes, route: str
) -> None:
    headers = [(b"Content-Type", content_type), (b"X-Twilio-Signature", b"c2ln")]
    response = await send(served, raw_request("POST", route, body, headers))
    assert _error_code(response) == (400, "INVALID_REQUEST")
    assert b"Traceback" not in response.body


async def test_a_webhook_body_whose_content_encoding_is_wrong_is_400(served: tuple[str, int]) -> None:
    headers = [
        (b"Content-Type", b"application/x-www-form-urlencoded"),
        (b"Content-Encoding", b"gzip"),
        (b"X-Twilio-Signature", b"c2ln"),
    ]
    response = await send(served, raw_request("POST", "/webhooks/twilio/sms", WEBHOOK_FORM, headers))
    assert _error_code(response) == (400, "INVALID_REQUEST")


# --- one credential, one header ------------------------------------------------------------------------------------


async def test_two_api_key_headers_are_refused_whichever_comes_first(
    served: tuple[str, int], tenant: DemoTenant
) -> None:
    for keys in ((tenant.api_key, "mce_wrong"), ("mce_wrong", tenant.api_key), (tenant.api_key, tenant.api_key)):
        headers = [(b"x-api-key", key.encode()) for key in keys] + [(b"Content-Type", b"application/json")]
        response = await send(served, raw_request("POST", INITIATE, orjson.dumps(initiate_body()), headers))
        assert _error_code(response) == (401, "UNAUTHORIZED")


# --- values the stores and the queue refuse ------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["1e200", "-1e200", "1e-200", "-1e-131", "1e126"])
async def test_a_project_data_number_dynamodb_cannot_store_is_400(
    served: tuple[str, int], tenant: DemoTenant, number: str
) -> None:
    text = orjson.dumps(initiate_body()).replace(
        b'"project_data":{', b'"project_data":{"slot":' + number.encode() + b","
    )
    headers = [(b"x-api-key", tenant.api_key.encode()), (b"Content-Type", b"application/json")]
    response = await send(served, raw_request("POST", INITIATE, text, headers))
    assert _error_code(response) == (400, "INVALID_PROJECT_DATA")


async def test_numbers_dynamodb_stores_are_accepted(api: TestClient[Any, Any], tenant: DemoTenant) -> None:
    body = initiate_body(project_data={"small": 1e-120, "large": 9.9e125, "zero": 0.0, "count": 10**37, "neg": -5})
    response = await api.post(INITIATE, json=body, headers={"x-api-key": tenant.api_key})
    assert response.status == 200


@pytest.mark.parametrize("character", ["\ufffe", "\uffff"])
async def test_a_character_sqs_refuses_is_400(api: TestClient[Any, Any], tenant: DemoTenant, character: str) -> None:
    body = initiate_body(project_data={"note": f"a{character}b"})
    response = await api.post(INITIATE, json=body, headers={"x-api-key": tenant.api_key})
    assert (response.status, (await response.json())["error_code"]) == (400, "INVALID_PROJECT_DATA")


async def test_a_character_sqs_refuses_outside_project_data_is_400(
    api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    body = initiate_body()
    body["recipient_data"]["recipient_first_name"] = "Lee\uffff"
    response = await api.post(INITIATE, json=body, headers={"x-api-key": tenant.api_key})
    assert (response.status, (await response.json())["error_code"]) == (400, "INVALID_REQUEST")


# --- a client that never finishes its headers ----------------------------------------------------------------------


async def test_a_connection_that_never_finishes_its_headers_is_closed_after_the_idle_timeout(
    deps: Dependencies,
) -> None:
    quick = dataclasses.replace(deps, settings=deps.settings.model_copy(update={"http_idle_timeout_s": 0.2}))
    async with serving(quick) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /initiate-conversation HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        async with asyncio.timeout(30):  # a bound on the test only: the server closes it at 0.2 s
            assert await reader.read() == b""
        writer.close()


# --- expectations ---------------------------------------------------------------------------------------------------


async def test_an_expectation_other_than_100_continue_is_417_json_without_echo(
    served: tuple[str, int], tenant: DemoTenant
) -> None:
    headers = [(b"Expect", b"<script>s3cr3t</script>"), (b"x-api-key", tenant.api_key.encode())]
    response = await send(served, raw_request("POST", INITIATE, orjson.dumps(initiate_body()), headers))
    assert _error_code(response) == (417, "INVALID_REQUEST")
    assert b"s3cr3t" not in response.body


async def test_an_initiate_that_expects_100_continue_is_served(served: tuple[str, int], tenant: DemoTenant) -> None:
    headers = [
        (b"Expect", b"100-continue"),
        (b"x-api-key", tenant.api_key.encode()),
        (b"Content-Type", b"application/json"),
    ]
    reader, writer = await asyncio.open_connection(*served)
    writer.write(raw_request("POST", INITIATE, orjson.dumps(initiate_body()), headers))
    raw = await reader.read()
    writer.close()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert raw.startswith(interim)
    response = parse_response(raw[len(interim) :])
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_a_webhook_field_over_its_length_is_400_naming_the_field_not_its_value(served: tuple[str, int]) -> None:
    form = WEBHOOK_FORM.replace(b"Body=hi", b"Body=" + b"s3cr3t" * 4000)
    headers = [(b"Content-Type", b"application/x-www-form-urlencoded"), (b"X-Twilio-Signature", b"c2ln")]
    response = await send(served, raw_request("POST", "/webhooks/twilio/sms", form, headers))
    assert _error_code(response) == (400, "INVALID_REQUEST")
    assert response.json()["message"] == "Body: over the length a Twilio webhook carries"
    assert b"s3cr3t" not in response.body
