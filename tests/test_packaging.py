"""pyproject.toml and environment.yml ask for the same packages, pinned the same way."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PINS = {"torch": "==2.14.1", "torchvision": "==0.29.1"}


def parse(requirement: str) -> tuple[str, str]:
    """``"Name >= 1.0"`` → ``("name", ">=1.0")``: normalised name (PEP 503) and specifier without spaces."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    return name, re.sub(r"\s+", "", match.group(3))


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pyproject_requirements(pyproject) -> list[str]:
    project = pyproject["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["course"])


def environment_pip(environment) -> list[str]:
    pips = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: section"
    return [line for line in pips[0] if line.strip() not in ("-e .", "--editable .", "-e ./")]


def test_pyproject_and_environment_list_the_same_requirements(pyproject, environment):
    ours = [parse(r) for r in pyproject_requirements(pyproject)]
    theirs = [parse(r) for r in environment_pip(environment)]
    assert len(set(n for n, _ in ours)) == len(ours), "a package is listed twice in pyproject.toml"
    assert len(set(n for n, _ in theirs)) == len(theirs), "a package is listed twice in environment.yml"
    only_pyproject = sorted(set(ours) - set(theirs))
    only_environment = sorted(set(theirs) - set(ours))
    assert not only_pyproject and not only_environment, (
        f"pyproject.toml only: {only_pyproject}; environment.yml only: {only_environment}")


def test_environment_installs_the_package_itself(environment):
    pips = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d][0]
    assert "-e ." in [p.strip() for p in pips]
    assert "pip" in environment["dependencies"]


@pytest.mark.parametrize("name, pin", PINS.items())
def test_torch_pins_are_exact_in_both(pyproject, environment, name, pin):
    assert dict(parse(r) for r in pyproject["project"]["dependencies"]).get(name) == pin
    assert dict(parse(r) for r in environment_pip(environment)).get(name) == pin


def test_environment_asks_for_python_311(environment, pyproject):
    pythons = [d for d in environment["dependencies"] if isinstance(d, str) and re.match(r"python\b", d)]
    assert pythons == ["python=3.11"]
    from packaging.specifiers import SpecifierSet

    assert "3.11" in SpecifierSet(pyproject["project"]["requires-python"]), "pyproject must allow Python 3.11"


def test_slow_marker_is_registered(pyproject):
    markers = pyproject["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_installed_versions_match_the_pins():
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == PINS["torch"][2:]
    assert torchvision.__version__.split("+")[0] == PINS["torchvision"][2:]
