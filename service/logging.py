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


def configure_logging(level: str = "INFO", *, to_stderr: bool = False) -> None:
    """JSON lines on stdout (the service), or on stderr (operator commands, whose stdout is data)."""
    numeric_level = getattr(logging, level)
    logging.basicConfig(format="%(message)s", stream=sys.stderr if to_stderr else sys.stdout, level=numeric_level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric_level))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: _StreamLogger(to_stderr),
        cache_logger_on_first_use=True,
    )
