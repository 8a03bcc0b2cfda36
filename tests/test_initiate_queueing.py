"""A valid request puts exactly one correctly shaped context message on its channel's queue (SPEC §2, §4)."""

from __future__ import annotations

import time

import pytest

from service.domain.claims import RequestRecord, RequestState, request_key
from service.domain.conversation import Lease
from service.domain.timefmt import utc_iso
from service.versions import ROUTER_VERSION
from tests.conftest import initiate_body
from tests.support import add_tenant, api_client, queued_messages

SENDER_COMPONENT = {"whatsapp": "447700900001", "sms": "447700900002", "email": "hello@demo-homes.example"}


async def _post(api, key, body):
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": key})
    return response.status, await response.json()


@pytest.mark.parametrize("channel", ["whatsapp", "sms", "email"])
async def test_a_queued_message_names_its_tenant_as_its_message_group(api, deps, tenant, channel):
    body = initiate_body(channel)
    status, answer = await _post(api, tenant.api_key, body)
    [message] = await queued_messages(deps, deps.settings.queue_url(channel), answer["conversation_id"])
    assert status == 200
    assert message["group"] == "ci-demo-001#pi-demo-001"


@pytest.mark.parametrize("channel", ["whatsapp", "sms", "email"])
async def test_valid_request_queues_one_context_message_on_its_channel_queue(api, deps, tenant, channel):
    body = initiate_body(channel)
    status, answer = await _post(api, tenant.api_key, body)
    request_id = body["request_data"]["request_id"]
    expected_id = f"ci-demo-001#pi-demo-001#{request_id}#{SENDER_COMPONENT[channel]}"
    assert status == 200
    assert answer["status"] == "success"
    assert answer["message"] == "Request accepted and queued for processing"
    assert answer["conversation_id"] == expected_id
    assert answer["request_id"] == request_id
    assert answer["queue_timestamp"].endswith("Z")

    messages = await queued_messages(deps, deps.settings.queue_url(channel), expected_id)
    assert len(messages) == 1
    context, attributes = messages[0]["body"], messages[0]["attributes"]
    assert context["frontend_payload"] == body
    assert context["conversation_data"] == {"conversation_id": expected_id, "conversation_status": "initiated"}
    assert context["company_data_payload"]["company_id"] == "ci-demo-001"
    assert context["metadata"]["router_version"] == ROUTER_VERSION
    assert context["metadata"]["trace_id"]
    assert attributes["channelMethod"] == channel
    assert attributes["conversationId"] == expected_id
    assert attributes["routerTimestamp"] == answer["queue_timestamp"]
    recipient_attribute = "recipientEmail" if channel == "email" else "recipientTel"
    assert attributes[recipient_attribute] == ("lee@example.com" if channel == "email" else "+447700900123")


async def test_queued_context_never_carries_key_hashes(api, deps, tenant):
    await deps.companies.put(
        (await deps.companies.get("ci-demo-001", "pi-demo-001")).model_copy(update={"api_key_hashes": ["abc"]}),
        overwrite=True,
    )
    body = initiate_body()
    _, answer = await _post(api, tenant.api_key, body)
    messages = await queued_messages(deps, deps.settings.whatsapp_queue_url, answer["conversation_id"])
    assert "api_key_hashes" not in messages[0]["body"]["company_data_payload"]


async def test_channel_is_normalised_to_lowercase_in_the_queued_payload(api, deps, tenant):
    body = initiate_body(request_data={"channel_method": "SMS"})
    _, answer = await _post(api, tenant.api_key, body)
    messages = await queued_messages(deps, deps.settings.sms_queue_url, answer["conversation_id"])
    assert messages[0]["body"]["frontend_payload"]["request_data"]["channel_method"] == "sms"


async def test_repeat_request_id_answers_the_same_conversation_and_queues_once(api, deps, tenant):
    body = initiate_body()
    first_status, first = await _post(api, tenant.api_key, body)
    second_status, second = await _post(api, tenant.api_key, body)
    assert (first_status, second_status) == (200, 200)
    assert second["conversation_id"] == first["conversation_id"]
    assert second["queue_timestamp"] == first["queue_timestamp"]
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, first["conversation_id"])) == 1


async def test_request_id_being_queued_elsewhere_answers_409_with_a_short_retry_after_when_no_wait(settings, tenant):
    body = initiate_body()
    key = request_key("ci-demo-001", "pi-demo-001", body["request_data"]["request_id"])
    async with api_client(settings, duplicate_wait_s=0) as (client, wired):
        now = time.time()
        await wired.adapters.ledger.claim(
            RequestRecord(key, RequestState.IN_PROGRESS, "other", Lease(expires_at=now + 30)), now
        )
        response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        assert response.status == 409
        assert (await response.json())["error_code"] == "REQUEST_IN_PROGRESS"
    assert 1 <= int(response.headers["Retry-After"]) <= 2  # not the 30 s lease: a retry waits again


async def test_expired_claim_of_a_crashed_attempt_is_taken_over(api, deps, tenant):
    body = initiate_body()
    key = request_key("ci-demo-001", "pi-demo-001", body["request_data"]["request_id"])
    now = time.time()
    await deps.adapters.ledger.claim(
        RequestRecord(key, RequestState.IN_PROGRESS, "crashed", Lease(expires_at=now - 60)), now - 90
    )
    status, answer = await _post(api, tenant.api_key, body)
    assert status == 200
    assert len(await queued_messages(deps, deps.settings.whatsapp_queue_url, answer["conversation_id"])) == 1


async def test_opted_out_recipient_is_refused_with_422(api, deps, tenant):
    await deps.adapters.opt_outs.opt_out("ci-demo-001", "pi-demo-001", "sms", "+447700900555", utc_iso(0))
    body = initiate_body("sms", recipient_data={"recipient_tel": "+447700900555"})
    status, answer = await _post(api, tenant.api_key, body)
    assert (status, answer["error_code"]) == (422, "RECIPIENT_OPTED_OUT")


async def test_opt_out_applies_only_to_its_channel(api, deps, tenant):
    await deps.adapters.opt_outs.opt_out("ci-demo-001", "pi-demo-001", "sms", "+447700900556", utc_iso(0))
    body = initiate_body("whatsapp", recipient_data={"recipient_tel": "+447700900556"})
    status, _ = await _post(api, tenant.api_key, body)
    assert status == 200


async def test_unknown_company_is_404(api, deps):
    key = await add_tenant(deps, "ci-ghost-001", "pi-ghost-001", store_company=False)
    body = initiate_body(company_data={"company_id": "ci-ghost-001", "project_id": "pi-ghost-001"})
    status, answer = await _post(api, key, body)
    assert (status, answer["error_code"]) == (404, "COMPANY_NOT_FOUND")


async def test_inactive_project_is_403(api, deps):
    key = await add_tenant(deps, "ci-idle-001", "pi-idle-001", project_status="paused")
    body = initiate_body(company_data={"company_id": "ci-idle-001", "project_id": "pi-idle-001"})
    status, answer = await _post(api, key, body)
    assert (status, answer["error_code"]) == (403, "PROJECT_INACTIVE")


async def test_channel_not_allowed_for_the_project_is_403(api, deps):
    key = await add_tenant(deps, "ci-sms-only", "pi-sms-only", allowed_channels=["sms"])
    body = initiate_body("whatsapp", company_data={"company_id": "ci-sms-only", "project_id": "pi-sms-only"})
    status, answer = await _post(api, key, body)
    assert (status, answer["error_code"]) == (403, "CHANNEL_NOT_ALLOWED")


async def test_channel_without_a_configured_queue_is_500_configuration_error(settings, tenant):
    async with api_client(settings, email_queue_url=None) as (client, _):
        status, answer = await _post(client, tenant.api_key, initiate_body("email"))
    assert (status, answer["error_code"]) == (500, "CONFIGURATION_ERROR")


async def test_channel_without_a_sender_configured_is_500_configuration_error(api, deps):
    key = await add_tenant(deps, "ci-nosender", "pi-nosender", channel_config={"sms": None, "whatsapp": None})
    body = initiate_body("sms", company_data={"company_id": "ci-nosender", "project_id": "pi-nosender"})
    status, answer = await _post(api, key, body)
    assert (status, answer["error_code"]) == (500, "CONFIGURATION_ERROR")
