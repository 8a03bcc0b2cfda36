"""Helpers for the operator command tests (no tests here): run `comms …` as a user would, set up AWS state.

The commands read their settings from the environment, so `Cli` points the `COMMS_*` variables at the
session's moto server; tests are plain `def` functions because `comms` runs its own event loop.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest

from service.adapters.aws.clients import AwsClients, open_aws_clients
from service.adapters.aws.provisioning import provision_resources
from service.adapters.aws.resources import QUEUE_KINDS
from service.cli import main
from service.config import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return orjson.loads(self.out)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def environment_for(settings: Settings) -> dict[str, str]:
    env = {
        "COMMS_AWS_ENDPOINT_URL": str(settings.aws_endpoint_url),
        "COMMS_AWS_MAX_ATTEMPTS": str(settings.aws_max_attempts),
        "COMMS_CONSUMER_CONCURRENCY": str(settings.consumer_concurrency),
        "COMMS_SECRETS_PREFIX": settings.secrets_prefix,
        "COMMS_ENVIRONMENT": settings.environment,
    }
    for kind in QUEUE_KINDS:
        url = getattr(settings, f"{kind}_queue_url")
        if url:
            env[f"COMMS_{kind.upper()}_QUEUE_URL"] = url
    return env


class Cli:
    """`comms` with the environment pointing at `settings`; captures exit code, stdout and stderr."""

    def __init__(self, settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.settings = settings
        self._capsys = capsys
        self._monkeypatch = monkeypatch
        for name in list(os.environ):
            if name.startswith("COMMS_"):
                monkeypatch.delenv(name)
        self.use(settings)

    def use(self, settings: Settings, **extra_env: str) -> None:
        self.settings = settings
        for name, value in {**environment_for(settings), **extra_env}.items():
            self._monkeypatch.setenv(name, value)

    def __call__(self, *argv: str, stdin: str | None = None) -> Result:
        if stdin is not None:
            self._monkeypatch.setattr("sys.stdin", _PipedStdin(stdin))
        self._capsys.readouterr()
        code = main(list(argv))
        captured = self._capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def aws(self, work: Callable[[AwsClients], Awaitable[T]]) -> T:
        """Run `work` with fresh AWS clients for the current settings (setup and checks)."""
        return aws_call(self.settings, work)

    def with_own_queues(self) -> Settings:
        """Settings whose five queues (and DLQs) exist only for this test."""
        own = asyncio.run(provision_resources(self.settings, queue_prefix=unique("op")))
        self.use(own)
        return own


class _PipedStdin:
    """A piped (not a terminal) stdin holding `text`."""

    def __init__(self, text: str) -> None:
        self._text = text

    def read(self) -> str:
        return self._text

    def isatty(self) -> bool:
        return False


def aws_call(settings: Settings, work: Callable[[AwsClients], Awaitable[T]]) -> T:
    async def call() -> T:
        async with AsyncExitStack() as stack:
            return await work(await open_aws_clients(settings, stack))

    return asyncio.run(call())


def write_json(path: Any, data: Any) -> str:
    path.write_bytes(orjson.dumps(data))
    return str(path)


def company_data(company_id: str, project_id: str = "pi-ops-001", **changes: Any) -> dict[str, Any]:
    """A valid company/project record, as an operator would write it."""
    prefix = f"comms/whatsapp-credentials/{company_id}/{project_id}"
    data: dict[str, Any] = {
        "company_id": company_id,
        "project_id": project_id,
        "company_name": "Ops Homes Ltd",
        "project_name": "Autumn viewings",
        "project_status": "active",
        "allowed_channels": ["whatsapp"],
        "rate_limits": {"requests_per_minute": 600, "burst": 20},
        "company_rep": {"company_rep_1": "Sam Example"},
        "channel_config": {
            "whatsapp": {
                "company_whatsapp_number": "+447700900111",
                "whatsapp_credentials_id": f"{prefix}/twilio-dev",
                "whatsapp_template_sid": "HX" + "a" * 32,
            }
        },
        "ai_config": {
            "openai_config": {
                "whatsapp": {
                    "api_key_reference": "comms/openai-api-key/whatsapp-dev",
                    "model": "gpt-4.1-mini",
                    "template_sender": {"instructions": "Write the first message."},
                }
            }
        },
    }
    data.update(changes)
    return data
