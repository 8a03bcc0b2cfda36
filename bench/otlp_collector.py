"""A tiny OTLP/HTTP trace collector in the benchmark process, for runs with `--tracing`.

The service exports to it when started with `OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT` (this
collector's URL) and `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`. It accepts `POST /v1/traces`, counts requests,
bytes and spans, and answers 200 with an empty body (an empty `ExportTraceServiceResponse`: everything accepted).
Spans are counted by walking the protobuf wire format (ExportTraceServiceRequest.resource_spans(1) →
ResourceSpans.scope_spans(2) → ScopeSpans.spans(2)), so no OpenTelemetry package is needed here.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

from aiohttp import web

from local_stack.sandbox_http import RunningServer, serve

TRACES_PATH = "/v1/traces"


@dataclass(slots=True)
class CollectorCounts:
    requests: int = 0
    bytes: int = 0  # request bodies as sent (compressed, when the exporter compresses)
    spans: int = 0
    undecodable: int = 0  # bodies whose spans could not be counted

    def snapshot(self) -> CollectorCounts:
        return CollectorCounts(self.requests, self.bytes, self.spans, self.undecodable)

    def since(self, earlier: CollectorCounts) -> CollectorCounts:
        return CollectorCounts(
            self.requests - earlier.requests,
            self.bytes - earlier.bytes,
            self.spans - earlier.spans,
            self.undecodable - earlier.undecodable,
        )


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> list[tuple[int, bytes | None]]:
    """(field number, bytes of a length-delimited field or None for the other wire types) of one message."""
    found: list[tuple[int, bytes | None]] = []
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, at = _varint(data, at)
            found.append((number, None))
        elif wire == 1:
            at += 8
            found.append((number, None))
        elif wire == 5:
            at += 4
            found.append((number, None))
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ValueError("truncated field")
            found.append((number, data[at : at + length]))
            at += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return found


def _nested(data: bytes, number: int) -> list[bytes]:
    return [value for field, value in _fields(data) if field == number and value is not None]


def count_spans(body: bytes) -> int:
    """Spans in an OTLP ExportTraceServiceRequest (protobuf)."""
    return sum(len(_nested(scope, 2)) for resource in _nested(body, 1) for scope in _nested(resource, 2))


def _decoded(body: bytes, encoding: str) -> bytes:
    """The protobuf bytes (aiohttp usually inflates a compressed request body itself; this covers when it does not)."""
    if encoding == "gzip" and body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if encoding == "deflate" and body[:1] == b"\x78":
        return zlib.decompress(body)
    return body


class OtlpCollector:
    def __init__(self) -> None:
        self.counts = CollectorCounts()
        self._server: RunningServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "collector not started"
        return self._server.url

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(TRACES_PATH, self._traces)
        self._server = await serve(app)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    def environment(self) -> dict[str, str]:
        """The standard OTEL_* variables that point a service's trace exporter here."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.counts.requests += 1
        self.counts.bytes += request.content_length or len(body)  # as sent (compressed, when it was)
        try:
            self.counts.spans += count_spans(_decoded(body, request.headers.get("Content-Encoding", "").lower()))
        except (ValueError, OSError, zlib.error):
            self.counts.undecodable += 1
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")
