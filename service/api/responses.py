"""JSON responses with orjson, and the SPEC §2 error body."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from service.domain.errors import ErrorCode


def _dumps(data: Any) -> str:
    return orjson.dumps(data).decode()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def error_response(
    code: ErrorCode, message: str, request_id: str, *, status: int | None = None, retry_after_s: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"status": "error", "error_code": code.value, "message": message, "request_id": request_id}
    return json_response(body, status=status or code.http_status, headers=headers)
