"""Per-call work botocore repeats on every request although its result cannot change: done once, reused exactly.

Each speed-up reads private botocore attributes (botocore and aiobotocore are pinned by requirements/*.lock). When
an attribute it needs is missing after an upgrade, it leaves botocore's own behaviour in place and logs a warning;
tests/unit/test_sigv4_speedup.py asserts every speed-up is applied and signs exactly as botocore does,
tests/unit/test_endpoint_retry_speedups.py that endpoints resolve and calls retry (5xx, throttling, CRC32, the last
attempt) exactly as botocore's own do, and tests/test_botocore_speedups.py that the User-Agent on the wire is
botocore's own, so an upgrade that breaks one fails CI instead of silently costing CPU or changing a request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.policy import compat32
from functools import lru_cache
from hashlib import sha256
from inspect import isawaitable
from typing import Any, cast

import structlog
from aiobotocore.endpoint import AioEndpoint
from aiobotocore.regions import AioEndpointRulesetResolver
from aiobotocore.retries.special import AioRetryDDBChecksumError
from aiobotocore.retries.standard import (
    AioOrRetryChecker,
    AioRetryHandler,
    AioRetryPolicy,
    AioStandardRetryConditions,
)
from botocore import auth as botocore_auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSRequestPreparer, HeadersDict, _HeaderKey
from botocore.context import get_context
from botocore.regions import EndpointResolverBuiltins
from botocore.retries.special import RetryIDPCommunicationError
from botocore.retries.standard import (
    MaxAttemptsChecker,
    ModeledRetryableChecker,
    RetryContext,
    RetryEventAdapter,
    ThrottledRetryableChecker,
    TransientRetryableChecker,
)
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
    if resolve_endpoints_faster(client):
        applied.append("endpoint")
    if check_retries_faster(client):
        applied.append("retry-check")
    if prepare_faster(client):
        applied.append("prepare")
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


# --- endpoint parameters --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ParamSource:
    """Where botocore looks for one endpoint-ruleset parameter of one operation, in its order: the operation's static
    context value, the call argument it names, its JMESPath over the call arguments, the client context, a builtin."""

    name: str
    static: Any
    member: str | None
    by_path: bool
    client_var: str | None
    builtin: str | None


def _parameter_plan(resolver: Any, operation_model: Any) -> tuple[_ParamSource, ...] | None:
    """The sources of every parameter of `operation_model`, looked up once (botocore looks them up on every call,
    through per-call instance caches and a linear scan of the builtin names); None when a parameter names a builtin
    botocore does not know (botocore raises then: its own path is left to do so)."""
    static = resolver._get_static_context_params(operation_model)
    dynamic = resolver._get_dynamic_context_params(operation_model)
    by_path = operation_model.operation_context_parameters
    client = resolver._get_client_context_params()
    known_builtins = list(EndpointResolverBuiltins.__members__.values())
    plan = []
    for name, definition in resolver._param_definitions.items():
        builtin = definition.builtin
        if builtin is not None and builtin not in known_builtins:
            return None
        plan.append(
            _ParamSource(
                name=name,
                static=static.get(name),
                member=dynamic.get(name),
                by_path=name in by_path,
                client_var=client.get(name),
                builtin=builtin,
            )
        )
    return tuple(plan)


def resolve_endpoints_faster(client: Any) -> bool:
    """botocore resolves the endpoint ruleset's parameters on every call, finding each parameter's source (static,
    call argument, JMESPath, client context, builtin) anew. The sources are a function of the operation alone, so
    they are found once per operation; the values are still read per call, the builtins still pass through the
    `before-endpoint-resolution` event, builtins that are callables (the account id) are still called, and the
    endpoint feature ids are still registered, as botocore does."""
    found = getattr(client, "_ruleset_resolver", None)
    needed = (
        "_get_customized_builtins",
        "_get_static_context_params",
        "_get_dynamic_context_params",
        "_get_client_context_params",
        "_resolve_param_as_operation_context_param",
        "_register_endpoint_feature_ids",
        "_param_definitions",
        "_client_context",
    )
    if type(found) is not AioEndpointRulesetResolver or not all(hasattr(found, name) for name in needed):
        log.warning("botocore_speedup_unavailable", speedup="endpoint", missing="endpoint ruleset resolver attributes")
        return False
    resolver: Any = found  # private attributes below: not in the stubs
    if "_get_provider_params" in vars(resolver):  # already applied
        return True
    original = resolver._get_provider_params
    plans: dict[Any, tuple[_ParamSource, ...] | None] = {}

    async def get_provider_params(operation_model: Any, call_args: Any, request_context: Any) -> Any:
        if operation_model not in plans:
            plans[operation_model] = _parameter_plan(resolver, operation_model)
        plan = plans[operation_model]
        if plan is None:
            return await original(operation_model, call_args, request_context)
        builtins = await resolver._get_customized_builtins(operation_model, call_args, request_context)
        params = {}
        for source in plan:
            value = source.static
            if value is None and source.member is not None:
                value = call_args.get(source.member)
            if value is None and source.by_path:
                value = resolver._resolve_param_as_operation_context_param(source.name, operation_model, call_args)
            if value is None and source.client_var is not None:
                value = resolver._client_context.get(source.client_var)
            if value is None and source.builtin is not None:
                value = builtins.get(source.builtin)
                if callable(value):
                    value = value()
                if isawaitable(value):
                    value = await value
            if value is not None:
                params[source.name] = value
                resolver._register_endpoint_feature_ids(source.name, value)
        return params

    resolver._get_provider_params = get_provider_params
    return True


# --- retry check ----------------------------------------------------------------------------------------------------


def _standard_retry_parts(handler: Any) -> tuple[int, Any, Any] | None:
    """(max attempts, transient checker, DynamoDB checksum checker) of aiobotocore's standard-mode retry handler, when
    it is built exactly as this aiobotocore builds it (so what it answers for a success is known); else None."""
    policy: Any = getattr(handler, "_retry_policy", None)
    conditions: Any = getattr(policy, "_retry_checker", None)
    max_checker: Any = getattr(conditions, "_max_attempts_checker", None)
    either: Any = getattr(conditions, "_additional_checkers", None)
    checkers = getattr(either, "_checkers", None)
    if (
        type(handler) is not AioRetryHandler
        or type(policy) is not AioRetryPolicy
        or type(conditions) is not AioStandardRetryConditions
        or type(max_checker) is not MaxAttemptsChecker
        or not isinstance(getattr(max_checker, "_max_attempts", None), int)
        or type(either) is not AioOrRetryChecker
        or not isinstance(checkers, list)
        or [type(checker) for checker in checkers]
        != [TransientRetryableChecker, ThrottledRetryableChecker, ModeledRetryableChecker, AioOrRetryChecker]
        or [type(checker) for checker in getattr(checkers[3], "_checkers", ())]
        != [RetryIDPCommunicationError, AioRetryDDBChecksumError]
        or not isinstance(getattr(checkers[0], "_transient_status_codes", None), list)
        or type(getattr(handler, "_retry_event_adapter", None)) is not RetryEventAdapter
    ):
        return None
    return cast(Any, max_checker)._max_attempts, checkers[0], checkers[3]._checkers[1]


def check_retries_faster(client: Any) -> bool:
    """After every response, botocore's standard retry handler builds a retry context and runs its checker chain
    (attempts left; transient status, error code or exception; throttling code; modelled retryable error; STS IDP
    error; DynamoDB CRC32). For an answer without an error (no exception, no `Error` in the parsed response, a
    status that is not transient) before the last attempt, every checker answers no except possibly the CRC32 one,
    which is still asked (botocore's own checker); what remains is the handler's side effects: the request's
    `retries.max`, and `ResponseMetadata` present. Everything else (errors, throttling, 5xx, network failures, the
    last attempt) goes to botocore's handler itself."""
    meta: Any = getattr(client, "meta", None)
    events: Any = getattr(meta, "events", None)
    service_id: Any = getattr(getattr(meta, "service_model", None), "service_id", None)
    sid = service_id.hyphenize() if callable(getattr(service_id, "hyphenize", None)) else ""
    unique_id = f"retry-config-{sid}"
    event = f"needs-retry.{sid}"
    emitter: Any = getattr(events, "_emitter", None)
    entry = getattr(emitter, "_unique_id_handlers", {}).get(unique_id)
    registered: Any = entry.get("handler") if isinstance(entry, dict) else None
    if getattr(registered, "__name__", "") == "_needs_retry_fast":  # already applied
        return True
    handler = getattr(registered, "__self__", None)
    parts = _standard_retry_parts(handler)
    handlers = getattr(emitter, "_handlers", None)
    if (
        parts is None
        or handlers is None
        or not callable(getattr(handlers, "prefix_search", None))
        or list(handlers.prefix_search(event)) != [registered]  # re-registering keeps the order only when it is alone
    ):
        log.warning("botocore_speedup_unavailable", speedup="retry-check", missing="standard retry handler attributes")
        return False
    max_attempts, transient, checksum = parts
    needs_retry = registered

    async def _needs_retry_fast(**kwargs: Any) -> Any:
        response = kwargs["response"]
        if response is not None and kwargs["caught_exception"] is None and kwargs["attempts"] < max_attempts:
            http_response, parsed = response
            if (
                type(parsed) is dict
                and "Error" not in parsed
                and http_response.status_code not in transient._transient_status_codes
            ):
                request_context = kwargs["request_dict"]["context"]
                if await checksum.is_retryable(
                    RetryContext(kwargs["attempts"], kwargs["operation"], parsed, http_response, None, request_context)
                ):
                    return await needs_retry(**kwargs)
                retries = request_context.get("retries")  # MaxAttemptsChecker's side effect
                if retries:
                    retries["max"] = max(retries.get("max", 0), max_attempts)
                parsed.setdefault("ResponseMetadata", {})  # adapt_retry_response_from_context, with no retry metadata
                return None
        return await needs_retry(**kwargs)

    events.unregister(event, unique_id=unique_id)
    events.register(event, _needs_retry_fast, unique_id=unique_id)
    return True


# --- request preparation --------------------------------------------------------------------------------------------

_NO_BODY_METHODS = ("GET", "HEAD", "OPTIONS")


def prepare_faster(client: Any) -> bool:
    """botocore prepares each signed request by re-encoding every header value to UTF-8 in place (each one appended a
    second time to the email.message header list, read back through the email policy) and then copying the list into
    a `HeadersDict` through MutableMapping.update. When every value is an ASCII str or bytes, that is: the same
    names in the same order, each with its last value as bytes; the prepared request (URL, body, headers, stream
    flag, context) is built that way directly. Query parameters, GET-like methods, non-ASCII values and bodies of
    unknown length go to botocore's own `prepare_request`. (botocore drops the request it encoded in place as soon as
    it is prepared: `Endpoint.create_request` returns the prepared request only.)"""
    found = getattr(client, "_endpoint", None)
    endpoint: Any = found
    if (
        type(found) is not AioEndpoint
        or not callable(getattr(endpoint, "prepare_request", None))
        or not callable(getattr(AWSRequestPreparer, "_prepare_url", None))
        or not callable(getattr(AWSRequestPreparer, "_prepare_body", None))
        or not callable(getattr(AWSRequestPreparer, "_determine_content_length", None))
    ):
        log.warning(
            "botocore_speedup_unavailable", speedup="prepare", missing="endpoint or request preparer attributes"
        )
        return False
    if "prepare_request" in vars(endpoint):  # already applied
        return True
    original = endpoint.prepare_request

    def prepare_request(request: Any) -> Any:
        headers = request.headers
        preparer: Any = getattr(request, "_request_preparer", None)
        if (
            type(request) is not AWSRequest
            or type(preparer) is not AWSRequestPreparer
            or getattr(headers, "policy", None) is not compat32
            or request.params
            or request.method in _NO_BODY_METHODS
        ):
            return original(request)
        req: Any = request  # narrowed by the checks above; private attributes below are not in the stubs
        prep: Any = preparer
        prepared = HeadersDict()
        store: dict[Any, Any] = cast(Any, prepared)._dict
        for name, value in headers._headers:
            if isinstance(value, str) and not value.isascii():  # compat32 may hand it back as a Header
                return original(request)
            store[_HeaderKey(name)] = value.encode("utf-8") if isinstance(value, str) else value
        body = prep._prepare_body(req)
        if _HeaderKey("Transfer-Encoding") not in store and _HeaderKey("Content-Length") not in store:
            length = prep._determine_content_length(body)
            if length is None:  # botocore switches to chunked: its own way
                return original(request)
            store[_HeaderKey("Content-Length")] = str(length)
        url = prep._prepare_url(req)
        return AWSPreparedRequest(req.method, url, cast(Any, prepared), body, req.stream_output, req.context)

    endpoint.prepare_request = prepare_request
    return True
