"""What every operator command shares: exit codes, errors, reading JSON input, printing tables or JSON.

Results go to stdout (a `rich` table for people, JSON with `--json` for scripts); errors, warnings and
progress go to stderr, so `comms … --json | jq` always sees clean JSON.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError
from rich.console import Console
from rich.table import Table

from service.adapters.aws.api_key_admin import DynamoApiKeyAdmin
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.adapters.aws.conversation_admin import ConversationAdmin
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.errors import AWS_FAILURES, error_code
from service.config import Settings
from service.domain.errors import DependencyUnavailable

if TYPE_CHECKING:
    from service.adapters.aws.clients import AwsClients

EXIT_REFUSED = 1  # not found, already exists, invalid input: the operator must change something
EXIT_USAGE = 2  # bad arguments or configuration (argparse also exits 2)
EXIT_UNREACHABLE = 3  # AWS could not be reached or kept failing after retries

# Codes that mean "this deployment is not configured for that", not "AWS is down".
_CONFIGURATION_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
        "ResourceNotFoundException",  # a DynamoDB table that was never bootstrapped
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "RequestThrottled",
    }
)


class OperatorError(Exception):
    """A refusal or failure with the exit code it maps to; the message is printed on stderr."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(OperatorError):
    exit_code = EXIT_REFUSED


class Refused(OperatorError):
    exit_code = EXIT_REFUSED


class UsageError(OperatorError):
    exit_code = EXIT_USAGE


class Unreachable(OperatorError):
    exit_code = EXIT_UNREACHABLE


def _classify_code(code: str, what: str) -> OperatorError:
    if code in _CONFIGURATION_CODES:
        return UsageError(
            f"{what}: {code} (check the AWS credentials, region and resource names; `comms bootstrap` creates them)"
        )
    if code in _TRANSIENT_CODES or code.endswith(("Unavailable", "Throttled")):
        return Unreachable(f"{what}: {code} (AWS kept failing after retries)")
    return Refused(f"{what}: AWS refused the request ({code})")


def classify_failure(exc: BaseException) -> OperatorError:
    """An AWS (or adapter) failure as the operator error and exit code it stands for."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError):
        return UsageError(f"AWS configuration: {exc}")
    if isinstance(exc, ClientError):
        operation = getattr(exc, "operation_name", "AWS call")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error_code(exc) or "Unknown"
        if isinstance(status, int) and status >= 500 and code not in _CONFIGURATION_CODES:
            return Unreachable(f"{operation}: {code} (HTTP {status}, AWS kept failing after retries)")
        return _classify_code(code, operation)
    if isinstance(exc, BotoCoreError):
        return Unreachable(f"AWS unreachable: {exc}")
    if isinstance(exc, DependencyUnavailable):
        if isinstance(exc.__cause__, AWS_FAILURES):  # an adapter's wrapping: the AWS error says more
            return classify_failure(exc.__cause__)
        what = f"{exc.service}.{exc.operation}"
        if exc.detail in _CONFIGURATION_CODES or exc.detail in _TRANSIENT_CODES:
            return _classify_code(exc.detail, what)
        return Unreachable(f"{what}: {exc.detail} (AWS unreachable or failing)")
    return OperatorError(f"unexpected failure: {type(exc).__name__}: {exc}")


class Output:
    """Where a command prints: stdout for results, stderr for everything else."""

    def __init__(self) -> None:
        # Wide enough for conversation ids when piped; a terminal uses its own width.
        self.console = Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False)
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def json(self, data: Any) -> None:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
        sys.stdout.flush()

    def line(self, text: str) -> None:
        """A plain result line (never rich markup: ids may contain brackets)."""
        self.console.print(text, markup=False)

    def note(self, text: str) -> None:
        self.errors.print(text, markup=False)

    def warn(self, text: str) -> None:
        self.errors.print(f"comms: warning: {text}", markup=False, style="yellow")

    def table(
        self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]], *, no_wrap: bool = True
    ) -> None:
        table = Table(title=title, title_justify="left", show_lines=False)
        for column in columns:
            table.add_column(column, no_wrap=no_wrap, overflow="fold")
        for row in rows:
            table.add_row(*(cell_text(cell) for cell in row))
        self.console.print(table)

    def fields(self, title: str | None, data: Mapping[str, Any]) -> None:
        """A two-column field/value table; nested values shown as compact JSON."""
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in data.items():
            table.add_row(key, cell_text(value))
        self.console.print(table)


def cell_text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def print_error(message: str) -> None:
    sys.stderr.write(f"comms: error: {message}\n")
    sys.stderr.flush()


def read_json_object(path: str | None, what: str) -> dict[str, Any]:
    """A JSON object from a file (`-` or None: stdin). Never echoes the content in an error."""
    if path is None or path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(f"{what}: pipe the JSON on stdin or name a file (values are never read from argv)")
        raw = sys.stdin.read()
        source = "stdin"
    else:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
        source = path
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # The position only: the content may be a secret.
        raise Refused(
            f"{what}: {source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise Refused(f"{what}: {source} must hold a JSON object, not {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Context:
    """What a command handler gets: settings, the AWS clients, where to print, and the adapters it reads and
    writes through (uncached: an operator sees the tables as they are now)."""

    settings: Settings
    aws: AwsClients
    out: Output

    @property
    def companies(self) -> DynamoCompanyDirectory:
        return DynamoCompanyDirectory(self.aws.dynamodb, self.settings.company_table, cache_ttl_s=0)

    @property
    def api_keys(self) -> DynamoApiKeyAdmin:
        return DynamoApiKeyAdmin(self.aws.dynamodb, self.settings.api_keys_table, cache_ttl_s=0)

    @property
    def conversations(self) -> ConversationAdmin:
        return ConversationAdmin(
            self.aws.dynamodb,
            self.settings.conversations_table,
            messages_table=self.settings.messages_table,
            index_shards=self.settings.conversation_index_shards,
        )

    @property
    def conversation_claims(self) -> DynamoConversationClaims:
        return DynamoConversationClaims(
            self.aws.dynamodb,
            self.settings.conversations_table,
            messages_table=self.settings.messages_table,
            index_shards=self.settings.conversation_index_shards,
        )
