"""SQS wire shapes and the contract's: a received message as a `QueueMessage`, its attributes for resending.

Also finds a queue's dead-letter queue from its RedrivePolicy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from consumers.contracts import QueueMessage

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueOutputTypeDef,
        MessageAttributeValueTypeDef,
        MessageTypeDef,
    )


def _message_attributes(raw: MessageTypeDef) -> list[tuple[str, MessageAttributeValueOutputTypeDef]]:
    return list(raw.get("MessageAttributes", {}).items())


def to_queue_message(raw: MessageTypeDef) -> QueueMessage:
    system = raw.get("Attributes", {})
    return QueueMessage(
        message_id=raw.get("MessageId", ""),
        receipt_handle=raw.get("ReceiptHandle", ""),
        body=raw.get("Body", ""),
        attributes={name: value["StringValue"] for name, value in _message_attributes(raw) if "StringValue" in value},
        receive_count=int(system.get("ApproximateReceiveCount", "1")),
        sent_at=int(system.get("SentTimestamp", "0")) / 1000,
    )


def resendable_attributes(raw: MessageTypeDef) -> dict[str, MessageAttributeValueTypeDef]:
    """The message attributes as SendMessage accepts them (type and string or binary value)."""
    attributes: dict[str, MessageAttributeValueTypeDef] = {}
    for name, value in _message_attributes(raw):
        copy: MessageAttributeValueTypeDef = {"DataType": value["DataType"]}
        if "StringValue" in value:
            copy["StringValue"] = value["StringValue"]
        if "BinaryValue" in value:
            copy["BinaryValue"] = value["BinaryValue"]
        attributes[name] = copy
    return attributes


async def find_dead_letter_queue(sqs: SQSClient, queue_url: str) -> str | None:
    """The URL of the queue's redrive target (RedrivePolicy deadLetterTargetArn), None without a policy."""
    answer = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = answer.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        return None
    arn = str(orjson.loads(policy)["deadLetterTargetArn"])  # arn:aws:sqs:<region>:<account>:<name>
    _, _, _, _, account, name = arn.split(":", 5)
    return (await sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account))["QueueUrl"]
