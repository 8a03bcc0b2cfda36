"""Turning botocore failures into the service's own exceptions, by error code, never by message text."""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from service.domain.errors import DependencyUnavailable

AWS_FAILURES: tuple[type[Exception], ...] = (ClientError, BotoCoreError)


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def is_conditional_check_failure(exc: BaseException) -> bool:
    return error_code(exc) in ("ConditionalCheckFailedException", "TransactionCanceledException")


def unavailable(service: str, operation: str, exc: BaseException) -> DependencyUnavailable:
    """Wrap an AWS failure (after botocore's own bounded retries) for the caller to map to 503."""
    detail = error_code(exc) or type(exc).__name__
    return DependencyUnavailable(service, operation, detail)
