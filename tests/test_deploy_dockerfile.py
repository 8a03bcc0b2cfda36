"""The container image recipe: hadolint clean, runs the `comms` console script by role, non-root, no build tools.

No Docker engine runs here, so the Dockerfile is linted and read, not built.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from service.cli import _parser as cli_parser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
TASK_DEFINITION = REPO / "deploy" / "ecs" / "task-definition.json"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "python3-dev", "libc6-dev", "git", "curl", "wget")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def stages() -> list[Stage]:
    """The Dockerfile's build stages, each with its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: list[Stage] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            base, _, alias = arguments.partition(" AS ")
            found.append(Stage(base.strip(), alias.strip() or None))
        elif found:
            found[-1].instructions.append((instruction.upper(), arguments.strip()))
    return found


def final_stage() -> Stage:
    return stages()[-1]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"use the exec (JSON) form, not a shell string: {arguments}"
    return [str(part) for part in parsed]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_built_in_stages_on_a_slim_python_base() -> None:
    assert len(stages()) >= 2
    default_base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert default_base is not None
    # An exact patch release (optionally with its digest): `python:3.11-slim` moves with every release.
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", default_base[1])
    assert {stage.base for stage in stages()} == {"${PYTHON_IMAGE}"}


def test_entrypoint_is_the_comms_console_script_pyproject_declares() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = final_stage().arguments("ENTRYPOINT")
    assert exec_form(entrypoint) == ["comms"]
    assert scripts["comms"] == "service.cli:main"


def test_default_command_serves_a_role_the_cli_accepts() -> None:
    (command,) = final_stage().arguments("CMD")
    arguments = cli_parser().parse_args(exec_form(command))
    assert (arguments.command, arguments.role) == ("serve", "all")


def test_every_role_the_deployments_run_is_a_role_the_cli_accepts() -> None:
    for role in ("api", "worker", "all"):
        assert cli_parser().parse_args(["serve", "--role", role]).role == role


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    (user,) = final_stage().arguments("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric user lets Kubernetes verify runAsNonRoot"
    assert int(uid) != 0


def test_final_stage_installs_ca_certificates_and_no_build_tools() -> None:
    installs = " ".join(final_stage().arguments("RUN"))
    assert "ca-certificates" in installs
    assert "--no-install-recommends" in installs
    for tool in BUILD_TOOLS:
        assert not re.search(rf"\b{re.escape(tool)}\b", installs), tool


def test_final_stage_copies_only_the_virtualenv_from_the_build_stage() -> None:
    build = stages()[0]
    copies = final_stage().arguments("COPY")
    assert copies, "the final stage must copy the installed application"
    for copy in copies:
        assert copy.startswith(f"--from={build.name} "), f"the final stage copies from the build context: {copy}"


def test_healthcheck_probes_healthz_with_python_not_curl() -> None:
    (healthcheck,) = final_stage().arguments("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    probe = exec_form(command)
    assert probe[:2] == ["python", "-c"]
    assert "/healthz" in probe[2]
    assert "--timeout" in options


def test_ecs_health_check_is_the_image_health_check() -> None:
    (healthcheck,) = final_stage().arguments("HEALTHCHECK")
    image_probe = exec_form(healthcheck.partition(" CMD ")[2])
    containers = json.loads(TASK_DEFINITION.read_text())["containerDefinitions"]
    (service,) = [c for c in containers if c["name"] == "comms"]  # beside it, the one-shot /tmp permissions fixer
    assert service["healthCheck"]["command"] == ["CMD", *image_probe]


def test_build_context_is_only_what_the_package_is_built_from() -> None:
    lines = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then allow what the build copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {source.rstrip("/") for copy in stages()[0].arguments("COPY") for source in copy.split()[:-1]}
    assert sources == allowed
    assert {"pyproject.toml", "service", "consumers"} <= allowed


def test_build_stage_installs_the_runtime_lock_with_hashes_before_the_package_without_resolving() -> None:
    runs = stages()[0].arguments("RUN")
    lock_install = next(i for i, run in enumerate(runs) if "-r requirements/runtime.lock" in run)
    package_install = next(i for i, run in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", run))
    assert "--require-hashes" in runs[lock_install]
    assert "--no-deps" in runs[lock_install]
    assert lock_install < package_install
    assert "--no-deps" in runs[package_install], "the package must not pull anything the lock does not pin"
    assert "--no-build-isolation" in runs[package_install], "an isolated build env would resolve setuptools afresh"
