"""The AI writer over OpenAI's Responses API: structured JSON output, retries, background polls.

One `AsyncOpenAI` per API key, all sharing one httpx2 connection pool. The SDK's own retries are off; this
module retries transient failures with jittered backoff honouring Retry-After, inside each request's time budget,
except a create refused for the key's rate (429 `rate_limit_exceeded`): that one is raised at once as
`ProviderRateLimited` with the wait OpenAI named, for the pacing decorator (`service.domain.ai_pacing`) to hold
the key off across the fleet. Retried here, in this worker slot, it would only be learnt after every attempt,
while the fleet's other workers kept meeting the same limit. (A background poll refused for the rate is still
retried here: its response is running, and giving up would cancel it.)
Creates and polls go through the SDK's client (auth, headers, errors as `openai.APIStatusError`) with a body this
module builds and an answer it reads itself (`ResponseView`): the SDK's parameter transform and its pydantic
`Response` model cost about a quarter of each call's client CPU, for the handful of fields read here.

Conversation state (docs/ai.md): one `responses.create` per exchange, chained with `previous_response_id`. The
continuation a conversation stores (`AiRequest.thread_id` / `AiResult.thread_id`) is the id of its last response;
an id from the Conversations API (`conv_…`, conversations started before chaining) is still passed as
`conversation` and stays the continuation. A chained response OpenAI no longer holds (stored responses expire) is
asked for once more without the link, with the conversation's recorded messages as input.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp
import httpx2
import openai
import orjson
import structlog
import yarl
from aiohttp.helpers import get_env_proxy_for_url
from openai import AsyncOpenAI, RequestOptions
from openai.types.responses import ResponseFormatTextJSONSchemaConfigParam, ResponseInputParam
from openai.types.responses.response_create_params import ResponseCreateParamsNonStreaming

from service.domain.provider_ports import (
    AiRequest,
    AiResult,
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    TransientProviderError,
)

__all__ = ["AiohttpTransport", "OpenAiWriter", "classify_openai_failure", "pooled_http_client"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})
TRANSIENT_HTTP_STATUSES = frozenset({408, 409, 429})
# `failed` background responses whose cause is on OpenAI's side: a new attempt can succeed.
TRANSIENT_RESPONSE_ERRORS = frozenset({"server_error", "rate_limit_exceeded", "vector_store_timeout"})
OUTPUT_FORMAT_NAME = "message"
BEARER_AUTH: RequestOptions = {"security": {"bearer_auth": True}}  # what the SDK's own Responses calls ask for
CONVERSATION_ID_PREFIX = "conv_"  # a Conversations API id: a continuation stored before chaining by response id
PREVIOUS_RESPONSE_NOT_FOUND = "previous_response_not_found"


@dataclass(frozen=True, slots=True)
class ResponseView:
    """The fields of a Responses API object this writer reads (`output_text` as the SDK's property joins it)."""

    id: str
    status: str | None
    output_text: str
    input_tokens: int
    output_tokens: int
    total_tokens: int
    error_code: str | None
    incomplete_reason: str | None


@dataclass(slots=True)
class _BackgroundRun:
    """The background response a `write` is waiting on, so a timeout can cancel it."""

    pending_id: str | None = None


class OpenAiWriter:
    """`AiWriter` for the Responses API.

    `http_client` is the shared pool (size its `limits` for the worker concurrency); when None the writer
    builds and owns one, and `close()` closes only a pool it owns. `base_url` is the API root including
    `/v1` (None: the SDK's default). `max_attempts` counts attempts per API call (create, each retrieve); retry
    delays double from `backoff_base_s` up to `backoff_cap_s`, scaled by a jitter in [0.5, 1.0), and background
    polls double from `poll_first_s` up to `poll_cap_s`. `sleep` waits out retry delays and the pauses between
    polls; `request.timeout_s` bounds the whole write on the event loop's time whatever `sleep` does.
    """

    def __init__(
        self,
        http_client: httpx2.AsyncClient | None,
        base_url: str | None,
        max_attempts: int = 4,
        *,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        poll_first_s: float = 0.5,
        poll_cap_s: float = 5.0,
        cancel_timeout_s: float = 5.0,
        max_clients: int = 1_000,
        jitter: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._owns_http_client = http_client is None
        self._http_client = http_client or default_http_client()
        self._base_url = base_url
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._poll_first_s = poll_first_s
        self._poll_cap_s = poll_cap_s
        self._cancel_timeout_s = cancel_timeout_s
        self._max_clients = max_clients
        self._jitter = jitter
        self._sleep = sleep
        self._clients: OrderedDict[str, AsyncOpenAI] = OrderedDict()
        self._cleanup_tasks: set[asyncio.Task[None]] = set()

    async def write(self, request: AiRequest) -> AiResult:
        client = self._client_for(request.api_key)
        run = _BackgroundRun()
        started = time.monotonic()
        deadline = asyncio.get_running_loop().time() + request.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._generate(client, request, deadline, run)
        except TimeoutError:
            await self._cancel_response(client, run.pending_id)
            raise TransientProviderError("ai_timeout", code="timeout") from None
        except ProviderError:  # e.g. polling kept failing: stop the model so a retry starts clean
            await self._cancel_response(client, run.pending_id)
            raise
        except asyncio.CancelledError:
            self._cancel_in_background(client, run)
            raise
        result = result_from(response, request)
        log.info(
            "ai.written",
            response_id=result.response_id,
            model=request.model,
            background=request.background,
            total_tokens=result.total_tokens,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return result

    async def close(self) -> None:
        if self._cleanup_tasks:
            await asyncio.gather(*self._cleanup_tasks, return_exceptions=True)
        self._clients.clear()
        if self._owns_http_client:
            await self._http_client.aclose()

    async def _generate(
        self, client: AsyncOpenAI, request: AiRequest, deadline: float, run: _BackgroundRun
    ) -> ResponseView:
        response = await self._create(client, request, deadline)
        if response.status not in TERMINAL_STATUSES and response.status is not None:
            run.pending_id = response.id
            response = await self._poll_until_terminal(client, response.id, deadline)
            run.pending_id = None
        return finished(response)

    async def _create(self, client: AsyncOpenAI, request: AiRequest, deadline: float) -> ResponseView:
        """The response, chained to `request.thread_id`; when OpenAI no longer holds that response (expired or
        deleted), once more unchained with the recorded history, which the new chain then starts from."""
        try:
            return await self._call("responses.create", lambda: create_response(client, request), deadline)
        except PermanentProviderError as exc:
            if not is_previous_response_gone(exc.__cause__):
                raise
        log.warning("ai.previous_response_not_found", history_messages=len(request.history))
        unchained = replace(request, thread_id=None)
        return await self._call("responses.create", lambda: create_response(client, unchained), deadline)

    async def _poll_until_terminal(self, client: AsyncOpenAI, response_id: str, deadline: float) -> ResponseView:
        delay = self._poll_first_s
        while True:
            await self._sleep(delay)
            response = await self._call("responses.retrieve", lambda: retrieve_response(client, response_id), deadline)
            if response.status in TERMINAL_STATUSES:
                return response
            delay = min(delay * 2, self._poll_cap_s)

    def _cancel_in_background(self, client: AsyncOpenAI, run: _BackgroundRun) -> None:
        """The caller gave up (shutdown, lost lease): stop the model without delaying the cancellation."""
        if run.pending_id is None:
            return
        task = asyncio.get_running_loop().create_task(self._cancel_response(client, run.pending_id))
        self._cleanup_tasks.add(task)
        task.add_done_callback(self._cleanup_tasks.discard)

    async def _cancel_response(self, client: AsyncOpenAI, response_id: str | None) -> None:
        """Best effort: a failed cancel only means the model finishes a response nobody reads."""
        if response_id is None:
            return
        try:
            async with asyncio.timeout(self._cancel_timeout_s):
                await client.responses.cancel(response_id)
        except (openai.OpenAIError, TimeoutError) as exc:
            log.warning("ai.cancel_failed", response_id=response_id, error=type(exc).__name__)
            return
        log.info("ai.cancelled", response_id=response_id)

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        attempt = 1
        while True:
            try:
                return await call()
            except openai.OpenAIError as exc:
                failure = classify_openai_failure(exc)
                retried_here = not rate_limited_create(operation, failure)
                delay = self._retry_delay(failure, attempt, deadline) if retried_here else None
                if delay is None:
                    log.warning(
                        "ai.call_failed", operation=operation, attempt=attempt, reason=failure.reason, code=failure.code
                    )
                    raise failure from exc
            log.info(
                "ai.retrying", operation=operation, attempt=attempt, reason=failure.reason, delay_s=round(delay, 3)
            )
            await self._sleep(delay)
            attempt += 1

    def _retry_delay(self, failure: ProviderError, attempt: int, deadline: float) -> float | None:
        """How long to wait before the next attempt, or None to give up (then `failure` says when to retry)."""
        if not isinstance(failure, TransientProviderError):
            return None
        backoff = min(self._backoff_cap_s, self._backoff_base_s * 2.0 ** (attempt - 1)) * (0.5 + self._jitter() / 2)
        delay = max(backoff, failure.retry_after_s or 0.0)
        if attempt >= self._max_attempts or asyncio.get_running_loop().time() + delay >= deadline:
            failure.retry_after_s = failure.retry_after_s or delay
            return None
        return delay

    def _client_for(self, api_key: str) -> AsyncOpenAI:
        """The cached SDK client for one API key (a least-recently-used cap bounds the cache)."""
        if not api_key:
            raise PermanentProviderError("ai_api_key_missing")
        client = self._clients.get(api_key)
        if client is None:
            client = AsyncOpenAI(api_key=api_key, base_url=self._base_url, http_client=self._http_client, max_retries=0)
            self._clients[api_key] = client
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)  # never closed: closing would close the shared pool
        self._clients.move_to_end(api_key)
        return client


def rate_limited_create(operation: str, failure: ProviderError) -> bool:
    """A create the key's rate refused: the caller's pace decides when to try again, not this writer."""
    return operation == "responses.create" and isinstance(failure, ProviderRateLimited)


def default_http_client() -> httpx2.AsyncClient:
    """A modest pool for callers that do not size their own."""
    return httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
        timeout=httpx2.Timeout(60.0, connect=5.0),
    )


def pooled_http_client(
    max_connections: int,
    timeout_s: float,
    connect_timeout_s: float = 5.0,
    wrap: Callable[[httpx2.AsyncBaseTransport], httpx2.AsyncBaseTransport] | None = None,
) -> httpx2.AsyncClient:
    """The shared OpenAI pool for a worker: httpx2's client (what the SDK takes) over `AiohttpTransport`, which
    `wrap` may put behind another transport (tracing). Closing the client closes the aiohttp session."""
    transport: httpx2.AsyncBaseTransport = AiohttpTransport(max_connections)
    if wrap is not None:
        transport = wrap(transport)
    return httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s))


_Proxy = tuple[yarl.URL | None, aiohttp.BasicAuth | None]
_NO_PROXY: _Proxy = (None, None)


def _environment_proxy(url: yarl.URL) -> _Proxy:
    """What aiohttp's `trust_env` would pick for `url`: a proxy from the environment unless NO_PROXY exempts it."""
    try:
        return get_env_proxy_for_url(url)
    except LookupError:
        return _NO_PROXY


# Hop-by-hop and length headers aiohttp sets itself from the URL and the body.
_HEADERS_AIOHTTP_SETS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx2 requests sent over one aiohttp connection pool.

    httpcore2's pool walks every pooled connection on each request it adds or removes (probing idle ones'
    sockets), so its cost per request grows with the pool, which is sized for the consumer slots; aiohttp's
    connector takes an idle connection in constant time. Timeouts come from the request (httpx2's `timeout`
    extension); failures become httpx2's exceptions (timeouts `TimeoutException`), which the SDK turns into
    `APITimeoutError` / `APIConnectionError` as it does for its own transport. Bodies are passed through
    undecoded: httpx2 decodes what it asked for (`Accept-Encoding`). The session is made on the first request,
    inside the running loop.

    `trust_env` (on by default, as in httpx2's own client): HTTP_PROXY / HTTPS_PROXY / NO_PROXY (and a proxy's
    credentials in ~/.netrc) choose the proxy, so a worker behind an egress proxy reaches OpenAI as it did over
    httpx2's transport. They are read once per origin, as httpx2 reads them once per client: aiohttp's own
    `trust_env` would read them, and ~/.netrc, in a worker thread on every request.
    """

    def __init__(self, max_connections: int, *, trust_env: bool = True) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._max_connections = max_connections
        self._trust_env = trust_env
        self._proxies: dict[tuple[str, str, int | None], _Proxy] = {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def _proxy(self, url: httpx2.URL) -> _Proxy:
        """The proxy the environment names for `url`'s origin (`_NO_PROXY` when none, or `trust_env` is off)."""
        origin = (url.scheme, url.host, url.port)
        proxy = self._proxies.get(origin)
        if proxy is None:
            proxy = await asyncio.to_thread(_environment_proxy, yarl.URL(str(url))) if self._trust_env else _NO_PROXY
            self._proxies[origin] = proxy
        return proxy

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = request.extensions.get("timeout", {})
        connect = timeouts.get("connect")
        pool = timeouts.get("pool")
        timeout = aiohttp.ClientTimeout(
            connect=None if connect is None or pool is None else connect + pool,
            sock_connect=connect,
            sock_read=timeouts.get("read"),
        )
        headers = [(name, value) for name, value in request.headers.raw if name.lower() not in _HEADERS_AIOHTTP_SETS]
        proxy, proxy_auth = await self._proxy(request.url)
        try:
            async with self._client().request(
                request.method,
                str(request.url),
                headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
                data=await request.aread(),
                timeout=timeout,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as answer:
                content = await answer.read()
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx2.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise httpx2.ReadTimeout(str(exc) or "read timeout", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx2.Response(answer.status, headers=list(answer.raw_headers), content=content, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def output_format(keys: tuple[str, ...]) -> ResponseFormatTextJSONSchemaConfigParam:
    """A strict JSON schema: an object with exactly `keys`, each a string."""
    return {
        "type": "json_schema",
        "name": OUTPUT_FORMAT_NAME,
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {key: {"type": "string"} for key in keys},
            "required": list(keys),
            "additionalProperties": False,
        },
    }


def is_conversation(thread_id: str | None) -> bool:
    return thread_id is not None and thread_id.startswith(CONVERSATION_ID_PREFIX)


def response_input(request: AiRequest) -> str | ResponseInputParam:
    """The new input alone when OpenAI holds the context (a chained response, a Conversations API id, or a first
    exchange); else the recorded messages first, so an unchained reply still sees the conversation."""
    if request.thread_id or not request.history:
        return request.input_text
    items: ResponseInputParam = [
        {"role": "assistant" if message.role == "assistant" else "user", "content": message.content}
        for message in request.history
    ]
    items.append({"role": "user", "content": request.input_text})
    return items


def create_body(request: AiRequest) -> ResponseCreateParamsNonStreaming:
    """The `POST /responses` body. `instructions` are sent every time: a chained response does not inherit the
    previous one's."""
    body: ResponseCreateParamsNonStreaming = {
        "model": request.model,
        "instructions": request.instructions,
        "input": response_input(request),
        "text": {"format": output_format(request.output_keys)},
        "store": True,  # the next exchange chains from this response
    }
    thread_id = request.thread_id or None
    if is_conversation(thread_id):
        body["conversation"] = thread_id
    elif thread_id is not None:
        body["previous_response_id"] = thread_id
    if request.metadata:
        body["metadata"] = dict(request.metadata)
    if request.background:
        body["background"] = True
    return body


async def create_response(client: AsyncOpenAI, request: AiRequest) -> ResponseView:
    answer = await client.post("/responses", body=create_body(request), cast_to=httpx2.Response, options=BEARER_AUTH)
    return response_view(answer)


async def retrieve_response(client: AsyncOpenAI, response_id: str) -> ResponseView:
    answer = await client.get(f"/responses/{response_id}", cast_to=httpx2.Response, options=BEARER_AUTH)
    return response_view(answer)


def response_view(answer: httpx2.Response) -> ResponseView:
    """The fields read here of a 2xx answer's Response object; a body that is not one is a permanent failure."""
    try:
        body = orjson.loads(answer.content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise PermanentProviderError("ai_client_error", code="invalid_response_body")
    usage = body.get("usage") or {}
    error = body.get("error") or {}
    incomplete = body.get("incomplete_details") or {}
    return ResponseView(
        id=body["id"],
        status=body.get("status"),
        output_text="".join(
            part["text"]
            for item in body.get("output") or ()
            if item.get("type") == "message"
            for part in item.get("content") or ()
            if part.get("type") == "output_text"
        ),
        input_tokens=usage.get("input_tokens") or 0,
        output_tokens=usage.get("output_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
        error_code=error.get("code"),
        incomplete_reason=incomplete.get("reason"),
    )


def is_previous_response_gone(exc: BaseException | None) -> bool:
    """OpenAI's answer to a `previous_response_id` it does not hold: 400 `previous_response_not_found` (404 on
    an unknown id is accepted too, when it names that parameter)."""
    if not isinstance(exc, openai.APIStatusError):
        return False
    if exc.code == PREVIOUS_RESPONSE_NOT_FOUND:
        return True
    return exc.status_code in (400, 404) and exc.param == "previous_response_id"


def finished(response: ResponseView) -> ResponseView:
    """The response if it completed; otherwise the error its terminal status stands for."""
    status = response.status
    if status == "completed" or status is None:
        return response
    if status == "failed":
        code = response.error_code
        if code in TRANSIENT_RESPONSE_ERRORS:
            raise TransientProviderError("ai_response_failed", code=code)
        raise PermanentProviderError("ai_response_failed", code=code)
    if status == "incomplete":
        raise PermanentProviderError("ai_response_incomplete", code=response.incomplete_reason)
    raise TransientProviderError("ai_response_cancelled", code=status)


def result_from(response: ResponseView, request: AiRequest) -> AiResult:
    """The answer, and the continuation to store: the Conversations API id it was written in, else this response."""
    thread_id = request.thread_id if is_conversation(request.thread_id) else None
    return AiResult(
        output=parse_output(response.output_text, request.output_keys),
        response_id=response.id,
        prompt_tokens=response.input_tokens,
        completion_tokens=response.output_tokens,
        total_tokens=response.total_tokens,
        thread_id=thread_id or response.id,
    )


def parse_output(text: str, output_keys: tuple[str, ...]) -> dict[str, str]:
    """The requested keys, each a non-blank string; extra keys are dropped. Otherwise `ai_output_invalid`."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise PermanentProviderError("ai_output_invalid", code="not_json") from None
    if not isinstance(value, dict):
        raise PermanentProviderError("ai_output_invalid", code="not_an_object")
    missing = [key for key in output_keys if not isinstance(value.get(key), str) or not value[key].strip()]
    if missing:
        log.warning("ai.output_missing_keys", missing=missing, present=sorted(value))
        raise PermanentProviderError("ai_output_invalid", code="missing_keys")
    return {key: value[key] for key in output_keys}


def classify_openai_failure(exc: openai.OpenAIError) -> ProviderError:
    """Transient: 408/409/429/5xx, timeouts, connection errors. Permanent: every other 4xx and the rest."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = exc.code or str(status)
        if status == 429 and exc.code == "insufficient_quota":  # billing, not load: waiting will not help
            return PermanentProviderError("ai_rejected", code=code)
        if status == 429:
            return ProviderRateLimited("ai_rate_limited", code=code, retry_after_s=rate_limit_wait_s(exc))
        if status in TRANSIENT_HTTP_STATUSES or status >= 500:
            return TransientProviderError("ai_unavailable", code=code, retry_after_s=retry_after_s(exc.response))
        return PermanentProviderError("ai_rejected", code=code)
    if isinstance(exc, openai.APITimeoutError):
        return TransientProviderError("ai_unavailable", code="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return TransientProviderError("ai_unavailable", code="connection_error")
    return PermanentProviderError("ai_client_error", code=type(exc).__name__)


# Go-style durations OpenAI's x-ratelimit-reset-* headers carry: "20ms", "1s", "6m0s", "1h2m3.5s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(raw: str) -> float | None:
    """A Go-style duration (or bare seconds) as seconds; None when it is neither."""
    raw = raw.strip()
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(raw)
    if not parts or "".join(number + unit for number, unit in parts) != raw:
        return None
    return sum(float(number) * _DURATION_UNIT_S[unit] for number, unit in parts)


def rate_limit_wait_s(exc: openai.APIStatusError) -> float | None:
    """How long OpenAI says to wait after a 429: `retry-after-ms` / `Retry-After` when sent, else the reset of
    the limit that refused (`x-ratelimit-reset-requests` or `-tokens`, by the error's `type`; when the type names
    neither, the reset of whichever has nothing remaining)."""
    explicit = retry_after_s(exc.response)
    if explicit is not None:
        return explicit
    headers = exc.response.headers
    kinds = [exc.type] if exc.type in ("requests", "tokens") else ["requests", "tokens"]
    waits = [
        wait
        for kind in kinds
        if (raw := headers.get(f"x-ratelimit-reset-{kind}")) is not None
        and (exc.type == kind or headers.get(f"x-ratelimit-remaining-{kind}") == "0")
        and (wait := duration_s(raw)) is not None
    ]
    return max(waits, default=None)


def retry_after_s(response: httpx2.Response) -> float | None:
    """`retry-after-ms`, else `Retry-After` (seconds or an HTTP date), as seconds from now."""
    headers = response.headers
    try:
        return max(float(headers["retry-after-ms"]) / 1000, 0.0)
    except (KeyError, ValueError):
        pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(raw).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None
