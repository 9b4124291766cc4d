"""pyproject.toml declares ranges; constraints.txt pins the tested stack; environment.yml, .ci/run, the
bootstrap and the README all go through constraints.txt; installing into an env with a suitable torch keeps
it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from course_utils.machinery import bootstrap

ROOT = Path(__file__).resolve().parents[1]
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1"}
OLDER_SUPPORTED = {"torch": "2.11.0", "torchvision": "0.26.0"}  # the GPU machine's


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


@pytest.fixture(scope="module")
def constraints() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert norm(req.name) not in reqs, f"{req.name} is pinned twice in constraints.txt"
            reqs[norm(req.name)] = req
    return reqs


def requirements(pyproject) -> dict[str, Requirement]:
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["course"]]
    return {norm(r.name): r for r in reqs}


def pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"constraints.txt must pin exactly: {req}"
    return spec.version


def test_constraints_pin_the_tested_torch_for_every_python(constraints):
    for name, version in TESTED.items():
        assert pinned(constraints[name]) == version
        assert constraints[name].marker is None, f"{name}'s pin must hold on every Python"


def test_constraints_pin_every_requirement_and_satisfy_the_ranges(pyproject, constraints):
    for name, req in requirements(pyproject).items():
        assert name in constraints, f"{name} (pyproject.toml) has no pin in constraints.txt"
        version = pinned(constraints[name])
        assert req.specifier.contains(version), (
            f"constraints.txt's {name}=={version} is outside pyproject's {req}"
        )


def test_pyproject_declares_ranges_not_pins(pyproject):
    reqs = requirements(pyproject)
    for name in TESTED:
        assert not any(s.operator == "==" for s in reqs[name].specifier), (
            f"{name} must be a range: {reqs[name]}"
        )


@pytest.mark.parametrize("versions", [TESTED, OLDER_SUPPORTED], ids=["tested", "older-supported"])
def test_ranges_accept_the_tested_and_an_older_supported_torch(pyproject, versions):
    reqs = requirements(pyproject)
    for name, version in versions.items():
        assert reqs[name].specifier.contains(version), f"{reqs[name]} refuses {name} {version}"
        assert reqs[name].specifier.contains(version + "+cu126"), (
            "a CUDA build's local version must be accepted"
        )


def test_ranges_refuse_a_torch_without_fused_adamw_on_the_cpu(pyproject):
    reqs = requirements(pyproject)
    assert not reqs["torch"].specifier.contains("2.3.1")
    assert not reqs["torchvision"].specifier.contains("0.18.1")


def test_bootstraps_torch_range_matches_pyproject(pyproject):
    """The stdlib bootstrap decides whether an installed torch is suitable with its own copy of the range."""
    spec = requirements(pyproject)["torch"].specifier
    for version in ("2.3.1", "2.4.0", "2.11.0", "2.14.1+cu130", "2.99.0", "3.0.0"):
        assert bootstrap.torch_supported(version) == spec.contains(version), version


def test_environment_installs_through_the_constraints_file(environment, pyproject):
    pips = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: section"
    assert [p.split() for p in pips[0]] == [["-c", "constraints.txt"], ["-e", ".[course]"]]
    assert "pip" in environment["dependencies"]
    pythons = [d for d in environment["dependencies"] if isinstance(d, str) and re.match(r"python\b", d)]
    assert pythons == ["python=3.11"]
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.11")


def test_bootstrap_ci_and_readme_use_the_constraints_file():
    assert bootstrap.install_command("py", constrained=True)[4:] == [
        "-c",
        "constraints.txt",
        "-e",
        ".[course]",
    ]
    assert "python3 -m course_utils test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "constraints.txt" in readme and "python -m course_utils test" in readme


def test_license_is_an_spdx_string_and_setuptools_can_read_it(pyproject):
    assert pyproject["project"]["license"] == "MIT"
    assert not any("License ::" in c for c in pyproject["project"].get("classifiers", ()))
    (setuptools,) = [
        Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert not setuptools.specifier.contains("76.1"), "SPDX license strings need setuptools >= 77"


def test_slow_marker_is_registered(pyproject):
    markers = pyproject["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


@pytest.mark.slow
def test_installing_the_course_keeps_the_installed_torch(tmp_path):
    """pip's own resolver, offline, against this environment: installing course_utils must not replace torch.

    ``--dry-run --report`` lists what pip would install; with ``--no-index`` it can only use what is
    installed, so a range that refused this torch fails the resolution instead of downloading another one."""
    import torch

    report = tmp_path / "report.json"
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-build-isolation",
            "--report",
            str(report),
            "--quiet",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, (
        f"pip could not resolve the course against torch {torch.__version__}:\n{result.stderr}"
    )
    would_install = {
        norm(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "torch" not in would_install and "torchvision" not in would_install, would_install
    assert set(would_install) <= {"course-utils"}, f"pip would also install {would_install}"
    assert seconds < 60, f"the resolution took {seconds:.0f} s"
