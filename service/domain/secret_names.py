"""Where provider credentials live in Secrets Manager (the naming convention SPEC §6 and operators share)."""

from __future__ import annotations


def credentials_secret_name(prefix: str, channel: str, company: str, project: str, provider: str, env: str) -> str:
    """`<prefix>/<channel>-credentials/<company>/<project>/<provider>-<env>`: Twilio or SendGrid credentials."""
    return f"{prefix}/{channel}-credentials/{company}/{project}/{provider}-{env}"


def openai_secret_name(prefix: str, channel: str, env: str) -> str:
    """`<prefix>/openai-api-key/<channel>-<env>`: the OpenAI key used for a channel."""
    return f"{prefix}/openai-api-key/{channel}-{env}"
