"""Builds Twilio SDK clients: one shared, pooled async HTTP client and a cheap `Client` per tenant.

`base_url` points the real SDK at a sandbox (local stack, tests, benchmarks) instead of https://api.twilio.com;
everything else (auth, form bodies, error parsing) stays the SDK's own.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import ClientSession, TCPConnector
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

__all__ = ["build_async_http_client", "build_twilio_client"]


class _TimedAsyncTwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio ships no type hints
    """The SDK's async client, made to honour its own `timeout` and to send Basic auth as a plain header.

    `AsyncTwilioHttpClient.request` only uses the per-call `timeout` argument, which the generated resources
    never pass, and it hands aiohttp an explicit `timeout=None`; aiohttp reads that as "no timeout at all" and
    skips the session's default. Filling the per-call value from `self.timeout` makes the constructor's
    `timeout` mean what it says. The SDK also wraps credentials in `aiohttp.BasicAuth`, deprecated since
    aiohttp 3.14 (one DeprecationWarning per request); the same header is built here instead. The SDK's
    request log skips Authorization headers, so the token still never reaches a log line.
    """

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        auth = kwargs.pop("auth", None)
        if auth is not None:
            login, password = auth
            credentials = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Basic {credentials}"}
        return await super().request(method, url, **kwargs)


def build_async_http_client(timeout_s: float, pool_size: int) -> AsyncTwilioHttpClient:
    """One pooled async HTTP client for every Twilio `Client`; close it once, at shutdown.

    Call inside the running event loop (aiohttp binds the session to it). `timeout_s` is a total per-request
    budget (pool wait + connect + response); `pool_size` caps open connections. Retries stay off: retrying a
    Messages POST can send the message twice.
    """
    if timeout_s <= 0 or pool_size < 1:
        raise ValueError("timeout_s must be > 0 and pool_size >= 1")
    http_client = _TimedAsyncTwilioHttpClient(pool_connections=False, timeout=timeout_s)
    http_client.session = ClientSession(connector=TCPConnector(limit=pool_size))
    return http_client


def build_twilio_client(
    account_sid: str, auth_token: str, *, base_url: str | None, http_client: AsyncTwilioHttpClient
) -> Client:
    """A Twilio `Client` for one account whose `api` domain calls go to `base_url` when it is given.

    Why `client.api.base_url`: every Messages call (create, fetch, list and the list's `next_page_uri`) is made
    absolute by the `api` Domain from its public `base_url` attribute, so replacing it redirects exactly that
    domain and nothing else (a host-rewriting HTTP client would have to parse every URL and would silently
    redirect other domains too). Edge/region are cleared for a sandbox because the SDK would otherwise splice
    TWILIO_EDGE/TWILIO_REGION from the environment into the sandbox's hostname.
    """
    client = Client(account_sid, auth_token, http_client=http_client)
    if base_url is not None:
        client.edge = None
        client.region = None
        client.api.base_url = base_url.rstrip("/")
    return client
