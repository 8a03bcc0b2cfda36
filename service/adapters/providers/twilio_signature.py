"""Twilio webhook signatures, checked with the twilio library's own RequestValidator."""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator


class TwilioSignatureVerifier:
    def valid(self, auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
        try:
            return bool(RequestValidator(auth_token).validate(url, dict(params), signature))
        except UnicodeEncodeError:  # a URL from header bytes that are not UTF-8: Twilio signed no such URL
            return False
