"""The AI writer over OpenAI's Responses and Conversations APIs: structured JSON output, retries, background polls.

One `AsyncOpenAI` per API key, all sharing one httpx2 connection pool. The SDK's own retries are off; this
module retries transient failures with jittered backoff honouring Retry-After, inside each request's time budget.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx2
import openai
import orjson
import structlog
from openai import AsyncOpenAI, omit
from openai.types.responses import Response, ResponseFormatTextJSONSchemaConfigParam

from service.domain.provider_ports import (
    AiRequest,
    AiResult,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)

__all__ = ["OpenAiWriter", "classify_openai_failure"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})
TRANSIENT_HTTP_STATUSES = frozenset({408, 409, 429})
# `failed` background responses whose cause is on OpenAI's side: a new attempt can succeed.
TRANSIENT_RESPONSE_ERRORS = frozenset({"server_error", "rate_limit_exceeded", "vector_store_timeout"})
OUTPUT_FORMAT_NAME = "message"


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
        thread_timeout_s: float = 30.0,
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
        self._thread_timeout_s = thread_timeout_s
        self._cancel_timeout_s = cancel_timeout_s
        self._max_clients = max_clients
        self._jitter = jitter
        self._sleep = sleep
        self._clients: OrderedDict[str, AsyncOpenAI] = OrderedDict()
        self._cleanup_tasks: set[asyncio.Task[None]] = set()

    async def start_thread(self, api_key: str, metadata: dict[str, str]) -> str:
        client = self._client_for(api_key)
        deadline = asyncio.get_running_loop().time() + self._thread_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                conversation = await self._call(
                    "conversations.create",
                    lambda: client.conversations.create(metadata=dict(metadata) or omit),
                    deadline,
                )
        except TimeoutError:
            raise TransientProviderError("ai_timeout", code="conversations.create") from None
        return conversation.id

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
        result = result_from(response, request.output_keys)
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
    ) -> Response:
        response = await self._call("responses.create", lambda: create_response(client, request), deadline)
        if response.status not in TERMINAL_STATUSES and response.status is not None:
            run.pending_id = response.id
            response = await self._poll_until_terminal(client, response.id, deadline)
            run.pending_id = None
        return finished(response)

    async def _poll_until_terminal(self, client: AsyncOpenAI, response_id: str, deadline: float) -> Response:
        delay = self._poll_first_s
        while True:
            await self._sleep(delay)
            response = await self._call("responses.retrieve", lambda: client.responses.retrieve(response_id), deadline)
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
                delay = self._retry_delay(failure, attempt, deadline)
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


def default_http_client() -> httpx2.AsyncClient:
    """A modest pool for callers that do not size their own."""
    return httpx2.AsyncClient(
        limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
        timeout=httpx2.Timeout(60.0, connect=5.0),
    )


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


async def create_response(client: AsyncOpenAI, request: AiRequest) -> Response:
    return await client.responses.create(
        model=request.model,
        instructions=request.instructions,
        input=request.input_text,
        conversation=request.thread_id or omit,
        text={"format": output_format(request.output_keys)},
        metadata=dict(request.metadata) or omit,
        store=True,
        background=True if request.background else omit,
    )


def finished(response: Response) -> Response:
    """The response if it completed; otherwise the error its terminal status stands for."""
    status = response.status
    if status == "completed" or status is None:
        return response
    if status == "failed":
        code = response.error.code if response.error is not None else None
        if code in TRANSIENT_RESPONSE_ERRORS:
            raise TransientProviderError("ai_response_failed", code=code)
        raise PermanentProviderError("ai_response_failed", code=code)
    if status == "incomplete":
        details = response.incomplete_details
        raise PermanentProviderError("ai_response_incomplete", code=details.reason if details else None)
    raise TransientProviderError("ai_response_cancelled", code=status)


def result_from(response: Response, output_keys: tuple[str, ...]) -> AiResult:
    usage = response.usage
    return AiResult(
        output=parse_output(response.output_text, output_keys),
        response_id=response.id,
        prompt_tokens=usage.input_tokens if usage else 0,
        completion_tokens=usage.output_tokens if usage else 0,
        total_tokens=usage.total_tokens if usage else 0,
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
        if status in TRANSIENT_HTTP_STATUSES or status >= 500:
            return TransientProviderError("ai_unavailable", code=code, retry_after_s=retry_after_s(exc.response))
        return PermanentProviderError("ai_rejected", code=code)
    if isinstance(exc, openai.APITimeoutError):
        return TransientProviderError("ai_unavailable", code="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return TransientProviderError("ai_unavailable", code="connection_error")
    return PermanentProviderError("ai_client_error", code=type(exc).__name__)


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
