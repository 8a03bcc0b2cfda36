"""The AWS resources as code: cfn-lint clean, and the very tables, queues and permissions the service uses.

Table names, keys, indexes and TTL attributes and the queue/dead-letter pairs are checked against
`service.adapters.aws.resources` (what `comms bootstrap` creates). The api and worker roles' actions are checked against
the AWS operations the code reachable from `comms serve` (and from each role's part of it) calls, found by reading that
code (not a list); what each role may do on each table and queue is checked against a minimum per resource. The ECS
files are checked for the stop budget, health checks, exposed ports and autoscaling ownership.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore import xform_name
from botocore.session import get_session
from botocore.validate import ParamValidator

from service.adapters.aws.resources import (
    DLQ_MAX_RECEIVE_COUNT,
    DLQ_RETENTION_S,
    QUEUE_RETENTION_S,
    TableSpec,
    queue_specs,
    table_specs,
)
from service.api.app import make_runner
from service.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
CORE_TEMPLATE = REPO / "deploy" / "cloudformation" / "comms-engine.yaml"
ECS_TEMPLATE = REPO / "deploy" / "ecs" / "service.yaml"
TASK_DEFINITION = REPO / "deploy" / "ecs" / "task-definition.json"
SERVICE_ENTRY_POINT = "service.runner"  # what `comms serve --role api|worker|all` runs
AWS_SERVICES = ("dynamodb", "sqs", "secretsmanager")  # the clients service/adapters/aws/clients.py opens
# SQS authorises a batch call by its single-message action (DeleteMessageBatch needs sqs:DeleteMessage).
SQS_BATCH_ACTIONS = {
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "sqs:SendMessageBatch": "sqs:SendMessage",
}
# The other task-definition placeholders are stack outputs; TaskRoleArn is ApiRoleArn or WorkerRoleArn, per role.
SUBSTITUTED_BY_THE_OPERATOR = {"IMAGE", "COMMS_ROLE", "TaskRoleArn"}


class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation YAML: a short-form intrinsic (!Ref, !Sub, !GetAtt, ...) becomes its long form."""


def _intrinsic(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


@cache
def template(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=CfnLoader)
    return loaded


def resources(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template(path)["Resources"].items() if r["Type"] == kind}


def parameter_defaults(path: Path) -> dict[str, str]:
    return {name: str(p.get("Default", "")) for name, p in template(path)["Parameters"].items()}


def resolve(value: Any, path: Path = CORE_TEMPLATE) -> Any:
    """A value with !Ref/!Sub of parameters resolved to the parameters' defaults."""
    defaults = parameter_defaults(path)
    if isinstance(value, dict) and "Ref" in value:
        return defaults[value["Ref"]]
    if isinstance(value, dict) and isinstance(value.get("Fn::Sub"), str):
        return re.sub(r"\$\{([A-Za-z]+)\}", lambda m: defaults[m.group(1)], value["Fn::Sub"])
    return value


def keys(schema: list[dict[str, str]]) -> tuple[str, str | None]:
    by_type = {k["KeyType"]: k["AttributeName"] for k in schema}
    return by_type["HASH"], by_type.get("RANGE")


def table_shape(properties: dict[str, Any]) -> tuple[Any, ...]:
    ttl = properties.get("TimeToLiveSpecification", {})
    return (
        keys(properties["KeySchema"]),
        {i["IndexName"]: keys(i["KeySchema"]) for i in properties.get("GlobalSecondaryIndexes", [])},
        ttl.get("AttributeName") if ttl.get("Enabled") else None,
    )


def spec_shape(spec: TableSpec) -> tuple[Any, ...]:
    return (
        (spec.partition_key, spec.sort_key),
        {i.name: (i.partition_key, i.sort_key) for i in spec.indexes},
        spec.ttl_attribute,
    )


def template_tables() -> dict[str, dict[str, Any]]:
    tables = resources(CORE_TEMPLATE, "AWS::DynamoDB::Table").values()
    return {resolve(t["Properties"]["TableName"]): t["Properties"] for t in tables}


def template_queues() -> dict[str, dict[str, Any]]:
    """Queue name -> properties, for every queue of the core template."""
    queues = resources(CORE_TEMPLATE, "AWS::SQS::Queue").values()
    return {resolve(q["Properties"]["QueueName"]): q["Properties"] for q in queues}


def queue_name_of(logical_id: str) -> str:
    queue = template(CORE_TEMPLATE)["Resources"][logical_id]
    return str(resolve(queue["Properties"]["QueueName"]))


# ---- the AWS operations the service calls -----------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else str(node.module)
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
    return found


def modules_the_service_runs() -> dict[str, Path]:
    """Every project module reachable by imports from the `comms serve` entry point."""
    seen: dict[str, Path] = {}
    pending = [SERVICE_ENTRY_POINT]
    while pending:
        module = pending.pop()
        if module in seen or module.split(".")[0] not in ("service", "consumers"):
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        pending += sorted(_imported_modules(path, module))
    return seen


@cache
def operations_by_method_name() -> dict[str, set[str]]:
    """aiobotocore method name (put_item) -> the IAM actions of that operation in the services the code uses."""
    session = get_session()
    actions: dict[str, set[str]] = {}
    for service in AWS_SERVICES:
        model = session.get_service_model(service)
        for operation in model.operation_names:
            action = f"{model.signing_name}:{operation}"
            actions.setdefault(xform_name(operation), set()).add(SQS_BATCH_ACTIONS.get(action, action))
    return actions


@cache
def actions_the_service_needs() -> dict[str, list[str]]:
    """IAM action -> where the code calls it (file:line), for every AWS client call `comms serve` can make."""
    operations = operations_by_method_name()
    needed: dict[str, list[str]] = {}
    for path in modules_the_service_runs().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in operations:
                actions = operations[node.func.attr]
                assert len(actions) == 1, f"{node.func.attr} is an operation of several AWS services: {actions}"
                needed.setdefault(next(iter(actions)), []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return needed


# The code each process role runs. The api role builds no consumers: everything reachable from the entry point
# except the `consumers` package. The workers run the consumers, the adapters bootstrap wires into their
# processors (`build_consumers`: TemplatePorts and ReplyPorts) and the readiness probe every role serves.
WORKER_ADAPTERS = (
    "service.adapters.aws.conversation_claims",
    "service.adapters.aws.reply_claims",
    "service.adapters.aws.stage_store",
    "service.adapters.aws.opt_out_registry",
    "service.adapters.aws.queue_publisher",
    "service.adapters.aws.secrets_store",
)
READINESS_PROBE = ("service/bootstrap.py", "probe_aws")  # /healthz never calls AWS; /readyz runs this in every role
ROLES = {"api": "ApiRole", "worker": "WorkerRole"}


def _reachable(starts: list[str], skip: tuple[str, ...] = ()) -> dict[str, Path]:
    seen: dict[str, Path] = {}
    pending = list(starts)
    while pending:
        module = pending.pop()
        top = module.split(".")[0]
        if (
            module in seen
            or top not in ("service", "consumers")
            or any(module == s or module.startswith(f"{s}.") for s in skip)
        ):
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        pending += sorted(_imported_modules(path, module))
    return seen


def _calls_in(tree: ast.AST, where: str, needed: dict[str, list[str]]) -> None:
    operations = operations_by_method_name()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in operations:
            actions = operations[node.func.attr]
            assert len(actions) == 1, f"{node.func.attr} is an operation of several AWS services: {actions}"
            needed.setdefault(next(iter(actions)), []).append(f"{where}:{node.lineno}")


@cache
def actions_the_role_needs(role: str) -> dict[str, list[str]]:
    """IAM action -> where the code of one process role calls it."""
    if role == "api":
        modules = _reachable([SERVICE_ENTRY_POINT], skip=("consumers",))
    else:
        consumers = [f"consumers.{p.stem}" for p in (REPO / "consumers").glob("*.py")]
        modules = _reachable([*consumers, *WORKER_ADAPTERS])
    needed: dict[str, list[str]] = {}
    for path in modules.values():
        if path.name != "bootstrap.py":  # bootstrap wires every adapter; only its readiness probe is called
            _calls_in(ast.parse(path.read_text()), str(path.relative_to(REPO)), needed)
    probe_file, probe_name = READINESS_PROBE
    (probe,) = [
        n
        for n in ast.walk(ast.parse((REPO / probe_file).read_text()))
        if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef) and n.name == probe_name
    ]
    _calls_in(probe, probe_file, needed)
    return needed


def role_statements(role: str) -> list[dict[str, Any]]:
    properties = template(CORE_TEMPLATE)["Resources"][ROLES[role]]["Properties"]
    return [s for policy in properties["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def granted_actions(role: str) -> set[str]:
    granted: set[str] = set()
    for statement in role_statements(role):
        assert statement["Effect"] == "Allow"
        granted |= set(_listed(statement["Action"]))
    return granted


def _resource_key(resource: Any) -> str:
    """A role's resource as the logical id it names: `ConversationsTable`, `ConversationsTable/index`, `secrets`."""
    if "Fn::GetAtt" in resource:
        logical_id, attribute = resource["Fn::GetAtt"]
        assert attribute == "Arn", resource
        return str(logical_id)
    pattern = resource["Fn::Sub"] if isinstance(resource["Fn::Sub"], str) else resource["Fn::Sub"][0]
    if ":secretsmanager:" in pattern:
        return "secrets"
    match = re.fullmatch(r"\$\{(\w+)\.Arn\}(/index/\*)?", pattern)
    assert match, resource
    return match[1] + ("/index" if match[2] else "")


def grants_by_resource(role: str) -> dict[str, set[str]]:
    grants: dict[str, set[str]] = {}
    for statement in role_statements(role):
        for resource in _listed(statement["Resource"]):
            grants.setdefault(_resource_key(resource), set()).update(_listed(statement["Action"]))
    return grants


ITEM_READ_WRITE = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"}
# What each role must at least be allowed on each resource (docs/deploying.md, "IAM").
ROLE_MINIMUM: dict[str, dict[str, set[str]]] = {
    "api": {
        "CompanyTable": ITEM_READ_WRITE | {"dynamodb:DescribeTable"},
        "ApiKeysTable": ITEM_READ_WRITE,
        "IdempotencyTable": ITEM_READ_WRITE | {"dynamodb:DeleteItem"},
        "OptOutTable": ITEM_READ_WRITE | {"dynamodb:DeleteItem"},
        "ConversationsTable": ITEM_READ_WRITE | {"dynamodb:Query", "dynamodb:BatchGetItem"},
        "ConversationsTable/index": {"dynamodb:Query"},
        "MessagesTable": {"dynamodb:Query", "dynamodb:UpdateItem"},  # hand-off history, delivery states
        "StageTable": ITEM_READ_WRITE | {"dynamodb:Query", "dynamodb:DeleteItem"},
        "LockTable": ITEM_READ_WRITE | {"dynamodb:DeleteItem"},
        "RateLimitsTable": {"dynamodb:UpdateItem"},
        "WhatsAppQueue": {"sqs:SendMessage"},
        "SmsQueue": {"sqs:SendMessage"},
        "EmailQueue": {"sqs:SendMessage"},
        "RepliesQueue": {"sqs:SendMessage"},
        "HandoffQueue": {"sqs:SendMessage"},
        "secrets": {"secretsmanager:GetSecretValue"},
    },
    "worker": {
        "ConversationsTable": ITEM_READ_WRITE,
        "MessagesTable": {"dynamodb:PutItem", "dynamodb:Query", "dynamodb:UpdateItem"},  # record, read history
        "StageTable": ITEM_READ_WRITE | {"dynamodb:Query", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"},
        "LockTable": ITEM_READ_WRITE | {"dynamodb:DeleteItem", "dynamodb:BatchWriteItem"},
        "OptOutTable": ITEM_READ_WRITE | {"dynamodb:DeleteItem"},
        "RateLimitsTable": {"dynamodb:UpdateItem"},
        # readiness, and the project's concurrent_conversations cap read from its current record
        "CompanyTable": {"dynamodb:DescribeTable", "dynamodb:GetItem"},
        **{
            queue: {
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:ChangeMessageVisibility",
                "sqs:GetQueueAttributes",
                "sqs:GetQueueUrl",
                "sqs:SendMessage",  # a deferral re-queues a copy of the message on its own queue
            }
            for queue in ("WhatsAppQueue", "SmsQueue", "EmailQueue", "RepliesQueue")
        },
        **{
            dlq: {"sqs:SendMessage", "sqs:GetQueueUrl"}
            for dlq in (
                "WhatsAppDeadLetterQueue",
                "SmsDeadLetterQueue",
                "EmailDeadLetterQueue",
                "RepliesDeadLetterQueue",
            )
        },
        "secrets": {"secretsmanager:GetSecretValue"},
    },
}


# ---- the task definition ----------------------------------------------------------------------------


def task_definition_placeholders() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_]+)\}", TASK_DEFINITION.read_text()))


def filled_task_definition(role: str, drain_grace_s: str | None = None) -> dict[str, Any]:
    """task-definition.json as `envsubst` fills it for one role, with plausible stack outputs."""
    values = {
        name: f"https://sqs.eu-west-2.amazonaws.com/123456789012/x-{name}" if name.endswith("Url") else f"x-{name}"
        for name in task_definition_placeholders()
    }
    values |= {
        "COMMS_ROLE": role,
        "IMAGE": "123456789012.dkr.ecr.eu-west-2.amazonaws.com/comms-engine:0.1.0",
        "TaskRoleArn": f"arn:aws:iam::123456789012:role/comms-prod-{role}",
        "TaskExecutionRoleArn": "arn:aws:iam::123456789012:role/comms-prod-task-execution",
        "PublicBaseUrl": "https://comms.example.com",
        "DrainGraceSeconds": drain_grace_s or parameter_defaults(CORE_TEMPLATE)["DrainGraceSeconds"],
    }
    text = re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: values[m.group(1)], TASK_DEFINITION.read_text())
    filled: dict[str, Any] = json.loads(text)
    return filled


def service_container(role: str, drain_grace_s: str | None = None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = filled_task_definition(role, drain_grace_s)["containerDefinitions"]
    (container,) = [c for c in containers if c["name"] == "comms"]
    return container


def container_environment(role: str, drain_grace_s: str | None = None) -> dict[str, str]:
    return {e["name"]: e["value"] for e in service_container(role, drain_grace_s)["environment"]}


def settings_of(environment: dict[str, str]) -> Settings:
    return load_settings(**{name.removeprefix("COMMS_").lower(): value for name, value in environment.items()})


FARGATE_MAX_STOP_TIMEOUT_S = 120


# ---- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CORE_TEMPLATE, ECS_TEMPLATE], ids=lambda p: p.name)
def test_template_passes_cfn_lint(path: Path) -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), str(path)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tables_have_the_names_keys_indexes_and_ttl_the_service_uses() -> None:
    expected = {spec.name: spec_shape(spec) for spec in table_specs(Settings())}
    assert {name: table_shape(props) for name, props in template_tables().items()} == expected


def test_table_attribute_definitions_are_exactly_the_key_attributes() -> None:
    tables = template_tables()
    for spec in table_specs(Settings()):
        defined = {a["AttributeName"]: a["AttributeType"] for a in tables[spec.name]["AttributeDefinitions"]}
        assert defined == dict.fromkeys(spec.key_attributes, "S"), spec.name


def test_every_index_projects_what_the_service_defines_and_none_projects_all() -> None:
    tables = template_tables()
    for spec in table_specs(Settings()):
        declared = {
            index["IndexName"]: index["Projection"] for index in tables[spec.name].get("GlobalSecondaryIndexes", [])
        }
        assert declared == {index.name: index.projection for index in spec.indexes}, spec.name
        assert all(projection["ProjectionType"] != "ALL" for projection in declared.values()), spec.name


def test_tables_are_on_demand_with_point_in_time_recovery() -> None:
    for name, table in template_tables().items():
        assert table["BillingMode"] == "PAY_PER_REQUEST", name
        assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}, name


def test_queues_are_the_ones_the_service_uses_each_with_its_dead_letter_queue() -> None:
    settings = Settings()
    queues = template_queues()
    expected = queue_specs(settings.secrets_prefix, settings.visibility_timeout_s)
    assert set(queues) == {s.name for s in expected} | {s.dead_letter_name for s in expected}
    for spec in expected:
        redrive = queues[spec.name]["RedrivePolicy"]
        dead_letter_logical_id = redrive["deadLetterTargetArn"]["Fn::GetAtt"][0]
        assert queue_name_of(dead_letter_logical_id) == spec.dead_letter_name
        assert redrive["maxReceiveCount"] == DLQ_MAX_RECEIVE_COUNT


def test_queue_visibility_and_retention_match_the_bootstrap() -> None:
    settings = Settings()
    queues = template_queues()
    assert parameter_defaults(CORE_TEMPLATE)["VisibilityTimeoutSeconds"] == str(settings.visibility_timeout_s)
    for spec in queue_specs(settings.secrets_prefix, settings.visibility_timeout_s):
        assert queues[spec.name]["VisibilityTimeout"] == {"Ref": "VisibilityTimeoutSeconds"}
        assert queues[spec.name]["MessageRetentionPeriod"] == QUEUE_RETENTION_S
        assert queues[spec.name]["ReceiveMessageWaitTimeSeconds"] == 20
        assert queues[spec.dead_letter_name]["MessageRetentionPeriod"] == DLQ_RETENTION_S


def test_every_dead_letter_queue_has_a_depth_alarm_that_notifies_the_topic() -> None:
    alarmed = set()
    for alarm in resources(CORE_TEMPLATE, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        if props["MetricName"] != "ApproximateNumberOfMessagesVisible":
            continue
        assert props["Namespace"] == "AWS/SQS"
        assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        (dimension,) = props["Dimensions"]
        alarmed.add(queue_name_of(dimension["Value"]["Fn::GetAtt"][0]))
    assert "AlarmTopic" in resources(CORE_TEMPLATE, "AWS::SNS::Topic")
    settings = Settings()
    assert alarmed == {s.dead_letter_name for s in queue_specs(settings.secrets_prefix, settings.visibility_timeout_s)}


def test_every_consumed_queue_has_a_backlog_age_alarm_that_notifies_the_topic() -> None:
    alarmed: list[str] = []
    for alarm in resources(CORE_TEMPLATE, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        if props["MetricName"] != "ApproximateAgeOfOldestMessage":
            continue
        assert props["Namespace"] == "AWS/SQS"
        assert props["Statistic"] == "Maximum"
        assert props["Threshold"] == {"Ref": "BacklogAgeAlarmSeconds"}
        assert props["ComparisonOperator"] == "GreaterThanThreshold"
        assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        (dimension,) = props["Dimensions"]
        assert dimension["Name"] == "QueueName"
        logical_id, attribute = dimension["Value"]["Fn::GetAtt"]
        assert attribute == "QueueName"
        alarmed.append(queue_name_of(logical_id))
    assert "BacklogAgeAlarmSeconds" in template(CORE_TEMPLATE)["Parameters"]
    settings = Settings()
    consumed = [s.name for s in queue_specs(settings.secrets_prefix, 60) if s.kind in settings.consumed_queues]
    assert sorted(alarmed) == sorted(consumed)
    assert set(consumed) == {f"{settings.secrets_prefix}-{q}" for q in ("whatsapp", "sms", "email", "replies")}


def test_alarm_topic_uses_a_customer_managed_key_cloudwatch_may_use() -> None:
    """alias/aws/sns cannot work: CloudWatch needs kms:GenerateDataKey* and kms:Decrypt on the topic's key, which
    only a key policy we control can grant."""
    (topic,) = resources(CORE_TEMPLATE, "AWS::SNS::Topic").values()
    key_ref = topic["Properties"]["KmsMasterKeyId"]
    assert isinstance(key_ref, dict), f"the alarm topic must use a key of this stack, not {key_ref}"
    key_id = key_ref["Fn::GetAtt"][0] if "Fn::GetAtt" in key_ref else key_ref["Ref"]
    key = resources(CORE_TEMPLATE, "AWS::KMS::Key")[key_id]["Properties"]
    assert key["EnableKeyRotation"] is True
    cloudwatch = [
        s for s in key["KeyPolicy"]["Statement"] if s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]
    granted = {a for s in cloudwatch if s["Effect"] == "Allow" for a in _listed(s["Action"])}
    assert {"kms:Decrypt", "kms:GenerateDataKey*"} <= granted
    roots = [s for s in key["KeyPolicy"]["Statement"] if "AWS" in s.get("Principal", {})]
    assert any(":root" in json.dumps(s["Principal"]) and s["Action"] == "kms:*" for s in roots)
    aliases = resources(CORE_TEMPLATE, "AWS::KMS::Alias").values()
    assert any(a["Properties"]["TargetKeyId"] == {"Ref": key_id} for a in aliases)


def test_the_code_scan_finds_the_calls_it_must_find() -> None:
    needed = actions_the_service_needs()
    # One known call per client, so a scan that silently finds nothing cannot pass the tests below.
    assert any(where.startswith("service/adapters/aws/queue_publisher.py") for where in needed["sqs:SendMessage"])
    assert "dynamodb:GetItem" in needed
    assert "secretsmanager:GetSecretValue" in needed
    assert "sqs:ReceiveMessage" in actions_the_role_needs("worker")
    assert "sqs:ReceiveMessage" not in actions_the_role_needs("api")
    assert "dynamodb:DescribeTable" in actions_the_role_needs("worker")  # the readiness probe


def test_the_roles_together_allow_every_aws_operation_the_service_calls() -> None:
    granted = granted_actions("api") | granted_actions("worker")
    missing = {action: where for action, where in actions_the_service_needs().items() if action not in granted}
    assert missing == {}, f"add these to ApiRole or WorkerRole in {CORE_TEMPLATE.name}: {missing}"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_allows_every_aws_operation_its_code_calls(role: str) -> None:
    missing = {
        action: where for action, where in actions_the_role_needs(role).items() if action not in granted_actions(role)
    }
    assert missing == {}, f"add these to {ROLES[role]} in {CORE_TEMPLATE.name}: {missing}"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_grants_no_action_its_code_does_not_call(role: str) -> None:
    assert granted_actions(role) - set(actions_the_role_needs(role)) == set()
    assert granted_actions(role) - set(actions_the_service_needs()) == set()


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_is_allowed_what_it_needs_on_each_resource(role: str) -> None:
    grants = grants_by_resource(role)
    short = {
        resource: sorted(actions - grants.get(resource, set()))
        for resource, actions in ROLE_MINIMUM[role].items()
        if not actions <= grants.get(resource, set())
    }
    assert short == {}, f"{ROLES[role]} lacks: {short}"


def test_the_roles_are_split_by_what_each_process_does() -> None:
    api, worker = grants_by_resource("api"), grants_by_resource("worker")
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"}
    assert not any(consume & actions for actions in api.values()), "the api consumes no queue"
    assert not any(r.endswith("DeadLetterQueue") for r in api), "the api never touches a dead-letter queue"
    for table in ("ApiKeysTable", "IdempotencyTable"):
        assert table not in worker, f"the workers never use {table}"
    assert "HandoffQueue" not in worker
    assert worker["CompanyTable"] == {"dynamodb:DescribeTable", "dynamodb:GetItem"}  # readiness, the cap
    for resource, actions in worker.items():
        if resource.endswith("DeadLetterQueue"):
            assert actions <= {"sqs:SendMessage", "sqs:GetQueueUrl"}, resource


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_reads_only_secrets_under_the_prefix(role: str) -> None:
    (secrets,) = [s for s in role_statements(role) if any(str(a).startswith("secretsmanager:") for a in s["Action"])]
    arn_pattern, variables = secrets["Resource"]["Fn::Sub"]
    assert arn_pattern.endswith(":secret:${Prefix}/*")
    assert arn_pattern.startswith("arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:")
    assert variables["Prefix"]["Fn::If"][2] == {"Ref": "ResourcePrefix"}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_acts_only_on_this_stacks_tables_and_queues(role: str) -> None:
    tables = set(resources(CORE_TEMPLATE, "AWS::DynamoDB::Table"))
    queues = set(resources(CORE_TEMPLATE, "AWS::SQS::Queue"))
    for statement in role_statements(role):
        service = str(_listed(statement["Action"])[0]).split(":")[0]
        assert all(str(a).startswith(f"{service}:") for a in _listed(statement["Action"])), statement["Sid"]
        if service in ("dynamodb", "sqs"):
            owned = tables if service == "dynamodb" else queues
            for resource in _listed(statement["Resource"]):
                assert _resource_key(resource).removesuffix("/index") in owned, resource
    assert "*" not in json.dumps([s["Resource"] for s in role_statements(role)]).replace("/*", "")


def test_only_the_worker_role_trusts_the_keda_operator() -> None:
    api = json.dumps(template(CORE_TEMPLATE)["Resources"]["ApiRole"]["Properties"]["AssumeRolePolicyDocument"])
    worker = json.dumps(template(CORE_TEMPLATE)["Resources"]["WorkerRole"]["Properties"]["AssumeRolePolicyDocument"])
    assert "KedaOperatorRoleArn" in worker and "KedaOperatorRoleArn" not in api
    assert "KubernetesApiServiceAccount" in api and "KubernetesWorkerServiceAccount" in worker


@pytest.mark.parametrize("role", ["api", "worker"])
def test_task_definition_is_a_valid_register_task_definition_request(role: str) -> None:
    model = get_session().get_service_model("ecs")
    request = model.operation_model("RegisterTaskDefinition").input_shape
    assert request is not None
    report = ParamValidator().validate(filled_task_definition(role), request)
    assert not report.has_errors(), report.generate_report()


def test_task_definition_placeholders_are_core_stack_outputs() -> None:
    outputs = set(template(CORE_TEMPLATE)["Outputs"])
    assert task_definition_placeholders() - SUBSTITUTED_BY_THE_OPERATOR <= outputs
    assert {"ApiRoleArn", "WorkerRoleArn"} <= outputs  # what the operator sets TaskRoleArn to, per role


def test_task_definition_runs_the_role_it_is_registered_for() -> None:
    for role in ("api", "worker"):
        assert service_container(role)["command"] == ["serve", "--role", role]
        assert filled_task_definition(role)["requiresCompatibilities"] == ["FARGATE"]
        assert filled_task_definition(role)["taskRoleArn"].endswith(f"-{role}")


def test_task_definition_sets_only_service_settings_and_every_queue_url() -> None:
    environment = container_environment("worker")
    assert {name.removeprefix("COMMS_").lower() for name in environment} <= set(Settings.model_fields)
    for spec in queue_specs("comms", 60):
        assert f"COMMS_{spec.kind.upper()}_QUEUE_URL" in environment
    settings_of(environment)  # and they validate


def test_task_definition_passes_the_required_public_base_url() -> None:
    raw = json.loads(re.sub(r"\$\{([A-Za-z_]+)\}", r"<\1>", TASK_DEFINITION.read_text()))
    (container,) = [c for c in raw["containerDefinitions"] if c["name"] == "comms"]
    environment = {e["name"]: e["value"] for e in container["environment"]}
    assert environment["COMMS_PUBLIC_BASE_URL"] == "<PublicBaseUrl>"
    parameter = template(CORE_TEMPLATE)["Parameters"]["PublicBaseUrl"]
    assert "Default" not in parameter, "required: no default"
    pattern = re.compile(parameter["AllowedPattern"])
    for good in ("https://comms.example.com", "http://comms.example.com:8080/base"):
        assert pattern.fullmatch(good), good
    for bad in ("", "comms.example.com", "ftp://comms.example.com", "https://"):
        assert not pattern.fullmatch(bad), bad
    assert template(CORE_TEMPLATE)["Outputs"]["PublicBaseUrl"]["Value"] == {"Ref": "PublicBaseUrl"}
    assert settings_of(container_environment("api")).public_base_url == "https://comms.example.com"


def test_drain_grace_parameter_feeds_the_task_environment() -> None:
    raw = TASK_DEFINITION.read_text()
    assert '{"name": "COMMS_DRAIN_GRACE_S", "value": "${DrainGraceSeconds}"}' in raw
    assert template(CORE_TEMPLATE)["Outputs"]["DrainGraceSeconds"]["Value"] == {"Ref": "DrainGraceSeconds"}


@pytest.mark.parametrize("bound", ["Default", "MaxValue"])
@pytest.mark.parametrize("role", ["api", "worker"])
def test_task_stop_timeout_covers_the_worst_case_stop_within_fargates_cap(role: str, bound: str) -> None:
    """stopTimeout is a ceiling (a task that is done exits sooner), so it is Fargate's maximum, and the worst-case
    stop the service computes from the task's own settings (Settings.stop_budget_s: drain grace + protected grace,
    or the open long poll + its margin, whichever is longer, then the HTTP shutdown) must fit in it."""
    drain_grace_s = str(template(CORE_TEMPLATE)["Parameters"]["DrainGraceSeconds"][bound])
    container = service_container(role, drain_grace_s)
    settings = settings_of(container_environment(role, drain_grace_s))
    assert settings.drain_grace_s == float(drain_grace_s)
    assert settings.stop_budget_s <= container["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT_S, (
        f"worst-case stop {settings.stop_budget_s} s (drain {settings.drain_grace_s:g}, poll {settings.poll_wait_s})"
        f" vs stopTimeout {container['stopTimeout']} (Fargate allows at most {FARGATE_MAX_STOP_TIMEOUT_S})"
    )


def test_ecs_drain_grace_lets_an_ai_call_and_its_send_finish() -> None:
    settings = settings_of(container_environment("worker"))  # the service also refuses a shorter grace
    assert settings.drain_grace_s >= settings.ai_timeout_s + settings.provider_timeout_s


def test_task_runs_non_root_on_a_read_only_root_filesystem() -> None:
    container = service_container("worker")
    assert container["readonlyRootFilesystem"] is True
    assert not container["user"].startswith("0")
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in container["mountPoints"]


def test_tmp_is_writable_by_the_non_root_user() -> None:
    """Fargate creates a bind-mount volume as a root-owned 0755 directory (aws/containers-roadmap#938), so uid
    10001 could not write /tmp. A non-essential init container (root, no capabilities: the owner may chmod)
    makes it 1777 like an ordinary /tmp, and the service container starts only once that succeeded."""
    definition = filled_task_definition("worker")
    assert definition["volumes"] == [{"name": "tmp"}]  # a Fargate bind mount (task ephemeral storage)
    containers = {c["name"]: c for c in definition["containerDefinitions"]}
    service = containers["comms"]
    (dependency,) = service["dependsOn"]
    assert dependency["condition"] == "SUCCESS"
    init = containers[dependency["containerName"]]
    assert init["essential"] is False
    assert init["image"] == service["image"]
    assert init["user"] in ("0", "0:0")
    assert init["entryPoint"] == ["chmod", "1777", "/tmp"]
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in init["mountPoints"]
    assert init["linuxParameters"]["capabilities"]["drop"] == ["ALL"]


def test_health_checks_use_healthz_never_readyz() -> None:
    """/readyz probes DynamoDB and SQS: as a load balancer or container health check, an AWS outage would make ECS
    replace every task."""
    container = service_container("api")
    assert any("/healthz" in part for part in container["healthCheck"]["command"])
    assert "readyz" not in json.dumps(filled_task_definition("api"))
    (target_group,) = resources(ECS_TEMPLATE, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    assert target_group["Properties"]["HealthCheckPath"] == "/healthz"
    assert target_group["Properties"]["HealthCheckPort"] == "traffic-port"


def test_load_balancer_deregistration_delay_covers_the_api_drain() -> None:
    (target_group,) = resources(ECS_TEMPLATE, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    attributes = {a["Key"]: a["Value"] for a in target_group["Properties"]["TargetGroupAttributes"]}
    delay = float(resolve(attributes["deregistration_delay.timeout_seconds"], ECS_TEMPLATE))
    settings = settings_of(container_environment("api"))
    http_shutdown_s = inspect.signature(make_runner).parameters["shutdown_timeout"].default
    assert delay >= settings.request_deadline_s + http_shutdown_s + 5


def test_only_the_service_port_is_routed_and_the_metrics_port_is_never_exposed() -> None:
    service_port = Settings().port
    metrics_port = int(getattr(Settings(), "metrics_port", 9090))
    for target_group in resources(ECS_TEMPLATE, "AWS::ElasticLoadBalancingV2::TargetGroup").values():
        assert target_group["Properties"]["Port"] == service_port
    for service in resources(ECS_TEMPLATE, "AWS::ECS::Service").values():
        balancers = service["Properties"].get("LoadBalancers")
        if balancers:
            for balancer in balancers["Fn::If"][1]:
                assert balancer["ContainerPort"] == service_port
    rules = [r["Properties"] for r in resources(ECS_TEMPLATE, "AWS::EC2::SecurityGroupIngress").values()]
    for group in resources(ECS_TEMPLATE, "AWS::EC2::SecurityGroup").values():
        rules += group["Properties"].get("SecurityGroupIngress", [])
    assert rules, "the tasks' security group admits the load balancer"
    for rule in rules:
        assert not rule["FromPort"] <= metrics_port <= rule["ToPort"], rule
        assert "CidrIp" not in rule and "CidrIpv6" not in rule, f"no address-range ingress to the tasks: {rule}"
    for role in ("api", "worker"):
        ports = {m["containerPort"] for m in service_container(role)["portMappings"]}
        assert ports == {service_port}


def test_autoscaled_ecs_services_leave_the_task_count_to_application_auto_scaling() -> None:
    scaled = set()
    for target in resources(ECS_TEMPLATE, "AWS::ApplicationAutoScaling::ScalableTarget").values():
        scaled |= set(re.findall(r"\$\{(\w+)\.Name\}", target["Properties"]["ResourceId"]["Fn::Sub"]))
    services = resources(ECS_TEMPLATE, "AWS::ECS::Service")
    assert scaled == set(services)
    for name in scaled:
        assert "DesiredCount" not in services[name]["Properties"], f"{name}: a deploy would reset the scaled count"


def test_ecs_worker_scales_on_backlog_per_task_of_every_consumed_queue() -> None:
    policy = resources(ECS_TEMPLATE, "AWS::ApplicationAutoScaling::ScalingPolicy")["WorkerBacklogScaling"]
    config = policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    metrics = {m["Id"]: m for m in config["CustomizedMetricSpecification"]["Metrics"]}
    (result,) = [m for m in metrics.values() if m["ReturnData"]]
    numerator, denominator = result["Expression"].rsplit("/", 1)
    assert metrics[denominator.strip()]["MetricStat"]["Metric"]["MetricName"] == "RunningTaskCount"
    counted = set()
    for term in re.findall(r"[a-z]+", numerator):
        metric = metrics[term]["MetricStat"]["Metric"]
        (dimension,) = metric["Dimensions"]
        counted.add((resolve(dimension["Value"], ECS_TEMPLATE), metric["MetricName"]))
    consumed = Settings().consumed_queues
    queues = [s.name for s in queue_specs(parameter_defaults(ECS_TEMPLATE)["ResourcePrefix"], 60) if s.kind in consumed]
    states = ("ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible")
    assert counted == {(queue, state) for queue in queues for state in states}


def test_ecs_worker_backlog_target_is_the_consumer_concurrency() -> None:
    policy = resources(ECS_TEMPLATE, "AWS::ApplicationAutoScaling::ScalingPolicy")["WorkerBacklogScaling"]
    target = policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]
    assert resolve(target, ECS_TEMPLATE) == container_environment("worker")["COMMS_CONSUMER_CONCURRENCY"]
