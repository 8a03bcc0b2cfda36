"""Exact speed-ups for the moto server process of the local stack (never imported by the service).

moto 5.2 does per-request work that grows with the queue, and it does it under one server-wide lock:
- `DomainDispatcherApplication.get_application` lists moto's package directory (listdir + isdir on ~190
  entries) for every request, inside the lock every request thread takes;
- every received message asks `get_queue_attributes` for the retention period, which computes *all* of a queue's
  attributes, three of them counts over every message in the queue (O(queue length) per message received);
- `Message.visible`/`delayed` read the clock through `utcnow() - utcfromtimestamp(0)` (two datetimes a call), once
  per queued message on every receive.

The local AWS endpoint bound the benchmarks at about a third of the rate it reached with fewer queued messages.
Two patches are for fidelity, not speed: DynamoDB item operations are applied one at a time, as on AWS, and an SQS
delete no longer races the queue's sends.
Each replacement returns what the original returns; a moto without the patched names keeps its own code (the
local stack is then slower, never wrong), and `tests/unit/test_moto_speedups.py` pins the equivalences.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from moto import backends
from moto.dynamodb.models import DynamoDBBackend
from moto.server import main as moto_main
from moto.sqs import models as sqs_models
from moto.sqs.models import Queue, SQSBackend

PATCHES = ("backend module list", "retention check", "message clock", "atomic DynamoDB items", "atomic SQS deletes")

# DynamoDB's item operations, made one at a time (see `_atomic_dynamodb_items`).
DYNAMODB_ITEM_OPERATIONS = (
    "put_item",
    "get_item",
    "query",
    "scan",
    "update_item",
    "delete_item",
    "transact_write_items",
    "transact_get_items",
    "batch_get_item",
    "batch_write_item",
)


def apply() -> list[str]:
    """Patch the loaded moto modules in place; return the names of the patches applied."""
    applied: list[str] = []
    patches = (
        _cache_module_list,
        _constant_time_retention,
        _cheap_message_clock,
        _atomic_dynamodb_items,
        _atomic_sqs_deletes,
    )
    for name, patch in zip(PATCHES, patches, strict=True):
        try:
            patch()
        except AttributeError as missing:  # another moto version: keep its own (slower) code
            print(f"local_stack: moto speed-up '{name}' not applied: {missing!r}", file=sys.stderr)
        else:
            applied.append(name)
    return applied


def _cache_module_list() -> None:
    listed = backends.list_of_moto_modules
    modules = tuple(listed())  # the installed package's directories: fixed for the life of the process

    def list_of_moto_modules() -> Iterable[str]:
        return iter(modules)

    functools.update_wrapper(list_of_moto_modules, listed)
    backends.list_of_moto_modules = list_of_moto_modules


def _constant_time_retention() -> None:
    getattr(SQSBackend, "is_message_valid_based_on_retention_period")  # noqa: B009 - raises when moto renamed it

    def is_message_valid_based_on_retention_period(self: Any, queue_name: str, message: Any) -> bool:
        # The same attribute `get_queue_attributes(queue_name, ["MessageRetentionPeriod"])` reads, without
        # computing the queue's other attributes (counts over every queued message) to find it.
        retention_period: int = self.get_queue(queue_name).message_retention_period
        return bool(retention_period + message.sent_timestamp / 1000 > time.time())

    setattr(SQSBackend, "is_message_valid_based_on_retention_period", is_message_valid_based_on_retention_period)  # noqa: B010


def _cheap_message_clock() -> None:
    for name, scale in (("unix_time_millis", 1000.0), ("unix_time", 1.0)):
        setattr(sqs_models, name, _now_or(getattr(sqs_models, name), scale))


def _atomic_dynamodb_items() -> None:
    """One DynamoDB item operation at a time, as real DynamoDB applies each write to an item atomically.

    moto's backend has no lock and its server runs a thread per connection: two conditional updates of one item
    could both pass their condition (a check, then a deep copy, then the write), so a claim could be taken twice
    and a shared counter lose updates (tests/test_token_leases.py caught 17 tokens granted from a bucket of 10).
    Not a speed-up: a fidelity fix, here because it is the same kind of patch.
    """
    lock = threading.RLock()  # re-entrant: a transaction or batch calls the single-item operations
    for name in DYNAMODB_ITEM_OPERATIONS:
        setattr(DynamoDBBackend, name, _holding(lock, getattr(DynamoDBBackend, name)))


def _atomic_sqs_deletes() -> None:
    """A queue's delete under the queue's own message lock, which its sends already take.

    moto's `Queue.delete_message` rebuilds the message list without that lock, so a message sent (or another
    delete) while it runs could vanish or come back: the benchmarks saw queued messages lost under load.
    """
    delete_message = getattr(Queue, "delete_message")  # noqa: B009 - raises when moto renamed it

    def locked_delete_message(self: Any, receipt_handle: str) -> None:
        with self._messages_lock:  # a Condition over an RLock: re-entrant, as sends take it too
            delete_message(self, receipt_handle)

    functools.update_wrapper(locked_delete_message, delete_message)
    setattr(Queue, "delete_message", locked_delete_message)  # noqa: B010


def _holding(lock: threading.RLock, method: Callable[..., Any]) -> Callable[..., Any]:
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    functools.update_wrapper(locked, method)
    return locked


def _now_or(original: Callable[..., float], scale: float) -> Callable[..., float]:
    """`original()` with no argument is the current POSIX time (naive UTC now minus the epoch): read it directly."""

    def clock(dt: datetime | None = None) -> float:
        return time.time() * scale if dt is None else original(dt)

    functools.update_wrapper(clock, original)
    return clock


def main() -> None:
    """`python -m local_stack.moto_speedups [moto.server options]`: moto's own server, patched.

    Without werkzeug's line per request (5 % of the server's CPU under load): the local stack sends the server's
    output to /dev/null anyway, and errors are still logged.
    """
    apply()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
