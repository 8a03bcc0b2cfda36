"""The ports the domain needs from the outside world, as Protocols. Adapters implement them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.domain.company import CompanyRecord
from service.domain.request_claim import RequestRecord


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    secret_hash: str
    company_id: str
    project_id: str
    status: str  # "active" | "revoked"

    @property
    def is_active(self) -> bool:
        return self.status == "active"


class CompanyDirectory(Protocol):
    async def get(self, company_id: str, project_id: str) -> CompanyRecord | None: ...


class ApiKeyStore(Protocol):
    async def find(self, key_id: str) -> ApiKeyRecord | None: ...


class OptOutRegistry(Protocol):
    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool: ...


class RequestLedger(Protocol):
    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        """Write `record` if the request_id is free; return None on success, else the record that refused it.

        Free: no record, or an IN_PROGRESS one whose lease ran out before `now` and whose
        body hash is the claim's (or was never stored). One conditional write.
        """
        ...

    async def read(self, key: str) -> RequestRecord | None:
        """The record for `key` as of now (a strongly consistent read), or None if there is none."""
        ...

    async def complete(self, key: str, queue_timestamp: str) -> None: ...

    async def release(self, key: str) -> None: ...


class MessagePublisher(Protocol):
    async def publish(self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0) -> str:
        """Put one message on a queue (visible after `delay_s`, at most 900) and return its message id."""
        ...
