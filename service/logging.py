"""structlog set-up: one JSON object per line, request/trace ids bound per request, secrets redacted.

Values under secret-looking keys are replaced; phone numbers and emails anywhere in
a log line are masked, so a recipient's address never reaches the log store whole.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from functools import lru_cache
from typing import Any, TextIO

import orjson
import structlog

# A key names a secret when its last word is one of these (auth_token, client_secret, X-Twilio-Signature),
# or its last two words are one of the pairs (x_api_key, apiKey, aws_secret_access_key). So `prompt_tokens`
# (a count), `whatsapp_credentials_id` and `api_key_reference` (references to secrets) are kept.
_SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "passphrase", "authorization", "signature", "cookie", "apikey"}
)
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_PHONE = re.compile(r"(?<![\w-])\+?\d{8,15}(?![\w-])")
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
REDACTED = "[REDACTED]"
FOREIGN_MESSAGE_MAX_CHARS = 2000  # a library message longer than this is cut (its text may be a caller's header)


def mask_phone(match: re.Match[str]) -> str:
    digits = match.group(0)
    return digits[:3] + "*" * (len(digits) - 6) + digits[-3:]


def mask_text(text: str) -> str:
    masked = _PHONE.sub(mask_phone, text)
    # Most values hold no "@": skip the email pattern, whose scan is quadratic in a long run of word characters.
    return _EMAIL.sub(r"\1***@\2", masked) if "@" in masked else masked


# Field names come from the code and from logged mappings (headers, usage): a bounded cache covers them.
@lru_cache(maxsize=1024)
def is_secret_key(key: str) -> bool:
    """Whether a field or header of this name carries a secret, whatever its spelling (snake, kebab, camel)."""
    words = [word for word in _NON_WORD.split(_CAMEL.sub(r"\1_\2", key).lower()) if word]
    return bool(words) and (words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS)


def _redact(value: Any, key: str = "") -> Any:
    # Numbers and booleans are never secrets (a flag like has_api_key, a count); empty values reveal nothing.
    if key and is_secret_key(key) and value not in (None, "") and not isinstance(value, bool | int | float):
        return REDACTED
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, key) for v in value]
    return value


def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() - {"timestamp", "level", "logger"}:
        event[key] = _redact(event[key], key)
    return event


# Libraries that log every request (and, for botocore, where credentials came from) at INFO.
_CHATTY_LOGGERS = ("botocore", "aiobotocore", "twilio", "aiohttp.access", "httpx2", "httpcore2", "openai")
# Libraries that warn about what a caller sent (OpenTelemetry: a malformed `tracestate` header, quoted whole): the
# caller's mistake, nothing an operator can act on, and one line per request to whoever sends it.
_CALLER_INPUT_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")


class _StreamLogger:
    """Writes each rendered line to sys.stdout or sys.stderr as they are *now* (not as they were at
    configuration time), so a replaced or closed stream never breaks logging."""

    def __init__(self, to_stderr: bool) -> None:
        self._to_stderr = to_stderr

    def msg(self, message: bytes) -> None:
        stream: TextIO = sys.stderr if self._to_stderr else sys.stdout
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(message + b"\n")
            buffer.flush()
        else:
            stream.write(message.decode() + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


class _JsonLines(logging.Handler):
    """Python's standard `logging` (what aiohttp, asyncio, botocore and OpenTelemetry write) as the service's own
    lines: one JSON object each, the logger named, a traceback in `exception`, phone numbers masked, the message
    cut at `FOREIGN_MESSAGE_MAX_CHARS` (a library may quote what a caller sent, a header of kilobytes)."""

    def __init__(self, out: _StreamLogger) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record).encode())
        except Exception:  # logging must never raise into the code that logs
            self.handleError(record)


def _bounded(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    message = str(event.get("event", ""))
    if len(message) > FOREIGN_MESSAGE_MAX_CHARS:
        event["event"] = f"{message[:FOREIGN_MESSAGE_MAX_CHARS]}… ({len(message)} characters, cut)"
    return event


def _printable(value: Any) -> Any:
    """`value` with every string made encodable: a lone surrogate (a header's byte that is not UTF-8, as aiohttp
    decodes it) becomes "?" instead of failing the line, and with it the request that logs it."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def json_line(event: Any, **options: Any) -> bytes:
    """orjson's encoding of a log event (structlog's JSONRenderer serializer), never raising on its strings."""
    try:
        return orjson.dumps(event, **options)
    except TypeError:
        return orjson.dumps(_printable(event), **options)


def _render(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    return json_line(event, default=str).decode()


def configure_logging(level: str = "INFO", *, to_stderr: bool = False) -> None:
    """JSON lines on stdout (the service), or on stderr (operator commands, whose stdout is data); the standard
    library's records too, through the same redaction (replacing any handler an earlier call installed)."""
    numeric_level = getattr(logging, level)
    out = _StreamLogger(to_stderr)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = _JsonLines(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,  # a library line inside a request carries its ids
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                stamp,
                _bounded,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event,
                _render,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _JsonLines)] + [handler]
    root.setLevel(numeric_level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric_level))
    for name in _CALLER_INPUT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(serializer=json_line),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: out,
        cache_logger_on_first_use=True,
    )
