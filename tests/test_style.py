"""The package stays readable: ruff clean (lint and format, pyproject.toml's settings), units that fit on a
screen, the lesson's modules at the top and the machinery in ``course_utils.machinery``, and no module
reaching into another's private names."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils.machinery import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "course_utils"
LONGEST_FUNCTION = 60  # lines, signature and docstring included
LONGEST_CLASS = 200
LESSON_MODULES = {"cbam", "models", "finetune", "batchnorm", "train", "lr_finder", "data", "plots"}


def units(path: Path):
    """``(kind, qualified name, lines)`` of every function, method and class in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield kind, name, child.end_lineno - child.lineno + 1
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree)


def package_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_units_fit_on_a_screen():
    too_long = [
        f"{path.relative_to(ROOT)}: {kind} {name} has {lines} lines"
        for path in package_files()
        for kind, name, lines in units(path)
        if lines > (LONGEST_CLASS if kind == "class" else LONGEST_FUNCTION)
    ]
    assert not too_long, "split these (functions ≤ 60 lines, classes ≤ 200):\n" + "\n".join(too_long)


def test_the_unit_measure_counts_nested_functions_and_methods(tmp_path):
    """The measure itself can fail: a long method inside a class is found and named."""
    body = "\n".join(f"        x{i} = {i}" for i in range(70))
    (tmp_path / "m.py").write_text(f"class A:\n    def long(self):\n{body}\n")
    found = {name: lines for _, name, lines in units(tmp_path / "m.py")}
    assert found["A.long"] == 71 and found["A"] == 72


def test_the_lesson_is_at_the_top_and_the_machinery_below_it():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top >= LESSON_MODULES, f"lesson modules missing at the top: {LESSON_MODULES - top}"
    machinery = {p.stem for p in (PACKAGE / "machinery").glob("*.py")}
    for name in (
        "cli",
        "bootstrap",
        "doctor",
        "bench",
        "book",
        "precision",
        "devices",
        "checkpoints",
        "guards",
    ):
        assert name in machinery and name not in top, f"{name} belongs in course_utils/machinery"


def private_uses(path: Path) -> list[str]:
    """``module._name`` and ``from .module import _name`` where the module is one of the package's own."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = {p.stem for p in package_files()}
    imported = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith("course_utils")
        ):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                if alias.name in own:
                    imported[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id[:1].isupper()
        ):
            found.append(f"{node.value.id}.{node.attr}")  # a class's private method (Schedule._expand)
    return [f"{path.relative_to(ROOT)}: {use}" for use in found]


def test_no_module_reaches_into_another_modules_private_names():
    found = [use for path in package_files() for use in private_uses(path)]
    assert not found, "use (or add) a public name instead:\n" + "\n".join(found)


def test_the_private_name_check_finds_one(tmp_path):
    package = tmp_path / "course_utils"
    package.mkdir()
    (package / "m.py").write_text(
        "from . import finetune\nfrom .models import _x\nfinetune._y\nSchedule._expand\n"
    )
    global PACKAGE, ROOT
    saved = PACKAGE, ROOT
    PACKAGE, ROOT = package, tmp_path
    try:
        (package / "finetune.py").write_text("")
        uses = private_uses(package / "m.py")
    finally:
        PACKAGE, ROOT = saved
    assert any("_x" in u for u in uses) and any("finetune._y" in u for u in uses)
    assert any("Schedule._expand" in u for u in uses)


def ruff(*args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed in this Python (python -m course_utils test installs it)")
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = ruff("check", "--no-cache", "course_utils", "tests")
    assert result.returncode == 0, (
        f"ruff check found problems (ruff check --fix fixes some):\n{result.stdout}"
    )


def test_ruff_format_is_clean():
    result = ruff("format", "--check", "--no-cache", "course_utils", "tests")
    assert result.returncode == 0, f"run `ruff format course_utils tests`:\n{result.stdout}"


def test_ruff_would_catch_a_long_line_and_an_unused_import(tmp_path):
    """The configuration bites: the same settings find a 111-column line and an unused import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n" + "x = '" + "a" * 105 + "'\n")
    result = ruff("check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1 and "E501" in result.stdout and "F401" in result.stdout


def test_the_fast_tier_is_the_tests_not_marked_slow():
    args, extra = cli.parse(["test", "--fast", "-x"])
    assert args.fast and extra == ["-x"]
    command = cli.test_command("py", extra, fast=True)
    assert command[:5] == ["py", "-m", "pytest", "-m", "not slow"] and "notebooks" not in command
    assert "notebooks" in cli.test_command("py", extra), "the full suite (CI's) still runs the notebooks"
    assert not cli.parse(["test"])[0].fast


def test_pre_commit_runs_the_same_ruff_as_the_tests():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    ruff_repo = next(r for r in config["repos"] if r["repo"].endswith("ruff-pre-commit"))
    pinned = next(
        line.split("==")[1].split(";")[0].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("ruff==")
    )
    assert ruff_repo["rev"] == f"v{pinned}", "keep the hook's rev at constraints.txt's ruff"
    assert {h["id"] for h in ruff_repo["hooks"]} == {"ruff-check", "ruff-format"}
