"""API key format, hashing and verification. Only hashes are stored; comparison is constant-time.

A key reads `mce_<key_id>_<secret>`: the key id finds the stored record, the
secret is checked against its hash with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_KEY = re.compile(r"^mce_([0-9a-f]{16})_([A-Za-z0-9_-]{32,64})$")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    plaintext: str
    secret_hash: str


def hash_secret(key_id: str, secret: str) -> str:
    return hashlib.sha256(f"{key_id}:{secret}".encode()).hexdigest()


def parse_key(presented: str) -> ParsedKey | None:
    match = _KEY.match(presented.strip())
    return ParsedKey(match.group(1), match.group(2)) if match else None


def issue_key() -> IssuedKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedKey(key_id=key_id, plaintext=f"mce_{key_id}_{secret}", secret_hash=hash_secret(key_id, secret))


def secret_matches(parsed: ParsedKey, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(parsed.key_id, parsed.secret), stored_hash)
