"""Putting context messages on the SQS queues (retries: botocore standard mode, bounded).

While tracing is on, each message is sent under a PRODUCER span whose W3C trace context travels in the
`traceparent` (and `tracestate`) message attributes, within SQS's ten attributes per message; the consumer
continues that trace. Off, the attributes are sent as given.

Every message names its tenant as its `MessageGroupId`. On a standard queue that is what SQS fair queues use: when
one tenant's backlog would hold everyone else's messages back, SQS delivers the other tenants' messages first
(by in-flight share), at no cost while no tenant is noisy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service import tracing
from service.adapters.aws.errors import AWS_FAILURES, unavailable

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient


class SqsPublisher:
    def __init__(self, sqs: SQSClient) -> None:
        self._sqs = sqs

    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        tracer = tracing.active_tracer()
        if tracer is None:
            return await self._send(queue_url, body, attributes, delay_s, group)
        with tracing.producer_span(tracer, queue_url) as span:
            message_id = await self._send(queue_url, body, tracing.with_trace_context(attributes), delay_s, group)
            tracing.set_attributes(span, messaging__message__id=message_id)
            return message_id

    async def _send(
        self, queue_url: str, body: str, attributes: dict[str, str], delay_s: int, group: str | None
    ) -> str:
        grouped: dict[str, Any] = {"MessageGroupId": group} if group else {}
        try:
            answer = await self._sqs.send_message(
                QueueUrl=queue_url,
                MessageBody=body,
                DelaySeconds=max(0, min(900, delay_s)),
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
                },
                **grouped,
            )
        except AWS_FAILURES as exc:
            raise unavailable("sqs", "SendMessage", exc) from exc
        return answer["MessageId"]
