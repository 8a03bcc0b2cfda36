"""The webhook signature check: the twilio library's RequestValidator, and never an exception for what a caller
sent (found from outside: a forwarded Host header whose bytes were not UTF-8 made the public URL unencodable, and
the webhook a 500)."""

from __future__ import annotations

from twilio.request_validator import RequestValidator

from service.adapters.providers.twilio_signature import TwilioSignatureVerifier

URL = "https://comms.example.com/webhooks/twilio/sms"
PARAMS = {"MessageSid": "SM1", "Body": "hi"}


def test_a_signature_made_with_the_token_verifies() -> None:
    signature = RequestValidator("token").compute_signature(URL, PARAMS)
    assert TwilioSignatureVerifier().valid("token", URL, PARAMS, signature)


def test_a_url_that_is_not_unicode_never_verifies() -> None:
    url = "https://h\udcffst/webhooks/twilio/sms"  # how aiohttp decodes a header byte that is not UTF-8
    assert not TwilioSignatureVerifier().valid("token", url, PARAMS, "c2ln")
