"""The local stack's moto speed-ups return what moto's own code returns (local_stack/moto_speedups.py)."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from moto import backends
from moto.dynamodb.models import DynamoDBBackend
from moto.sqs import models as sqs_models
from moto.sqs.models import Queue, SQSBackend

from local_stack import moto_speedups

ACCOUNT, REGION = "123456789012", "eu-west-2"


@pytest.fixture
def originals(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """moto's own functions; the patches are undone after each test (monkeypatch restores what it set)."""
    saved = {
        "list_of_moto_modules": backends.list_of_moto_modules,
        "is_message_valid_based_on_retention_period": SQSBackend.is_message_valid_based_on_retention_period,
        "unix_time_millis": sqs_models.unix_time_millis,
        "unix_time": sqs_models.unix_time,
    }
    monkeypatch.setattr(backends, "list_of_moto_modules", saved["list_of_moto_modules"])
    monkeypatch.setattr(
        SQSBackend, "is_message_valid_based_on_retention_period", saved["is_message_valid_based_on_retention_period"]
    )
    monkeypatch.setattr(sqs_models, "unix_time_millis", saved["unix_time_millis"])
    monkeypatch.setattr(sqs_models, "unix_time", saved["unix_time"])
    for name in moto_speedups.DYNAMODB_ITEM_OPERATIONS:
        monkeypatch.setattr(DynamoDBBackend, name, getattr(DynamoDBBackend, name))
    monkeypatch.setattr(Queue, "delete_message", Queue.delete_message)
    yield saved


def test_every_speed_up_applies_to_the_locked_moto(originals: dict[str, object]) -> None:
    assert moto_speedups.apply() == list(moto_speedups.PATCHES)


def test_the_cached_module_list_is_the_one_moto_lists(originals: dict[str, object]) -> None:
    listed = list(backends.list_of_moto_modules())
    moto_speedups.apply()
    assert list(backends.list_of_moto_modules()) == listed
    assert list(backends.list_of_moto_modules()) == listed  # read twice: not a spent iterator


@pytest.mark.parametrize("age_s", [0, 59, 61, 3600])
def test_the_retention_check_agrees_with_moto(originals: dict[str, object], age_s: int) -> None:
    backend = SQSBackend(region_name=REGION, account_id=ACCOUNT)
    backend.create_queue("q", MessageRetentionPeriod="60")
    message = backend.send_message("q", "body")
    message.sent_timestamp = int((time.time() - age_s) * 1000)
    expected = backend.is_message_valid_based_on_retention_period("q", message)
    moto_speedups.apply()
    assert backend.is_message_valid_based_on_retention_period("q", message) is expected
    assert expected is (age_s < 60)


def test_the_message_clock_without_an_argument_is_the_current_time(originals: dict[str, object]) -> None:
    moto_speedups.apply()
    before = time.time() * 1000.0
    now = sqs_models.unix_time_millis()
    after = time.time() * 1000.0
    assert before <= now <= after


def test_the_message_clock_of_a_given_datetime_is_moto_s(originals: dict[str, object]) -> None:
    moment = datetime(2026, 11, 30, 12, 0, 0) + timedelta(microseconds=250)
    expected = (originals["unix_time_millis"](moment), originals["unix_time"](moment))  # type: ignore[operator]
    moto_speedups.apply()
    assert (sqs_models.unix_time_millis(moment), sqs_models.unix_time(moment)) == expected


def test_messages_are_received_visible_and_hidden_as_before(originals: dict[str, object]) -> None:
    moto_speedups.apply()
    backend = SQSBackend(region_name=REGION, account_id=ACCOUNT)
    backend.create_queue("q", VisibilityTimeout="30")
    backend.send_message("q", "one")
    backend.send_message("q", "two", delay_seconds=60)
    received = backend.receive_message("q", count=10, wait_seconds_timeout=0, visibility_timeout=30)
    assert [m.body for m in received] == ["one"]
    assert backend.receive_message("q", count=10, wait_seconds_timeout=0, visibility_timeout=30) == []


def _lock_of(operation: object) -> Any:
    return inspect.getclosurevars(operation).nonlocals["lock"]  # type: ignore[arg-type]


def test_every_dynamodb_item_operation_takes_the_same_lock(originals: dict[str, object]) -> None:
    moto_speedups.apply()
    locks = {id(_lock_of(getattr(DynamoDBBackend, name))) for name in moto_speedups.DYNAMODB_ITEM_OPERATIONS}
    assert len(locks) == 1


def test_a_dynamodb_item_operation_holds_the_lock_until_it_returns(
    originals: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow_update_item(*args: object, **kwargs: object) -> None:
        inside.set()
        release.wait(10)

    monkeypatch.setattr(DynamoDBBackend, "update_item", slow_update_item)
    moto_speedups.apply()
    backend = DynamoDBBackend(region_name=REGION, account_id=ACCOUNT)
    worker = threading.Thread(target=backend.update_item)
    worker.start()
    inside.wait(10)
    lock = _lock_of(DynamoDBBackend.get_item)
    held_by_the_update = not lock.acquire(blocking=False)  # from this thread: another operation would wait
    release.set()
    worker.join(10)
    assert held_by_the_update
    assert lock.acquire(blocking=False)
    lock.release()


def test_an_sqs_delete_holds_its_queue_s_message_lock(originals: dict[str, object]) -> None:
    moto_speedups.apply()
    backend = SQSBackend(region_name=REGION, account_id=ACCOUNT)
    queue = backend.create_queue("q")
    backend.send_message("q", "one")
    [received] = backend.receive_message("q", count=1, wait_seconds_timeout=0, visibility_timeout=30)
    [stored] = queue._messages
    own_check = stored.had_receipt_handle
    held: list[bool] = []

    def checked_while_probing(receipt_handle: str) -> bool:  # runs inside the delete, for each message
        taken: list[bool] = []

        def probe() -> None:  # from another thread: can the queue's lock be taken now?
            if queue._messages_lock.acquire(blocking=False):
                queue._messages_lock.release()
                taken.append(True)
            else:
                taken.append(False)

        thread = threading.Thread(target=probe)
        thread.start()
        thread.join(10)
        held.append(not taken[0])
        return bool(own_check(receipt_handle))

    stored.had_receipt_handle = checked_while_probing
    backend.delete_message("q", received.receipt_handle)
    assert held and all(held)
    assert queue._messages == []
