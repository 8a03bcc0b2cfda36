"""Operator tooling: `comms company|secrets|apikey|dlq|conversation …`.

`register(subparsers)` adds the commands to the `comms` parser; `run(args, settings)` runs one and
returns its exit code: 0 done, 1 not found or refused, 2 usage or configuration error, 3 AWS
unreachable. Errors go to stderr; results to stdout (JSON with `--json`). Every AWS call goes
through `open_aws_clients`, so the same commands work against the embedded stack and real AWS; the
tables only through the adapters `Context` hands out (uncached), never by attribute name here.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from service.adapters.aws.clients import open_aws_clients
from service.adapters.aws.errors import AWS_FAILURES
from service.config import Settings
from service.domain.errors import DependencyUnavailable
from service.operator import apikeys, companies, conversations, dlq, secrets
from service.operator.output import Context, OperatorError, Output, classify_failure, print_error

__all__ = ["COMMANDS", "execute", "register", "run"]

_MODULES = (companies, secrets, apikeys, dlq, conversations)
_FAILURES: tuple[type[Exception], ...] = (OperatorError, *AWS_FAILURES, DependencyUnavailable)
COMMANDS = frozenset({"company", "secrets", "apikey", "dlq", "conversation"})


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for module in _MODULES:
        module.register(commands)


async def execute(args: argparse.Namespace, settings: Settings) -> int:
    """Run the parsed command; every failure becomes a message on stderr and an exit code."""
    handler: Callable[[argparse.Namespace, Context], Awaitable[int]] = args.handler
    try:
        async with AsyncExitStack() as stack:
            aws = await open_aws_clients(settings, stack)
            return await handler(args, Context(settings, aws, Output()))
    except _FAILURES as exc:
        failure = exc if isinstance(exc, OperatorError) else classify_failure(exc)
        print_error(failure.message)
        return failure.exit_code


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`execute` on a fresh event loop (what `comms` calls)."""
    return asyncio.run(execute(args, settings))
