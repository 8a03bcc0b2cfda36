"""The Helm chart: lints, renders valid Kubernetes manifests in every mode, and keeps its operating rules.

Renders with a real helm binary (installed into .tools/bin by tools/get-helm on first use, or the
one $HELM_BIN names) and validates core kinds with kubernetes-validate's bundled schemas. The CI values
files under helm/comms-engine/ci/ are the modes: KEDA (default), KEDA on some queues, a CPU HPA, fixed
replicas behind an ingress, and Prometheus Operator monitoring.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import __version__
from service.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "comms-engine"
CI_VALUES = sorted(path.name for path in (CHART / "ci").glob("*.yaml"))
GET_HELM = REPO / "tools" / "get-helm"
HELM_DIR = REPO / ".tools" / "bin"
KUBERNETES_VERSION = "1.30.0"
# Custom resources the chart may render; their operators' CRDs are not in kubernetes-validate.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
HTTP_SHUTDOWN_S = 5  # aiohttp's shutdown_timeout in service/runner.py

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]


def install_helm() -> Path:
    """The helm binary: $HELM_BIN, else .tools/bin/helm, installed there by get-helm when absent."""
    if named := os.environ.get("HELM_BIN"):
        return Path(named)
    binary = HELM_DIR / "helm"
    if os.access(binary, os.X_OK):
        return binary
    if not GET_HELM.is_file():
        pytest.fail(f"helm is not installed and {GET_HELM} is missing: set HELM_BIN to a helm binary")
    result = subprocess.run(
        [str(GET_HELM), str(HELM_DIR)], check=False, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        pytest.fail(f"{GET_HELM} could not install helm:\n{result.stdout}\n{result.stderr}")
    return binary


@pytest.fixture(scope="session")
def helm() -> Path:
    return install_helm()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)


def template_args(values_file: str | None, overrides: tuple[str, ...]) -> list[str]:
    args = ["template", "rel", str(CHART), "--namespace", "comms", "--kube-version", KUBERNETES_VERSION]
    if values_file:
        args += ["--values", str(CHART / "ci" / values_file)]
    for override in overrides:
        args += ["--set", override]
    return args


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`render("keda-values.yaml", "a.b=c", ...)`: the manifests helm template produces (cached)."""

    @cache
    def rendered(values_file: str | None, *overrides: str) -> list[Manifest]:
        result = run_helm(helm, *template_args(values_file, overrides))
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return rendered


def render_error(helm: Path, values_file: str | None, *overrides: str) -> str:
    """What helm says when it refuses to render; fails the test if it renders."""
    result = run_helm(helm, *template_args(values_file, overrides))
    assert result.returncode != 0, f"helm rendered values it should refuse: {overrides}"
    return result.stderr


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def component(manifest: Manifest) -> str:
    return str(manifest["metadata"]["labels"]["app.kubernetes.io/component"])


def deployments(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {component(d): d for d in of_kind(manifests, "Deployment")}


def containers(manifests: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    for deployment in of_kind(manifests, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def config_map(manifests: list[Manifest]) -> dict[str, str]:
    (found,) = of_kind(manifests, "ConfigMap")
    return dict(found["data"])


def minimum_replicas(manifests: list[Manifest], name: str) -> int:
    """What the component's autoscaler may scale down to, else its fixed replica count."""
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
        if component(hpa) == name:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in of_kind(manifests, "ScaledObject"):
        if component(scaled) == name:
            return int(scaled["spec"].get("minReplicaCount", 0))
    return int(deployments(manifests)[name]["spec"].get("replicas", 1))


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_chart_lints_cleanly_with_every_ci_values_file(helm: Path, values_file: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "--values", str(CHART / "ci" / values_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_every_rendered_manifest_is_valid_against_the_kubernetes_schemas(render: Render, values_file: str) -> None:
    manifests = render(values_file)
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc}")


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_worker_is_scaled_by_keda_or_by_an_hpa_never_both(render: Render, values_file: str) -> None:
    manifests = render(values_file)
    worker_hpas = [h for h in of_kind(manifests, "HorizontalPodAutoscaler") if component(h) == "worker"]
    scaled_objects = of_kind(manifests, "ScaledObject")
    assert len(worker_hpas) + len(scaled_objects) <= 1
    if scaled_objects or worker_hpas:
        assert "replicas" not in deployments(manifests)["worker"]["spec"], "an autoscaler owns the replica count"


@pytest.mark.parametrize(
    ("values_file", "scaler"),
    [
        ("default-values.yaml", "ScaledObject"),
        ("keda-values.yaml", "ScaledObject"),
        ("hpa-worker-values.yaml", "HorizontalPodAutoscaler"),
        ("ingress-pdb-values.yaml", None),
    ],
)
def test_worker_autoscaling_mode_selects_its_scaler(render: Render, values_file: str, scaler: str | None) -> None:
    manifests = render(values_file)
    worker_scalers = [
        m["kind"]
        for m in manifests
        if m["kind"] in ("ScaledObject", "HorizontalPodAutoscaler") and component(m) == "worker"
    ]
    assert worker_scalers == ([scaler] if scaler else [])


def test_keda_scales_each_consumed_queue_at_consumer_concurrency_per_pod(render: Render) -> None:
    manifests = render("keda-values.yaml")
    (scaled,) = of_kind(manifests, "ScaledObject")
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["queueURL"].rsplit("/", 1)[1] for t in triggers] == ["comms-whatsapp", "comms-sms"]
    for trigger in triggers:
        assert trigger["type"] == "aws-sqs-queue"
        assert trigger["metadata"]["queueLength"] == config_map(manifests)["COMMS_CONSUMER_CONCURRENCY"] == "128"
        assert trigger["metadata"]["scaleOnInFlight"] == "true"
        assert trigger["metadata"]["awsRegion"] == "eu-west-2"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployments(manifests)["worker"]["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 50)


def test_keda_authenticates_with_aws_pod_identity(render: Render) -> None:
    manifests = render("default-values.yaml")
    (scaled,) = of_kind(manifests, "ScaledObject")
    (auth,) = of_kind(manifests, "TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in scaled["spec"]["triggers"]} == {auth["metadata"]["name"]}
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_pod_disruption_budget_exists_only_when_minimum_replicas_exceed_one(render: Render, values_file: str) -> None:
    manifests = render(values_file)
    budgets = {component(p) for p in of_kind(manifests, "PodDisruptionBudget")}
    for name in deployments(manifests):
        assert (name in budgets) == (minimum_replicas(manifests, name) > 1), name


def test_pod_disruption_budgets_cover_fixed_replica_deployments(render: Render) -> None:
    budgets = of_kind(render("ingress-pdb-values.yaml"), "PodDisruptionBudget")
    assert sorted(component(p) for p in budgets) == ["api", "worker"]


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_every_container_has_liveness_on_healthz_and_readiness_on_readyz(render: Render, values_file: str) -> None:
    for _, container in containers(render(values_file)):
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["port"] == container["ports"][0]["name"]


def test_worker_restarting_probes_never_check_dependencies(render: Render) -> None:
    worker = deployments(render("default-values.yaml"))["worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    restarting = [container["livenessProbe"], container["startupProbe"]]
    assert {probe["httpGet"]["path"] for probe in restarting} == {"/healthz"}


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_termination_grace_covers_the_consumer_drain_grace(render: Render, values_file: str) -> None:
    manifests = render(values_file)
    drain_grace_s = float(config_map(manifests)["COMMS_DRAIN_GRACE_S"])
    for deployment, container in containers(manifests):
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
        needed = int(pre_stop[1]) + math.ceil(drain_grace_s) + HTTP_SHUTDOWN_S
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed


def test_termination_grace_grows_with_the_drain_grace(render: Render) -> None:
    manifests = render("default-values.yaml", "config.drain_grace_s=100")
    graces = {
        name: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for name, d in deployments(manifests).items()
    }
    assert graces["worker"] >= 105
    assert graces["api"] >= 110  # plus the api's 5 s preStop sleep


def test_termination_grace_shorter_than_the_drain_fails_the_render(helm: Path) -> None:
    error = render_error(helm, "default-values.yaml", "worker.terminationGracePeriodSeconds=20")
    assert "worker.terminationGracePeriodSeconds (20) must be at least 30" in error


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_containers_run_as_non_root_on_a_read_only_root_filesystem(render: Render, values_file: str) -> None:
    for deployment, container in containers(render(values_file)):
        pod = deployment["spec"]["template"]["spec"]
        security = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["runAsNonRoot"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_containers_declare_resource_requests_and_limits(render: Render, values_file: str) -> None:
    for _, container in containers(render(values_file)):
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}
        assert set(container["resources"]["limits"]) == {"cpu", "memory"}


def test_each_role_runs_its_own_serve_command_from_one_image(render: Render) -> None:
    found = {
        name: d["spec"]["template"]["spec"]["containers"][0]
        for name, d in deployments(render("default-values.yaml")).items()
    }
    assert found["api"]["args"] == ["serve", "--role", "api"]
    assert found["worker"]["args"] == ["serve", "--role", "worker"]
    assert found["api"]["image"] == found["worker"]["image"]


def test_service_account_carries_the_irsa_role_annotation(render: Render) -> None:
    manifests = render("default-values.yaml")
    (account,) = of_kind(manifests, "ServiceAccount")
    role = "arn:aws:iam::123456789012:role/comms-prod-service"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == role
    for deployment in deployments(manifests).values():
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_chart_never_renders_a_secret(render: Render, values_file: str) -> None:
    assert of_kind(render(values_file), "Secret") == []


def test_secrets_reach_the_containers_only_by_reference(render: Render) -> None:
    for _, container in containers(render("ingress-pdb-values.yaml")):
        assert {"secretRef": {"name": "comms-extra-env"}} in container["envFrom"]
        (variable,) = (e for e in container["env"] if e["name"] == "COMMS_OPENAI_BASE_URL")
        assert variable["valueFrom"]["secretKeyRef"] == {"name": "comms-provider-endpoints", "key": "openai_base_url"}


def test_chart_values_name_every_service_setting() -> None:
    assert set(chart_values()["config"]) == set(Settings.model_fields)


def test_chart_defaults_are_the_service_defaults() -> None:
    defaults = Settings.model_construct()
    for name, value in chart_values()["config"].items():
        assert value == getattr(defaults, name), f"config.{name}"


def test_config_map_renders_every_set_setting_as_a_comms_variable(render: Render) -> None:
    data = config_map(render("default-values.yaml"))
    chart_set = {name for name, value in chart_values()["config"].items() if value not in (None, "")}
    assert {f"COMMS_{name.upper()}" for name in chart_set} <= set(data)
    assert set(data) <= {f"COMMS_{name.upper()}" for name in Settings.model_fields}


def test_config_map_is_accepted_by_the_service(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("COMMS_")]:
        monkeypatch.delenv(name)
    for name, value in config_map(render("keda-values.yaml")).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.consumed_channels == ["whatsapp", "sms"]
    assert settings.consumer_concurrency == 128
    assert settings.drain_grace_s == 40.0


def test_values_schema_is_at_least_as_strict_as_the_service_settings() -> None:
    chart = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]
    for name, code in Settings.model_json_schema()["properties"].items():
        declared = chart[name]
        code_types = {t["type"] for t in code["anyOf"]} if "anyOf" in code else {code["type"]}
        chart_types = set(declared["type"]) if isinstance(declared["type"], list) else {declared["type"]}
        assert chart_types == code_types, name
        assert declared.get("enum") == code.get("enum"), name
        for bound in ("minimum", "exclusiveMinimum"):
            if bound in code:
                assert declared[bound] >= code[bound], f"{name}.{bound}"
        for bound in ("maximum", "exclusiveMaximum"):
            if bound in code:
                assert declared[bound] <= code[bound], f"{name}.{bound}"


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("worker.autoscaling.mode=both", "/worker/autoscaling/mode"),
        ("config.consumer_concurrency=0", "/config/consumer_concurrency"),
        ("config.consumer_concurency=8", "consumer_concurency"),
        ("config.log_level=VERBOSE", "/config/log_level"),
        ("config.consumer_queues=whatsapp\\,fax", "/config/consumer_queues"),
        ("config.aws_read_timeout_s=20", "/config/aws_read_timeout_s"),
        ("config.whatsapp_queue_url=comms-whatsapp", "/config/whatsapp_queue_url"),
        ("image.repository=", "/image/repository"),
        ("serviceAccount.roleArn=comms-role", "/serviceAccount/roleArn"),
        ("worker.autoscaling.minReplicas=-1", "/worker/autoscaling/minReplicas"),
        ("securityContext.readOnlyRootFilesystem=false", "/securityContext/readOnlyRootFilesystem"),
    ],
)
def test_values_schema_refuses_bad_values_at_install(helm: Path, override: str, complaint: str) -> None:
    error = render_error(helm, "default-values.yaml", override)
    assert "schema" in error
    assert complaint in error


def test_worker_hpa_mode_needs_at_least_one_replica(helm: Path) -> None:
    error = render_error(helm, "hpa-worker-values.yaml", "worker.autoscaling.minReplicas=0")
    assert "/worker/autoscaling/minReplicas" in error


def test_worker_without_the_queue_url_of_a_consumed_channel_fails_the_render(helm: Path) -> None:
    error = render_error(helm, "hpa-worker-values.yaml", "config.email_queue_url=null")
    assert "config.email_queue_url is empty" in error
    assert "COMMS_EMAIL_QUEUE_URL" in error


def test_api_only_install_needs_no_queue_urls(render: Render) -> None:
    manifests = render(None, "worker.enabled=false")
    assert list(deployments(manifests)) == ["api"]
    assert of_kind(manifests, "ScaledObject") == []


def test_ingress_routes_to_the_api_service(render: Render) -> None:
    manifests = render("ingress-pdb-values.yaml")
    (ingress,) = of_kind(manifests, "Ingress")
    (api_service,) = [s for s in of_kind(manifests, "Service") if component(s) == "api"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": api_service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "alb"


def test_service_monitor_scrapes_metrics_from_api_and_worker(render: Render) -> None:
    manifests = render("monitoring-values.yaml")
    (monitor,) = of_kind(manifests, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selected = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    for service in of_kind(manifests, "Service"):
        assert component(service) in selected
        assert service["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"]


def test_prometheus_rule_alerts_on_final_update_failures(render: Render) -> None:
    (rule,) = of_kind(render("monitoring-values.yaml"), "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    expr = alerts["CommsFinalUpdateFailed"]["expr"]
    assert "increase(comms_final_update_failures_total" in expr
    assert expr.endswith("> 0")


def test_prometheus_rule_alerts_on_dead_letter_queue_depth(render: Render) -> None:
    (rule,) = of_kind(render("monitoring-values.yaml"), "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    expr = alerts["CommsDeadLetterQueueNotEmpty"]["expr"]
    assert 'aws_sqs_approximate_number_of_messages_visible_average{queue_name=~"comms-prod-.+-dlq"}' in expr


def test_monitoring_objects_are_opt_in(render: Render) -> None:
    manifests = render("default-values.yaml")
    assert of_kind(manifests, "ServiceMonitor") == of_kind(manifests, "PrometheusRule") == []


def test_the_chart_deploys_the_version_the_service_reports():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
