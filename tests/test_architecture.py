"""The layering issue 11 set up, checked on the source: only the DynamoDB adapter (`service/adapters/aws/`) knows
how a conversation is stored, only `service/domain/conversation.py` spells its statuses, the consumers reach AWS
through ports alone, and only the CLI starts the local stack.

Read with `ast`, so comments and docstrings (the first statement string of a module, class or function) may
name anything; string literals, f-string parts included, may not.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.adapters.aws.resources import CONVERSATION_INDEXES, table_specs
from service.config import Settings

REPO = Path(__file__).resolve().parent.parent
ADAPTER = REPO / "service" / "adapters" / "aws"
STATUS_HOME = REPO / "service" / "domain" / "conversation.py"
LOCAL_STACK_ALLOWED = {REPO / "service" / "cli.py"}

TABLE_ONLY_NAMES = {
    "conversation_status",
    "send_state",
    "send_attempted_at",
    "generated_content",
    "ai_usage",
    "claim_owner",
    "claim_expires_at",
    "claim_count",
    "reply_owner",
    "reply_lease_expires",
    "status_before_reply",
    "reply_attempt",
    "replied_message_sids",
    "last_reply_failure",
    "early_delivery",
    "failure_kind",
    "last_failure_reason",
    "reopen_count",
    "task_complete",
    "trigger_queued",
    "request_state",
    "lease_expires_at",
    "idempotency_key",
    "suppression_key",
}
COMPOUND_STATUSES = {
    "initial_message_sent",
    "processing_reply",
    "reply_sent",
    "failed_secrets_fetch",
    "failed_to_process_ai",
    "failed_to_send_message",
    "failed_invalid_context",
    "failed_unknown",
}


def _index_names() -> set[str]:
    """Every index name and every gsi_* key attribute the resource specs declare."""
    indexes = [*CONVERSATION_INDEXES, *(i for spec in table_specs(Settings()) for i in spec.indexes)]
    names = {index.name for index in indexes}
    for index in indexes:
        names |= {key for key in (index.partition_key, index.sort_key) if key and key.startswith("gsi_")}
    return names


def _modules(*parts: str) -> list[Path]:
    return sorted(path for part in parts for path in (REPO / part).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: the first statement string of each module, class and function."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _string_literals(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal of the module that is not a docstring."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def _named_in(text: str, names: set[str]) -> set[str]:
    """The names the literal uses as a whole identifier (in an expression like `SET claim_owner = :o` too)."""
    words = set(re.findall(r"[A-Za-z0-9_-]+", text))
    return names & words


def _offences(paths: list[Path], names: set[str]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {sorted(found)}"
        for path in paths
        for line, text in _string_literals(path)
        if (found := _named_in(text, names))
    ]


def _imports(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, modules) of every import statement (`from x import y` names x and x.y: y may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]


def _importing(paths: list[Path], package: str) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {modules[0]}"
        for path in paths
        for line, modules in _imports(path)
        if any(module == package or module.startswith(f"{package}.") for module in modules)
    ]


def test_the_index_names_are_read_from_the_resource_specs():
    assert {"company-shard-project-id-index", "gsi_company_shard", "gsi_recipient_email"} <= _index_names()


def test_only_the_dynamodb_adapter_names_stored_attributes_and_indexes():
    outside = [p for p in _modules("service", "consumers") if ADAPTER not in p.parents]

    assert _offences(outside, TABLE_ONLY_NAMES | _index_names()) == []


def test_only_the_conversation_module_spells_the_compound_statuses():
    elsewhere = [p for p in _modules("service", "consumers") if p != STATUS_HOME]

    assert _offences(elsewhere, COMPOUND_STATUSES) == []


def test_the_consumers_reach_aws_only_through_ports():
    assert _importing(_modules("consumers"), "service.adapters") == []


def test_only_the_cli_imports_the_local_stack():
    modules = [p for p in _modules("service", "consumers") if p not in LOCAL_STACK_ALLOWED]

    assert _importing(modules, "local_stack") == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('"""claim_owner in a docstring."""\n', set()),
        ("# claim_owner in a comment\nx = 1\n", set()),
        ('x = "SET claim_owner = :owner"\n', {"claim_owner"}),
        ('x = f"{y}#status = reply_sent"\n', {"reply_sent"}),
        ('x = "early_delivery_status_applied"\n', set()),  # a log event, not the attribute
        ('def f():\n    """reply_sent"""\n    return "reply_sent"\n', {"reply_sent"}),
    ],
)
def test_the_check_reads_literals_not_comments_or_docstrings(tmp_path, source, expected):
    module = tmp_path / "m.py"
    module.write_text(source)

    found: set[str] = set()
    for _, text in _string_literals(module):
        found |= _named_in(text, TABLE_ONLY_NAMES | COMPOUND_STATUSES)

    assert found == expected
