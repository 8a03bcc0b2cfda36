"""Every API error code the service answers with, and the HTTP status each one carries.

One place for codes: handlers raise `ApiError(ErrorCode.X, message)`; the error
middleware turns it into the SPEC §2 error body.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    HEADER_TOO_LARGE = "HEADER_TOO_LARGE"
    UNAUTHORIZED = "UNAUTHORIZED"
    AUTHORIZATION_ERROR = "AUTHORIZATION_ERROR"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    MISSING_IDENTIFIERS = "MISSING_IDENTIFIERS"
    MISSING_COMPANY_DATA = "MISSING_COMPANY_DATA"
    MISSING_RECIPIENT_DATA = "MISSING_RECIPIENT_DATA"
    MISSING_REQUEST_DATA = "MISSING_REQUEST_DATA"
    INVALID_COMPANY_DATA_TYPE = "INVALID_COMPANY_DATA_TYPE"
    INVALID_RECIPIENT_DATA_TYPE = "INVALID_RECIPIENT_DATA_TYPE"
    INVALID_REQUEST_DATA_TYPE = "INVALID_REQUEST_DATA_TYPE"
    INVALID_PROJECT_DATA_TYPE = "INVALID_PROJECT_DATA_TYPE"
    INVALID_PROJECT_DATA = "INVALID_PROJECT_DATA"
    MISSING_REQUEST_ID = "MISSING_REQUEST_ID"
    MISSING_CHANNEL_METHOD = "MISSING_CHANNEL_METHOD"
    MISSING_INITIAL_REQUEST_TIMESTAMP = "MISSING_INITIAL_REQUEST_TIMESTAMP"
    INVALID_REQUEST_ID_FORMAT = "INVALID_REQUEST_ID_FORMAT"
    INVALID_CHANNEL_METHOD_FORMAT = "INVALID_CHANNEL_METHOD_FORMAT"
    INVALID_INITIAL_REQUEST_TIMESTAMP_FORMAT = "INVALID_INITIAL_REQUEST_TIMESTAMP_FORMAT"
    INVALID_REQUEST_ID = "INVALID_REQUEST_ID"
    UNSUPPORTED_CHANNEL = "UNSUPPORTED_CHANNEL"
    INVALID_TIMESTAMP = "INVALID_TIMESTAMP"
    MISSING_RECIPIENT_TEL = "MISSING_RECIPIENT_TEL"
    INVALID_RECIPIENT_TEL = "INVALID_RECIPIENT_TEL"
    MISSING_RECIPIENT_EMAIL = "MISSING_RECIPIENT_EMAIL"
    INVALID_RECIPIENT_EMAIL = "INVALID_RECIPIENT_EMAIL"
    MISSING_COMMS_CONSENT = "MISSING_COMMS_CONSENT"
    INVALID_COMMS_CONSENT_TYPE = "INVALID_COMMS_CONSENT_TYPE"
    CONSENT_REQUIRED = "CONSENT_REQUIRED"
    RECIPIENT_OPTED_OUT = "RECIPIENT_OPTED_OUT"
    COMPANY_NOT_FOUND = "COMPANY_NOT_FOUND"
    PROJECT_INACTIVE = "PROJECT_INACTIVE"
    CHANNEL_NOT_ALLOWED = "CHANNEL_NOT_ALLOWED"
    REQUEST_IN_PROGRESS = "REQUEST_IN_PROGRESS"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    CONFIGURATION_ERROR = "CONFIGURATION_ERROR"
    DATABASE_ERROR = "DATABASE_ERROR"
    QUEUE_ERROR = "QUEUE_ERROR"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def http_status(self) -> int:
        return _STATUS.get(self, 400)


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    # Request headers over the server's limit (RFC 6585).
    ErrorCode.HEADER_TOO_LARGE: 431,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.AUTHORIZATION_ERROR: 403,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429,
    ErrorCode.CONSENT_REQUIRED: 422,
    ErrorCode.RECIPIENT_OPTED_OUT: 422,
    ErrorCode.COMPANY_NOT_FOUND: 404,
    ErrorCode.PROJECT_INACTIVE: 403,
    ErrorCode.CHANNEL_NOT_ALLOWED: 403,
    # A repeat of a request_id whose first attempt is still being queued.
    ErrorCode.REQUEST_IN_PROGRESS: 409,
    # A request_id already used with a different body for the same project.
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFIGURATION_ERROR: 500,
    ErrorCode.DATABASE_ERROR: 503,
    ErrorCode.QUEUE_ERROR: 503,
    # A dependency did not answer within the request deadline (COMMS_REQUEST_DEADLINE_S).
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}


class ApiError(Exception):
    """A refusal the caller should see, with its SPEC §2 error code."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return self.code.http_status


class DependencyUnavailable(Exception):
    """An AWS dependency failed in a way a retry later may fix (throttling, 5xx, network)."""

    def __init__(self, service: str, operation: str, detail: str) -> None:
        super().__init__(f"{service}.{operation}: {detail}")
        self.service = service
        self.operation = operation
        self.detail = detail


class InvalidStoredRecord(Exception):
    """A stored record does not match its model: an operator must fix the data (500 CONFIGURATION_ERROR)."""
