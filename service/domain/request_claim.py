"""The request-idempotency record: one per (company, project, request_id), decided by one conditional write.

States and transitions (the `idempotency` table, key `company_id#project_id#request_id`):

    (absent)          --claim-->    IN_PROGRESS (lease until now + lease_s)
    IN_PROGRESS       --complete--> COMPLETED  (message is on the queue; kept until TTL)
    IN_PROGRESS       --release-->  (absent)   (queueing failed; the caller may retry at once)
    IN_PROGRESS, lease expired --claim--> IN_PROGRESS (a crashed attempt is taken over)
    IN_PROGRESS, lease live    --claim--> refused: REQUEST_IN_PROGRESS (409)
    COMPLETED         --claim-->    refused: answer with the stored conversation_id, enqueue nothing
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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


class ClaimVerdict(StrEnum):
    CLAIMED = "claimed"
    ALREADY_QUEUED = "already_queued"
    IN_PROGRESS_ELSEWHERE = "in_progress_elsewhere"


def request_key(company_id: str, project_id: str, request_id: str) -> str:
    return f"{company_id}#{project_id}#{request_id}"


def verdict_for_existing(record: RequestRecord | None, now: float) -> ClaimVerdict:
    """What a refused claim means, given the record that refused it."""
    if record is None:
        # The record vanished between the write and the read: the other attempt released it.
        return ClaimVerdict.IN_PROGRESS_ELSEWHERE
    if record.state is RequestState.COMPLETED:
        return ClaimVerdict.ALREADY_QUEUED
    if record.lease_expires_at <= now:
        return ClaimVerdict.CLAIMED  # only reachable if the conditional write raced an expiry
    return ClaimVerdict.IN_PROGRESS_ELSEWHERE
