"""Which Python runs the course's commands, and setting it up: standard library only.

``python -m course_utils <command>`` works from the repository root with a bare Python 3.10+, on Windows,
macOS and Linux. Before anything else it picks the interpreter (:func:`plan`):

* ``--here`` (or ``COURSE_ENV=here``): the Python you started, as it is — for Colab, Kaggle or a conda/CUDA
  image that brings its own torch. Only what is missing gets installed (``pip install -e .[course]``
  without the constraints file, so pip keeps every installed package that satisfies pyproject.toml's
  ranges, and the installed torch is pinned for that install: your torch stays).
* otherwise the Python you started when it already has every package the command needs and a torch within
  the supported range (an activated conda env or virtualenv, ``/usr/bin/python3`` of a GPU image), and
  ``COURSE_ENV=venv`` was not set;
* otherwise the project's own ``.venv``: created when missing (``python -m venv .venv``), filled with the
  tested versions (``pip install -c constraints.txt -e .[course]``, again whenever pyproject.toml or
  constraints.txt change), and the command is run again inside it.

Nothing here imports a third-party package, and every command is a list of arguments (no shell), so paths
with spaces or backslashes work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = "constraints.txt"
READY_STAMP = ".course-ready"
# Keep in step with pyproject.toml (tests/test_packaging.py checks): the oldest torch the code supports.
TORCH_MIN = (2, 4)
TORCH_BELOW = (3,)
# import names the commands need: the package itself ...
BASE_MODULES = ("torch", "torchvision", "matplotlib", "ipywidgets", "tqdm")
# ... and what each command adds (the [course] extra).
COMMAND_MODULES = {
    "course": ("papermill", "ipykernel"),
    "test": ("pytest", "nbval", "papermill", "ipykernel"),
    "lab": ("jupyterlab", "ipykernel"),
    "bench": (),
    "book": (),
    "doctor": (),
}


def say(message: str) -> None:
    """What the bootstrap is doing, on stderr so that it never mixes into a command's own output."""
    print(f"[course_utils] {message}", file=sys.stderr, flush=True)


def shown(argv: list[str]) -> str:
    """A command as the user would type it in their shell (quoted where a path has spaces)."""
    return subprocess.list2cmdline(argv) if os.name == "nt" else shlex.join(argv)


def venv_python(venv: Path, windows: bool | None = None) -> Path:
    """The interpreter of the virtual environment ``venv``: ``Scripts\\python.exe`` on Windows,
    ``bin/python`` elsewhere."""
    windows = os.name == "nt" if windows is None else windows
    return venv / "Scripts" / "python.exe" if windows else venv / "bin" / "python"


def in_venv(venv: Path, prefix: str | None = None) -> bool:
    """Whether this interpreter (``sys.prefix``) is the one of ``venv``."""
    try:
        return Path(prefix or sys.prefix).resolve() == Path(venv).resolve()
    except OSError:
        return False


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` → ``(2, 14, 1)``; stops at the first part that is not a number
    (``"2.5.0a0"`` → ``(2, 5)``)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits or digits != piece:
            if digits:
                parts.append(int(digits))
            break
        parts.append(int(piece))
    return tuple(parts)


def torch_supported(version: str | None) -> bool:
    return version is not None and TORCH_MIN <= version_tuple(version) < TORCH_BELOW


def pytorch_index(torch_version: str | None) -> str | None:
    """PyTorch's wheel index a torch build came from (``2.13.0+cpu`` → ``.../whl/cpu``); ``None``: PyPI's."""
    local = (torch_version or "").partition("+")[2]
    return (
        f"https://download.pytorch.org/whl/{local}"
        if re.fullmatch(r"cpu|cu\d+|rocm[\d.]+|xpu", local)
        else None
    )


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_modules(command: str, find=importlib.util.find_spec) -> list[str]:
    """The import names ``command`` needs that this interpreter cannot import."""
    return [m for m in BASE_MODULES + COMMAND_MODULES.get(command, ()) if find(m) is None]


def install_command(python: Path | str, constrained: bool) -> list[str]:
    """``pip install`` of the course and its ``[course]`` extra, run from the repository root."""
    command = [str(python), "-m", "pip", "install"]
    if constrained:
        command += ["-c", CONSTRAINTS]
    return command + ["-e", ".[course]"]


def stamp_of(root: Path = ROOT) -> str:
    """A digest of what the installed set depends on: pyproject.toml and the constraints file."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", CONSTRAINTS):
        path = root / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


@dataclass
class Plan:
    """What :func:`run` does before the command: where it runs, and the steps that prepare it."""

    python: Path  # the interpreter that runs the command
    reexec: bool  # run ``python -m course_utils ...`` again under ``python``
    reason: str  # one line for the user
    steps: list[tuple[str, list[str]]] = field(default_factory=list)  # (what it does, argv)
    stamp: Path | None = None  # written after the steps succeed


def plan(
    command: str,
    here: bool = False,
    root: Path = ROOT,
    env: dict | None = None,
    executable: str | None = None,
    prefix: str | None = None,
    windows: bool | None = None,
    find=importlib.util.find_spec,
    version=installed_version,
) -> Plan:
    """Decide which interpreter runs ``command`` and what must be installed first (nothing is run here)."""
    env = os.environ if env is None else env
    executable = Path(executable or sys.executable)
    choice = env.get("COURSE_ENV", "").strip().lower()
    if choice not in ("", "here", "venv"):
        raise ValueError(f"COURSE_ENV must be 'here' or 'venv', got {choice!r}")
    here = here or choice == "here"
    venv = root / ".venv"
    missing = missing_modules(command, find)
    torch_version = version("torch")

    if in_venv(venv, prefix):
        return _venv_plan(executable, venv, root, reexec=False, reason=f"running in the project's {venv}")
    if here:
        return _here_plan(command, executable, missing, torch_version)
    if not missing and torch_supported(torch_version) and choice != "venv":
        return Plan(
            executable,
            reexec=False,
            reason=f"using this Python ({executable}): it has torch {torch_version} and everything "
            f"'{command}' needs (COURSE_ENV=venv uses the project's .venv instead)",
        )
    if command == "doctor" and not venv_python(venv, windows).exists():
        return Plan(executable, reexec=False, reason="no .venv yet: checking this Python")
    return _venv_plan(
        venv_python(venv, windows),
        venv,
        root,
        reexec=True,
        windows=windows,
        reason=f"using the project's virtual environment {venv}",
        executable=executable,
        create=command != "doctor",
    )


def _here_plan(command: str, executable: Path, missing: list[str], torch_version: str | None) -> Plan:
    """``--here``: this Python as it is, with only what is missing installed (its torch kept and pinned)."""
    p = Plan(executable, reexec=False, reason=f"--here: using this Python ({executable}) as it is")
    if not missing or command == "doctor":  # doctor looks, it never installs
        return p
    if torch_version and not torch_supported(torch_version):
        say(
            f"your torch {torch_version} is outside the supported range "
            f">={'.'.join(map(str, TORCH_MIN))},<{TORCH_BELOW[0]}: pip will replace it"
        )
    keep = [f"torch=={torch_version}"] if torch_supported(torch_version) else []
    if keep and "torchvision" in missing and pytorch_index(torch_version):
        # a torch from PyTorch's own index (+cpu, +cu126, ...) needs torchvision from the same index:
        # PyPI's is built against PyPI's torch and fails to load ("operator torchvision::nms does not exist")
        keep += ["--extra-index-url", pytorch_index(torch_version)]
    p.steps.append(
        (
            f"installing what is missing ({', '.join(missing)}); installed packages that fit "
            f"pyproject.toml's ranges are kept"
            + (
                f", torch {torch_version} included (pinned, so pip picks the torchvision that goes with it)"
                if keep
                else ""
            ),
            install_command(executable, False) + keep,
        )
    )
    return p


def _venv_plan(
    python: Path,
    venv: Path,
    root: Path,
    reexec: bool,
    reason: str,
    windows: bool | None = None,
    executable: Path | None = None,
    create: bool = True,
) -> Plan:
    p = Plan(python, reexec=reexec, reason=reason, stamp=venv / READY_STAMP)
    stamp_file = venv / READY_STAMP
    if not create:  # doctor looks, it never installs
        return p
    if not python.exists():
        p.steps.append(
            (
                f"creating the virtual environment {venv} (once; about 1-3 minutes with the installs)",
                [str(executable or sys.executable), "-m", "venv", str(venv)],
            )
        )
    ready = stamp_file.exists() and stamp_file.read_text().strip() == stamp_of(root)
    if not ready:
        p.steps.append(
            (
                "updating pip and setuptools inside it (setuptools 77+ reads pyproject.toml's license)",
                [str(python), "-m", "pip", "install", "--upgrade", "pip", "setuptools>=77"],
            )
        )
        p.steps.append(
            (
                f"installing the course with the tested versions ({CONSTRAINTS}: torch, torchvision, "
                f"JupyterLab, ...) into {venv}",
                install_command(python, True),
            )
        )
    return p


def run(command: str, argv: list[str], here: bool = False, root: Path = ROOT) -> int | None:
    """Prepare the interpreter for ``command``; returns the exit status of the command run again inside
    ``.venv``, or ``None`` when the command is to run in this process."""
    if os.environ.get("COURSE_BOOTSTRAPPED") and not in_venv(root / ".venv"):
        raise RuntimeError(
            f"course_utils re-ran itself but is still not inside .venv: delete {root / '.venv'} and try again"
        )
    p = plan(command, here=here, root=root)
    say(p.reason)
    for what, step in p.steps:
        say(f"{what}:\n    {shown(step)}")
        result = subprocess.run(step, cwd=root)
        if result.returncode:
            say(
                f"that failed (exit status {result.returncode}); nothing else was changed. Fix the message "
                f"above and run the same command again, or use --here to run with your own Python's packages."
            )
            return result.returncode
    if p.stamp is not None and p.steps:
        p.stamp.write_text(stamp_of(root) + "\n")
    if not p.reexec:
        return None
    child_env = dict(os.environ, COURSE_BOOTSTRAPPED="1")
    return subprocess.run([str(p.python), "-m", "course_utils", *argv], cwd=root, env=child_env).returncode
