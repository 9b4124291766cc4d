"""``python -m course_utils``: the stdlib bootstrap's decisions and the exact commands, making no venv."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from course_utils.machinery import bootstrap, cli

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


@pytest.fixture(autouse=True)
def no_bootstrap_env(monkeypatch):
    """The suite itself may run inside a re-run (COURSE_BOOTSTRAPPED=1, set by `python -m course_utils
    test`)."""
    monkeypatch.delenv("COURSE_BOOTSTRAPPED", raising=False)
    monkeypatch.delenv("COURSE_ENV", raising=False)


@pytest.mark.parametrize(
    "module",
    [
        "__init__.py",
        "__main__.py",
        "machinery/__init__.py",
        "machinery/cli.py",
        "machinery/bootstrap.py",
        "machinery/doctor.py",
    ],
)
def test_what_runs_before_the_env_exists_imports_only_the_stdlib(module):
    tree = ast.parse((ROOT / "course_utils" / module).read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in top_level:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            if isinstance(node, ast.ImportFrom) and node.level:
                assert name in ("", "bootstrap", "machinery.cli"), f"{module} imports .{name} at import time"
                continue
            assert name.split(".")[0] in STDLIB, f"{module} imports {name} at import time"


def test_a_bare_python_runs_doctor_and_help(tmp_path):
    """A Python without any package (a venv without pip), as on a fresh machine: help, a wrong command, and
    ``doctor --here`` (this Python, not .venv) that says how to set up and exits 1."""
    import venv

    venv.create(tmp_path / "bare", with_pip=False)
    bare = [str(bootstrap.venv_python(tmp_path / "bare")), "-E", "-m", "course_utils"]
    env = {
        k: v for k, v in os.environ.items() if k not in ("COURSE_ENV", "COURSE_BOOTSTRAPPED", "PYTHONPATH")
    }
    help_run = subprocess.run(bare + ["test", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert help_run.returncode == 0, help_run.stderr
    assert "--here" in help_run.stdout
    unknown = subprocess.run(bare + ["brew"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    doctor = subprocess.run(
        bare + ["doctor", "--here"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "torch, torchvision" in doctor.stdout and "python -m course_utils lab" in doctor.stdout
    assert str(tmp_path / "bare") in doctor.stdout, "doctor --here checks the Python it was started with"


def test_venv_python_per_os(monkeypatch):
    venv = PurePosixPath("/x/my course/.venv")
    assert bootstrap.venv_python(venv, windows=True) == venv / "Scripts" / "python.exe"
    assert bootstrap.venv_python(venv, windows=False) == venv / "bin" / "python"
    monkeypatch.setattr(os, "name", "nt")
    assert bootstrap.venv_python(venv).parts[-2:] == ("Scripts", "python.exe")
    monkeypatch.setattr(os, "name", "posix")
    assert bootstrap.venv_python(venv).parts[-2:] == ("bin", "python")


@pytest.mark.parametrize(
    "version, ok",
    [
        ("2.14.1", True),
        ("2.14.1+cu130", True),
        ("2.11.0", True),
        ("2.4.0", True),
        ("2.3.1", False),
        ("1.13.1", False),
        ("3.0.0", False),
        ("2.5.0a0+git1234", True),
        (None, False),
    ],
)
def test_torch_supported(version, ok):
    assert bootstrap.torch_supported(version) is ok


def fake_find(missing=()):
    return lambda name: None if name in missing else object()


def make_root(tmp_path, venv: bool, ready: bool) -> Path:
    root = tmp_path / "repo with space"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    (root / "constraints.txt").write_text("torch==2.14.1\n")
    if venv:
        python = bootstrap.venv_python(root / ".venv")
        python.parent.mkdir(parents=True)
        python.write_text("")
        if ready:
            (root / ".venv" / bootstrap.READY_STAMP).write_text(bootstrap.stamp_of(root))
    return root


def plan(root, command="test", here=False, env=None, missing=(), torch="2.14.1", prefix="/usr"):
    return bootstrap.plan(
        command,
        here=here,
        root=root,
        env=env or {},
        executable="/usr/bin/python3",
        prefix=prefix,
        windows=False,
        find=fake_find(missing),
        version=lambda name: torch if name == "torch" else "1.0",
    )


def test_bare_python_creates_the_venv_installs_with_constraints_and_reruns_inside(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    p = plan(root, missing=("torch", "torchvision"), torch=None)
    venv_py = str(root / ".venv" / "bin" / "python")
    assert p.reexec and str(p.python) == venv_py
    assert [argv for _, argv in p.steps] == [
        ["/usr/bin/python3", "-m", "venv", str(root / ".venv")],
        [venv_py, "-m", "pip", "install", "--upgrade", "pip", "setuptools>=77"],
        [venv_py, "-m", "pip", "install", "-c", "constraints.txt", "-e", ".[course]"],
    ]
    assert "creating the virtual environment" in p.steps[0][0]
    assert "constraints.txt" in p.steps[2][0]


def test_a_ready_venv_is_used_without_installing(tmp_path):
    root = make_root(tmp_path, venv=True, ready=True)
    p = plan(root, missing=("torch",), torch=None)
    assert p.reexec and p.steps == []


def test_a_changed_pyproject_or_constraints_file_reinstalls(tmp_path):
    root = make_root(tmp_path, venv=True, ready=True)
    (root / "constraints.txt").write_text("torch==2.14.2\n")
    p = plan(root, missing=("torch",), torch=None)
    assert [argv[-2:] for _, argv in p.steps] == [["pip", "setuptools>=77"], ["-e", ".[course]"]]


def test_inside_the_venv_it_runs_in_this_process(tmp_path):
    root = make_root(tmp_path, venv=True, ready=True)
    p = plan(root, prefix=str(root / ".venv"))
    assert not p.reexec and p.steps == []


def test_a_suitable_active_env_is_used_as_it_is(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    p = plan(root, torch="2.11.0+cu126")
    assert not p.reexec and p.steps == [] and str(p.python) == "/usr/bin/python3"
    assert "torch 2.11.0+cu126" in p.reason


@pytest.mark.parametrize("torch", ["2.3.1", None])
def test_an_unsuitable_env_gets_the_venv(tmp_path, torch):
    root = make_root(tmp_path, venv=False, ready=False)
    assert plan(root, torch=torch, missing=() if torch else ("torch",)).reexec


def test_course_env_venv_forces_the_venv(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    assert plan(root, env={"COURSE_ENV": "venv"}).reexec


@pytest.mark.parametrize("how", ["flag", "env"])
def test_here_installs_only_what_is_missing_without_constraints(tmp_path, how):
    root = make_root(tmp_path, venv=False, ready=False)
    p = plan(
        root,
        here=how == "flag",
        env={"COURSE_ENV": "here"} if how == "env" else {},
        missing=("nbval", "papermill"),
        torch="2.6.0",
    )
    assert not p.reexec
    ((what, argv),) = p.steps
    assert argv == ["/usr/bin/python3", "-m", "pip", "install", "-e", ".[course]", "torch==2.6.0"]
    assert "-c" not in argv and "nbval, papermill" in what and "torch 2.6.0 included" in what


def test_here_without_a_suitable_torch_lets_pip_choose_one(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    for torch in (None, "2.1.0"):
        ((_, argv),) = plan(
            root, here=True, missing=("torch",) if torch is None else ("nbval",), torch=torch
        ).steps
        assert argv[-2:] == ["-e", ".[course]"]


def test_here_with_everything_installed_does_nothing(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    assert plan(root, here=True).steps == []


def test_bad_course_env_is_refused(tmp_path):
    root = make_root(tmp_path, venv=False, ready=False)
    with pytest.raises(ValueError, match="COURSE_ENV must be 'here' or 'venv'"):
        plan(root, env={"COURSE_ENV": "conda"})


def test_doctor_never_creates_or_installs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bare = make_root(tmp_path / "a", venv=False, ready=False)
    p = plan(bare, command="doctor", missing=("torch",), torch=None)
    assert not p.reexec and p.steps == []
    stale = make_root(tmp_path / "b", venv=True, ready=False)
    p = plan(stale, command="doctor", missing=("torch",), torch=None)
    assert p.reexec and p.steps == []
    p = plan(bare, command="doctor", here=True, missing=("torch",), torch=None)
    assert not p.reexec and p.steps == []


def test_run_executes_the_steps_and_reruns_with_the_same_arguments(tmp_path, monkeypatch):
    root = make_root(tmp_path, venv=False, ready=False)
    calls = []

    def fake_run(argv, cwd=None, env=None):
        calls.append((argv, cwd, (env or {}).get("COURSE_BOOTSTRAPPED")))
        if argv[1:3] == ["-m", "venv"]:
            Path(argv[3]).mkdir()
        return subprocess.CompletedProcess(argv, 3 if argv[1:3] == ["-m", "course_utils"] else 0)

    monkeypatch.setattr(bootstrap.subprocess, "run", fake_run)
    monkeypatch.setattr(bootstrap, "missing_modules", lambda command, find=None: ["torch"])
    code = bootstrap.run("test", ["test", "-x"], root=root)
    assert code == 3, "the command's exit status is passed through"
    assert [c[0][1:3] for c in calls] == [
        ["-m", "venv"],
        ["-m", "pip"],
        ["-m", "pip"],
        ["-m", "course_utils"],
    ]
    assert calls[-1][0][3:] == ["test", "-x"] and calls[-1][2] == "1"
    assert all(c[1] == root for c in calls)
    assert (root / ".venv" / bootstrap.READY_STAMP).read_text().strip() == bootstrap.stamp_of(root)


def test_a_failed_install_stops_and_writes_no_stamp(tmp_path, monkeypatch, capsys):
    root = make_root(tmp_path, venv=True, ready=False)
    monkeypatch.setattr(
        bootstrap.subprocess,
        "run",
        lambda argv, cwd=None, env=None: subprocess.CompletedProcess(argv, 1 if "-c" in argv else 0),
    )
    monkeypatch.setattr(bootstrap, "missing_modules", lambda command, find=None: ["torch"])
    assert bootstrap.run("course", ["course"], root=root) == 1
    assert not (root / ".venv" / bootstrap.READY_STAMP).exists()
    assert "nothing else was changed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the commands
def test_test_command_is_the_readmes():
    assert cli.test_command("py", ["-x"]) == [
        "py",
        "-m",
        "pytest",
        "--nbval",
        "--nbval-current-env",
        "--nbval-sanitize-with",
        "tests/nbval_sanitize.cfg",
        "--ignore-glob=tests/*.ipynb",
        "tests",
        "notebooks",
        "-x",
    ]
    readme = (ROOT / "README.md").read_text()
    assert (
        "--nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg "
        "--ignore-glob='tests/*.ipynb' tests notebooks"
    ) in " ".join(readme.replace("\\\n", " ").split())


def test_test_passes_pytests_options_and_exit_status_through(monkeypatch):
    seen = {}

    def fake_run(argv, cwd=None, env=None):
        seen.update(argv=argv, cwd=cwd, env=env)
        return subprocess.CompletedProcess(argv, 5)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    assert cli.main(["test", "-k", "packaging"]) == 5
    assert seen["argv"][-2:] == ["-k", "packaging"] and seen["cwd"] == cli.ROOT
    assert seen["env"]["COURSE_PRESET"] == "smoke"
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(cli.ROOT)


def test_course_runs_each_notebook_with_the_preset(monkeypatch, tmp_path, capsys):
    runs = []
    monkeypatch.setattr(
        cli.subprocess,
        "run",
        lambda argv, cwd=None, env=None: (
            runs.append((argv, env["COURSE_PRESET"])) or subprocess.CompletedProcess(argv, 0)
        ),
    )
    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    out = tmp_path / "out dir"
    assert cli.main(["course", "--preset", "smoke", "--out", str(out), "04", "01"]) == 0
    assert [Path(a[-2]).name for a, _ in runs] == [
        "04_three_stage_finetuning.ipynb",
        "01_resnet18_structure.ipynb",
    ]
    assert all(p == "smoke" for _, p in runs)
    argv = runs[0][0]
    assert argv[1:3] == ["-m", "papermill"] and argv[-1] == str(out / "04_three_stage_finetuning.ipynb")
    printed = capsys.readouterr().out
    assert (
        "== notebooks/04_three_stage_finetuning.ipynb (COURSE_PRESET=smoke)" in printed
        and " s -> " in printed
    )


def test_course_stops_at_the_first_failing_notebook(monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr(
        cli.subprocess,
        "run",
        lambda argv, cwd=None, env=None: runs.append(argv) or subprocess.CompletedProcess(argv, 1),
    )
    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    assert cli.main(["course", "--preset", "smoke", "--out", str(tmp_path)]) == 1
    assert len(runs) == 1


def test_unknown_notebook_is_named(monkeypatch):
    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="no notebook matches '99'"):
        cli.main(["course", "--preset", "smoke", "99"])


def test_lab_and_book(monkeypatch, capsys):
    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(
        cli.subprocess,
        "run",
        lambda argv, cwd=None, env=None: seen.append(argv) or subprocess.CompletedProcess(argv, 0),
    )
    assert cli.main(["lab", "--port", "8899"]) == 0
    assert seen[0][1:] == ["-m", "jupyterlab", str(cli.ROOT / "notebooks"), "--port", "8899"]
    if not (cli.ROOT / "course_utils" / "machinery" / "book.py").exists():
        monkeypatch.setattr(
            cli.bootstrap, "run", lambda *a, **k: pytest.fail("must not set up an env for nothing")
        )
        assert cli.main(["book", "--here"]) == 2
        assert "course_utils/machinery/book.py" in capsys.readouterr().err


def test_bench_options_reach_benchs_own_parser(monkeypatch):
    from course_utils.machinery import bench

    monkeypatch.setattr(cli.bootstrap, "run", lambda *a, **k: None)
    got = {}
    monkeypatch.setattr(bench, "main", lambda args: got.update(vars(args)))
    assert cli.main(["bench", "--repeats", "1", "--workers", "0"]) == 0
    assert got["repeats"] == 1 and got["workers"] == 0


@pytest.mark.parametrize(
    "torch, index",
    [
        ("2.13.0+cpu", "https://download.pytorch.org/whl/cpu"),
        ("2.11.0+cu126", "https://download.pytorch.org/whl/cu126"),
        ("2.14.1", None),
        ("2.5.0+git1234", None),
    ],
)
def test_here_gets_torchvision_from_the_index_its_torch_came_from(tmp_path, torch, index):
    root = make_root(tmp_path, venv=False, ready=False)
    ((_, argv),) = plan(root, here=True, missing=("torchvision",), torch=torch).steps
    assert argv[6] == f"torch=={torch}"
    assert argv[7:] == (["--extra-index-url", index] if index else [])


def test_a_wrong_course_env_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_ENV", "conda")
    assert cli.main(["doctor"]) == 2
    assert "COURSE_ENV must be 'here' or 'venv', got 'conda'" in capsys.readouterr().err
