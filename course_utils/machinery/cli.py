"""``python -m course_utils <command>`` (Windows: ``py -m course_utils <command>``), from the repository root.

* ``course`` — run every notebook end to end through papermill into ``output/`` (the preset and time of each);
* ``test``   — the test suite, exactly as CI runs it (``COURSE_PRESET=smoke pytest --nbval ...``);
* ``lab``    — JupyterLab on ``notebooks/``;
* ``bench``  — the plain torchvision way against the course's fast path (see :mod:`.bench`);
* ``doctor`` — one screen of findings about this machine, each with its fix;
* ``book``   — the course as one readable book (see :mod:`course_utils.machinery.book`).

With a bare Python (no torch yet) the first command creates ``.venv`` and installs the tested versions into
it, then runs there (see :mod:`.bootstrap`); ``--here`` runs in the Python you started instead, keeping
its torch. Until the environment exists this module imports the standard library only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from . import bootstrap

ROOT = bootstrap.ROOT
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg"]


def test_command(python: str | Path, extra: list[str] = (), fast: bool = False) -> list[str]:
    """The README's test command (run with ``COURSE_PRESET=smoke`` from the repository root); ``fast``: the
    contributors' quick tier, the tests not marked slow (no notebook runs, no browser)."""
    if fast:
        return [str(python), "-m", "pytest", "-m", "not slow", "tests", *extra]
    return [str(python), "-m", "pytest", *NBVAL, "--ignore-glob=tests/*.ipynb", "tests", "notebooks", *extra]


def course_command(python: str | Path, notebook: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [
        str(python),
        "-m",
        "papermill",
        "--cwd",
        str(ROOT / "notebooks"),
        "--kernel",
        "python3",
        "--progress-bar",
        str(notebook),
        str(out / notebook.name),
        *extra,
    ]


def lab_command(python: str | Path, extra: list[str] = ()) -> list[str]:
    return [str(python), "-m", "jupyterlab", str(ROOT / "notebooks"), *extra]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository root on ``PYTHONPATH`` (notebook kernels and pytest
    then import this checkout's ``course_utils`` however it was installed)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def notebooks(names: list[str]) -> list[Path]:
    found = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if not names:
        return found
    chosen = []
    for name in names:
        matches = [nb for nb in found if nb.name == name or nb.stem == name or nb.name.startswith(name)]
        if not matches:
            raise SystemExit(
                f"no notebook matches {name!r}; the notebooks are: {', '.join(nb.stem for nb in found)}"
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


# ------------------------------------------------------------------------------ the commands
def _course(args: argparse.Namespace, extra: list[str]) -> int:
    from . import presets

    env = child_env(**({"COURSE_PRESET": args.preset} if args.preset else {}))
    preset = presets.preset_name(args.preset)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for nb in notebooks(args.notebooks):
        print(f"== {nb.relative_to(ROOT).as_posix()} (COURSE_PRESET={preset})", flush=True)
        start = time.perf_counter()
        code = subprocess.run(course_command(sys.executable, nb, out, extra), cwd=ROOT, env=env).returncode
        if code:
            print(
                f"   failed after {time.perf_counter() - start:.0f} s (exit status {code}); "
                f"the partly executed notebook is {out / nb.name}",
                flush=True,
            )
            return code
        print(f"   {time.perf_counter() - start:.0f} s -> {out / nb.name}", flush=True)
    print(f"== all done in {time.perf_counter() - total:.0f} s (COURSE_PRESET={preset})", flush=True)
    return 0


def _test(args: argparse.Namespace, extra: list[str]) -> int:
    return subprocess.run(
        test_command(sys.executable, extra, fast=args.fast), cwd=ROOT, env=child_env(COURSE_PRESET="smoke")
    ).returncode


def _lab(args: argparse.Namespace, extra: list[str]) -> int:
    return subprocess.run(lab_command(sys.executable, extra), cwd=ROOT, env=child_env()).returncode


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    from . import bench

    parser = argparse.ArgumentParser(prog="python -m course_utils bench", description=BENCH_DESCRIPTION)
    bench.add_arguments(parser)
    bench.main(parser.parse_args(extra))
    return 0


def _doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from . import doctor

    return doctor.main(extra)


def _book(args: argparse.Namespace, extra: list[str]) -> int:
    import importlib

    try:
        book = importlib.import_module("course_utils.machinery.book")
    except ModuleNotFoundError as err:
        if err.name != "course_utils.machinery.book":
            raise
        print(
            "`book` needs course_utils/machinery/book.py, which this checkout does not have yet.",
            file=sys.stderr,
        )
        return 2
    return int(book.main(extra) or 0)


BENCH_DESCRIPTION = (
    "Train and evaluation images/s of the plain torchvision way (PIL transforms in a DataLoader, "
    "fp32) and of the course's path (TensorLoader + fit), on the same model, batch size and "
    "images; medians of the repeats, their ratio and peak memory."
)
COMMANDS = {
    "course": (_course, "run every notebook through papermill into output/ (preset and time per notebook)"),
    "test": (_test, "the test suite as CI runs it: COURSE_PRESET=smoke pytest --nbval ... tests notebooks"),
    "lab": (_lab, "start JupyterLab on notebooks/"),
    "bench": (_bench, "time the plain torchvision pipeline against the course's fast path"),
    "doctor": (
        _doctor,
        "check this machine: versions, device, weights, data, widgets, fonts; each with its fix",
    ),
    "book": (_book, "build the course as one book (see course_utils.machinery.book)"),
}
# options after these commands belong to the command's own parser, which needs torch: passed on as they are
PASS_THROUGH = ("bench", "book", "doctor")


def build_parser() -> argparse.ArgumentParser:
    """The command line; standard library only (bench's and book's own options are parsed inside the env)."""
    parser = argparse.ArgumentParser(
        prog="python -m course_utils",
        description="The course's commands; run from the repository root (Windows: py -m course_utils ...).",
        epilog="The first run creates .venv with the tested versions (constraints.txt) unless this Python "
        "already has a suitable torch and the course's packages. "
        "COURSE_ENV=here|venv chooses without the flag.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, add_help=name not in PASS_THROUGH
        )
        sub.set_defaults(run=func)
        sub.add_argument(
            "--here",
            action="store_true",
            help="run with the Python you started (e.g. Colab's, with its own torch): install only "
            "what is missing, keep the installed torch; no .venv",
        )
        if name == "course":
            sub.add_argument(
                "notebooks",
                nargs="*",
                help="which notebooks (e.g. 04 or 04_three_stage_finetuning); default: all, in order",
            )
            sub.add_argument(
                "--preset",
                choices=("smoke", "quick", "full"),
                help="COURSE_PRESET for every notebook (default: $COURSE_PRESET, else full on a "
                "CUDA GPU and quick otherwise)",
            )
            sub.add_argument("--out", default=str(ROOT / "output"), help="folder for the executed notebooks")
        if name == "test":
            sub.add_argument(
                "--fast",
                action="store_true",
                help="only the tests not marked slow (a few minutes; for contributors): "
                "pytest -m 'not slow' tests",
            )
            sub.epilog = "Other options are passed on to pytest (e.g. -x, -k NAME)."
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(args, extra)``: ``extra`` are the options the command passes on (pytest's, papermill's, bench's)."""
    return build_parser().parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse(argv)
    if args.command == "book" and not (ROOT / "course_utils" / "machinery" / "book.py").exists():
        return _book(args, extra)  # says that book.py is missing, before installing anything
    try:
        try:
            code = bootstrap.run(args.command, argv, here=args.here, root=ROOT)
        except ValueError as err:  # e.g. a wrong COURSE_ENV
            print(f"python -m course_utils: {err}", file=sys.stderr)
            return 2
        return args.run(args, extra) if code is None else code
    except KeyboardInterrupt:  # Ctrl-C: the child got it too; no traceback from this process
        return 130


if __name__ == "__main__":
    sys.exit(main())
