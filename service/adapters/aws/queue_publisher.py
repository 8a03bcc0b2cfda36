"""Putting context messages on the SQS channel queues (retries: botocore standard mode, bounded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.adapters.aws.errors import AWS_FAILURES, unavailable

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient


class SqsPublisher:
    def __init__(self, sqs: SQSClient) -> None:
        self._sqs = sqs

    async def publish(self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0) -> str:
        try:
            answer = await self._sqs.send_message(
                QueueUrl=queue_url,
                MessageBody=body,
                DelaySeconds=max(0, min(900, delay_s)),
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
                },
            )
        except AWS_FAILURES as exc:
            raise unavailable("sqs", "SendMessage", exc) from exc
        return answer["MessageId"]
