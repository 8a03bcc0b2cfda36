"""What crosses the provider ports (`service.domain.ports`: secrets, the AI writer, the message senders):
the values, and the only exceptions their adapters raise, so processors decide retry versus fail from the
exception type, never from message text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.domain.conversation import Message, TokenUsage


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


class ProviderRateLimited(TransientProviderError):
    """The provider refused for exceeding its rate (HTTP 429): nothing was sent; the sender's pace must drop."""


class ProviderPaced(TransientProviderError):
    """Not attempted: the provider's pace (a sender's or an AI key's, fleet-wide) has no turn free within the
    wait a worker slot may spend; `retry_after_s` says when one is. The message waits in the queue for that long
    (deferred, not retried: the receive count must not grow)."""


class PermanentProviderError(ProviderError):
    """Retrying cannot help (bad credentials, invalid recipient, refused content, unknown secret)."""


class SendOutcomeUnknown(TransientProviderError):
    """The send request may have reached the provider (timeout, dropped connection after writing)."""


# ---- AI ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AiRequest:
    """One exchange with the model. `thread_id` is the continuation the previous exchange returned
    (`AiResult.thread_id`, opaque outside the adapter), None for a conversation's first exchange; `history` is the
    conversation as recorded, which the adapter sends when the provider no longer holds (or never held) the
    continuation, so the model still sees what was said."""

    api_key: str
    model: str
    instructions: str
    input_text: str
    output_keys: tuple[str, ...]  # the JSON object keys the answer must have, e.g. ("1", "2") or ("content",)
    thread_id: str | None = None
    history: tuple[Message, ...] = ()
    background: bool = False  # long-running models: create in background mode, poll until terminal
    timeout_s: float = 60.0  # hard limit for the whole call, retries and polling included
    metadata: dict[str, str] = field(default_factory=dict)
    requests_per_second: float | None = None  # the project's pace for this key; None: COMMS_AI_REQUESTS_PER_SECOND


@dataclass(frozen=True, slots=True)
class AiResult:
    """The answer, and `thread_id`: the continuation the conversation stores for its next exchange."""

    output: dict[str, str]
    response_id: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    thread_id: str

    @property
    def usage(self) -> TokenUsage:
        return TokenUsage(self.prompt_tokens, self.completion_tokens, self.total_tokens)


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
    sends_per_second: float | None = None  # the project's pace for this sender; None: the channel's default


@dataclass(frozen=True, slots=True)
class SentMessage:
    provider_message_id: str
    status: str | None = None
