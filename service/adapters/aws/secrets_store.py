"""Provider credentials from AWS Secrets Manager: a JSON object of strings per secret, behind a TTL cache.

Concurrent misses for one secret share one GetSecretValue (single-flight); failures are never cached.
Secret values never reach a log line: only the secret's name and the AWS error code do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import structlog
from botocore.exceptions import BotoCoreError, ClientError

from service.adapters.aws.errors import error_code
from service.adapters.ttl_cache import TtlCache
from service.domain.provider_ports import PermanentProviderError, ProviderError, TransientProviderError

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

__all__ = ["SecretsManagerStore"]

log = structlog.get_logger(__name__)

# Codes that name a problem with the secret or the request, not with Secrets Manager's availability.
PERMANENT_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "InvalidRequestException",  # e.g. the secret is scheduled for deletion
        "InvalidParameterException",
        "DecryptionFailure",
        "AccessDeniedException",
        "ValidationException",
    }
)


class SecretsManagerStore:
    """`SecretStore` over one shared aiobotocore Secrets Manager client (whose own retries stay on)."""

    def __init__(self, secrets_client: SecretsManagerClient, ttl_s: float, max_entries: int = 10_000) -> None:
        self._client = secrets_client
        self._cache: TtlCache[str, dict[str, str]] = TtlCache(ttl_s, max_entries=max_entries)

    async def get_json(self, secret_id: str) -> dict[str, str]:
        secret = await self._cache.get(secret_id, lambda: self._fetch(secret_id))
        return dict(secret)  # a copy: callers cannot change the cached object

    def invalidate(self, secret_id: str) -> None:
        """Forget a cached secret (e.g. after the provider rejected its credentials as revoked)."""
        self._cache.invalidate(secret_id)

    async def _fetch(self, secret_id: str) -> dict[str, str]:
        try:
            answer = await self._client.get_secret_value(SecretId=secret_id)
        except (ClientError, BotoCoreError) as exc:
            failure = classify_aws_failure(exc)
            log.warning("secrets.fetch_failed", secret_id=secret_id, reason=failure.reason, code=failure.code)
            raise failure from exc
        secret_string = answer.get("SecretString")
        if secret_string is None:
            raise PermanentProviderError("secret_not_json", code="SecretBinary")
        return parse_secret(secret_id, secret_string)


def classify_aws_failure(exc: ClientError | BotoCoreError) -> ProviderError:
    """Permanent for a missing or unusable secret; transient for throttling, 5xx and network trouble."""
    code = error_code(exc)
    if code is None:  # BotoCoreError: endpoint unreachable, read timeout, ...
        return TransientProviderError("secrets_unavailable", code=type(exc).__name__)
    if code in PERMANENT_CODES:
        reason = "secret_not_found" if code == "ResourceNotFoundException" else "secret_unusable"
        return PermanentProviderError(reason, code=code)
    return TransientProviderError("secrets_unavailable", code=code)


def parse_secret(secret_id: str, secret_string: str) -> dict[str, str]:
    """The secret as a dict of strings, or PermanentProviderError (without echoing the value)."""
    try:
        value = orjson.loads(secret_string)
    except orjson.JSONDecodeError:
        log.warning("secrets.not_json", secret_id=secret_id)
        raise PermanentProviderError("secret_not_json", code="InvalidJson") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        log.warning("secrets.not_object_of_strings", secret_id=secret_id)
        raise PermanentProviderError("secret_not_json", code="NotAnObjectOfStrings")
    return value
