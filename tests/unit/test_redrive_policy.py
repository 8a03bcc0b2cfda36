"""Reading a queue's RedrivePolicy (`consumers.sqs_messages.find_redrive_policy`): a policy that cannot be read
is no policy, so the runtime and `comms dlq` fall back instead of failing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy, find_redrive_policy


class PolicyQueue:
    """An SQS client whose one queue has the given RedrivePolicy attribute (None: no policy)."""

    def __init__(self, policy: str | None) -> None:
        self.policy = policy

    async def get_queue_attributes(self, **_: Any) -> dict[str, Any]:
        return {"Attributes": {} if self.policy is None else {"RedrivePolicy": self.policy}}

    async def get_queue_url(self, QueueName: str, QueueOwnerAWSAccountId: str) -> dict[str, str]:
        return {"QueueUrl": f"https://sqs.example/{QueueOwnerAWSAccountId}/{QueueName}"}


async def test_a_policy_names_its_dead_letter_queue_and_max_receive_count() -> None:
    policy = orjson.dumps({"deadLetterTargetArn": "arn:aws:sqs:eu-west-2:123456789012:q-dlq", "maxReceiveCount": 3})

    found = await find_redrive_policy(PolicyQueue(policy.decode()), "https://sqs.example/q")  # type: ignore[arg-type]

    assert found == RedrivePolicy("https://sqs.example/123456789012/q-dlq", 3)


@pytest.mark.parametrize(
    "policy",
    [None, "", "not json", "[]", '{"maxReceiveCount": 3}', '{"deadLetterTargetArn": "not-an-arn"}'],
    ids=["none", "empty", "not-json", "not-an-object", "no-target", "malformed-arn"],
)
async def test_a_policy_that_cannot_be_read_is_no_policy(policy: str | None) -> None:
    assert await find_redrive_policy(PolicyQueue(policy), "https://sqs.example/q") == NO_REDRIVE_POLICY  # type: ignore[arg-type]
