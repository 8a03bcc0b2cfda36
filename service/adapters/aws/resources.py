"""The AWS resources the service uses: table keys, indexes, TTL attributes and queues.

One definition, read by `comms bootstrap`, by the embedded local stack, by the DynamoDB adapters (index names)
and by the test that cross-checks `deploy/` against the code. Attribute and index names stay inside
`service.adapters.aws` (tests/test_architecture.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.config import Settings

DLQ_MAX_RECEIVE_COUNT = 3
DLQ_RETENTION_S = 14 * 86400
QUEUE_RETENTION_S = 4 * 86400


@dataclass(frozen=True, slots=True)
class Index:
    """A global secondary index. Its entries hold the table's and its own keys plus `included` (INCLUDE), or
    the keys alone (KEYS_ONLY) when there is none: never ALL, so a write of the item costs the index only when it
    changes an attribute the index holds, and then the entry's size, not the item's."""

    name: str
    partition_key: str
    sort_key: str | None = None
    included: tuple[str, ...] = ()

    @property
    def projection(self) -> dict[str, Any]:
        if not self.included:
            return {"ProjectionType": "KEYS_ONLY"}
        return {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(self.included)}


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


# What each conversations index holds, and why (every reader is in `conversation_lookup` and `conversation_admin`):
# - the per-company index is keyed by `gsi_company_shard` = "<company_id>#<n>" (n: a stable hash of the conversation
#   id modulo `conversation_index_shards`), so one tenant's writes spread over that many index partitions instead of
#   one (a partition takes ~1,000 write units/s); listing queries every shard. KEYS_ONLY: its readers (the operator
#   CLI's find and list) then read the records themselves, and no conversation write but the first touches it.
# - the channel indexes (company address + recipient, the inbound webhooks' look-ups) hold what never changes after
#   the record is created: the credentials (`channel_config`, read per company number to verify a signature), and
#   `created_at` and `task_complete` (the newest open conversation of a pair); the webhook then reads the record it
#   found with one GetItem. No update of a conversation writes to them.
CHANNEL_INDEX_INCLUDES = ("channel_config", "created_at", "task_complete")
COMPANY_SHARD = "gsi_company_shard"
CONVERSATION_INDEXES = (
    Index("company-shard-project-id-index", COMPANY_SHARD, "project_id"),
    Index(
        "company-whatsapp-number-recipient-tel-index",
        "gsi_company_whatsapp_number",
        "gsi_recipient_tel",
        CHANNEL_INDEX_INCLUDES,
    ),
    Index(
        "company-sms-number-recipient-tel-index", "gsi_company_sms_number", "gsi_recipient_tel", CHANNEL_INDEX_INCLUDES
    ),
    Index("company-email-recipient-email-index", "gsi_company_email", "gsi_recipient_email", CHANNEL_INDEX_INCLUDES),
)


# A conversation's messages, one item each (`message_items`): the conversation's key in one string + its position.
MESSAGES_PARTITION_KEY = "conversation_key"
MESSAGES_SORT_KEY = "position"


def table_specs(settings: Settings) -> list[TableSpec]:
    return [
        TableSpec(settings.company_table, "company_id", "project_id"),
        TableSpec(settings.conversations_table, "primary_channel", "conversation_id", CONVERSATION_INDEXES),
        TableSpec(settings.messages_table, MESSAGES_PARTITION_KEY, MESSAGES_SORT_KEY),
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
