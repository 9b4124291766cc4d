"""``.ci/gpu_course.sh``: the full-size GPU run's steps, targets and figures; ``--tiny`` runs them on the CPU.

The slow test runs the script as CI does (``--tiny``): the local copy built from the shipped subset in
torchvision's layout, the bench, the three-stage schedule with the CIFAR stem, and every notebook at its
``full`` preset through papermill — then checks the figures JSON, the executed notebooks and the PASS/FAIL
lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_course.sh"


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_course", ROOT / ".ci" / "gpu_course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = load_driver()


def figures_with(schedule=None, ratio=None, notebooks=None):
    return {
        "schedule": {} if schedule is None else {"seconds": schedule},
        "bench": {} if ratio is None else {"train_ratio": ratio},
        "notebooks": {} if notebooks is None else {"seconds": notebooks},
    }


def test_verdicts_pass_at_the_limit_fail_past_it_and_say_when_not_measured():
    by_key = lambda figures: {v["key"]: v["verdict"] for v in driver.verdicts(figures)}  # noqa: E731
    assert by_key(figures_with(60.0, 5.0, 480.0)) == {
        "schedule.seconds": "PASS",
        "bench.train_ratio": "PASS",
        "notebooks.seconds": "PASS",
    }
    assert by_key(figures_with(60.1, 4.99, 481)) == {
        "schedule.seconds": "FAIL",
        "bench.train_ratio": "FAIL",
        "notebooks.seconds": "FAIL",
    }
    assert by_key(figures_with(12.0)) == {
        "schedule.seconds": "PASS",
        "bench.train_ratio": "NOT MEASURED",
        "notebooks.seconds": "NOT MEASURED",
    }
    assert set(by_key({})) == {"schedule.seconds", "bench.train_ratio", "notebooks.seconds"}


def test_every_notebook_gets_full_and_only_parameters_its_cell_defines(tmp_path):
    assert len(driver.NOTEBOOKS) == 6
    for path in driver.NOTEBOOKS:
        defined = driver.notebook_parameters(path)
        for tiny in (False, True):
            params = driver.notebook_overrides(path, tiny, tmp_path / "results")
            assert params["PRESET"] == "full" and set(params) <= defined, path.name
            assert ("RESULTS_DIR" in params) == ("RESULTS_DIR" in defined)
        if not ({"TRAIN_SIZE", "BATCH_SIZE"} - defined):  # tiny sizes wherever the notebook has them
            assert driver.notebook_overrides(path, True, tmp_path)["TRAIN_SIZE"] <= 128


def test_steps_that_no_longer_fit_are_skipped_with_a_note(tmp_path, capsys):
    args = driver.parse(
        [
            "--tiny",
            "--budget",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "w"),
            "--steps",
            "setup,bench",
        ]
    )
    assert driver.Run(args).main() == 0
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["steps"] == {} and [n.split(":")[0] for n in figures["notes"]] == ["setup", "bench"]
    assert {v["verdict"] for v in figures["verdicts"]} == {"NOT MEASURED"}
    assert "NOT MEASURED" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown steps"):
        driver.Run(driver.parse(["--tiny", "--steps", "bench,train", "--out", str(tmp_path / "o2")])).main()


@pytest.mark.slow
def test_tiny_run_builds_the_local_copy_runs_every_step_and_reports(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PY=sys.executable, GPU_COURSE_WORK=str(work), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    figures = json.loads((out / "figures.json").read_text())
    assert figures["mode"] == "tiny (CPU)" and figures["notes"] == []
    assert list(figures["steps"]) == ["setup", "bench", "schedule", "notebooks"]

    setup = figures["steps"]["setup"]  # the real local-copy path: torchvision's layout, shipped val held out
    assert setup["load_cifar10"].startswith("local copy") and "cifar-10-batches-py" in setup["load_cifar10"]
    sizes = driver.TINY["jpeg_tar"]
    assert (setup["train_images"], setup["val_images"]) == (
        10 * sizes["train_per_class"],
        10 * sizes["val_per_class"],
    )
    assert sorted(p.name for p in (work / "data" / "cifar-10-batches-py").iterdir()) == [
        "batches.meta",
        "course_local_copy.json",
        *(f"data_batch_{k}" for k in range(1, 6)),
        "test_batch",
    ]

    schedule = figures["schedule"]
    assert (
        schedule["stem"] == "cifar" and schedule["epochs"] == 3 and schedule["data"].startswith("local copy")
    )
    assert schedule["train_images"] == driver.TINY["schedule"]["train_size"] and schedule["seconds"] > 0
    assert len(schedule["stages"]) == 3
    assert figures["bench"]["train_ratio"] > 0

    notebooks = figures["notebooks"]
    assert {name: r["status"] for name, r in notebooks["each"].items()} == {
        p.name: "ok" for p in driver.NOTEBOOKS
    }
    assert notebooks["seconds"] == notebooks["wall_seconds"] > 0
    with tarfile.open(out / "notebooks.tar.gz") as tar:
        names = sorted(m.name for m in tar.getmembers())
        assert names == [f"notebooks/{p.name}" for p in driver.NOTEBOOKS]
        nb04 = json.load(tar.extractfile("notebooks/04_three_stage_finetuning.ipynb"))
    text = "".join("".join(o.get("text", "")) for c in nb04["cells"] for o in c.get("outputs", []))
    assert "'preset': 'full'" in text and "'stem': 'cifar'" in text and "来自 local copy" in text
    assert any("image/png" in o.get("data", {}) for c in nb04["cells"] for o in c.get("outputs", [])), (
        "the executed notebook has no figures (the book shows them)"
    )

    # PASS/FAIL: recomputed from the figures, and printed as such
    assert figures["verdicts"] == driver.verdicts(figures)
    for v in figures["verdicts"]:
        assert v["verdict"] in ("PASS", "FAIL")
        assert re.search(rf"^{v['verdict']}\s+{re.escape(v['target'])}", proc.stdout, re.M), v
    assert sorted(p.name for p in out.iterdir()) == ["figures.json", "notebooks.tar.gz"]
