"""Ports to the outside services a conversation needs: secrets, the AI writer, the message senders.

Adapters raise only the exceptions defined here, so processors decide retry versus
fail from the exception type, never from message text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ProviderError(Exception):
    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransientProviderError(ProviderError):
    """Worth retrying later (throttled, 5xx, timeout, network). `retry_after_s` when the provider said."""

    def __init__(self, reason: str, *, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason, code=code)
        self.retry_after_s = retry_after_s


class PermanentProviderError(ProviderError):
    """Retrying cannot help (bad credentials, invalid recipient, refused content, unknown secret)."""


class SendOutcomeUnknown(TransientProviderError):
    """The send request may have reached the provider (timeout, dropped connection after writing)."""


# ---- secrets ---------------------------------------------------------------------------------


class SecretStore(Protocol):
    async def get_json(self, secret_id: str) -> dict[str, str]:
        """The secret's JSON object (cached with a TTL). PermanentProviderError if it does not exist or
        is not a JSON object of strings; TransientProviderError when Secrets Manager is unavailable."""
        ...


# ---- AI ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AiRequest:
    api_key: str
    model: str
    instructions: str
    input_text: str
    output_keys: tuple[str, ...]  # the JSON object keys the answer must have, e.g. ("1", "2") or ("content",)
    thread_id: str  # the OpenAI conversation the exchange is stored in
    background: bool = False  # long-running models: create in background mode, poll until terminal
    timeout_s: float = 60.0  # hard limit for the whole call, retries and polling included
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AiResult:
    output: dict[str, str]
    response_id: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AiWriter(Protocol):
    async def start_thread(self, api_key: str, metadata: dict[str, str]) -> str:
        """Create an OpenAI conversation and return its id (stored as the conversation's `thread_id`)."""
        ...

    async def write(self, request: AiRequest) -> AiResult:
        """Generate a JSON object with exactly `output_keys` (string values) in `thread_id`.

        Retries transient errors with backoff honouring Retry-After within `timeout_s`; then raises
        TransientProviderError. Raises PermanentProviderError for 4xx other than 408/409/429 and for
        an answer that is not a JSON object with the requested keys."""
        ...


# ---- sending -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    channel: str  # whatsapp | sms | email
    credentials: dict[str, str]  # the secret: twilio_account_sid/_auth_token, or sendgrid_api_key/from_*
    sender: str  # company number (E.164) or company email
    recipient: str  # recipient number (E.164) or email
    body: str | None = None  # sms / email text / whatsapp free-form reply
    subject: str | None = None  # email
    content_sid: str | None = None  # whatsapp template
    content_variables: dict[str, str] | None = None  # whatsapp template variables
    status_callback_url: str | None = None
    reference: str | None = None  # our conversation id: SendGrid custom_args, for support look-ups
    sender_name: str | None = None  # email From name


@dataclass(frozen=True, slots=True)
class SentMessage:
    provider_message_id: str
    status: str | None = None


class MessageSender(Protocol):
    async def send(self, message: OutboundMessage) -> SentMessage:
        """Send once (never retried inside: a retry could send twice). Raises PermanentProviderError,
        TransientProviderError (certainly not sent) or SendOutcomeUnknown (may have been sent)."""
        ...

    async def find_sent(self, message: OutboundMessage, since_epoch_s: float) -> SentMessage | None:
        """Reconciliation after a crash: the provider's record of this message sent since `since_epoch_s`,
        or None when the provider has none. Raises TransientProviderError when it cannot tell, and
        PermanentProviderError when the provider offers no way to look (then the caller marks for review)."""
        ...
