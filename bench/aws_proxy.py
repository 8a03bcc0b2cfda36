"""A counting reverse proxy in front of the moto server: every AWS request the service makes, by operation.

The service's `COMMS_AWS_ENDPOINT_URL` points here; each request is forwarded unchanged to moto and
counted as `<service>.<Operation>` (service from the SigV4 credential scope, operation from `X-Amz-Target`
or the query protocol's `Action` parameter), with its upstream time and any error status. DynamoDB writes are
also charged in write units (`bench.write_units`), from the request and moto's answer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from bench.write_units import WriteUnitLedger
from local_stack.sandbox_http import RunningServer, serve

# Hop-by-hop headers and the ones aiohttp recomputes for the forwarded message.
_REQUEST_DROP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
_RESPONSE_DROP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"})
_TARGET_PREFIXES = {"DynamoDB_20120810": "dynamodb", "AmazonSQS": "sqs", "secretsmanager": "secretsmanager"}


@dataclass(frozen=True, slots=True)
class CountsSnapshot:
    """The proxy's counters at one moment; subtract two for a window."""

    requests: Counter[str]
    errors: Counter[str]
    upstream_s: dict[str, float]
    write_units: Counter[str] = field(default_factory=Counter)  # DynamoDB write units, by table and table / index

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def since(self, earlier: CountsSnapshot) -> CountsSnapshot:
        upstream = {op: s - earlier.upstream_s.get(op, 0.0) for op, s in self.upstream_s.items()}
        return CountsSnapshot(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            upstream,
            self.write_units - earlier.write_units,
        )

    def plus(self, other: CountsSnapshot) -> CountsSnapshot:
        """Two proxies' counts together (the replies mode runs one per service process)."""
        operations = self.upstream_s.keys() | other.upstream_s.keys()
        upstream = {op: self.upstream_s.get(op, 0.0) + other.upstream_s.get(op, 0.0) for op in operations}
        return CountsSnapshot(
            self.requests + other.requests, self.errors + other.errors, upstream, self.write_units + other.write_units
        )


@dataclass(slots=True)
class RequestCounter:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "<op> <status>" for answers >= 400
    upstream_s: dict[str, float] = field(default_factory=dict)

    write_units: Counter[str] = field(default_factory=Counter)
    ledger: WriteUnitLedger | None = None  # shared by every proxy of a run: the item images are the tables'

    def snapshot(self) -> CountsSnapshot:
        return CountsSnapshot(
            Counter(self.requests), Counter(self.errors), dict(self.upstream_s), Counter(self.write_units)
        )

    def record(self, operation: str, status: int, seconds: float) -> None:
        self.requests[operation] += 1
        self.upstream_s[operation] = self.upstream_s.get(operation, 0.0) + seconds
        if status >= 400:
            self.errors[f"{operation} {status}"] += 1


def aws_service(headers: CIMultiDictProxy[str]) -> str:
    """The signing service name from `Authorization: AWS4-HMAC-SHA256 Credential=key/date/region/service/...`."""
    credential = headers.get("Authorization", "").partition("Credential=")[2]
    parts = credential.split("/")
    return parts[3] if len(parts) > 3 else "unknown"


def operation_of(headers: CIMultiDictProxy[str], body: bytes) -> str:
    target = headers.get("X-Amz-Target")
    if target:
        prefix, _, operation = target.partition(".")
        return f"{_TARGET_PREFIXES.get(prefix, prefix)}.{operation}"
    action = parse_qs(body.decode("utf-8", "replace")).get("Action", ["unknown"])[0]
    return f"{aws_service(headers)}.{action}"


class CountingProxy:
    """Forwards every request to `upstream_url` and counts it in `counter` (DynamoDB writes in `ledger` too)."""

    def __init__(self, upstream_url: str, ledger: WriteUnitLedger | None = None) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.counter = RequestCounter(ledger=ledger)
        self._session: aiohttp.ClientSession | None = None
        self._server: RunningServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        return self._server.url

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=1024, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._server = await serve(app)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        operation = operation_of(request.headers, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
        started = time.perf_counter()
        status = 599
        try:
            async with self._session.request(
                request.method, self.upstream_url + request.path_qs, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                if self.counter.ledger is not None and operation.startswith("dynamodb."):
                    charged = self.counter.ledger.record(operation.partition(".")[2], body, status, payload)
                    self.counter.write_units.update(charged)
                kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP}
                return web.Response(status=status, body=payload, headers=kept)
        except aiohttp.ClientError:
            # moto dropped the connection (its listen queue overflows under load): a 502, which the SDK retries.
            status = 502
            return web.Response(status=status, text="upstream connection failed")
        finally:
            self.counter.record(operation, status, time.perf_counter() - started)
