"""Reproducible installs: the image and `make` install exactly the locked, hash-checked dependency set.

`requirements/runtime.lock` is what the image ships; `requirements/dev.lock` adds the test and lint tools on
top of the very same runtime pins. Both are made by `make lock` (pip-tools) from pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RUNTIME_LOCK = REPO / "requirements" / "runtime.lock"
DEV_LOCK = REPO / "requirements" / "dev.lock"


def locked(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """Each pinned package with its version and its hashes (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, tuple[Version, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        assert version, f"{path.name}: not an exact pin: {spec}"
        hashes = [option.removeprefix("--hash=") for option in options if option.startswith("--hash=")]
        pins[canonicalize_name(name)] = (Version(version), hashes)
    return pins


def declared(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    names = [*project["dependencies"], *(dep for extra in extras for dep in project["optional-dependencies"][extra])]
    return [Requirement(name) for name in names]


def build_requirements() -> list[Requirement]:
    return [Requirement(name) for name in PYPROJECT["build-system"]["requires"]]


def assert_satisfied(lock: dict[str, tuple[Version, list[str]]], requirements: list[Requirement]) -> None:
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is declared in pyproject.toml but not locked: run `make lock`"
        version, _ = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"locked {name}=={version} does not satisfy {requirement}: run `make lock`"
        )


def test_runtime_lock_pins_every_runtime_dependency_within_its_declared_range() -> None:
    assert_satisfied(locked(RUNTIME_LOCK), declared())


def test_dev_lock_pins_every_runtime_dev_and_local_dependency_within_its_declared_range() -> None:
    assert_satisfied(locked(DEV_LOCK), declared("dev", "local"))


def test_both_locks_pin_the_build_backend_so_no_isolated_build_resolves_its_own() -> None:
    assert_satisfied(locked(RUNTIME_LOCK), build_requirements())
    assert_satisfied(locked(DEV_LOCK), build_requirements())


def test_every_locked_file_is_pinned_by_a_sha256_hash() -> None:
    for path in (RUNTIME_LOCK, DEV_LOCK):
        for name, (_, hashes) in locked(path).items():
            assert hashes, f"{path.name}: {name} has no hash"
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", value) for value in hashes), (path.name, name)


def test_tests_run_on_exactly_the_versions_the_image_ships() -> None:
    runtime, dev = locked(RUNTIME_LOCK), locked(DEV_LOCK)
    for name, (version, _) in runtime.items():
        assert name in dev, f"{name} is in the image but not in the dev lock"
        assert dev[name][0] == version, f"{name}: image {version}, tests {dev[name][0]}"


def test_make_install_installs_the_dev_lock_with_hashes_and_nothing_resolved_afresh() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(BIN)/comms:", 1)[1].split("\n\n", 1)[0]
    assert "requirements/dev.lock" in recipe.splitlines()[0], "a changed lock must reinstall"
    assert "--require-hashes --no-deps -r requirements/dev.lock" in recipe
    assert "--no-deps --no-build-isolation -e ." in recipe
    assert "pip check" in recipe
