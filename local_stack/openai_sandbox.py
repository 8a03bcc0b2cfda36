"""A local stand-in for OpenAI's Responses and Conversations APIs that the real `openai` SDK can call.

Owns the `/v1/responses*` and `/v1/conversations*` routes, their in-memory objects, the deterministic
canned generation, background-mode timing and `/_sandbox/openai/*`; latency and faults come from `sandbox_http`.

Conversation state as the real API keeps it: a response created with `conversation` reads and extends that
conversation; one created with `previous_response_id` sees the chain of stored responses before it (their input
and output, not their instructions). A `previous_response_id` the sandbox does not hold (never stored, deleted,
or `store: false`) is refused with OpenAI's 400 `previous_response_not_found`; giving both is refused too.

Rate limits: `POST /_sandbox/openai/key-limit {"per_second": 8}` (or `{"max_requests": 2, "window_s": 60}`; null
`per_second`: none) holds each API key to that many creates (`POST /v1/responses`, the model requests) over a
sliding window; past it a create answers as OpenAI's does, 429 with `{"error": {"type": "requests", "code":
"rate_limit_exceeded", ...}}` and the `x-ratelimit-*-requests` headers (no `Retry-After`: the reset header says
when). Every create under a limit carries those headers too. `GET /_sandbox/openai/key-limit` shows the limit and
how many creates it refused.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from local_stack.sandbox_http import (
    CONTROL_KEY,
    Handler,
    RecordedRequest,
    SandboxControl,
    json_response,
    new_sandbox_app,
)

JSONObject = dict[str, Any]

CREATE_RESPONSE = "openai.create_response"
RETRIEVE_RESPONSE = "openai.retrieve_response"
CANCEL_RESPONSE = "openai.cancel_response"

PENDING_STATUSES = frozenset({"queued", "in_progress"})
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
TEXT_FORMAT_TYPES = frozenset({"text", "json_object", "json_schema"})
REPLY_KEYS = frozenset({"content", "message", "body", "text", "reply"})
MAX_METADATA_PAIRS = 16
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20
EXCERPT_CHARS = 80

_FIRST_NAME = re.compile(r"first[_\s-]?name[\"']?\s*[:=]\s*[\"']?([A-Za-z][A-Za-z'-]*)", re.IGNORECASE)
_MY_NAME_IS = re.compile(r"(?i:\bmy name is)\s+([A-Z][A-Za-z'-]*)")
_QUOTED_KEY = re.compile(r"\"([A-Za-z_][\w-]*)\"\s*:")


class Timer(Protocol):
    """A scheduled callback that can be called off (`asyncio.Handle` is one)."""

    def cancel(self) -> None: ...


# Runs a callback after a delay in seconds: when a background response's generation time is over.
CallLater = Callable[[float, Callable[[], None]], Timer]


def loop_call_later(delay_s: float, callback: Callable[[], None]) -> Timer:
    """The real background timer: the running event loop's `call_later`."""
    return asyncio.get_running_loop().call_later(delay_s, callback)


# --- errors -------------------------------------------------------------------------------------------

_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", None),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONObject:
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    kind, default_code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


class ApiFailure(Exception):
    """An OpenAI API error; the front-door middleware renders it as OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, param, code)
        self.headers = headers

    def to_response(self) -> web.Response:
        return json_response(self.body, status=self.status, headers=self.headers)


def invalid(param: str, message: str) -> ApiFailure:
    return ApiFailure(400, message, param=param)


def not_found(kind: str, object_id: str) -> ApiFailure:
    return ApiFailure(404, f"{kind} with id '{object_id}' not found.")


# --- small helpers ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def unix_now() -> int:
    return int(time.time())


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token, like OpenAI's rule of thumb."""
    return (len(text) + 3) // 4


def excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


# --- request parsing ----------------------------------------------------------------------------------


async def read_json_object(request: web.Request, *, empty_ok: bool = False) -> JSONObject:
    raw = await request.read()
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiFailure(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiFailure(400, "The request body must be a JSON object.")
    return body


def required_string(body: JSONObject, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(name, f"Missing required parameter: '{name}'.")
    return value


def optional_string(body: JSONObject, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"Invalid type for '{name}': expected a string.")
    return value


def optional_bool(body: JSONObject, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"Invalid type for '{name}': expected a boolean.")
    return value


def optional_number(body: JSONObject, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"Invalid type for '{name}': expected a number.")
    return float(value)


def optional_positive_int(body: JSONObject, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, f"Invalid '{name}': expected a positive integer.")
    return value


def parse_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise invalid("metadata", "Invalid 'metadata': expected an object of string keys and string values.")
    if len(value) > MAX_METADATA_PAIRS:
        raise invalid("metadata", f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs are allowed.")
    return dict(value)


def parse_conversation_ref(value: object) -> str | None:
    """`conversation` is an id string or `{"id": ...}`."""
    if value is None:
        return None
    conversation_id = value.get("id") if isinstance(value, dict) else value
    if not isinstance(conversation_id, str) or not conversation_id:
        raise invalid("conversation", "Invalid 'conversation': expected an id or an object with an 'id'.")
    return conversation_id


def parse_text_config(value: object) -> JSONObject:
    """The `text` parameter with its `format` checked and defaulted to plain text."""
    if value is None:
        return {"format": {"type": "text"}}
    if not isinstance(value, dict):
        raise invalid("text", "Invalid type for 'text': expected an object.")
    text_format = value.get("format") or {"type": "text"}
    if not isinstance(text_format, dict) or text_format.get("type") not in TEXT_FORMAT_TYPES:
        raise invalid("text.format.type", "Invalid 'text.format.type': expected text, json_object or json_schema.")
    if text_format["type"] == "json_schema":
        if not isinstance(text_format.get("name"), str) or not text_format["name"]:
            raise invalid("text.format.name", "Missing required parameter: 'text.format.name'.")
        if not isinstance(text_format.get("schema"), dict):
            raise invalid("text.format.schema", "Missing required parameter: 'text.format.schema'.")
    return {**value, "format": text_format}


def content_parts(content: object, role: str, param: str) -> list[JSONObject]:
    """Message content as a list of typed parts; a bare string becomes one text part."""
    if isinstance(content, str):
        if role == "assistant":
            return [{"type": "output_text", "text": content, "annotations": []}]
        return [{"type": "input_text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return [dict(part) for part in content]
    raise invalid(param, f"Invalid '{param}': expected a string or a list of content parts.")


def message_item(role: str, content: list[JSONObject], item_id: str | None = None) -> JSONObject:
    return {"type": "message", "id": item_id or new_id("msg"), "role": role, "status": "completed", "content": content}


def normalise_item(raw: object, param: str) -> JSONObject:
    """An input item as the Conversations API stores it: typed, with an id."""
    if not isinstance(raw, dict):
        raise invalid(param, f"Invalid type for '{param}': expected an object.")
    if "role" in raw and raw.get("type", "message") == "message":
        role = raw["role"]
        if role not in MESSAGE_ROLES:
            raise invalid(f"{param}.role", f"Invalid '{param}.role': expected one of {sorted(MESSAGE_ROLES)}.")
        item_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        return message_item(role, content_parts(raw.get("content"), role, f"{param}.content"), item_id)
    if not isinstance(raw.get("type"), str):
        raise invalid(f"{param}.type", f"Missing required parameter: '{param}.type'.")
    return {"id": new_id("item"), **raw}


def normalise_items(value: object, param: str) -> list[JSONObject]:
    """`input` / `items`: absent, a string (one user message) or a list of items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [message_item("user", content_parts(value, "user", param))]
    if not isinstance(value, list):
        raise invalid(param, f"Invalid type for '{param}': expected a string or a list of items.")
    return [normalise_item(raw, f"{param}[{index}]") for index, raw in enumerate(value)]


@dataclass(frozen=True, slots=True)
class ResponseRequest:
    """A checked `POST /v1/responses` body."""

    model: str
    instructions: str | None
    input_items: list[JSONObject]
    conversation_id: str | None
    previous_response_id: str | None
    text: JSONObject
    background: bool
    store: bool
    metadata: dict[str, str]
    max_output_tokens: int | None
    temperature: float
    top_p: float

    @property
    def text_format(self) -> JSONObject:
        text_format: JSONObject = self.text["format"]
        return text_format


def parse_response_request(body: JSONObject) -> ResponseRequest:
    if optional_bool(body, "stream", False):
        raise invalid("stream", "The OpenAI sandbox does not stream; send 'stream': false.")
    request = ResponseRequest(
        model=required_string(body, "model"),
        instructions=optional_string(body, "instructions"),
        input_items=normalise_items(body.get("input"), "input"),
        conversation_id=parse_conversation_ref(body.get("conversation")),
        previous_response_id=optional_string(body, "previous_response_id") or None,
        text=parse_text_config(body.get("text")),
        background=optional_bool(body, "background", False),
        store=optional_bool(body, "store", True),
        metadata=parse_metadata(body.get("metadata")),
        max_output_tokens=optional_positive_int(body, "max_output_tokens"),
        temperature=optional_number(body, "temperature", 1.0),
        top_p=optional_number(body, "top_p", 1.0),
    )
    if request.background and not request.store:
        raise invalid("background", "Background mode requires 'store': true.")
    if request.conversation_id and request.previous_response_id:
        raise ApiFailure(
            400,
            "Mutually exclusive parameters: Ensure you are only providing one of: 'previous_response_id' or "
            "'conversation'.",
            code="mutually_exclusive_parameters",
        )
    return request


# --- canned generation --------------------------------------------------------------------------------


def item_texts(item: JSONObject) -> list[str]:
    """The plain text an item carries (message text parts, or a tool output string)."""
    content = item.get("content")
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part.get("text"), str)]
    output = item.get("output")
    return [output] if isinstance(output, str) else []


def find_first_name(texts: Iterable[str]) -> str | None:
    """The first `first_name: X` (e.g. `"recipient_first_name": "Lee"`) or `my name is X` in `texts`."""
    for text in texts:
        match = _FIRST_NAME.search(text) or _MY_NAME_IS.search(text)
        if match:
            return match.group(1).capitalize()
    return None


def latest_user_text(items: list[JSONObject]) -> str:
    for item in reversed(items):
        if item.get("role") == "user" and (texts := item_texts(item)):
            return " ".join(texts)
    return ""


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the canned generation looks at."""

    instructions: str
    latest_text: str
    first_name: str | None

    @property
    def greeting(self) -> str:
        return f"Hi {self.first_name or 'there'}"

    @property
    def reply(self) -> str:
        if not self.latest_text:
            return f"{self.greeting}, this is the sandbox assistant."
        return f"{self.greeting}, the sandbox assistant read: {excerpt(self.latest_text)}"


def build_prompt(request: ResponseRequest, history_first_name: str | None) -> Prompt:
    input_texts = [text for item in reversed(request.input_items) for text in item_texts(item)]
    instructions = request.instructions or ""
    first_name = find_first_name(input_texts) or history_first_name or find_first_name([instructions])
    return Prompt(instructions, latest_user_text(request.input_items), first_name)


def string_for_key(key: str, index: int, prompt: Prompt) -> str:
    lowered = key.lower()
    if "name" in lowered:
        return prompt.first_name or "there"
    if lowered in REPLY_KEYS:
        return prompt.reply
    if index == 0 or "greet" in lowered:
        return prompt.greeting
    return f"Sandbox {key} for {prompt.first_name or 'you'}"


def concrete_schema(schema: object, root: JSONObject) -> JSONObject:
    """Follow a local `$ref` and take the first non-null `anyOf` branch."""
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: object = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return concrete_schema(target, root)
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        usable = [branch for branch in branches if isinstance(branch, dict) and branch.get("type") != "null"]
        return concrete_schema(usable[0], root) if usable else {}
    return schema


def value_for_schema(key: str, index: int, schema: object, root: JSONObject, prompt: Prompt) -> object:
    resolved = concrete_schema(schema, root)
    enum = resolved.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = resolved.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        return object_for_schema(resolved, root, prompt)
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    return string_for_key(key, index, prompt)


def object_for_schema(schema: JSONObject, root: JSONObject, prompt: Prompt) -> JSONObject:
    """A JSON object with exactly the schema's `properties` keys, filled from the prompt."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {
        key: value_for_schema(key, index, subschema, root, prompt)
        for index, (key, subschema) in enumerate(properties.items())
    }


def keys_named_in(instructions: str) -> list[str]:
    """Keys the instructions show as `"key":`, in order, e.g. from an example JSON object."""
    return list(dict.fromkeys(_QUOTED_KEY.findall(instructions)))


def generate_text(text_format: JSONObject, prompt: Prompt) -> str:
    """Deterministic output text; valid JSON whenever a JSON format was asked for."""
    if text_format["type"] == "json_schema":
        schema: JSONObject = text_format["schema"]
        return orjson.dumps(object_for_schema(schema, schema, prompt)).decode()
    if text_format["type"] == "json_object":
        keys = keys_named_in(prompt.instructions) or ["content"]
        return orjson.dumps({key: string_for_key(key, index, prompt) for index, key in enumerate(keys)}).decode()
    return prompt.reply


# --- stored objects -----------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredConversation:
    """A conversation and its items, oldest first, with an id index for cursor paging."""

    body: JSONObject
    items: list[JSONObject] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    token_count: int = 0
    first_name: str | None = None

    @property
    def id(self) -> str:
        conversation_id: str = self.body["id"]
        return conversation_id

    def append(self, items: Iterable[JSONObject]) -> None:
        for item in items:
            self.positions[item["id"]] = len(self.items)
            self.items.append(item)
            texts = item_texts(item)
            self.token_count += sum(estimate_tokens(text) for text in texts)
            self.first_name = self.first_name or find_first_name(texts)


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    input_tokens: int

    def usage(self) -> JSONObject:
        output_tokens = estimate_tokens(self.text)
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output_tokens,
        }


@dataclass(slots=True)
class StoredResponse:
    """A response object as served, what it will say, and the timers of a background run."""

    body: JSONObject
    input_items: list[JSONObject]
    generation: Generation
    timers: list[Timer] = field(default_factory=list)

    @property
    def id(self) -> str:
        response_id: str = self.body["id"]
        return response_id

    @property
    def background(self) -> bool:
        return bool(self.body["background"])

    @property
    def pending(self) -> bool:
        return self.body["status"] in PENDING_STATUSES

    @property
    def context_items(self) -> list[JSONObject]:
        """What a response chained after this one sees of it: its input, then its output."""
        output: list[JSONObject] = self.body["output"]
        return [*self.input_items, *output]

    def stop_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


@dataclass(slots=True)
class OpenAISandboxStats:
    responses_created: int = 0
    conversations_created: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def as_json(self) -> JSONObject:
        return {
            "responses_created": self.responses_created,
            "conversations_created": self.conversations_created,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }


def go_duration(seconds: float) -> str:
    """A wait as OpenAI's `x-ratelimit-reset-*` headers write it: "250ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


@dataclass(slots=True)
class KeyLimit:
    """Creates each API key may make over a sliding window, and the times of those it made."""

    max_requests: int
    window_s: float
    recent: dict[str, deque[float]] = field(default_factory=dict)
    refused: int = 0

    def _window(self, api_key: str, now: float) -> deque[float]:
        times = self.recent.setdefault(api_key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def take(self, api_key: str, now: float) -> float:
        """0.0 when one more create from `api_key` at `now` is within the limit (and counted), else the seconds
        until the oldest create in the window leaves it."""
        times = self._window(api_key, now)
        if len(times) >= self.max_requests:
            self.refused += 1
            return max(times[0] + self.window_s - now, 0.001)
        times.append(now)
        return 0.0

    def headers(self, api_key: str, now: float) -> dict[str, str]:
        """OpenAI's request-limit headers for `api_key` at `now`."""
        times = self._window(api_key, now)
        reset_s = times[0] + self.window_s - now if times else 0.0
        return {
            "x-ratelimit-limit-requests": str(self.max_requests),
            "x-ratelimit-remaining-requests": str(max(self.max_requests - len(times), 0)),
            "x-ratelimit-reset-requests": go_duration(reset_s),
        }

    def as_json(self) -> JSONObject:
        return {"max_requests": self.max_requests, "window_s": self.window_s, "rate_limited": self.refused}


@dataclass(slots=True)
class OpenAISandboxState:
    """Everything one OpenAI sandbox holds; `background_latency_s` None means "follow `control.latency_s`".

    `call_later` schedules the end of each background generation (tests may pass a timer they fire themselves).
    """

    control: SandboxControl
    responses: dict[str, StoredResponse] = field(default_factory=dict)
    conversations: dict[str, StoredConversation] = field(default_factory=dict)
    stats: OpenAISandboxStats = field(default_factory=OpenAISandboxStats)
    background_latency_s: float | None = None
    call_later: CallLater = loop_call_later
    key_limit: KeyLimit | None = None

    def background_generation_s(self) -> float:
        return self.control.latency_s if self.background_latency_s is None else self.background_latency_s

    def conversation(self, conversation_id: str) -> StoredConversation:
        found = self.conversations.get(conversation_id)
        if found is None:
            raise not_found("Conversation", conversation_id)
        return found

    def response(self, response_id: str) -> StoredResponse:
        found = self.responses.get(response_id)
        if found is None:
            raise not_found("Response", response_id)
        return found

    def stop_background_work(self) -> None:
        for stored in self.responses.values():
            stored.stop_timers()

    def reset(self) -> None:
        self.stop_background_work()
        self.responses.clear()
        self.conversations.clear()
        self.stats = OpenAISandboxStats(in_flight=self.stats.in_flight, peak_in_flight=self.stats.in_flight)
        self.background_latency_s = None
        self.key_limit = None


OPENAI_STATE_KEY = web.AppKey("openai_sandbox_state", OpenAISandboxState)


def sandbox_state(request: web.Request) -> OpenAISandboxState:
    return request.app[OPENAI_STATE_KEY]


# --- response lifecycle -------------------------------------------------------------------------------


def new_response_body(request: ResponseRequest) -> JSONObject:
    """A Response with every field the SDK's model requires; output and usage come on completion."""
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": unix_now(),
        "status": "queued" if request.background else "in_progress",
        "background": request.background,
        "completed_at": None,
        "conversation": {"id": request.conversation_id} if request.conversation_id else None,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None,
        "metadata": request.metadata,
        "model": request.model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": request.store,
        "temperature": request.temperature,
        "text": request.text,
        "tool_choice": "auto",
        "tools": [],
        "top_p": request.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": None,
    }


def assistant_message(text: str) -> JSONObject:
    return message_item("assistant", [{"type": "output_text", "text": text, "annotations": []}])


@dataclass(frozen=True, slots=True)
class History:
    """What a response sees before its own input: the conversation's items, or the chain of previous responses."""

    token_count: int = 0
    first_name: str | None = None


def chain_history(state: OpenAISandboxState, previous: StoredResponse) -> History:
    """The input and output of every stored response in the chain ending at `previous`, oldest first; a link that
    was deleted ends the walk there (the real API loses that part of the context silently too)."""
    chain: list[StoredResponse] = []
    link: StoredResponse | None = previous
    while link is not None:
        chain.append(link)
        previous_id = link.body["previous_response_id"]
        link = state.responses.get(previous_id) if previous_id else None
    texts = [text for stored in reversed(chain) for item in stored.context_items for text in item_texts(item)]
    return History(sum(estimate_tokens(text) for text in texts), find_first_name(texts))


def generate(request: ResponseRequest, history: History) -> Generation:
    prompt = build_prompt(request, history.first_name)
    input_texts = [request.instructions or ""] + [text for item in request.input_items for text in item_texts(item)]
    input_tokens = history.token_count + sum(estimate_tokens(text) for text in input_texts)
    return Generation(generate_text(request.text_format, prompt), input_tokens)


def finish_response(state: OpenAISandboxState, stored: StoredResponse) -> None:
    """Complete a response: output and usage appear, and the conversation gets its input and output."""
    stored.timers.clear()
    output = assistant_message(stored.generation.text)
    stored.body.update(
        status="completed",
        completed_at=unix_now(),
        output=[output],
        usage=stored.generation.usage(),
    )
    conversation_ref = stored.body["conversation"]
    conversation = state.conversations.get(conversation_ref["id"]) if conversation_ref else None
    if conversation is not None:
        conversation.append([*stored.input_items, output])


def mark_in_progress(stored: StoredResponse) -> None:
    if stored.body["status"] == "queued":
        stored.body["status"] = "in_progress"


def run_in_background(state: OpenAISandboxState, stored: StoredResponse) -> None:
    """Queued now, in progress on the next loop turn, completed after the background generation time."""
    loop = asyncio.get_running_loop()
    stored.timers = [
        loop.call_soon(mark_in_progress, stored),
        state.call_later(state.background_generation_s(), partial(finish_response, state, stored)),
    ]


# --- /v1 handlers -------------------------------------------------------------------------------------


async def create_conversation(request: web.Request) -> web.Response:
    state = sandbox_state(request)
    body = await read_json_object(request, empty_ok=True)
    items = normalise_items(body.get("items"), "items")
    conversation_body = {
        "id": new_id("conv"),
        "object": "conversation",
        "created_at": unix_now(),
        "metadata": parse_metadata(body.get("metadata")),
    }
    conversation = StoredConversation(conversation_body)
    conversation.append(items)
    state.conversations[conversation.id] = conversation
    state.stats.conversations_created += 1
    return json_response(conversation_body)


async def retrieve_conversation(request: web.Request) -> web.Response:
    conversation = sandbox_state(request).conversation(request.match_info["conversation_id"])
    return json_response(conversation.body)


async def delete_conversation(request: web.Request) -> web.Response:
    state = sandbox_state(request)
    conversation = state.conversation(request.match_info["conversation_id"])
    del state.conversations[conversation.id]
    return json_response({"id": conversation.id, "object": "conversation.deleted", "deleted": True})


def page_limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit", str(DEFAULT_PAGE_SIZE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise invalid("limit", f"Invalid 'limit': expected an integer from 1 to {MAX_PAGE_SIZE}.")
    return int(raw)


def page_positions(conversation: StoredConversation, after: str | None, limit: int, descending: bool) -> range:
    """Positions of one page of items, walking oldest→newest (asc) or newest→oldest (desc) from `after`."""
    total = len(conversation.items)
    if after is not None and after not in conversation.positions:
        raise invalid("after", f"Invalid 'after': no item '{after}' in conversation '{conversation.id}'.")
    if descending:
        start = conversation.positions[after] - 1 if after is not None else total - 1
        return range(start, max(start - limit, -1), -1)
    start = conversation.positions[after] + 1 if after is not None else 0
    return range(start, min(start + limit, total))


async def list_conversation_items(request: web.Request) -> web.Response:
    return item_page(request, sandbox_state(request).conversation(request.match_info["conversation_id"]))


async def list_response_input_items(request: web.Request) -> web.Response:
    """The input items the response was created with (its own, not those of the responses it chains after)."""
    stored = sandbox_state(request).response(request.match_info["response_id"])
    items = StoredConversation({"id": stored.id})
    items.append(stored.input_items)
    return item_page(request, items)


def item_page(request: web.Request, conversation: StoredConversation) -> web.Response:
    """One page of `conversation`'s items as the list endpoints answer (`order`, `after`, `limit`)."""
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", "Invalid 'order': expected 'asc' or 'desc'.")
    positions = page_positions(conversation, request.query.get("after"), page_limit(request.query), order == "desc")
    data = [conversation.items[position] for position in positions]
    has_more = bool(positions) and positions[-1] != (0 if order == "desc" else len(conversation.items) - 1)
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def previous_response(state: OpenAISandboxState, response_id: str) -> StoredResponse:
    found = state.responses.get(response_id)
    if found is None:
        message = f"Previous response with id '{response_id}' not found."
        raise ApiFailure(400, message, param="previous_response_id", code="previous_response_not_found")
    return found


def history_for(state: OpenAISandboxState, ask: ResponseRequest) -> History:
    if ask.conversation_id:
        conversation = state.conversation(ask.conversation_id)
        return History(conversation.token_count, conversation.first_name)
    if ask.previous_response_id:
        return chain_history(state, previous_response(state, ask.previous_response_id))
    return History()


def bearer_token(request: web.Request) -> str:
    return request.headers.get("Authorization", "").partition(" ")[2].strip()


def check_key_limit(state: OpenAISandboxState, api_key: str, model: str) -> dict[str, str]:
    """The request-limit headers of a create within its key's limit; past it, OpenAI's 429."""
    limit = state.key_limit
    if limit is None:
        return {}
    now = time.monotonic()
    wait_s = limit.take(api_key, now)
    headers = limit.headers(api_key, now)
    if wait_s:
        headers["x-ratelimit-reset-requests"] = go_duration(wait_s)
        message = (
            f"Rate limit reached for {model} in organization org-sandbox on requests per min (RPM): "
            f"Limit {limit.max_requests}, Used {limit.max_requests}, Requested 1. "
            f"Please try again in {go_duration(wait_s)}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )
        raise ApiFailure(429, message, code="rate_limit_exceeded", headers=headers)
    return headers


async def create_response(request: web.Request) -> web.Response:
    state = sandbox_state(request)
    ask = parse_response_request(await read_json_object(request))
    limit_headers = check_key_limit(state, bearer_token(request), ask.model)
    stored = StoredResponse(new_response_body(ask), ask.input_items, generate(ask, history_for(state, ask)))
    state.stats.responses_created += 1
    if ask.store:
        state.responses[stored.id] = stored
    if ask.background:
        run_in_background(state, stored)
    else:
        finish_response(state, stored)
    return json_response(stored.body, headers=limit_headers or None)


async def retrieve_response(request: web.Request) -> web.Response:
    return json_response(sandbox_state(request).response(request.match_info["response_id"]).body)


async def delete_response(request: web.Request) -> web.Response:
    state = sandbox_state(request)
    stored = state.response(request.match_info["response_id"])
    stored.stop_timers()
    del state.responses[stored.id]
    return json_response({"id": stored.id, "object": "response.deleted", "deleted": True})


async def cancel_response(request: web.Request) -> web.Response:
    """Cancel a queued or in-progress background response; a finished one is returned unchanged."""
    stored = sandbox_state(request).response(request.match_info["response_id"])
    if not stored.background:
        raise ApiFailure(400, "Only responses created with 'background': true can be cancelled.")
    if stored.pending:
        stored.stop_timers()
        stored.body["status"] = "cancelled"
    return json_response(stored.body)


# --- /_sandbox/openai handlers ------------------------------------------------------------------------


async def show_stats(request: web.Request) -> web.Response:
    return json_response(sandbox_state(request).stats.as_json())


async def set_background_latency(request: web.Request) -> web.Response:
    """`{"seconds": 2.0}` fixes the background generation time; `{"seconds": null}` follows the latency again."""
    state = sandbox_state(request)
    seconds = (await request.json()).get("seconds")
    state.background_latency_s = None if seconds is None else float(seconds)
    return json_response({"background_latency_s": state.background_latency_s})


async def configure_key_limit(request: web.Request) -> web.Response:
    """`{"per_second": n}` (null: no limit) or `{"max_requests": n, "window_s": s}`: each key's creates."""
    data = await read_json_object(request)
    state = sandbox_state(request)

    def positive(name: str) -> float:
        value = data.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise web.HTTPBadRequest(text=f"'{name}' must be a positive number")
        return float(value)

    if "max_requests" in data:
        state.key_limit = KeyLimit(int(positive("max_requests")), positive("window_s"))
    elif data.get("per_second") is None:
        state.key_limit = None
    else:
        state.key_limit = KeyLimit(max(1, int(positive("per_second"))), 1.0)
    return json_response(None if state.key_limit is None else state.key_limit.as_json())


async def show_key_limit(request: web.Request) -> web.Response:
    limit = sandbox_state(request).key_limit
    return json_response(None if limit is None else limit.as_json())


async def reset_openai_state(request: web.Request) -> web.Response:
    sandbox_state(request).reset()
    return json_response({"reset": True})


# --- front door: auth, in-flight count, latency exemption, error bodies -------------------------------


def require_bearer_token(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiFailure(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")


async def asks_for_background(request: web.Request) -> bool:
    try:
        body = await read_json_object(request)
    except ApiFailure:
        return False
    return body.get("background") is True


async def skips_latency(request: web.Request, state: OpenAISandboxState) -> bool:
    """Background creates and a background response's retrieves and cancels answer at once (unless faulted):
    their latency is the background generation time instead."""
    if any(fault.matches(request) for fault in state.control.faults):
        return False
    route = request.match_info.route.name
    if route == CREATE_RESPONSE:
        return await asks_for_background(request)
    if route in (RETRIEVE_RESPONSE, CANCEL_RESPONSE):
        stored = state.responses.get(request.match_info["response_id"])
        return stored is not None and stored.background
    return False


def record_request(control: SandboxControl, request: web.Request) -> None:
    """Log a request that bypassed the shared middleware, as that middleware would have."""
    if len(control.requests) < control.max_recorded:
        control.requests.append(RecordedRequest(request.method, request.path, time.time()))


def shape_injected_fault(response: web.StreamResponse) -> web.StreamResponse:
    """Give a body-less injected fault (`{"error": {"message", "code": <int>}}`) OpenAI's error shape."""
    if response.status < 400 or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return response
    try:
        payload = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return response
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and set(error) == {"message", "code"} and isinstance(error["code"], int):
        response.body = orjson.dumps(error_body(response.status, str(error["message"])))
    return response


async def answer_api_request(request: web.Request, handler: Handler, state: OpenAISandboxState) -> web.StreamResponse:
    try:
        require_bearer_token(request)
        if await skips_latency(request, state):
            record_request(state.control, request)
            return await request.match_info.handler(request)
        return shape_injected_fault(await handler(request))
    except ApiFailure as failure:
        return failure.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(error_body(exc.status, exc.reason), status=exc.status)


def openai_front_door(state: OpenAISandboxState) -> Middleware:
    """The outermost middleware: it wraps the shared latency/fault middleware for every API request."""

    @web.middleware
    async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sandbox/"):
            return await handler(request)
        state.stats.enter()
        try:
            return await answer_api_request(request, handler, state)
        finally:
            state.stats.leave()

    return front_door


# --- app ----------------------------------------------------------------------------------------------


def add_api_routes(app: web.Application) -> None:
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}", retrieve_conversation)
    app.router.add_delete("/v1/conversations/{conversation_id}", delete_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}/items", list_conversation_items)
    app.router.add_post("/v1/responses", create_response, name=CREATE_RESPONSE)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response, name=RETRIEVE_RESPONSE)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_response_input_items)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response, name=CANCEL_RESPONSE)


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sandbox/openai/stats", show_stats)
    app.router.add_post("/_sandbox/openai/background_latency", set_background_latency)
    app.router.add_post("/_sandbox/openai/reset", reset_openai_state)
    app.router.add_post("/_sandbox/openai/key-limit", configure_key_limit)
    app.router.add_get("/_sandbox/openai/key-limit", show_key_limit)


async def stop_background_work(app: web.Application) -> None:
    app[OPENAI_STATE_KEY].stop_background_work()


def create_openai_sandbox(
    control: SandboxControl | None = None, *, call_later: CallLater = loop_call_later
) -> web.Application:
    """The OpenAI sandbox app: point `AsyncOpenAI(base_url=<url>/v1, api_key=<any>)` at it.

    `call_later` ends background generations (default: real time on the running loop).
    """
    app = new_sandbox_app(control)
    state = OpenAISandboxState(control=app[CONTROL_KEY], call_later=call_later)
    app[OPENAI_STATE_KEY] = state
    app.middlewares.insert(0, openai_front_door(state))
    add_api_routes(app)
    add_control_routes(app)
    app.on_cleanup.append(stop_background_work)
    return app
