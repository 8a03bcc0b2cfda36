"""The local AWS endpoint's own ceiling: a short burst of cheap concurrent calls, requests answered per second.

Half the workers call DynamoDB GetItem (the demo company record), half SQS GetQueueAttributes, with the
service idle (not yet started), so the figure is what the endpoint carries at most, in the same run.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

from bench.procfs import cpu_seconds
from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.dynamo_codec import to_attribute
from service.config import Settings


@dataclass(frozen=True, slots=True)
class Ceiling:
    endpoint: str
    requests_per_s: float
    dynamodb_per_s: float
    sqs_per_s: float
    errors: int
    moto_cpu_ms_per_request: float  # what one cheap call costs the endpoint process
    moto_cpu_share: float  # of one core during the burst


async def measure_ceiling(
    settings: Settings,
    endpoint_url: str,
    key: tuple[str, str],
    queue_url: str,
    moto_pid: int,
    *,
    concurrency: int = 32,
    warmup_s: float = 0.5,
    duration_s: float = 3.0,
) -> Ceiling:
    """Requests/s `endpoint_url` answers to `concurrency` callers over `duration_s` (after `warmup_s`)."""
    probe = settings.model_copy(update={"aws_endpoint_url": endpoint_url, "aws_max_attempts": 1})
    counts = {"dynamodb": 0, "sqs": 0, "errors": 0}
    measuring = asyncio.Event()
    company_key = {"company_id": to_attribute(key[0]), "project_id": to_attribute(key[1])}
    async with AsyncExitStack() as stack:
        aws = await open_aws_clients(probe, stack)

        async def worker(service: str, until: float) -> None:
            while time.monotonic() < until:
                try:
                    if service == "dynamodb":
                        await aws.dynamodb.get_item(TableName=settings.company_table, Key=company_key)
                    else:
                        await aws.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
                except Exception:
                    counts["errors"] += 1
                    continue
                if measuring.is_set():
                    counts[service] += 1

        until = time.monotonic() + warmup_s + duration_s
        workers = [asyncio.create_task(worker(("dynamodb", "sqs")[i % 2], until)) for i in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring.set()
        started, moto_before = time.monotonic(), cpu_seconds(moto_pid)
        await asyncio.gather(*workers)
        elapsed, moto_s = time.monotonic() - started, cpu_seconds(moto_pid) - moto_before
    answered = counts["dynamodb"] + counts["sqs"]
    return Ceiling(
        endpoint=endpoint_url,
        requests_per_s=answered / elapsed,
        dynamodb_per_s=counts["dynamodb"] / elapsed,
        sqs_per_s=counts["sqs"] / elapsed,
        errors=counts["errors"],
        moto_cpu_ms_per_request=moto_s * 1000 / max(1, answered),
        moto_cpu_share=moto_s / elapsed,
    )
