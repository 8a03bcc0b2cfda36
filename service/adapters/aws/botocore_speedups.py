"""Per-call work botocore repeats on every request although its result cannot change: done once, reused exactly.

Each speed-up reads private botocore attributes (botocore and aiobotocore are pinned by requirements/*.lock). When
an attribute it needs is missing after an upgrade, it leaves botocore's own behaviour in place and logs a warning;
tests/unit/test_sigv4_speedup.py asserts every speed-up is applied and signs exactly as botocore does, and
tests/test_botocore_speedups.py that the User-Agent on the wire is botocore's own, so an upgrade that breaks one
fails CI instead of silently costing CPU or changing a request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from email.policy import compat32
from functools import lru_cache
from hashlib import sha256
from typing import Any, cast

import structlog
from botocore import auth as botocore_auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, AWSRequestPreparer
from botocore.context import get_context
from botocore.useragent import UserAgentString

log = structlog.get_logger("service.adapters.aws")

# Distinct feature-id sets seen per client: a handful (retry mode, endpoint override, credentials source...). The
# cap only guards against a future botocore putting something per-request in there.
_MAX_USER_AGENTS = 64


def speed_up(client: Any) -> list[str]:
    """Apply every speed-up to one aiobotocore client; the names of those applied (the rest log why not)."""
    applied = []
    if reuse_user_agent(client):
        applied.append("user-agent")
    if sign_faster(client):
        applied.append("sigv4")
    return applied


def reuse_user_agent(client: Any) -> bool:
    """botocore builds the User-Agent string twice per request (in `_convert_to_request_dict` and again in
    `rebuild_and_replace_user_agent_handler` on request-created, to pick up features registered meanwhile),
    sanitising every component character by character: ~0.35 M instructions each time. The string is a function of
    the client's fixed configuration and of the feature ids in play (the client's and the request context's), so it
    is built once per distinct sequence of feature ids — the sequence botocore joins, in its order — and reused.
    """
    creator: Any = getattr(client, "_user_agent_creator", None)
    needed = ("_client_features", "_build_feature_metadata", "_client_config")
    if not isinstance(creator, UserAgentString) or not all(hasattr(creator, name) for name in needed):
        log.warning("botocore_speedup_unavailable", speedup="user-agent", missing="UserAgentString attributes")
        return False
    ua: Any = creator  # private attributes below: not in the stubs
    if "to_string" in vars(ua):  # already applied to this creator
        return True
    build: Callable[[], str] = ua.to_string
    built: dict[tuple[str, ...], str] = {}

    def to_string() -> str:
        context = get_context()
        # The same union, in the same order, that UserAgentString._build_feature_metadata joins.
        features = (ua._client_features or set()).union(set() if context is None else context.features)
        key = tuple(features)
        value = built.get(key)
        if value is None:
            value = build()
            if len(built) < _MAX_USER_AGENTS:
                built[key] = value
        return value

    # An instance attribute shadows the method for both callers (the bound handler calls self.to_string()).
    ua.to_string = to_string
    return True


# --- SigV4 ------------------------------------------------------------------------------------------------------------


class _HeaderMap(dict[str, str]):
    """What SigV4Auth.headers_to_sign builds — an email.message-based HTTPHeaders, a slow structure — when every
    header name occurs once, as a dict with the same keys, values and order, answering `in` and `get_all` as
    HTTPHeaders does (case-insensitively)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def get_all(self, name: str, failobj: Any = None) -> Any:
        value = self.get(name.lower())
        return failobj if value is None else [value]


_BOTOCORE_HOST_FROM_URL: Any = getattr(botocore_auth, "_host_from_url", None)


@lru_cache(maxsize=64)
def _host_from_url(url: str) -> str:
    """botocore's own derivation of the Host header (a pure function of the URL), once per endpoint URL."""
    host: str = _BOTOCORE_HOST_FROM_URL(url)
    return host


# (secret key, date, region, service) -> the signing key botocore derives from them on every request.
_SIGNING_KEYS: dict[tuple[Any, ...], bytes] = {}


class _SigV4Auth(SigV4Auth):
    """botocore's SigV4Auth (same canonical request, string to sign and signature) without its repeated work: the
    headers to sign are built as a plain mapping (`_HeaderMap`), the Host value once per endpoint URL, and the signing
    key (four HMACs of the secret, the date, the region and the service) once per day, region and service."""

    def headers_to_sign(self, request: Any) -> Any:
        headers = request.headers
        if getattr(headers, "policy", None) is not compat32:
            return super().headers_to_sign(request)
        header_map = _HeaderMap()
        # The raw (name, value) pairs HTTPHeaders.items() reads back through compat32's header_fetch_parse, which
        # returns an ASCII str unchanged (it re-encodes only values holding surrogates, which are not ASCII).
        for name, value in headers._headers:
            lname = name.lower()
            if not isinstance(value, str) or not value.isascii() or dict.__contains__(header_map, lname):
                return super().headers_to_sign(request)  # values botocore sanitises, or a repeated name: its own way
            if lname not in botocore_auth.SIGNED_HEADERS_BLACKLIST:
                header_map[lname] = value
        if "host" not in header_map:
            header_map["host"] = _host_from_url(request.url)
        return header_map

    def payload(self, request: Any) -> str:
        me: Any = self
        # botocore reads `request.body`, which prepares a whole copy of the request (URL, headers, body) to keep only
        # the body; the body alone is the same function of the request.
        preparer: Any = getattr(request, "_request_preparer", None)
        if (
            type(request) is not AWSRequest
            or type(preparer) is not AWSRequestPreparer
            or me._is_streaming_checksum_payload(request)
            or not me._should_sha256_sign_payload(request)
        ):
            return super().payload(request)
        body = cast(Any, preparer)._prepare_body(request)
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, bytes | bytearray):  # a stream (or anything else): botocore's own way
            return super().payload(request)
        return sha256(body).hexdigest() if body else botocore_auth.EMPTY_SHA256_HASH

    def signature(self, string_to_sign: str, request: Any) -> str:
        me: Any = self
        key = (me.credentials.secret_key, request.context["timestamp"][0:8], me._region_name, me._service_name)
        k_signing = _SIGNING_KEYS.get(key)
        if k_signing is None:
            k_date = me._sign(f"AWS4{key[0]}".encode(), key[1])
            k_region = me._sign(k_date, key[2])
            k_service = me._sign(k_region, key[3])
            k_signing = me._sign(k_service, "aws4_request")
            if len(_SIGNING_KEYS) >= 16:  # a new day (or rotated credentials): the old keys are of no further use
                _SIGNING_KEYS.clear()
            _SIGNING_KEYS[key] = k_signing
        return hmac.new(k_signing, string_to_sign.encode("utf-8"), sha256).hexdigest()


def _signing_parts_present(names: Iterable[str]) -> bool:
    return all(callable(getattr(SigV4Auth, name, None)) for name in names)


def sign_faster(client: Any) -> bool:
    """Signing is SigV4 all the same (`_SigV4Auth` produces botocore's exact Authorization header): the client's
    signer hands out `_SigV4Auth` where it would hand out botocore's SigV4Auth."""
    signer: Any = getattr(client, "_request_signer", None)
    parts = (
        "headers_to_sign",
        "payload",
        "signature",
        "_sign",
        "_is_streaming_checksum_payload",
        "_should_sha256_sign_payload",
    )
    if (
        signer is None
        or not callable(getattr(signer, "get_auth_instance", None))
        or not callable(_BOTOCORE_HOST_FROM_URL)
        or not hasattr(botocore_auth, "SIGNED_HEADERS_BLACKLIST")
        or not hasattr(botocore_auth, "EMPTY_SHA256_HASH")
        or not callable(getattr(AWSRequestPreparer, "_prepare_body", None))
        or not _signing_parts_present(parts)
    ):
        log.warning("botocore_speedup_unavailable", speedup="sigv4", missing="request signer or SigV4Auth attributes")
        return False
    if "get_auth_instance" in vars(signer):  # already applied
        return True
    get_auth_instance = signer.get_auth_instance

    async def faster_auth_instance(*args: Any, **kwargs: Any) -> Any:
        auth = await get_auth_instance(*args, **kwargs)
        if type(auth) is SigV4Auth:  # exactly botocore's v4 signer; any other (s3v4, v4a, bearer...) is left alone
            auth.__class__ = _SigV4Auth
        return auth

    signer.get_auth_instance = faster_auth_instance
    return True
