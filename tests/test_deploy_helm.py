"""The Helm chart: lints, renders valid Kubernetes manifests in every mode, and keeps its operating rules.

Renders with a real helm binary (installed into .tools/bin by tools/get-helm on first use, or the
one $HELM_BIN names) and validates core kinds with kubernetes-validate's bundled schemas. The CI values
files under helm/comms-engine/ci/ are the modes: KEDA (default, IRSA), KEDA on some queues, EKS Pod Identity
with NetworkPolicies, a CPU HPA, fixed replicas behind an ingress, and Prometheus Operator monitoring. Custom
resources (KEDA, Prometheus Operator) are validated against the CRD schemas in helm/crd-schemas/.
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

import jsonschema
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
CRD_SCHEMAS = REPO / "helm" / "crd-schemas"
PUBLIC_PATHS = {("/initiate-conversation", "Exact"), ("/webhooks/twilio/", "Prefix")}

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
        # "json:a.b=[]" sets a JSON value (--set-json); anything else is a --set.
        args += ["--set-json", override.removeprefix("json:")] if override.startswith("json:") else ["--set", override]
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


def settings_of(manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the service builds from the rendered ConfigMap alone."""
    for name in [n for n in os.environ if n.startswith("COMMS_")]:
        monkeypatch.delenv(name)
    for name, value in config_map(manifests).items():
        monkeypatch.setenv(name, value)
    return load_settings()


def grace_of(manifests: list[Manifest]) -> dict[str, int]:
    return {
        name: int(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
        for name, d in deployments(manifests).items()
    }


def pre_stop_s(container: Manifest) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    return int(command[1])


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = yaml.safe_load((CRD_SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.yaml").read_text())
    return schema


def worker_scale_down(manifests: list[Manifest]) -> dict[str, Any]:
    """The worker's HPA scaleDown behavior, from the ScaledObject (mode keda) or the HPA (mode hpa)."""
    for scaled in of_kind(manifests, "ScaledObject"):
        return dict(scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"])
    (hpa,) = [h for h in of_kind(manifests, "HorizontalPodAutoscaler") if component(h) == "worker"]
    return dict(hpa["spec"]["behavior"]["scaleDown"])


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
def test_every_custom_resource_is_valid_against_its_crd_schema(render: Render, values_file: str) -> None:
    for manifest in render(values_file):
        if (manifest["apiVersion"], manifest["kind"]) not in CUSTOM_KINDS:
            continue
        try:
            jsonschema.validate(manifest, crd_schema(manifest["apiVersion"], manifest["kind"]))
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {exc.json_path}: {exc.message}")


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
    assert auth["spec"]["podIdentity"]["provider"] == "aws"


def pod_identity(manifests: list[Manifest]) -> dict[str, Any]:
    (auth,) = of_kind(manifests, "TriggerAuthentication")
    return dict(auth["spec"]["podIdentity"])


API_ROLE = "arn:aws:iam::123456789012:role/comms-prod-api"  # Outputs.ApiRoleArn in ci/default-values.yaml
WORKER_ROLE = "arn:aws:iam::123456789012:role/comms-prod-worker"  # Outputs.WorkerRoleArn


def service_accounts(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {component(a): a for a in of_kind(manifests, "ServiceAccount")}


def service_account_role(manifests: list[Manifest], name: str = "worker") -> str | None:
    """The IRSA role annotated on one component's service account (the worker's: the one KEDA reads)."""
    account = service_accounts(manifests)[name]
    return (account["metadata"].get("annotations") or {}).get("eks.amazonaws.com/role-arn")


def test_keda_with_irsa_assumes_the_workers_annotated_role(render: Render) -> None:
    manifests = render("default-values.yaml")  # serviceAccount.worker.roleArn set, identityOwner left to the chart
    assert service_account_role(manifests) == WORKER_ROLE
    assert pod_identity(manifests) == {"provider": "aws", "identityOwner": "workload"}


def test_keda_with_eks_pod_identity_uses_the_operators_identity(render: Render) -> None:
    manifests = render("eks-pod-identity-values.yaml")  # no role annotation: identityOwner workload would fail
    assert service_account_role(manifests) is None
    assert pod_identity(manifests) == {"provider": "aws", "identityOwner": "keda"}


def test_keda_operator_identity_can_be_chosen_explicitly(render: Render) -> None:
    manifests = render("keda-values.yaml")  # IRSA on the worker, but identityOwner keda
    assert service_account_role(manifests)
    assert pod_identity(manifests) == {"provider": "aws", "identityOwner": "keda"}


def test_keda_ignores_the_api_role_when_choosing_workload_identity(render: Render, helm: Path) -> None:
    """Only the worker's role counts: an api role alone leaves KEDA on its own identity, and refuses workload."""
    api_only = ("serviceAccount.worker.roleArn=", f"serviceAccount.api.roleArn={API_ROLE}")
    manifests = render("default-values.yaml", *api_only)
    assert service_account_role(manifests, "api") == API_ROLE
    assert service_account_role(manifests) is None
    assert pod_identity(manifests) == {"provider": "aws", "identityOwner": "keda"}
    error = render_error(helm, "default-values.yaml", *api_only, "worker.autoscaling.keda.identityOwner=workload")
    assert "needs an IRSA role on the worker's service account" in error


def test_keda_role_arn_is_never_combined_with_an_identity_owner(render: Render) -> None:
    role = "arn:aws:iam::123456789012:role/keda-sqs-reader"
    for values_file in ("default-values.yaml", "eks-pod-identity-values.yaml"):
        manifests = render(values_file, f"worker.autoscaling.keda.roleArn={role}")
        assert pod_identity(manifests) == {"provider": "aws", "roleArn": role}


@pytest.mark.parametrize(
    ("values_file", "overrides", "complaint"),
    [
        (
            "eks-pod-identity-values.yaml",
            ("worker.autoscaling.keda.identityOwner=workload",),
            "identityOwner workload needs an IRSA role on the worker's service account",
        ),
        (
            "default-values.yaml",
            (
                "worker.autoscaling.keda.identityOwner=workload",
                "worker.autoscaling.keda.roleArn=arn:aws:iam::123456789012:role/k",
            ),
            "roleArn and identityOwner workload are mutually exclusive",
        ),
    ],
)
def test_keda_identity_combinations_keda_rejects_fail_the_render(
    helm: Path, values_file: str, overrides: tuple[str, ...], complaint: str
) -> None:
    assert complaint in render_error(helm, values_file, *overrides)


@pytest.mark.parametrize("annotations", ["serviceAccount.worker.annotations", "serviceAccount.annotations"])
def test_keda_workload_identity_accepts_an_annotation_given_directly(render: Render, annotations: str) -> None:
    manifests = render(
        "eks-pod-identity-values.yaml",
        "worker.autoscaling.keda.identityOwner=workload",
        f"{annotations}.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/comms",
    )
    assert service_account_role(manifests) == "arn:aws:iam::123456789012:role/comms"
    assert pod_identity(manifests) == {"provider": "aws", "identityOwner": "workload"}


def test_keda_workload_identity_ignores_an_annotation_on_the_api_account_only(helm: Path) -> None:
    error = render_error(
        helm,
        "eks-pod-identity-values.yaml",
        "worker.autoscaling.keda.identityOwner=workload",
        "serviceAccount.api.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/comms",
    )
    assert "needs an IRSA role on the worker's service account" in error


@pytest.mark.parametrize(
    ("queues", "complaint"),
    [
        ("{whatsapp_queue_url,handoff_queue_url}", "must not list handoff_queue_url"),
        ("{email_queue_url}", "does not consume email"),
    ],
)
def test_keda_refuses_to_scale_on_a_queue_nobody_consumes(helm: Path, queues: str, complaint: str) -> None:
    error = render_error(
        helm,
        "keda-values.yaml",
        f"worker.autoscaling.keda.queues={queues}",
        "config.handoff_queue_url=https://sqs.eu-west-2.amazonaws.com/123456789012/comms-handoff",
    )
    assert complaint in error


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
def test_termination_grace_covers_the_services_stop_budget(
    render: Render, values_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(values_file)
    budget = settings_of(manifests, monkeypatch).stop_budget_s
    for deployment, container in containers(manifests):
        needed = pre_stop_s(container) + math.ceil(budget)
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed


def test_termination_grace_is_derived_from_the_stop_budget_by_default(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render("default-values.yaml")
    budget = settings_of(manifests, monkeypatch).stop_budget_s
    assert budget == 128  # max(110 + 10, 20 + 5) + 5 HTTP + 3 trace flush
    margin = chart_values()["shutdownMarginSeconds"]
    assert grace_of(manifests) == {"api": 5 + 128 + margin, "worker": 128 + margin}


def test_termination_grace_grows_with_the_drain_grace(render: Render) -> None:
    graces = grace_of(render("default-values.yaml", "config.drain_grace_s=200"))
    assert graces["worker"] >= 218  # 200 + 10 protected + 5 HTTP + 3 trace flush
    assert graces["api"] >= 223  # plus the api's 5 s preStop sleep


def test_termination_grace_shorter_than_the_stop_budget_fails_the_render(helm: Path) -> None:
    error = render_error(helm, "default-values.yaml", "worker.terminationGracePeriodSeconds=100")
    assert "worker.terminationGracePeriodSeconds (100) must be at least 128" in error


@pytest.mark.parametrize(
    "overrides",
    [
        ("config.drain_grace_s=25",),
        ("json:config.drain_grace_s=104.5",),
        ("config.ai_timeout_s=120",),
    ],
)
def test_drain_grace_shorter_than_an_ai_call_and_a_send_fails_the_render(
    helm: Path, overrides: tuple[str, ...]
) -> None:
    error = render_error(helm, "default-values.yaml", *overrides)
    assert "config.drain_grace_s" in error
    assert "must be at least config.ai_timeout_s + config.provider_timeout_s" in error


def test_drain_grace_covering_an_ai_call_and_a_send_renders(render: Render) -> None:
    manifests = render("default-values.yaml", "config.drain_grace_s=105", "config.ai_timeout_s=90")
    assert config_map(manifests)["COMMS_DRAIN_GRACE_S"] == "105"


@pytest.mark.parametrize("values_file", ["default-values.yaml", "keda-values.yaml", "hpa-worker-values.yaml"])
def test_worker_scale_down_is_no_faster_than_a_pod_drains(render: Render, values_file: str) -> None:
    manifests = render(values_file)
    grace = grace_of(manifests)["worker"]
    scale_down = worker_scale_down(manifests)
    assert scale_down["stabilizationWindowSeconds"] >= grace
    assert scale_down["policies"]
    for policy in scale_down["policies"]:
        assert policy["periodSeconds"] >= min(grace, 1800)
        assert (policy["type"] == "Pods" and policy["value"] <= 1) or (
            policy["type"] == "Percent" and policy["value"] <= 25
        )


def test_worker_scale_down_period_follows_a_longer_drain(render: Render) -> None:
    manifests = render("default-values.yaml", "config.drain_grace_s=600")
    scale_down = worker_scale_down(manifests)
    grace = grace_of(manifests)["worker"]
    assert grace == 618 + 15  # 600 + 10 protected + 5 HTTP + 3 trace flush, and the margin
    assert scale_down["stabilizationWindowSeconds"] == grace
    assert {p["periodSeconds"] for p in scale_down["policies"]} == {grace}


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


def test_each_service_account_carries_its_own_irsa_role(render: Render) -> None:
    """One IAM role per process (Outputs.ApiRoleArn / WorkerRoleArn), each on its own service account."""
    manifests = render("default-values.yaml")
    accounts = service_accounts(manifests)
    assert set(accounts) == {"api", "worker"}
    assert service_account_role(manifests, "api") == API_ROLE
    assert service_account_role(manifests, "worker") == WORKER_ROLE
    for account in accounts.values():
        assert account["automountServiceAccountToken"] is False


def test_each_deployment_uses_its_own_service_account(render: Render) -> None:
    manifests = render("default-values.yaml")
    accounts = service_accounts(manifests)
    for name, deployment in deployments(manifests).items():
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == accounts[name]["metadata"]["name"]
    # The names the stack's IRSA trust expects by default (KubernetesApiServiceAccount / ...WorkerServiceAccount).
    assert accounts["api"]["metadata"]["name"] == "rel-comms-engine-api"
    assert accounts["worker"]["metadata"]["name"] == "rel-comms-engine-worker"


def test_service_account_names_can_be_chosen(render: Render) -> None:
    manifests = render("default-values.yaml", "serviceAccount.api.name=front", "serviceAccount.worker.name=back")
    assert {n: a["metadata"]["name"] for n, a in service_accounts(manifests).items()} == {
        "api": "front",
        "worker": "back",
    }
    found = {n: d["spec"]["template"]["spec"]["serviceAccountName"] for n, d in deployments(manifests).items()}
    assert found == {"api": "front", "worker": "back"}


def test_existing_service_accounts_are_used_when_create_is_false(render: Render, helm: Path) -> None:
    names = ("serviceAccount.api.name=front", "serviceAccount.worker.name=back")
    manifests = render("default-values.yaml", "serviceAccount.create=false", *names)
    assert of_kind(manifests, "ServiceAccount") == []
    found = {n: d["spec"]["template"]["spec"]["serviceAccountName"] for n, d in deployments(manifests).items()}
    assert found == {"api": "front", "worker": "back"}
    error = render_error(helm, "default-values.yaml", "serviceAccount.create=false", names[0])
    assert "serviceAccount.worker.name is required when serviceAccount.create is false" in error


def test_a_disabled_component_gets_no_service_account(render: Render) -> None:
    manifests = render(None, "worker.enabled=false", "config.public_base_url=https://comms.example.com")
    assert set(service_accounts(manifests)) == {"api"}


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


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_config_map_is_accepted_by_the_service(
    render: Render, values_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(values_file)
    settings = settings_of(manifests, monkeypatch)
    if "api" in deployments(manifests):
        settings.require_public_base_url()  # what `serve --role api` checks at start


def test_config_map_carries_the_chosen_settings(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(render("keda-values.yaml"), monkeypatch)
    assert settings.consumed_channels == ["whatsapp", "sms"]
    assert settings.consumer_concurrency == 128
    assert settings.drain_grace_s == 120.0


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
        ("serviceAccount.worker.roleArn=comms-role", "/serviceAccount/worker/roleArn"),
        ("serviceAccount.api.roleArn=comms-role", "/serviceAccount/api/roleArn"),
        # The one shared role of old values files is refused, not silently dropped.
        ("serviceAccount.roleArn=arn:aws:iam::123456789012:role/comms", "roleArn"),
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
    manifests = render(None, "worker.enabled=false", "config.public_base_url=https://comms.example.com")
    assert list(deployments(manifests)) == ["api"]
    assert of_kind(manifests, "ScaledObject") == []


def ingress_paths(manifests: list[Manifest]) -> set[tuple[str, str]]:
    (ingress,) = of_kind(manifests, "Ingress")
    return {(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}


def test_ingress_routes_to_the_api_service(render: Render) -> None:
    manifests = render("ingress-pdb-values.yaml")
    (ingress,) = of_kind(manifests, "Ingress")
    (api_service,) = [s for s in of_kind(manifests, "Service") if component(s) == "api"]
    for path in ingress["spec"]["rules"][0]["http"]["paths"]:
        assert path["backend"]["service"] == {"name": api_service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["ingressClassName"] == "alb"


def test_ingress_routes_only_the_public_paths(render: Render) -> None:
    assert ingress_paths(render("ingress-pdb-values.yaml")) == PUBLIC_PATHS


def test_ingress_exposes_the_openapi_document_only_when_asked(render: Render) -> None:
    assert ingress_paths(render("eks-pod-identity-values.yaml")) == PUBLIC_PATHS | {("/openapi.json", "Exact")}
    assert ingress_paths(render("eks-pod-identity-values.yaml", "api.ingress.exposeOpenapi=false")) == PUBLIC_PATHS


def test_ingress_hosts_may_not_name_their_own_paths(helm: Path) -> None:
    error = render_error(helm, "ingress-pdb-values.yaml", "api.ingress.hosts[0].paths[0].path=/")
    assert "/api/ingress/hosts/0" in error


def test_metrics_are_served_on_their_own_container_port(render: Render) -> None:
    manifests = render("default-values.yaml")
    metrics_port = int(config_map(manifests)["COMMS_METRICS_PORT"])
    assert metrics_port == 9090
    for _, container in containers(manifests):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8080, "metrics": metrics_port}


def test_metrics_port_equal_to_the_http_port_fails_the_render(helm: Path) -> None:
    assert "config.metrics_port (8080) must differ from config.port" in render_error(
        helm, "default-values.yaml", "config.metrics_port=8080"
    )


def test_service_monitor_scrapes_the_metrics_port_of_api_and_worker(render: Render) -> None:
    manifests = render("monitoring-values.yaml")
    (monitor,) = of_kind(manifests, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["path"], endpoint["port"]) == ("/metrics", "metrics")
    selected = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    for service in of_kind(manifests, "Service"):
        assert component(service) in selected
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["metrics"]["targetPort"] == "metrics"
        assert ports["metrics"]["port"] == int(config_map(manifests)["COMMS_METRICS_PORT"])
    (api_service,) = [s for s in of_kind(manifests, "Service") if component(s) == "api"]
    assert {p["name"] for p in api_service["spec"]["ports"]} == {"http", "metrics"}


def test_network_policies_are_opt_in(render: Render) -> None:
    assert of_kind(render("default-values.yaml"), "NetworkPolicy") == []


def test_network_policies_keep_metrics_to_the_monitoring_namespace(render: Render) -> None:
    manifests = render("eks-pod-identity-values.yaml")
    policies = {component(p): p["spec"] for p in of_kind(manifests, "NetworkPolicy")}
    assert set(policies) == {"api", "worker"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    for name, spec in policies.items():
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        assert spec["policyTypes"] == ["Ingress"]
        by_port = {rule["ports"][0]["port"]: rule for rule in spec["ingress"]}
        assert [peer["namespaceSelector"]["matchLabels"] for peer in by_port["metrics"]["from"]] == [monitoring]
        if name == "api":
            assert set(by_port) == {"http", "metrics"}
            assert "from" not in by_port["http"]  # the public port: from anywhere
        else:
            assert set(by_port) == {"metrics"}  # the worker takes no traffic


def test_network_policy_http_sources_can_be_restricted(render: Render) -> None:
    manifests = render(
        "eks-pod-identity-values.yaml",
        "networkPolicy.httpFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ingress",
    )
    (api,) = [p for p in of_kind(manifests, "NetworkPolicy") if component(p) == "api"]
    (http,) = [r for r in api["spec"]["ingress"] if r["ports"][0]["port"] == "http"]
    assert http["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("config.public_base_url=",),
    ],
)
def test_api_with_webhooks_needs_the_public_base_url(helm: Path, overrides: tuple[str, ...]) -> None:
    error = render_error(helm, None, "worker.enabled=false", *overrides)
    assert "config.public_base_url is required when the api is deployed with config.webhooks_enabled" in error


@pytest.mark.parametrize(
    "overrides",
    [
        ("config.webhooks_enabled=false",),
        (
            "api.enabled=false",
            "config.whatsapp_queue_url=https://sqs.eu-west-2.amazonaws.com/1/w",
            "config.sms_queue_url=https://sqs.eu-west-2.amazonaws.com/1/s",
            "config.email_queue_url=https://sqs.eu-west-2.amazonaws.com/1/e",
            "config.replies_queue_url=https://sqs.eu-west-2.amazonaws.com/1/r",
        ),
    ],
)
def test_public_base_url_is_optional_without_api_webhooks(render: Render, overrides: tuple[str, ...]) -> None:
    assert "COMMS_PUBLIC_BASE_URL" not in config_map(render(None, "worker.enabled=false", *overrides))


@pytest.mark.parametrize("values_file", CI_VALUES)
def test_pods_spread_over_zones_and_nodes_by_default(render: Render, values_file: str) -> None:
    for deployment in deployments(render(values_file)).values():
        constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in constraints:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_topology_spread_can_be_turned_off(render: Render) -> None:
    manifests = render("default-values.yaml", "json:worker.topologySpreadConstraints=[]")
    assert "topologySpreadConstraints" not in deployments(manifests)["worker"]["spec"]["template"]["spec"]


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


def test_prometheus_rule_alerts_on_the_age_of_each_consumed_queues_oldest_message(render: Render) -> None:
    (rule,) = of_kind(render("monitoring-values.yaml"), "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    alert = alerts["CommsQueueBacklogAging"]
    queues = "comms-prod-whatsapp|comms-prod-sms|comms-prod-email|comms-prod-replies"
    assert alert["expr"] == (
        f'max by (queue_name) (aws_sqs_approximate_age_of_oldest_message_maximum{{queue_name=~"{queues}"}}) > 600'
    )
    assert alert["for"] == "10m"
    assert alert["labels"]["severity"] == "warning"


def test_queue_age_alert_follows_the_exporter_named_in_values(render: Render) -> None:
    (rule,) = of_kind(
        render(
            "monitoring-values.yaml",
            "monitoring.prometheusRule.queueAge.queueNameLabel=dimension_QueueName",
            "monitoring.prometheusRule.queueAge.thresholdSeconds=300",
            "config.consumer_queues=sms",
        ),
        "PrometheusRule",
    )
    (alert,) = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "CommsQueueBacklogAging"]
    assert alert["expr"].endswith('{dimension_QueueName=~"comms-prod-sms"}) > 300')


def test_monitoring_objects_are_opt_in(render: Render) -> None:
    manifests = render("default-values.yaml")
    assert of_kind(manifests, "ServiceMonitor") == of_kind(manifests, "PrometheusRule") == []


def test_the_chart_deploys_the_version_the_service_reports():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
