"""The `comms` command: run the service (by role), run it on the embedded local stack, bootstrap AWS.

comms local                 everything on 127.0.0.1, seeded, prints a ready curl
comms serve --role api      the service against the AWS/OpenAI/Twilio the env vars name
comms bootstrap             create the tables and queues in the configured account (idempotent)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

from service.adapters.aws.provisioning import provision_resources
from service.aws_failures import AWS_FAILURES
from service.config import ConfigurationError, Settings, load_settings
from service.domain.errors import DependencyUnavailable
from service.logging import configure_logging
from service.operator import COMMANDS as OPERATOR_COMMANDS
from service.operator import register as register_operator
from service.operator import run as run_operator
from service.operator.output import classify_failure
from service.runner import Role, run_on, run_service

EXIT_CONFIG = 2
BOOTSTRAP_FAILURES: tuple[type[Exception], ...] = (*AWS_FAILURES, DependencyUnavailable)


async def _run_local(base: Settings, role: Role, ai_latency_s: float) -> None:
    from local_stack.moto_server import LOCAL_CREDENTIALS
    from local_stack.stack import local_stack, ready_banner

    for name, value in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(name, value)  # moto accepts any credentials; aiobotocore needs some
    async with local_stack(base, ai_latency_s=ai_latency_s) as stack:

        def announce(_: object) -> None:
            print(ready_banner(stack), file=sys.stderr, flush=True)

        await run_service(stack.settings, role, on_ready=announce)


async def _bootstrap(settings: Settings) -> None:
    provisioned = await provision_resources(settings)
    for kind in ("whatsapp", "sms", "email", "replies", "handoff"):
        print(f"COMMS_{kind.upper()}_QUEUE_URL={getattr(provisioned, f'{kind}_queue_url')}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comms", description="AI Multi-Comms Engine")
    commands = parser.add_subparsers(dest="command", required=True)

    local = commands.add_parser("local", help="run everything on the embedded local stack (127.0.0.1)")
    local.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    local.add_argument("--role", choices=["api", "all"], default="all")
    local.add_argument("--ai-latency", type=float, default=0.2, help="seconds the OpenAI sandbox takes per answer")

    serve = commands.add_parser("serve", help="run the service against the configured endpoints")
    serve.add_argument("--role", choices=["api", "worker", "all"], default="all")

    commands.add_parser("bootstrap", help="create tables and queues in the configured AWS account (idempotent)")
    register_operator(commands)
    return parser


def _serving(serve: Callable[[], None]) -> int:
    """Run the service; a configuration it cannot start with (found at start-up) exits 2 with the reason."""
    try:
        serve()
    except ConfigurationError as exc:
        print(f"comms: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {"host": "127.0.0.1", "port": args.port} if args.command == "local" else {}
        settings = load_settings(**overrides)
    except ConfigurationError as exc:
        print(f"comms: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Operator commands print data on stdout (tables, --json): their logs go to stderr.
    configure_logging(settings.log_level, to_stderr=args.command in OPERATOR_COMMANDS)
    if args.command == "local":
        if importlib.util.find_spec("local_stack") is None:  # the image ships the service only
            print("comms: `comms local` needs the embedded stack of a source checkout (make local)", file=sys.stderr)
            return EXIT_CONFIG
        return _serving(lambda: run_on(settings.event_loop, _run_local(settings, args.role, args.ai_latency)))
    elif args.command == "serve":
        return _serving(lambda: run_on(settings.event_loop, run_service(settings, args.role)))
    elif args.command == "bootstrap":
        try:
            asyncio.run(_bootstrap(settings))
        except BOOTSTRAP_FAILURES as exc:  # exit codes as the operator commands'
            failure = classify_failure(exc)
            print(f"comms: bootstrap: {failure.message}", file=sys.stderr)
            return failure.exit_code
    elif args.command in OPERATOR_COMMANDS:
        return run_operator(args, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
