"""Who may call: API key authentication, tenant authorisation and the rate limit that applies."""

from __future__ import annotations

from service.domain.api_keys import parse_key, secret_matches
from service.domain.company import CompanyRecord
from service.domain.errors import ApiError, ErrorCode
from service.domain.ports import ApiKeyRecord, ApiKeyStore
from service.domain.rate_limit import RateLimit


async def authenticate(presented: str | None, keys: ApiKeyStore) -> ApiKeyRecord:
    """The active key record behind `x-api-key`, or 401 UNAUTHORIZED."""
    parsed = parse_key(presented) if presented else None
    if parsed is None:
        raise ApiError(ErrorCode.UNAUTHORIZED, "a valid x-api-key header is required")
    record = await keys.find(parsed.key_id)
    # Compare even when the record is missing so timing does not reveal which key ids exist.
    stored_hash = record.secret_hash if record else "0" * 64
    if not secret_matches(parsed, stored_hash) or record is None or not record.is_active:
        raise ApiError(ErrorCode.UNAUTHORIZED, "a valid x-api-key header is required")
    return record


def authorise(key: ApiKeyRecord, company_id: str, project_id: str) -> None:
    """403 AUTHORIZATION_ERROR unless the key belongs to the company/project named in the body."""
    if (key.company_id, key.project_id) != (company_id, project_id):
        raise ApiError(ErrorCode.AUTHORIZATION_ERROR, "this API key is not authorised for that company/project")


def rate_limit_for(company: CompanyRecord | None, default: RateLimit) -> RateLimit:
    """The project's own limit when it sets one (per second, or per minute), else the service default."""
    limits = company.rate_limits if company else None
    if limits is None:
        return default
    if limits.requests_per_second:
        per_second = limits.requests_per_second
    elif limits.requests_per_minute:
        per_second = limits.requests_per_minute / 60.0
    else:
        per_second = default.per_second
    return RateLimit(per_second=per_second, burst=limits.burst or default.burst)
