"""Every notebook in notebooks/: exactly one ``parameters`` cell, clean committed outputs, and a papermill
run.

The papermill run (marked ``slow``) executes each notebook with ``PRESET="smoke"`` plus smaller sizes for
whichever of ``TRAIN_SIZE`` / ``VAL_SIZE`` / ``BATCH_SIZE`` its parameters cell defines, then checks that
papermill injected them, that the printed configuration shows them, and that no cell failed. Notebooks are
found by glob, so a new one is tested without touching this file.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_BYTES = 3_000_000

# The smallest sensible sizes, for the parameters a notebook defines (smoke's own are 256-500 images).
SMALL = {"TRAIN_SIZE": 64, "VAL_SIZE": 64, "BATCH_SIZE": 32}
PER_NOTEBOOK = {  # VGG16 trains at a few dozen images per second on a CPU
    "05_homework_vgg16_cbam.ipynb": {"TRAIN_SIZE": 32, "VAL_SIZE": 32, "BATCH_SIZE": 16},
}


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def assigned(source: str) -> dict[str, object]:
    """``{name: value}`` of the top-level ``NAME = literal`` lines of a cell (value None if not a literal)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        values[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        values[target.id] = None
    return values


def output_text(nb: dict) -> str:
    """All text a notebook printed or displayed as plain text."""
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                parts.append("".join(out["text"]))
            elif "data" in out:
                parts.append("".join(out["data"].get("text/plain", "")))
    return "\n".join(parts)


def errors(nb: dict) -> list[str]:
    return [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb["cells"])
        for out in cell.get("outputs", [])
        if out["output_type"] == "error"
    ]


ids = [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_exactly_one_parameters_cell(path):
    cells = [c for c in read(path)["cells"] if "parameters" in tags(c)]
    assert len(cells) == 1, (
        f"{path.name} has {len(cells)} cells tagged 'parameters' (papermill needs exactly one)"
    )
    assert cells[0]["cell_type"] == "code"
    assert "PRESET" in assigned("".join(cells[0]["source"])), "the parameters cell should define PRESET"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_notebook_is_clean_and_small(path):
    nb = read(path)
    assert not errors(nb), f"{path.name} was committed with error outputs: {errors(nb)}"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB (limit 3 MB)"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


# What a committed output must never show: it would differ on the student's machine or look broken there.
MACHINE_SPECIFIC = {
    "an absolute path": re.compile(r"(?<![\w.])(/work/|/root/|/home/|/tmp/|/Users/|[A-Za-z]:\\\\)"),
    "a frozen progress bar": re.compile(r"\b0%\|"),
    "a widget's text repr": re.compile(r"\w+\(children=\(|ScheduleDesigner\("),
    "an ASCII banner": re.compile(r"!!!"),
}


def committed_problems(nb: dict) -> list[str]:
    """Cells tagged ``nbval-ignore-output`` (their output depends on weights, data, device, time or chance)
    must be committed without outputs; no other output may show what ``MACHINE_SPECIFIC`` names."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if "nbval-ignore-output" in tags(cell) and (cell.get("outputs") or cell.get("execution_count")):
            found.append(f"cell {i}: tagged nbval-ignore-output but committed with its output")
        text = json.dumps(cell.get("outputs", []), ensure_ascii=False)
        found += [f"cell {i}: {what}" for what, pattern in MACHINE_SPECIFIC.items() if pattern.search(text)]
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_outputs_are_the_same_on_every_machine(path):
    problems = committed_problems(read(path))
    assert not problems, (
        f"{path.name}: " + "; ".join(problems) + ". Clear those outputs: jupyter nbconvert --to notebook "
        "--inplace --TagRemovePreprocessor.enabled=True "
        "--TagRemovePreprocessor.remove_all_outputs_tags='{\"nbval-ignore-output\"}' " + str(path)
    )


def test_the_committed_output_check_finds_each_problem():
    def notebook(outputs, tagged=False):
        cell = {"cell_type": "code", "execution_count": 1, "metadata": {}, "outputs": outputs, "source": ""}
        if tagged:
            cell["metadata"]["tags"] = ["nbval-ignore-output"]
        return {"cells": [cell]}

    def stream(text):
        return [{"output_type": "stream", "name": "stdout", "text": [text]}]

    assert committed_problems(notebook(stream("device: cpu\n"))) == []
    assert "tagged" in committed_problems(notebook(stream("anything"), tagged=True))[0]
    for text, what in [
        ("subset /work/main/data/x.tar.gz", "an absolute path"),
        ("epochs:   0%|          | 0/3", "a frozen progress bar"),
        ("ScheduleDesigner(children=(HBox(", "a widget's text repr"),
        ("!!! no pretrained weights", "an ASCII banner"),
    ]:
        assert committed_problems(notebook(stream(text))) == [f"cell 0: {what}"], text


# ------------------------------------------------------------------ prose: a screen per cell, links, terms
MAX_MARKDOWN_ROWS = 30  # about a screen: rows of 100 columns, a Chinese character two columns wide
LINK = re.compile(r"\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:)([^)#\s]+)(?:#([^)\s]+))?\)")
# one term per concept (notebooks/glossary.md): variants a lesson must not use, and the term to use instead
OTHER_TERMS = {"训练计划": "日程 (schedule)", "捷径": "跳跃连接", "正确率": "准确率", "批量大小": "批次大小"}


def display_rows(text: str, columns: int = 100) -> int:
    """How many rows ``text`` takes at ``columns`` columns (East Asian wide characters count two)."""
    from course_utils.plots import text_width

    return sum(max(1, -(-text_width(line) // columns)) for line in text.splitlines())


def markdown_headings(path: Path) -> set[str]:
    """The GitHub anchors of a Markdown file's headings (what ``file.md#anchor`` may point at)."""
    from course_utils.machinery.book import github_slug

    lines = path.read_text(encoding="utf-8").splitlines()
    text = [
        re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#")) for line in lines if line.startswith("#")
    ]
    return {github_slug(heading.replace("`", "")) for heading in text}


def prose_problems(nb: dict, base: Path = NOTEBOOK_DIR) -> list[str]:
    """Markdown cells longer than about a screen, relative links to a file or heading that does not exist,
    terms other than the glossary's, and a notebook that never links the glossary."""
    found, links = [], set()
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        if display_rows(text) > MAX_MARKDOWN_ROWS:
            found.append(f"cell {i}: {display_rows(text)} rows, more than a screen ({MAX_MARKDOWN_ROWS})")
        for target, anchor in LINK.findall(text):
            links.add(target)
            file = (base / target).resolve()
            if not file.is_file():
                found.append(f"cell {i}: links to {target}, which does not exist")
            elif anchor and file.suffix == ".md" and anchor not in markdown_headings(file):
                found.append(f"cell {i}: links to {target}#{anchor}, a heading {target} does not have")
        found += [f"cell {i}: {term} (say {use})" for term, use in OTHER_TERMS.items() if term in text]
    if "glossary.md" not in links:
        found.append("no link to the glossary (glossary.md)")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_prose_fits_a_screen_links_resolve_and_uses_the_glossarys_terms(path):
    problems = prose_problems(read(path))
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_the_prose_check_finds_each_problem():
    def notebook(*texts):
        return {"cells": [{"cell_type": "markdown", "metadata": {}, "source": t} for t in texts]}

    glossary = "术语见 [术语表](glossary.md)。"
    assert prose_problems(notebook(glossary, "见 [Devices](../course_utils/README.md#devices)")) == []
    for text, what in [
        ("长" * 50 * 31, "31 rows"),
        ("[x](nowhere.md)", "does not exist"),
        ("[x](../course_utils/README.md#no-such-heading)", "a heading"),
        ("按训练计划训练", "训练计划 (say 日程"),
    ]:
        problems = prose_problems(notebook(glossary, text))
        assert len(problems) == 1 and what in problems[0], (text, problems)
    assert prose_problems(notebook("没有链接")) == ["no link to the glossary (glossary.md)"]


def smoke_parameters(path: Path, results_dir: Path) -> tuple[dict, dict]:
    """``(parameters, overrides)`` papermill injects into ``path`` for the smoke run."""
    (cell,) = [c for c in read(path)["cells"] if "parameters" in tags(c)]
    defined = assigned("".join(cell["source"]))
    overrides = {k: v for k, v in {**SMALL, **PER_NOTEBOOK.get(path.name, {})}.items() if k in defined}
    parameters = {"PRESET": "smoke", **overrides}
    if "RESULTS_DIR" in defined:
        parameters["RESULTS_DIR"] = str(results_dir)
    return parameters, overrides


def execute_smoke(path: Path, out_dir: Path) -> Path:
    """Execute ``path`` with papermill at smoke into ``out_dir``; saved runs go to ``out_dir/results``."""
    import papermill

    results = out_dir / "results"
    parameters, _ = smoke_parameters(path, results)
    before = os.environ.get("COURSE_RESULTS")
    os.environ["COURSE_RESULTS"] = str(results)  # saved runs go to tmp, not the repository
    try:
        papermill.execute_notebook(
            str(path),
            str(out_dir / path.name),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(NOTEBOOK_DIR),
            progress_bar=False,
            execution_timeout=600,
        )
    finally:
        if before is None:
            os.environ.pop("COURSE_RESULTS", None)
        else:
            os.environ["COURSE_RESULTS"] = before
    return out_dir / path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_with_papermill_overrides(path, smoke_notebooks):
    pytest.importorskip("papermill")
    out = smoke_notebooks(path)  # executed once per session (tests/test_book.py renders the same run)
    parameters, overrides = smoke_parameters(path, out.parent / "results")
    executed = read(out)
    assert not errors(executed), errors(executed)

    injected = [c for c in executed["cells"] if "injected-parameters" in tags(c)]
    assert len(injected) == 1, "papermill did not inject the parameters"
    assert assigned("".join(injected[0]["source"])) == parameters

    printed = output_text(executed)
    assert re.search(r"""['"]?preset['"]?\s*[:=]\s*['"]?smoke\b""", printed), (
        "the printed cfg does not show the smoke preset"
    )
    for name, value in overrides.items():
        key = name.lower()
        assert re.search(rf"""['"]?{key}['"]?\s*[:=]\s*{value}\b""", printed), (
            f"{name}={value} was injected but the printed cfg does not show {key} = {value}"
        )
