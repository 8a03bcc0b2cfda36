"""Service configuration: every setting comes from an environment variable.

`Settings()` validates at start-up; `load_settings()` turns a validation error into
one readable message so a bad deployment fails fast and says why.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Channel = Literal["whatsapp", "sms", "email"]
EventLoop = Literal["uvloop", "asyncio"]
CHANNELS: tuple[Channel, ...] = ("whatsapp", "sms", "email")
CONSUMABLE_QUEUES = (*CHANNELS, "replies")

# The stop path's fixed bounds (see `Settings.stop_budget_s`); the consumer runtime and the runner use these.
PROTECTED_GRACE_S = 10.0  # ConsumerConfig.protected_grace_s: extra wait for work inside lease.protected()
RECEIVE_MARGIN_S = 5.0  # ConsumerConfig.receive_margin_s: how long past poll_wait_s an open poll may run at stop
FINISH_TIMEOUT_S = 30.0  # ConsumerConfig.finish_timeout_s: longest wait per finishing stage (within the stop budget)
HTTP_SHUTDOWN_S = 5.0  # the HTTP runner's shutdown timeout for in-flight requests
TRACE_FLUSH_S = 3.0  # the longest wait for tracing's last export at stop, after every client closed (service.tracing)


class ConfigurationError(Exception):
    """The environment does not describe a runnable service."""


class Settings(BaseSettings):
    """All configuration, read from `COMMS_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="COMMS_", extra="ignore", frozen=True)

    environment: str = Field("dev", description="Environment name, used in secret names and logs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    event_loop: EventLoop = Field(
        "uvloop", description="Event loop of `comms serve` / `comms local`: uvloop (less CPU), or asyncio's own"
    )

    # AWS
    aws_region: str = "eu-west-2"
    aws_endpoint_url: str | None = Field(None, description="Override for every AWS service (local stack)")
    dynamodb_endpoint_url: str | None = Field(None, description="Override for DynamoDB only (VPC endpoint)")
    sqs_endpoint_url: str | None = Field(None, description="Override for SQS only")
    secretsmanager_endpoint_url: str | None = Field(None, description="Override for Secrets Manager only")
    aws_max_attempts: int = Field(4, ge=1, le=10)
    aws_connect_timeout_s: float = Field(2.0, gt=0)
    aws_read_timeout_s: float = Field(25.0, gt=0, description="Must exceed the SQS long-poll wait")

    # Resource names
    company_table: str = "comms-company-data"
    conversations_table: str = "comms-conversations"
    stage_table: str = "comms-stage"
    lock_table: str = "comms-locks"
    idempotency_table: str = "comms-idempotency"
    api_keys_table: str = "comms-api-keys"
    opt_out_table: str = "comms-opt-outs"
    rate_limits_table: str = "comms-rate-limits"
    messages_table: str = Field(
        "comms-conversation-messages", description="One item per message of a conversation (conversation key + seq)"
    )
    whatsapp_queue_url: str | None = None
    sms_queue_url: str | None = None
    email_queue_url: str | None = None
    replies_queue_url: str | None = None
    handoff_queue_url: str | None = None
    secrets_prefix: str = "comms"

    # HTTP API
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    metrics_port: int = Field(
        9090, ge=1, le=65535, description="Port of the Prometheus /metrics listener (on `host`), never `port`"
    )
    webhooks_enabled: bool = Field(
        True,
        description="Mount the Twilio webhooks and ask for status callbacks; an api/all process then needs"
        " public_base_url",
    )
    cors_allow_origin: str = "*"
    max_body_bytes: int = Field(64 * 1024, gt=0)
    rate_limit_per_second: float = Field(10.0, gt=0)
    rate_limit_burst: int = Field(20, ge=1)
    rate_limit_scope: Literal["fleet", "replica"] = Field(
        "fleet",
        description="fleet: one limit per API key across every api replica (tokens leased from the rate-limits"
        " table in chunks); replica: each process enforces the limit on its own (N replicas allow N times it)",
    )
    rate_limit_lease_horizon_s: float = Field(
        1.0, gt=0, le=10, description="A replica leases about this many seconds of its own demand at a time"
    )
    company_cache_ttl_s: float = Field(30.0, ge=0)
    api_key_cache_ttl_s: float = Field(60.0, ge=0)
    request_claim_lease_s: int = Field(30, ge=1, description="How long an in-flight initiate owns its request_id")
    request_idempotency_ttl_s: int = Field(7 * 86400, ge=60, description="How long a request_id is remembered")
    sqs_send_attempts: int = Field(3, ge=1, le=10)
    public_base_url: str | None = Field(None, description="Public URL Twilio calls (webhooks, status callbacks)")
    http_idle_timeout_s: float = Field(
        75.0,
        gt=0,
        le=3600,
        description="An HTTP connection without a complete request for this long is closed (one whose client never"
        " finishes its headers too); keep it above the load balancer's idle timeout (ALB: 60 s)",
    )
    request_deadline_s: float = Field(
        5.0, gt=0, le=60, description="Whole-request deadline on the HTTP paths; over it: 503 with Retry-After"
    )
    duplicate_wait_s: float = Field(
        2.0, ge=0, le=10, description="How long a concurrent repeat of a request_id waits for the first to finish"
    )

    # Consumers
    consumer_concurrency: int = Field(64, ge=1, le=2000)
    visibility_timeout_s: int = Field(60, ge=10, le=43200)
    drain_grace_s: float = Field(
        110.0,
        ge=0,
        description="Time in-flight work gets on SIGTERM; at least ai_timeout_s + provider_timeout_s (one AI call"
        " and one send), so a rollout does not cancel an AI call",
    )
    poll_wait_s: int = Field(
        20, ge=1, le=20, description="SQS long-poll WaitTimeSeconds; a stop waits for the open poll up to this + 5 s"
    )
    batching_window_s: int = Field(10, ge=0, le=900)
    consumer_queues: str = Field("whatsapp,sms,email,replies", description="Queues this process consumes")
    secrets_cache_ttl_s: float = Field(300.0, ge=0)
    ai_timeout_s: float = Field(90.0, gt=0, description="Whole AI call, retries and background polling included")
    ai_max_attempts: int = Field(4, ge=1, le=10)
    provider_timeout_s: float = Field(15.0, gt=0, description="One Twilio/SendGrid call")
    whatsapp_sends_per_second: float = Field(
        80.0, ge=0, description="Default pace of one WhatsApp sender, fleet-wide (Twilio's default); 0: not paced"
    )
    sms_sends_per_second: float = Field(
        1.0, ge=0, description="Default pace of one SMS sender, fleet-wide (a US long code: 1/s); 0: not paced"
    )
    send_pace_max_wait_s: float = Field(
        30.0, ge=0, le=300, description="Longest a worker slot waits for a sender's or AI key's turn; past it, later"
    )
    ai_requests_per_second: float = Field(
        8.0,
        ge=0,
        description="Default pace of AI calls per OpenAI API key, fleet-wide (about 500 requests a minute, the"
        " lowest paid tier's limit for the small models); 0: not paced",
    )
    concurrency_defer_s: int = Field(
        5,
        ge=1,
        le=900,
        description="The shortest wait of a message over its project's concurrent_conversations cap (re-queued with"
        " this delay: its receive count does not grow); the project's later refusals come back one after another,"
        " each (time its conversations hold their lease) / (2 x cap) later and at most 1 s, so its backlog returns"
        " a little faster than the cap lets it run (booked at most 900 s ahead)",
    )
    conversation_index_shards: int = Field(
        8,
        ge=1,
        le=64,
        description="Shards of the per-company conversations index (listing queries each); only ever raise it",
    )

    # Providers (empty means the real public endpoints)
    openai_base_url: str | None = None
    twilio_base_url: str | None = None
    sendgrid_base_url: str = "https://api.sendgrid.com"

    @field_validator("*", mode="before")
    @classmethod
    def _no_whitespace_at_an_end(cls, value: object) -> object:
        """A value from a Kubernetes Secret or a ConfigMap block scalar often ends in a newline: kept, a table name
        or a queue URL names nothing that exists, and the service runs, ready, refusing every request."""
        if isinstance(value, str) and value != value.strip():
            raise ValueError("has whitespace at an end (a trailing newline from a Secret or ConfigMap?)")
        return value

    @field_validator(
        "aws_endpoint_url",
        "dynamodb_endpoint_url",
        "sqs_endpoint_url",
        "secretsmanager_endpoint_url",
        "whatsapp_queue_url",
        "sms_queue_url",
        "email_queue_url",
        "replies_queue_url",
        "handoff_queue_url",
        "public_base_url",
        "openai_base_url",
        "twilio_base_url",
        "sendgrid_base_url",
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host (empty: not set); anything else failed later, deep in a client, as a
        traceback."""
        if value:
            parts = urlsplit(value)
            try:
                parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
            except ValueError:
                raise ValueError("has a port that is not a number from 0 to 65535") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("cors_allow_origin")
    @classmethod
    def _origin_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be '*' or an origin such as https://app.example.com")
        return value.strip()

    @field_validator("consumer_queues")
    @classmethod
    def _known_channels(cls, value: str) -> str:
        unknown = {c.strip().lower() for c in value.split(",") if c.strip()} - set(CONSUMABLE_QUEUES)
        if unknown:
            raise ValueError(f"unknown queues {sorted(unknown)}; use a comma list of {', '.join(CONSUMABLE_QUEUES)}")
        return value

    @model_validator(mode="after")
    def _timeouts_fit_together(self) -> Settings:
        if self.aws_read_timeout_s <= 20:
            raise ValueError("aws_read_timeout_s must exceed the 20 s SQS long-poll wait")
        # A waiting duplicate must be able to answer 409 itself before the request deadline answers 503.
        if self.duplicate_wait_s >= self.request_deadline_s:
            raise ValueError("duplicate_wait_s must be shorter than request_deadline_s")
        # A rollout must not cancel work that is inside its AI call and send: the drain outlasts both.
        if self.drain_grace_s < self.ai_timeout_s + self.provider_timeout_s:
            raise ValueError(
                f"drain_grace_s ({self.drain_grace_s:g}) must be at least ai_timeout_s ({self.ai_timeout_s:g})"
                f" + provider_timeout_s ({self.provider_timeout_s:g})"
            )
        if self.metrics_port == self.port:
            raise ValueError(f"metrics_port must differ from port (both {self.port})")
        return self

    def require_public_base_url(self) -> None:
        """An HTTP API with webhooks needs the public URL Twilio calls back (status callbacks, signatures)."""
        if self.webhooks_enabled and not self.public_base_url:
            raise ConfigurationError(
                "COMMS_PUBLIC_BASE_URL is not set: the Twilio webhooks need the public URL Twilio calls"
                " (or set COMMS_WEBHOOKS_ENABLED=false)"
            )

    def endpoint_url(self, service: str) -> str | None:
        """The endpoint for one AWS service: its own override, else the shared one, else AWS's."""
        own: str | None = getattr(self, f"{service}_endpoint_url", None)
        return own or self.aws_endpoint_url

    def queue_url(self, channel: str) -> str | None:
        """The SQS queue URL of a channel (or of `replies` / `handoff`), or None when it is not configured."""
        url: str | None = getattr(self, f"{channel}_queue_url", None)
        return url

    @property
    def claim_lease_s(self) -> float:
        """Below the visibility timeout, so a crashed worker's claim expires before its message reappears."""
        return self.visibility_timeout_s * 0.8

    @property
    def consumed_queues(self) -> list[str]:
        return [c.strip().lower() for c in self.consumer_queues.split(",") if c.strip()]

    @property
    def consumed_channels(self) -> list[str]:
        return [q for q in self.consumed_queues if q in CHANNELS]

    @property
    def stop_budget_s(self) -> float:
        """Worst-case seconds from SIGTERM to exit of a process running consumers (role worker/all), for the
        pod's terminationGracePeriodSeconds and the ECS stopTimeout (both should be at least this):

            max(drain_grace_s + PROTECTED_GRACE_S, poll_wait_s + RECEIVE_MARGIN_S) + HTTP_SHUTDOWN_S + TRACE_FLUSH_S

        with PROTECTED_GRACE_S = 10 (work inside `lease.protected()`, the send, gets that long past the grace),
        RECEIVE_MARGIN_S = 5 (an open long poll is left to end by itself, at most poll_wait_s + 5 s; it runs
        alongside the drain), HTTP_SHUTDOWN_S = 5 (the HTTP server's shutdown timeout, after the consumers) and
        TRACE_FLUSH_S = 3 (the last spans' export, after every client closed: counted whether or not tracing is
        on, since OTEL_* variables can be added without touching the grace periods derived from this).
        Defaults: max(110 + 10, 20 + 5) + 5 + 3 = 128. The consumers' stop holds to its part whatever SQS does:
        the finishing SQS calls of cancelled work, the returns and the last deletes wait only for what the drain
        left of it (each stage at most FINISH_TIMEOUT_S); cut while SQS hangs, a message reappears after its
        visibility timeout and the claims acknowledge the repeat.
        """
        drain = max(self.drain_grace_s + PROTECTED_GRACE_S, self.poll_wait_s + RECEIVE_MARGIN_S)
        return drain + HTTP_SHUTDOWN_S + TRACE_FLUSH_S

    @property
    def aws_pool_size(self) -> int:
        """Connections per AWS client: every consumer slot of every queue may hold one, plus API headroom."""
        return self.consumer_concurrency * max(1, len(self.consumed_queues)) + 32


def _reason(message: str) -> str:
    return message.removeprefix("Value error, ")  # pydantic's prefix for a validator's own message


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise `ConfigurationError` with every problem listed."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"COMMS_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {_reason(err['msg'])}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from exc
