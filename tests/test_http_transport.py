"""What the service answers whatever the TCP framing: bodies in several segments, malformed requests.

Real TCP clients against real servers: a body arrives in several writes, a pause between them, so the
server sees it in several segments; malformed requests are written on a raw socket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from local_stack.seed import DemoTenant
from service.bootstrap import Dependencies
from service.runner import start_http
from tests.conftest import initiate_body
from tests.fault_proxy import FaultProxy, RawResponse, chunked_body, exchange, http_request, split

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "OPTIONS,POST",
    "access-control-allow-headers": "Content-Type,X-Amz-Date,Authorization,X-Api-Key,X-Amz-Security-Token",
}
INITIATE = "/initiate-conversation"


def _headers(api_key: str) -> dict[str, str]:
    return {"x-api-key": api_key, "Content-Type": "application/json"}


def _address(api: TestClient[Any, Any]) -> tuple[str, int]:
    assert api.server.port is not None
    return api.server.host, api.server.port


def _over_limit_body() -> bytes:
    return orjson.dumps(initiate_body(project_data={"notes": "x" * (70 * 1024)}))


# --- bodies in several TCP segments -------------------------------------------------------------


async def test_body_with_content_length_in_two_writes_is_accepted(
    api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    body = orjson.dumps(initiate_body())
    head = http_request("POST", INITIATE, body, _headers(tenant.api_key))
    half = len(body) // 2
    response = await exchange(*_address(api), [head, body[:half], body[half:]])
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_chunked_body_in_50_byte_chunks_is_accepted(api: TestClient[Any, Any], tenant: DemoTenant) -> None:
    body = orjson.dumps(initiate_body())
    head = http_request("POST", INITIATE, headers=_headers(tenant.api_key), chunked=True)
    response = await exchange(*_address(api), [head, *chunked_body(body, 50)], pause_s=0.01)
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_chunked_body_over_the_limit_is_413_every_time(api: TestClient[Any, Any], tenant: DemoTenant) -> None:
    head = http_request("POST", INITIATE, headers=_headers(tenant.api_key), chunked=True)
    for _ in range(5):
        writes = [head, *chunked_body(_over_limit_body(), 8 * 1024)]
        response = await exchange(*_address(api), writes, pause_s=0.01)
        assert (response.status, response.json()["error_code"]) == (413, "PAYLOAD_TOO_LARGE")


async def test_body_with_content_length_over_the_limit_in_segments_is_413(
    api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    body = _over_limit_body()
    head = http_request("POST", INITIATE, body, _headers(tenant.api_key))
    response = await exchange(*_address(api), [head, *split(body, 16 * 1024)], pause_s=0.01)
    assert (response.status, response.json()["error_code"]) == (413, "PAYLOAD_TOO_LARGE")


async def test_body_split_into_small_segments_by_a_proxy_is_accepted(
    api: TestClient[Any, Any], tenant: DemoTenant
) -> None:
    body = orjson.dumps(initiate_body())
    async with FaultProxy(*_address(api)) as proxy:
        proxy.split_writes(100, delay_s=0.01)
        response = await exchange(
            "127.0.0.1", proxy.port, [http_request("POST", INITIATE, body, _headers(tenant.api_key)) + body]
        )
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_webhook_body_over_the_limit_is_413_payload_too_large(api: TestClient[Any, Any]) -> None:
    body = b"Body=" + b"x" * (1024 * 1024)
    head = http_request(
        "POST", "/webhooks/twilio/whatsapp", body, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    response = await exchange(*_address(api), [head, body])
    assert (response.status, response.json()["error_code"]) == (413, "PAYLOAD_TOO_LARGE")
    assert b"xxxx" not in response.body


# --- malformed requests: answered by the server the service runs (`served`: make_runner) ------------


async def _send(served: tuple[str, int], writes: list[bytes]) -> RawResponse:
    host, port = served
    return await exchange(host, port, writes)


def _is_error_body(response: RawResponse, status: int, code: str) -> bool:
    answer = response.json()
    return (
        response.status == status
        and set(answer) == {"status", "error_code", "message", "request_id"}
        and (answer["status"], answer["error_code"]) == ("error", code)
        and response.headers["content-type"].startswith("application/json")
    )


async def test_header_over_the_limit_is_431_json_without_echo(served: tuple[str, int]) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"s3cr3t" * 1700 + b"\r\n\r\n"
    response = await _send(served, [head])
    assert _is_error_body(response, 431, "HEADER_TOO_LARGE")
    assert b"s3cr3t" not in response.body


async def test_request_line_over_the_limit_is_431_json_without_echo(served: tuple[str, int]) -> None:
    head = b"GET /" + b"s3cr3t" * 1700 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    response = await _send(served, [head])
    assert _is_error_body(response, 431, "HEADER_TOO_LARGE")
    assert b"s3cr3t" not in response.body


async def test_garbage_request_is_400_invalid_request_json_without_echo(served: tuple[str, int]) -> None:
    response = await _send(served, [b"s3cr3t garbage\r\n\r\n"])
    assert _is_error_body(response, 400, "INVALID_REQUEST")
    assert b"s3cr3t" not in response.body


async def test_malformed_request_errors_carry_cors_headers(served: tuple[str, int]) -> None:
    response = await _send(served, [b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
    assert _is_error_body(response, 400, "INVALID_REQUEST")
    assert {name: response.headers[name] for name in CORS} == CORS


async def test_the_service_runner_still_serves_the_app(served: tuple[str, int], tenant: DemoTenant) -> None:
    body = orjson.dumps(initiate_body())
    response = await _send(served, [http_request("POST", INITIATE, body, _headers(tenant.api_key)), body])
    assert (response.status, response.json()["status"]) == (200, "success")


async def test_the_service_process_answers_malformed_requests_with_json(deps: Dependencies) -> None:
    local = dataclasses.replace(deps, settings=deps.settings.model_copy(update={"host": "127.0.0.1", "port": 0}))
    runner = await start_http(local)
    try:
        response = await exchange(runner.addresses[0][0], runner.addresses[0][1], [b"s3cr3t garbage\r\n\r\n"])
    finally:
        await runner.cleanup()
    assert _is_error_body(response, 400, "INVALID_REQUEST")


async def test_another_method_on_a_route_is_405_method_not_allowed_with_allow(api: TestClient[Any, Any]) -> None:
    response = await api.get(INITIATE)
    answer = await response.json()
    assert (response.status, answer["error_code"]) == (405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]
