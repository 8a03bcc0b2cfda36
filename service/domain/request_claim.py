"""The request-idempotency record: one per (company, project, request_id), decided by one conditional write.

States and transitions (the `idempotency` table, key `company_id#project_id#request_id`).
Every claim stores `body_hash`, the SHA-256 hex of the normalised body (`body_fingerprint`);
"same body" / "other body" below compare it with the repeat's hash:

    (absent)          --claim-->    IN_PROGRESS (lease until now + lease_s, body_hash)
    IN_PROGRESS       --complete--> COMPLETED  (message is on the queue; kept until TTL)
    IN_PROGRESS       --release-->  (absent)   (queueing failed; the caller, or a waiting repeat, may claim at once)
    IN_PROGRESS, lease expired, same body  --claim--> IN_PROGRESS (a crashed attempt is taken over)
    IN_PROGRESS, lease live,    same body  --claim--> refused: the repeat waits, polling with consistent
                                                      reads (25 ms doubling to 200 ms, at most
                                                      `duplicate_wait_s`), and follows the record:
                                                      COMPLETED -> 200 with the stored answer,
                                                      absent or lease expired -> claim again,
                                                      still live after the wait -> 409 REQUEST_IN_PROGRESS
                                                      with a short Retry-After (the wait, not the lease)
    COMPLETED,                  same body  --claim--> refused: answer with the stored conversation_id and
                                                      queue_timestamp, enqueue nothing
    IN_PROGRESS or COMPLETED,   other body --claim--> refused: 422 IDEMPOTENCY_KEY_REUSED (an expired lease
                                                      included: the crashed attempt may have queued its body)

A record written before body hashes were stored (no `body_hash`) matches any body: such
records behave exactly as they did, and they age out with the table's TTL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson


class RequestState(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    key: str
    state: RequestState
    conversation_id: str
    lease_expires_at: float
    queue_timestamp: str | None = None
    body_hash: str | None = None  # None only on records written before hashes were stored


class ClaimVerdict(StrEnum):
    CLAIMED = "claimed"  # from `decide`: nobody holds the request_id, claim it
    ALREADY_QUEUED = "already_queued"
    IN_PROGRESS_ELSEWHERE = "in_progress_elsewhere"
    KEY_REUSED = "key_reused"


def request_key(company_id: str, project_id: str, request_id: str) -> str:
    return f"{company_id}#{project_id}#{request_id}"


def body_fingerprint(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON (keys sorted at every level) of a normalised request body."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def same_body(record: RequestRecord, body_hash: str | None) -> bool:
    """Whether a repeat carrying `body_hash` repeats the request that wrote `record` (unknown hashes match)."""
    return record.body_hash is None or body_hash is None or record.body_hash == body_hash


def decide(record: RequestRecord | None, *, now: float, body_hash: str | None) -> ClaimVerdict:
    """What a request with `body_hash` may do, given the ledger's record for its request_id (None: no record)."""
    if record is None:
        return ClaimVerdict.CLAIMED
    if not same_body(record, body_hash):
        return ClaimVerdict.KEY_REUSED
    if record.state is RequestState.COMPLETED:
        return ClaimVerdict.ALREADY_QUEUED
    if record.lease_expires_at <= now:
        return ClaimVerdict.CLAIMED
    return ClaimVerdict.IN_PROGRESS_ELSEWHERE


def verdict_for_existing(record: RequestRecord | None, now: float, body_hash: str | None = None) -> ClaimVerdict:
    """What a refused claim means, given the record that refused it (kept for existing callers; see `decide`).

    None here means the record vanished between the write and the read: another attempt
    released it, so the caller should look again rather than assume the request is free.
    """
    if record is None:
        return ClaimVerdict.IN_PROGRESS_ELSEWHERE
    return decide(record, now=now, body_hash=body_hash)
