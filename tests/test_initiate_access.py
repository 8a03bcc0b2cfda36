"""Who may call /initiate-conversation, how often, and what every response carries (SPEC §2)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from service.domain.timefmt import utc_iso
from tests.conftest import initiate_body
from tests.support import add_tenant

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "OPTIONS,POST",
    "Access-Control-Allow-Headers": "Content-Type,X-Amz-Date,Authorization,X-Api-Key,X-Amz-Security-Token",
}


async def _code(response):
    return response.status, (await response.json())["error_code"]


async def test_missing_api_key_is_401(api, tenant):
    assert await _code(await api.post("/initiate-conversation", json=initiate_body())) == (401, "UNAUTHORIZED")


async def test_unknown_api_key_is_401(api, tenant):
    fake = "mce_0123456789abcdef_" + "x" * 43
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": fake})
    assert await _code(response) == (401, "UNAUTHORIZED")


async def test_known_key_id_with_wrong_secret_is_401(api, tenant):
    key_id = tenant.api_key.split("_")[1]
    forged = f"mce_{key_id}_" + "y" * 43
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": forged})
    assert await _code(response) == (401, "UNAUTHORIZED")


async def test_revoked_key_is_401(api, deps):
    key = await add_tenant(deps, "ci-revoked", "pi-revoked")
    key_id = key.split("_")[1]
    stored = await deps.api_keys.find(key_id)
    await deps.api_keys.put(replace(stored, status="revoked"), utc_iso(time.time()))
    body = initiate_body(company_data={"company_id": "ci-revoked", "project_id": "pi-revoked"})
    assert await _code(await api.post("/initiate-conversation", json=body, headers={"x-api-key": key})) == (
        401,
        "UNAUTHORIZED",
    )


async def test_key_of_company_a_used_for_company_b_is_403(api, deps, tenant):
    other_key = await add_tenant(deps, "ci-bbb-001", "pi-bbb-001")
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": other_key})
    assert await _code(response) == (403, "AUTHORIZATION_ERROR")


async def test_key_of_one_project_used_for_a_sibling_project_is_403(api, deps, tenant):
    sibling_key = await add_tenant(deps, "ci-demo-001", "pi-demo-002")
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": sibling_key})
    assert await _code(response) == (403, "AUTHORIZATION_ERROR")


async def test_rate_limit_trips_with_retry_after_and_recovers(api, deps):
    key = await add_tenant(deps, "ci-slow-001", "pi-slow-001", rate_limits={"requests_per_second": 2, "burst": 2})

    def body():
        return initiate_body(company_data={"company_id": "ci-slow-001", "project_id": "pi-slow-001"})

    statuses = [
        (await api.post("/initiate-conversation", json=body(), headers={"x-api-key": key})).status for _ in range(2)
    ]
    limited = await api.post("/initiate-conversation", json=body(), headers={"x-api-key": key})
    assert statuses == [200, 200]
    assert await _code(limited) == (429, "RATE_LIMIT_EXCEEDED")
    retry_after = int(limited.headers["Retry-After"])
    assert retry_after >= 1
    await asyncio.sleep(retry_after)
    recovered = await api.post("/initiate-conversation", json=body(), headers={"x-api-key": key})
    assert recovered.status == 200


async def test_rate_limit_of_one_key_does_not_affect_another(api, deps, tenant):
    key = await add_tenant(deps, "ci-slow-002", "pi-slow-002", rate_limits={"requests_per_second": 1, "burst": 1})
    body = initiate_body(company_data={"company_id": "ci-slow-002", "project_id": "pi-slow-002"})
    for _ in range(2):
        await api.post("/initiate-conversation", json=body, headers={"x-api-key": key})
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key})
    assert response.status == 200


async def test_cors_preflight_answers_200_with_cors_headers(api):
    response = await api.options(
        "/initiate-conversation", headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    )
    assert response.status == 200
    assert {k: response.headers[k] for k in CORS} == CORS


async def test_error_responses_carry_cors_headers(api):
    response = await api.post("/initiate-conversation", json={})
    assert response.status == 401
    assert {k: response.headers[k] for k in CORS} == CORS


async def test_success_responses_carry_cors_headers(api, tenant):
    response = await api.post("/initiate-conversation", json=initiate_body(), headers={"x-api-key": tenant.api_key})
    assert response.status == 200
    assert {k: response.headers[k] for k in CORS} == CORS


async def test_body_over_64_kib_is_413(api, tenant):
    body = initiate_body(project_data={"notes": "x" * (64 * 1024)})
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    assert await _code(response) == (413, "PAYLOAD_TOO_LARGE")


async def test_chunked_body_over_64_kib_is_413(api, tenant):
    async def chunks():
        yield b'{"company_data": {"company_id": "ci-demo-001", "project_id": "pi-demo-001"}, "pad": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}'

    response = await api.post(
        "/initiate-conversation",
        data=chunks(),
        headers={"x-api-key": tenant.api_key, "Content-Type": "application/json"},
    )
    assert await _code(response) == (413, "PAYLOAD_TOO_LARGE")


async def test_unknown_route_answers_a_json_404(api):
    response = await api.get("/nope")
    assert await _code(response) == (404, "NOT_FOUND")
