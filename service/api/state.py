"""Typed application and request state keys: the wired dependencies, request and trace ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from service.bootstrap import Dependencies

DEPS: web.AppKey[Dependencies] = web.AppKey("deps")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
TRACE_ID: web.RequestKey[str] = web.RequestKey("trace_id", str)
# The caller's own request_id, echoed in error bodies once the body has been parsed.
PAYLOAD_REQUEST_ID: web.RequestKey[str] = web.RequestKey("payload_request_id", str)
