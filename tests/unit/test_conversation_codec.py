"""The conversations table's stored form (`conversation_codec`): items read back as the typed record for every
status and ledger state, the initial record exactly as the template sender has always written it, and the
conditional writes exactly as the stores have always sent them. No AWS: the stores send to `RecordingDynamoDB`."""

from __future__ import annotations

import time
import zlib
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from consumers.template_job import new_conversation, parse_template_job
from local_stack.seed import demo_company
from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.dynamo_codec import from_item, to_item
from service.adapters.aws.reply_claims import DynamoReplyClaims
from service.domain.claims import RETRIES_EXHAUSTED, may_reopen
from service.domain.context import build_context
from service.domain.conversation import (
    AiProfile,
    ConversationKey,
    ConversationStatus,
    Failure,
    Lease,
    Message,
    NewConversation,
    ReplyAttempt,
    SendState,
    TemplateDraft,
    TokenUsage,
)
from service.domain.initiate import validate_initiate_body
from service.domain.timefmt import utc_iso
from tests.fakes import INDEX_SHARDS

REQUEST_ID = "5d0f6a52-2b1c-4d7e-9a43-0c8e1f2b3a4d"
KEY = ConversationKey("+447700900123", f"ci-demo-001#pi-demo-001#{REQUEST_ID}#447700900002")
SMS_CREDENTIALS = "comms/sms-credentials/ci-demo-001/pi-demo-001/twilio-dev"
AI_INSTRUCTIONS = (
    "You write the first message of a conversation for Demo Homes. Fill the template variables: "
    "'1' is the recipient's first name, '2' is one friendly sentence about their enquiry."
)
REPLY_INSTRUCTIONS = "You answer the recipient's replies for Demo Homes, briefly and helpfully."
STAMP = utc_iso(0.0)  # what the stores below write as `updated_at` (their clock is stopped at 0)


class RecordingDynamoDB:
    """Stands in for the DynamoDB client of a store: records each write; refuses the first `refuse` of them as
    DynamoDB refuses a failed condition (the item `old` sent back as ALL_OLD), then answers an empty item."""

    def __init__(self, refuse: int = 0, old: dict[str, Any] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._refuse = refuse
        self._old = old or {}

    async def put_item(self, **params: Any) -> dict[str, Any]:
        return self._answer("PutItem", params)

    async def update_item(self, **params: Any) -> dict[str, Any]:
        return self._answer("UpdateItem", params)

    def _answer(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((operation, params))
        if self._refuse:
            self._refuse -= 1
            refusal = {"Error": {"Code": "ConditionalCheckFailedException"}, "Item": to_item(self._old)}
            raise ClientError(refusal, operation)
        return {"Attributes": {}}

    def sent(self, index: int = -1) -> dict[str, Any]:
        return self.requests[index][1]

    def values(self, index: int = -1) -> dict[str, Any]:
        """The ExpressionAttributeValues of a recorded write, decoded."""
        return from_item(self.sent(index)["ExpressionAttributeValues"])


def template_claims(dynamodb: RecordingDynamoDB) -> DynamoConversationClaims:
    return DynamoConversationClaims(dynamodb, "table", clock=lambda: 0.0, messages_table="messages", index_shards=8)


def reply_claims(dynamodb: RecordingDynamoDB) -> DynamoReplyClaims:
    return DynamoReplyClaims(dynamodb, "table", clock=lambda: 0.0, messages_table="messages")


def demo_job_body(channel: str) -> str:
    """A channel-queue message for the demo tenant, as the router builds it."""
    request = validate_initiate_body(
        {
            "company_data": {"company_id": "ci-demo-001", "project_id": "pi-demo-001"},
            "recipient_data": {
                "recipient_first_name": "Lee",
                "recipient_last_name": "Hayton",
                "recipient_tel": "+447700900123",
                "recipient_email": "lee@example.com",
                "comms_consent": True,
            },
            "project_data": {"property": "12 Acacia Avenue", "viewing": "Saturday 10am"},
            "request_data": {
                "request_id": REQUEST_ID,
                "channel_method": channel,
                "initial_request_timestamp": "2025-04-27T05:45:56Z",
            },
        }
    )
    company = demo_company("comms", "dev", time.time())
    sender = company.sender_address(channel) or ""
    component = sender if channel == "email" else sender.lstrip("+")
    conversation_id = f"ci-demo-001#pi-demo-001#{REQUEST_ID}#{component}"
    context = build_context(request, company, conversation_id, router_version="r", trace_id="t", queue_timestamp="q")
    return orjson.dumps(context.model_dump(mode="json")).decode()


def stored(item: dict[str, Any]) -> dict[str, Any]:
    """What a read gives back after a write: through DynamoDB's attribute encoding and back."""
    return from_item(to_item(item))


def new_sms() -> NewConversation:
    return NewConversation(
        key=KEY,
        request_id=REQUEST_ID,
        channel="sms",
        company_id="ci-demo-001",
        project_id="pi-demo-001",
        company_address="+447700900002",
        recipient={"recipient_tel": "+447700900123"},
        ai_config={
            "api_key_reference": "ref",
            "model": "gpt-x",
            "mode": "background",
            "replies": {"instructions": "r"},
        },
        channel_config={"sms_credentials_id": SMS_CREDENTIALS},
        processor_version="p",
    )


# ---- the initial record --------------------------------------------------------------------------------------


def test_the_initial_record_of_a_parsed_demo_job_is_exactly_what_the_template_sender_has_always_written():
    new = new_conversation(parse_template_job(demo_job_body("sms")))

    fields = codec.new_conversation_fields(new, "2026-01-01T00:00:00.000Z", INDEX_SHARDS)

    assert fields == {
        "request_id": REQUEST_ID,
        "channel_method": "sms",
        "company_id": "ci-demo-001",
        "project_id": "pi-demo-001",
        "company_name": "Demo Homes Ltd",
        "project_name": "Spring viewings",
        "company_rep": {"company_rep_1": "Alex Example"},
        "recipient_first_name": "Lee",
        "recipient_last_name": "Hayton",
        "recipient_tel": "+447700900123",
        "recipient_email": "lee@example.com",
        "comms_consent": True,
        "project_data": {"property": "12 Acacia Avenue", "viewing": "Saturday 10am"},
        "ai_config": {
            "api_key_reference": "comms/openai-api-key/sms-dev",
            "model": "gpt-4.1-mini",
            "mode": "foreground",
            "requests_per_second": 100,  # the demo key's own AI pace (local_stack.seed)
            "template_sender": {"instructions": AI_INSTRUCTIONS, "variables": ["1", "2"]},
            "replies": {"instructions": REPLY_INSTRUCTIONS},
        },
        "channel_config": {
            "company_sms_number": "+447700900002",
            "sms_credentials_id": SMS_CREDENTIALS,
            "sends_per_second": 100.0,  # the demo sender's own pace (local_stack.seed)
        },
        "router_version": "r",
        "processor_version": new.processor_version,
        "trace_id": "t",
        "messages": [],
        "task_complete": 0,
        "hand_off_to_human": False,
        "send_state": "not_sent",
        "created_at": "2026-01-01T00:00:00.000Z",
        "gsi_company_sms_number": "+447700900002",
        "gsi_recipient_tel": "+447700900123",
        "gsi_company_shard": codec.company_shard("ci-demo-001", new.key.conversation_id, 8),
    }


@pytest.mark.parametrize(
    ("channel", "sender_attribute", "sender", "recipient_attribute", "recipient"),
    [
        ("whatsapp", "gsi_company_whatsapp_number", "+447700900001", "gsi_recipient_tel", "+447700900123"),
        ("sms", "gsi_company_sms_number", "+447700900002", "gsi_recipient_tel", "+447700900123"),
        ("email", "gsi_company_email", "hello@demo-homes.example", "gsi_recipient_email", "lee@example.com"),
    ],
)
def test_the_initial_record_carries_the_index_attributes_of_its_channel_only(
    channel, sender_attribute, sender, recipient_attribute, recipient
):
    new = new_conversation(parse_template_job(demo_job_body(channel)))
    fields = codec.new_conversation_fields(new, "s", INDEX_SHARDS)

    assert {name: value for name, value in fields.items() if name.startswith("gsi_")} == {
        sender_attribute: sender,
        recipient_attribute: recipient,
        "gsi_company_shard": fields["gsi_company_shard"],  # every channel's: the per-company index
    }


def test_a_conversation_s_company_shard_is_stable_and_spreads_a_company_over_every_shard():
    ids = [f"ci-demo-001#pi-demo-001#{n:08d}#447700900002" for n in range(400)]

    shards = {codec.company_shard("ci-demo-001", conversation_id, 8) for conversation_id in ids}

    assert shards == {f"ci-demo-001#{n}" for n in range(8)}
    assert codec.company_shard("ci-demo-001", ids[0], 8) == "ci-demo-001#" + str(zlib.crc32(ids[0].encode()) % 8)


def test_the_initial_record_leaves_out_what_has_no_value():
    new = NewConversation(
        key=KEY, request_id="r", channel="sms", company_id="c", project_id="p", company_address="+447700900002"
    )

    fields = codec.new_conversation_fields(new, "s", INDEX_SHARDS)

    assert not {"ai_config", "channel_config", "recipient_first_name", "recipient_email", "comms_consent"} & set(fields)
    assert fields["company_rep"] == {} and fields["project_data"] == {} and fields["router_version"] == ""


def test_a_created_record_reads_back_processing_claimed_and_open():
    item = stored(codec.created_item(new_sms(), "worker-1", 1234.5, "2026-01-01T00:00:00.000Z", INDEX_SHARDS))

    record = codec.record_from_item(item)

    assert record.key == KEY
    assert (record.status, record.channel, record.company_id, record.project_id) == (
        ConversationStatus.PROCESSING,
        "sms",
        "ci-demo-001",
        "pi-demo-001",
    )
    assert record.claim == Lease("worker-1", 1234.5)
    assert item["claim_count"] == 1 and item["updated_at"] == item["created_at"] == record.created_at
    assert record.ledger.state is SendState.NOT_SENT and record.ledger.generated is None
    assert record.is_open and not record.hand_off_to_human and record.messages == ()
    assert (record.company_address, record.credentials_id) == ("+447700900002", SMS_CREDENTIALS)
    assert record.ai == AiProfile("ref", "gpt-x", "r", background=True)
    assert record.failure is None and record.reply_attempt is None and record.reply_claim == Lease()


# ---- item -> record -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(ConversationStatus))
def test_every_status_reads_back_as_itself(status):
    assert (
        codec.record_from_item(stored({**codec.item_fields(KEY), "conversation_status": status.value})).status is status
    )


@pytest.mark.parametrize("value", ["no_such_status", None])
def test_an_unknown_or_missing_status_reads_as_failed_unknown(value):
    item = {**codec.item_fields(KEY), "conversation_status": value}

    assert codec.record_from_item(stored(item)).status is ConversationStatus.FAILED_UNKNOWN


def test_a_record_with_almost_nothing_reads_with_defaults():
    record = codec.record_from_item({"primary_channel": KEY.primary_channel, "conversation_id": KEY.conversation_id})

    assert record.key == KEY and record.channel == "" and record.company_id == ""
    assert not record.is_open  # only task_complete = 0 is open
    assert record.ai == AiProfile() and record.claim == Lease() and record.messages == ()
    assert record.ledger.state is SendState.NOT_SENT and not record.awaits_final_update


def test_a_not_sent_ledger_with_generated_content_reads_back_for_sending_it():
    item = {
        **codec.item_fields(KEY),
        "conversation_status": "processing",
        "send_state": "not_sent",
        "generated_content": {"1": "Lee", "2": "Hello"},
        "ai_usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "thread_id": "conv_1",
    }

    ledger = codec.record_from_item(stored(item)).ledger

    assert ledger.state is SendState.NOT_SENT and ledger.generated == {"1": "Lee", "2": "Hello"}
    assert ledger.usage == TokenUsage(3, 4, 7) and ledger.provider_message_id is None


async def test_a_recorded_attempt_reads_back_attempting_with_what_it_wrote():
    draft = TemplateDraft("conv_1", {"1": "Lee", "2": "Hello"}, TokenUsage(3, 4, 7), 1700000000.25)
    dynamodb = RecordingDynamoDB()
    await template_claims(dynamodb).record_attempt(KEY, "worker-1", draft)
    values = dynamodb.values()
    item = {
        **codec.item_fields(KEY),
        "conversation_status": "processing",
        "send_state": values[":attempting"],
        "send_attempted_at": values[":at"],
        "thread_id": values[":thread"],
        "generated_content": values[":generated"],
        "ai_usage": values[":usage"],
    }

    record = codec.record_from_item(stored(item))

    assert record.ledger.state is SendState.ATTEMPTING and record.awaits_final_update
    assert record.ledger.generated == {"1": "Lee", "2": "Hello"} and record.ledger.usage == TokenUsage(3, 4, 7)
    assert record.ledger.attempted_at == 1700000000.25 and record.thread_id == "conv_1"


async def test_a_finalised_template_is_one_update_and_reads_back_sent_with_the_ledger_as_its_first_message():
    message = Message("SM1", "assistant", '{"1":"Lee","2":"Hello"}', "2026-01-01T00:00:01.000Z", TokenUsage(3, 4, 7))
    dynamodb = RecordingDynamoDB()
    await template_claims(dynamodb).finalise(KEY, message, "conv_1", 42)
    [(update, _)] = dynamodb.requests  # no item of its own: the ledger (written by the attempt) is the message
    values = dynamodb.values()
    item = {
        **codec.item_fields(KEY),
        "channel_method": "whatsapp",
        "conversation_status": values[":sent_status"],
        "send_state": values[":sent"],
        "provider_message_id": values[":sid"],
        "generated_content": {"1": "Lee", "2": "Hello"},  # from the attempt
        "ai_usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        "thread_id": values[":thread"],
        "message_count": values[":one"],
        "first_message_at": values[":first_at"],
        "task_complete": 0,
    }

    record = codec.record_from_item(stored(item))

    assert update == "UpdateItem"
    assert record.ledger_message == message
    assert record.status is ConversationStatus.INITIAL_MESSAGE_SENT and record.is_open
    assert record.ledger.state is SendState.SENT and record.ledger.provider_message_id == "SM1"
    assert record.recorded_messages == 1 and record.messages == () and not record.awaits_final_update


def test_an_unknown_send_state_reads_as_not_sent():
    item = {**codec.item_fields(KEY), "send_state": "sideways"}

    assert codec.record_from_item(item).ledger.state is SendState.NOT_SENT


def test_messages_read_back_with_tokens_delivery_states_and_positions_kept():
    user = Message("SMu", "user", "Hello?", "2026-01-01T00:00:00.000Z")
    reply = Message("SMa", "assistant", "Hi", "2026-01-01T00:00:01.000Z", TokenUsage(1, 2, 3), "delivered")
    elements = [codec.message_element(user), "not a map", codec.message_element(reply)]

    messages = codec.record_from_item(stored({**codec.item_fields(KEY), "messages": elements})).messages

    assert messages[0] == user and messages[2] == reply
    assert messages[1].message_id == ""  # kept in place: delivery states address messages by position
    assert codec.message_element(reply) == {
        "message_id": "SMa",
        "timestamp": "2026-01-01T00:00:01.000Z",
        "role": "assistant",
        "content": "Hi",
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "delivery_status": "delivered",
    }
    assert set(codec.message_element(user)) == {"message_id", "timestamp", "role", "content"}


def test_a_reply_claim_and_its_ledger_entry_read_back():
    attempt = ReplyAttempt(
        ("SM1", "SM2"), "a\nb", "2026-01-01T00:00:00.000Z", "Hi", TokenUsage(1, 2, 3), "conv_1", 99.5
    )
    item = {
        **codec.item_fields(KEY),
        "conversation_status": "processing_reply",
        "status_before_reply": "initial_message_sent",
        "reply_owner": "replier-1",
        "reply_lease_expires": 123.0,
        "reply_attempt": codec.reply_attempt_fields(attempt),
        "replied_message_sids": {"SM0"},
    }

    record = codec.record_from_item(stored(item))

    assert record.status is ConversationStatus.PROCESSING_REPLY
    assert record.reply_claim == Lease("replier-1", 123.0)
    assert record.reply_attempt == attempt and record.awaits_final_update
    assert record.replied_sids == frozenset({"SM0"})


def test_a_malformed_reply_ledger_entry_still_reads_as_an_entry():
    """A send may have gone out: any stored map counts, its missing parts empty."""
    record = codec.record_from_item({**codec.item_fields(KEY), "reply_attempt": {"batch": "x"}})

    assert record.reply_attempt == ReplyAttempt((), "", "", "", TokenUsage(), "", 0.0)
    assert record.awaits_final_update


@pytest.mark.parametrize(
    ("kind", "exhausted"),
    [(None, False), (RETRIES_EXHAUSTED, True)],
)
async def test_a_failure_reads_back_with_its_reason_and_whether_retries_ran_out(kind, exhausted):
    failure = Failure(ConversationStatus.FAILED_TO_PROCESS_AI, "ai_unavailable", exhausted)
    dynamodb = RecordingDynamoDB()
    await template_claims(dynamodb).fail(KEY, "worker-1", failure)
    values = dynamodb.values()
    assert values.get(":kind") == kind
    item = {
        **codec.item_fields(KEY),
        "conversation_status": values[":failed"],
        "failure_reason": values[":reason"],
        "failure_kind": kind,
        "updated_at": "2026-01-01T00:00:00.000Z",
    }

    record = codec.record_from_item(stored(item))

    assert record.failure == failure
    assert may_reopen(record) is exhausted
    assert record.updated_at == "2026-01-01T00:00:00.000Z"


def test_a_failed_status_without_a_reason_still_reads_as_failed():
    item = {**codec.item_fields(KEY), "conversation_status": "failed_unknown"}

    assert codec.record_from_item(item).failure == Failure(ConversationStatus.FAILED_UNKNOWN, "")


def test_a_reopened_record_reads_back_with_its_redrive_bookkeeping():
    item = {
        **codec.item_fields(KEY),
        "conversation_status": "processing",
        "last_failure_reason": "ai_unavailable",
        "reopen_count": 2,
        "claim_owner": "worker-1",
        "claim_expires_at": 0,
    }

    record = codec.record_from_item(stored(item))

    assert (record.last_failure_reason, record.reopen_count, record.failure) == ("ai_unavailable", 2, None)
    assert record.claim == Lease("worker-1", 0.0)


def test_shared_fields_are_the_record_without_configuration_kept_callbacks_and_index_shard():
    item = stored(
        {
            **codec.created_item(new_sms(), "worker-1", 1.0, "s", INDEX_SHARDS),
            "early_delivery": {"SM9": {"status": "delivered", "at": "s"}},
        }
    )

    record = codec.record_from_item(item)

    assert record.early_delivery_sids == frozenset({"SM9"})
    assert dict(record.shared_fields) == {
        k: v for k, v in item.items() if k not in ("ai_config", "channel_config", "early_delivery", "gsi_company_shard")
    }
    assert record.shared_fields["conversation_id"] == KEY.conversation_id


# ---- writes, exactly as the adapters have always sent them ----------------------------------------------------


def lapsed_claim(expires_at: float) -> dict[str, Any]:
    return {**codec.item_fields(KEY), "conversation_status": "processing", "claim_expires_at": expires_at}


async def test_the_takeover_is_conditioned_on_a_lapsed_processing_claim():
    dynamodb = RecordingDynamoDB(refuse=1, old=lapsed_claim(50))

    await template_claims(dynamodb).claim(new_sms(), "worker-2", 200.0, 100.0)

    (create, _), (takeover, params) = dynamodb.requests
    assert (create, dynamodb.sent(0)["ConditionExpression"]) == ("PutItem", "attribute_not_exists(conversation_id)")
    assert takeover == "UpdateItem"
    assert params["ConditionExpression"] == (
        "attribute_not_exists(conversation_id) OR (#status = :processing AND claim_expires_at <= :now)"
    )
    assert params["ExpressionAttributeNames"] == {"#status": "conversation_status"}
    assert params["Key"] == {
        "primary_channel": {"S": KEY.primary_channel},
        "conversation_id": {"S": KEY.conversation_id},
    }
    assert dynamodb.values()[":now"] == 100


@pytest.mark.parametrize(
    ("existing", "now", "takes_over"),
    [
        (lapsed_claim(100), 100.5, True),
        (lapsed_claim(100), 100.0, True),  # lapsed at its expiry, as `Lease.is_live` and the condition say
        (lapsed_claim(100), 99.5, False),
        ({**codec.item_fields(KEY), "conversation_status": "initial_message_sent"}, 1000.0, False),
    ],
)
async def test_a_takeover_is_sent_only_where_its_condition_lets_it_through(existing, now, takes_over):
    dynamodb = RecordingDynamoDB(refuse=1, old=existing)

    await template_claims(dynamodb).claim(new_sms(), "worker-2", now + 60, now)

    assert [operation for operation, _ in dynamodb.requests] == ["PutItem", *(["UpdateItem"] if takes_over else [])]


async def test_the_reply_final_update_has_a_stopped_variant_that_keeps_the_status():
    messages = [Message("SM1", "user", "hi", "t")]
    claimed = codec.record_from_item({**codec.item_fields(KEY), "message_count": 3})
    # The message is stored already (a retry: its put is refused), and the claim is no longer processing_reply:
    # the stopped variant follows.
    dynamodb = RecordingDynamoDB(refuse=2)

    await reply_claims(dynamodb).finalise(KEY, "r-1", messages, ["SM1"], "resp_2", 5, claimed=claimed)

    assert [operation for operation, _ in dynamodb.requests] == ["PutItem", "UpdateItem", "UpdateItem"]
    normal, stopped = dynamodb.sent(1), dynamodb.sent(2)
    assert normal["ConditionExpression"] == "reply_owner = :owner AND #status = :replying"
    assert stopped["ConditionExpression"] == "reply_owner = :owner AND #status IN (:opted_out, :handed_off)"
    assert normal["UpdateExpression"].startswith("SET #status = :replied_status, #count = :count, thread_id = ")
    assert stopped["UpdateExpression"].startswith("SET #count = :count, thread_id = :thread")
    assert "replied_message_sids" not in normal["UpdateExpression"]  # the fragments are on the user message item
    assert from_item(dynamodb.sent(0)["Item"])["fragment_sids"] == ["SM1"]
    assert dynamodb.values(1)[":count"] == 4 == dynamodb.values(2)[":count"]  # after the 3 the claim read
    assert dynamodb.values(1)[":thread"] == "resp_2" == dynamodb.values(2)[":thread"]  # the next reply chains on


async def test_an_exhausted_reply_failure_goes_back_to_the_status_before_the_claim_with_the_failure_noted():
    dynamodb = RecordingDynamoDB()
    failure = Failure(ConversationStatus.FAILED_TO_SEND_MESSAGE, "x", exhausted=True)

    await reply_claims(dynamodb).fail(KEY, "r-1", failure)

    assert dynamodb.sent()["UpdateExpression"].startswith(
        "SET #status = status_before_reply, last_reply_failure = :failure"
    )
    assert dynamodb.values()[":failure"] == {
        "status": "failed_to_send_message",
        "reason": "x",
        "failure_kind": RETRIES_EXHAUSTED,
        "at": STAMP,
    }


async def test_closing_a_reopen_restores_exactly_what_was_there():
    before = codec.record_from_item(
        {
            **codec.item_fields(KEY),
            "conversation_status": "failed_to_process_ai",
            "failure_reason": "ai_unavailable",
            "failure_kind": RETRIES_EXHAUSTED,
            "claim_owner": "worker-1",
            "claim_expires_at": 0,
        }
    )
    dynamodb = RecordingDynamoDB()

    assert await template_claims(dynamodb).close_reopened(KEY, before, "r-stamp")

    assert dynamodb.sent()["UpdateExpression"] == (
        "SET #status = :failed, failure_reason = :reason, failure_kind = :kind, updated_at = :stamp "
        "REMOVE last_failure_reason, reopen_count"
    )
    assert dynamodb.sent()["ConditionExpression"].endswith("AND claim_owner = :owner")
    values = dynamodb.values()
    assert (values[":count"], values[":owner"], values[":reopened"]) == (1, "worker-1", "r-stamp")


async def test_only_a_record_failed_by_exhausted_retries_can_have_a_reopen_closed():
    permanent = codec.record_from_item(
        {**codec.item_fields(KEY), "conversation_status": "failed_to_process_ai", "failure_reason": "bad"}
    )
    dynamodb = RecordingDynamoDB()

    assert not await template_claims(dynamodb).close_reopened(KEY, permanent, "r")
    assert dynamodb.requests == []


@pytest.mark.parametrize("stored", [True, "true", "false", 1, None])
def test_only_a_stored_true_flags_a_conversation_for_hand_off(stored: Any) -> None:
    record = codec.record_from_item({**codec.item_fields(KEY), "hand_off_to_human": stored})

    assert record.hand_off_to_human is (stored is True)


def test_a_template_message_whose_content_lacks_the_channels_fields_reads_as_its_json():
    item = {
        **codec.item_fields(KEY),
        "channel_method": "sms",
        "send_state": "sent",
        "provider_message_id": "SM1",
        "generated_content": {"text": "hand-edited"},
        "first_message_at": "2026-01-01T00:00:01.000Z",
    }

    message = codec.record_from_item(stored(item)).ledger_message

    assert message is not None and message.content == '{"text":"hand-edited"}'
