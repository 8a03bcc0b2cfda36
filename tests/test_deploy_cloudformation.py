"""The AWS resources as code: cfn-lint clean, and the very tables, queues and permissions the service uses.

Table names, keys, indexes and TTL attributes and the queue/dead-letter pairs are checked against
`service.adapters.aws.resources` (what `comms bootstrap` creates). The service role's actions are checked against the
AWS operations the code reachable from `comms serve` calls, found by reading that code (not a list).
"""

from __future__ import annotations

import ast
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
from service.config import Settings

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
SUBSTITUTED_BY_THE_OPERATOR = {"IMAGE", "COMMS_ROLE"}  # the other task-definition placeholders are stack outputs


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


def service_role_statements() -> list[dict[str, Any]]:
    role = template(CORE_TEMPLATE)["Resources"]["ServiceRole"]["Properties"]
    return [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def granted_actions() -> set[str]:
    granted: set[str] = set()
    for statement in service_role_statements():
        assert statement["Effect"] == "Allow"
        action = statement["Action"]
        granted |= {action} if isinstance(action, str) else set(action)
    return granted


# ---- the task definition ----------------------------------------------------------------------------


def task_definition_placeholders() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_]+)\}", TASK_DEFINITION.read_text()))


def filled_task_definition(role: str) -> dict[str, Any]:
    """task-definition.json as `envsubst` fills it for one role, with plausible stack outputs."""
    values = {name: f"x-{name}" for name in task_definition_placeholders()}
    values |= {
        "COMMS_ROLE": role,
        "IMAGE": "123456789012.dkr.ecr.eu-west-2.amazonaws.com/comms-engine:0.1.0",
        "ServiceRoleArn": "arn:aws:iam::123456789012:role/comms-prod-service",
        "TaskExecutionRoleArn": "arn:aws:iam::123456789012:role/comms-prod-task-execution",
    }
    text = re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: values[m.group(1)], TASK_DEFINITION.read_text())
    filled: dict[str, Any] = json.loads(text)
    return filled


def container_environment(role: str) -> dict[str, str]:
    (container,) = filled_task_definition(role)["containerDefinitions"]
    return {e["name"]: e["value"] for e in container["environment"]}


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


def test_every_index_projects_all_attributes() -> None:
    for name, table in template_tables().items():
        for index in table.get("GlobalSecondaryIndexes", []):
            assert index["Projection"] == {"ProjectionType": "ALL"}, f"{name}/{index['IndexName']}"


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
        assert (props["Namespace"], props["MetricName"]) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
        assert props["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        (dimension,) = props["Dimensions"]
        alarmed.add(queue_name_of(dimension["Value"]["Fn::GetAtt"][0]))
    assert "AlarmTopic" in resources(CORE_TEMPLATE, "AWS::SNS::Topic")
    settings = Settings()
    assert alarmed == {s.dead_letter_name for s in queue_specs(settings.secrets_prefix, settings.visibility_timeout_s)}


def test_the_code_scan_finds_the_calls_it_must_find() -> None:
    needed = actions_the_service_needs()
    # One known call per client, so a scan that silently finds nothing cannot pass the tests below.
    assert any(where.startswith("service/adapters/aws/queue_publisher.py") for where in needed["sqs:SendMessage"])
    assert "dynamodb:GetItem" in needed
    assert "secretsmanager:GetSecretValue" in needed


def test_service_role_allows_every_aws_operation_the_service_calls() -> None:
    missing = {
        action: where for action, where in actions_the_service_needs().items() if action not in granted_actions()
    }
    assert missing == {}, f"add these to ServiceRole in {CORE_TEMPLATE.name}: {missing}"


def test_service_role_grants_no_action_the_service_does_not_call() -> None:
    assert granted_actions() - set(actions_the_service_needs()) == set()


def test_service_role_reads_only_secrets_under_the_prefix() -> None:
    (secrets,) = [
        s for s in service_role_statements() if any(str(a).startswith("secretsmanager:") for a in s["Action"])
    ]
    arn_pattern, variables = secrets["Resource"]["Fn::Sub"]
    assert arn_pattern.endswith(":secret:${Prefix}/*")
    assert arn_pattern.startswith("arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:")
    assert variables["Prefix"]["Fn::If"][2] == {"Ref": "ResourcePrefix"}


def test_service_role_acts_only_on_this_stacks_tables_and_queues() -> None:
    tables = set(resources(CORE_TEMPLATE, "AWS::DynamoDB::Table"))
    queues = set(resources(CORE_TEMPLATE, "AWS::SQS::Queue"))
    for statement in service_role_statements():
        if str(statement["Action"][0]).startswith(("dynamodb:", "sqs:")):
            owned = tables if str(statement["Action"][0]).startswith("dynamodb:") else queues
            for resource in statement["Resource"]:
                target = resource.get("Fn::GetAtt", [None])[0] or re.match(r"\$\{(\w+)\.Arn\}", resource["Fn::Sub"])[1]
                assert target in owned, resource
    assert "*" not in json.dumps([s["Resource"] for s in service_role_statements()]).replace("/*", "")


@pytest.mark.parametrize("role", ["api", "worker"])
def test_task_definition_is_a_valid_register_task_definition_request(role: str) -> None:
    model = get_session().get_service_model("ecs")
    request = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(filled_task_definition(role), request)
    assert not report.has_errors(), report.generate_report()


def test_task_definition_placeholders_are_core_stack_outputs() -> None:
    outputs = set(template(CORE_TEMPLATE)["Outputs"])
    assert task_definition_placeholders() - SUBSTITUTED_BY_THE_OPERATOR <= outputs


def test_task_definition_runs_the_role_it_is_registered_for() -> None:
    for role in ("api", "worker"):
        (container,) = filled_task_definition(role)["containerDefinitions"]
        assert container["command"] == ["serve", "--role", role]
        assert filled_task_definition(role)["requiresCompatibilities"] == ["FARGATE"]


def test_task_definition_sets_only_service_settings_and_every_queue_url() -> None:
    environment = container_environment("worker")
    assert {name.removeprefix("COMMS_").lower() for name in environment} <= set(Settings.model_fields)
    for spec in queue_specs("comms", 60):
        assert f"COMMS_{spec.kind.upper()}_QUEUE_URL" in environment


def test_task_stop_timeout_covers_the_drain_grace() -> None:
    (container,) = filled_task_definition("worker")["containerDefinitions"]
    drain_grace_s = float(container_environment("worker")["COMMS_DRAIN_GRACE_S"])
    assert container["stopTimeout"] >= drain_grace_s + 5


def test_task_runs_non_root_on_a_read_only_root_filesystem() -> None:
    (container,) = filled_task_definition("worker")["containerDefinitions"]
    assert container["readonlyRootFilesystem"] is True
    assert not container["user"].startswith("0")
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in container["mountPoints"]


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
