"""Turning botocore failures into the service's own exceptions, by error code, never by message text."""

from __future__ import annotations

from service.aws_failures import AWS_FAILURES, error_code
from service.domain.errors import DependencyUnavailable

__all__ = ["AWS_FAILURES", "error_code", "is_conditional_check_failure", "unavailable"]


def is_conditional_check_failure(exc: BaseException) -> bool:
    return error_code(exc) in ("ConditionalCheckFailedException", "TransactionCanceledException")


def unavailable(service: str, operation: str, exc: BaseException) -> DependencyUnavailable:
    """Wrap an AWS failure (after botocore's own bounded retries) for the caller to map to 503."""
    detail = error_code(exc) or type(exc).__name__
    return DependencyUnavailable(service, operation, detail)
