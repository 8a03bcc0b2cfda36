"""How a botocore failure is recognised and named: by error code, never by message text. Shared by the AWS
adapters (`service.adapters.aws.errors`) and the SQS consumer runtime (`consumers/`), which talks to SQS itself."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

AWS_FAILURES: tuple[type[Exception], ...] = (ClientError, BotoCoreError)
# What SQS answers for a queue URL that names no queue (the query protocol's code, then the JSON protocol's).
MISSING_QUEUE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None
