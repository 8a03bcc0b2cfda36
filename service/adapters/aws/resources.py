"""The AWS resources the service uses: table keys, indexes, TTL attributes and queues.

One definition, read by `comms bootstrap`, by the embedded local stack, by the DynamoDB adapters (index names)
and by the test that cross-checks `deploy/` against the code. Attribute and index names stay inside
`service.adapters.aws` (tests/test_architecture.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.config import Settings

DLQ_MAX_RECEIVE_COUNT = 3
DLQ_RETENTION_S = 14 * 86400
QUEUE_RETENTION_S = 4 * 86400


@dataclass(frozen=True, slots=True)
class Index:
    name: str
    partition_key: str
    sort_key: str | None = None


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    partition_key: str
    sort_key: str | None = None
    indexes: tuple[Index, ...] = ()
    ttl_attribute: str | None = None

    @property
    def key_attributes(self) -> list[str]:
        names = [self.partition_key, *([self.sort_key] if self.sort_key else [])]
        for index in self.indexes:
            names += [index.partition_key, *([index.sort_key] if index.sort_key else [])]
        return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class QueueSpec:
    kind: str  # whatsapp | sms | email | replies | handoff
    name: str
    visibility_timeout_s: int
    dead_letter_name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dead_letter_name", f"{self.name}-dlq")


CONVERSATION_INDEXES = (
    Index("company-id-project-id-index", "company_id", "project_id"),
    Index("company-whatsapp-number-recipient-tel-index", "gsi_company_whatsapp_number", "gsi_recipient_tel"),
    Index("company-sms-number-recipient-tel-index", "gsi_company_sms_number", "gsi_recipient_tel"),
    Index("company-email-recipient-email-index", "gsi_company_email", "gsi_recipient_email"),
)


def table_specs(settings: Settings) -> list[TableSpec]:
    return [
        TableSpec(settings.company_table, "company_id", "project_id"),
        TableSpec(settings.conversations_table, "primary_channel", "conversation_id", CONVERSATION_INDEXES),
        TableSpec(settings.stage_table, "conversation_id", "message_sid", ttl_attribute="expires_at"),
        TableSpec(settings.lock_table, "conversation_id", ttl_attribute="expires_at"),
        TableSpec(settings.idempotency_table, "idempotency_key", ttl_attribute="expires_at"),
        TableSpec(settings.api_keys_table, "key_id"),
        TableSpec(settings.opt_out_table, "suppression_key", "recipient"),
        TableSpec(settings.rate_limits_table, "bucket_key", ttl_attribute="expires_at"),
    ]


QUEUE_KINDS = ("whatsapp", "sms", "email", "replies", "handoff")


def queue_specs(prefix: str, visibility_timeout_s: int) -> list[QueueSpec]:
    return [QueueSpec(kind, f"{prefix}-{kind}", visibility_timeout_s) for kind in QUEUE_KINDS]
