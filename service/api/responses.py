"""JSON responses with orjson, the SPEC §2 error body, and the CORS headers every response carries."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from service.domain.errors import ErrorCode

CORS_METHODS = "OPTIONS,POST"
CORS_HEADERS = "Content-Type,X-Amz-Date,Authorization,X-Api-Key,X-Amz-Security-Token"

# HTTP-level refusals (raised by aiohttp's router, body reader or HTTP parser) as SPEC §2 codes.
_CODE_BY_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    431: ErrorCode.HEADER_TOO_LARGE,
}
# Fixed messages: nothing from the request is ever echoed back.
_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "malformed request",
    ErrorCode.NOT_FOUND: "not found",
    ErrorCode.METHOD_NOT_ALLOWED: "method not allowed",
    ErrorCode.PAYLOAD_TOO_LARGE: "request body too large",
    ErrorCode.HEADER_TOO_LARGE: "request line or headers too large",
    ErrorCode.INTERNAL_ERROR: "internal error",
}


def cors_headers(allow_origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": allow_origin,
        "Access-Control-Allow-Methods": CORS_METHODS,
        "Access-Control-Allow-Headers": CORS_HEADERS,
    }


def http_error_response(status: int, request_id: str, headers: dict[str, str] | None = None) -> web.Response:
    """The SPEC §2 body for an HTTP-level refusal with this status, with a fixed message.
    Statuses without their own code: other 4xx INVALID_REQUEST, 5xx INTERNAL_ERROR."""
    default = ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST
    code = _CODE_BY_STATUS.get(status, default)
    response = error_response(code, _MESSAGES.get(code, "request refused"), request_id, status=status)
    response.headers.update(headers or {})
    return response


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda value: orjson.dumps(value).decode())


def error_response(
    code: ErrorCode, message: str, request_id: str, *, status: int | None = None, retry_after_s: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"status": "error", "error_code": code.value, "message": message, "request_id": request_id}
    return json_response(body, status=status or code.http_status, headers=headers)
