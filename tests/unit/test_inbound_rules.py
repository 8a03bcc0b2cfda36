"""The pure rules of inbound replies: keywords, hand-off routing, fragment order and batch identity."""

from __future__ import annotations

from typing import Any

import pytest

from service.domain.company import CompanyRecord
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus
from service.domain.inbound import (
    Fragment,
    InvalidInbound,
    Keyword,
    bare_address,
    batch_of,
    hand_off_reason,
    inbound_from_form,
    keyword_of,
)


@pytest.mark.parametrize("body", ["STOP", "stop", "  Stop  ", "STOPALL", "unsubscribe", "Cancel", "END", "quit"])
def test_whole_message_opt_out_words_opt_out_in_any_case(body: str) -> None:
    assert keyword_of(body, suppressed=False) is Keyword.OPT_OUT


@pytest.mark.parametrize("body", ["please stop", "STOP!", "stop it", "ending soon", ""])
def test_opt_out_words_inside_a_sentence_are_ordinary_messages(body: str) -> None:
    assert keyword_of(body, suppressed=False) is None


@pytest.mark.parametrize("body", ["START", "unstop"])
def test_start_and_unstop_opt_back_in(body: str) -> None:
    assert keyword_of(body, suppressed=True) is Keyword.OPT_IN


def test_yes_opts_in_only_a_suppressed_sender() -> None:
    assert keyword_of("yes", suppressed=True) is Keyword.OPT_IN
    assert keyword_of("yes", suppressed=False) is None


def test_whatsapp_prefix_is_stripped_for_look_ups() -> None:
    assert bare_address("whatsapp:+447700900123") == "+447700900123"
    assert bare_address("+447700900123") == "+447700900123"


def test_form_without_message_sid_is_invalid() -> None:
    with pytest.raises(InvalidInbound):
        inbound_from_form("sms", {"From": "+447700900123", "To": "+447700900002"})


def test_form_becomes_an_inbound_message_with_bare_addresses() -> None:
    message = inbound_from_form(
        "whatsapp",
        {"MessageSid": "SM1", "From": "whatsapp:+447700900123", "To": "whatsapp:+447700900001", "Body": "Hi"},
    )
    assert (message.sender, message.company_address, message.body) == ("+447700900123", "+447700900001", "Hi")


SENDER = "+447700900123"


def conversation(
    status: ConversationStatus = ConversationStatus.INITIAL_MESSAGE_SENT, *, flagged: bool = False
) -> ConversationRecord:
    return ConversationRecord(
        key=ConversationKey(SENDER, "c#p#r#447700900001"),
        status=status,
        channel="whatsapp",
        company_id="c",
        project_id="p",
        hand_off_to_human=flagged,
    )


def company(**rules: Any) -> CompanyRecord:
    return CompanyRecord.model_validate({"company_id": "c", "project_id": "p", **rules})


def test_a_reply_to_a_handed_off_conversation_goes_to_a_human_too() -> None:
    assert hand_off_reason(conversation(ConversationStatus.HANDED_OFF), company(), SENDER) == "conversation_handed_off"


def test_conversation_flag_hands_off() -> None:
    assert hand_off_reason(conversation(flagged=True), company(), SENDER) == "conversation_flagged"


def test_project_auto_queue_hands_off_every_reply() -> None:
    assert hand_off_reason(conversation(), company(auto_queue_reply_message=True), SENDER) == "project_auto_queue"


def test_listed_sender_hands_off() -> None:
    listed = company(auto_queue_reply_message_from_number=["+447700900999", SENDER])
    assert hand_off_reason(conversation(), listed, SENDER) == "sender_auto_queue"


def test_listed_email_sender_hands_off_whatever_the_case_and_spacing() -> None:
    listed = company(auto_queue_reply_message_from_email=[" Ann@Example.com "])
    assert hand_off_reason(conversation(), listed, "ann@example.com") == "sender_auto_queue"


def test_unlisted_sender_of_an_unflagged_conversation_is_answered_by_the_ai() -> None:
    unlisted = company(auto_queue_reply_message=False, auto_queue_reply_message_from_number=["+447700900999"])
    assert hand_off_reason(conversation(), unlisted, SENDER) is None


@pytest.mark.parametrize("odd", [{"auto_queue_reply_message": "yes"}, {"auto_queue_reply_message_from_number": SENDER}])
def test_a_malformed_hand_off_rule_is_no_rule(odd: dict[str, Any]) -> None:
    assert hand_off_reason(conversation(), company(**odd), SENDER) is None


def test_batch_orders_fragments_by_received_time_then_sid() -> None:
    staged = [
        Fragment("SMc", "third", "2026-01-01T00:00:02.000Z"),
        Fragment("SMb", "second", "2026-01-01T00:00:01.000Z"),
        Fragment("SMa", "first", "2026-01-01T00:00:01.000Z"),
    ]
    assert batch_of(staged).text == "first\nsecond\nthird"


def test_batch_skips_fragments_already_answered() -> None:
    staged = [Fragment("SMa", "old", "2026-01-01T00:00:00.000Z"), Fragment("SMb", "new", "2026-01-01T00:00:01.000Z")]
    assert batch_of(staged, already_answered=["SMa"]).message_sids == ["SMb"]


def test_batch_restricted_to_a_pending_attempt_leaves_later_fragments_for_the_next_reply() -> None:
    staged = [Fragment("SMa", "one", "2026-01-01T00:00:00.000Z"), Fragment("SMb", "two", "2026-01-01T00:00:01.000Z")]
    assert batch_of(staged, only=["SMa"]).message_sids == ["SMa"]


def test_batch_key_is_the_same_whatever_the_order_of_its_fragments() -> None:
    one = batch_of([Fragment("SMa", "x", "1"), Fragment("SMb", "y", "2")])
    other = batch_of([Fragment("SMb", "y", "2"), Fragment("SMa", "x", "1")])
    assert one.key == other.key
