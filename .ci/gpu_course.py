"""The whole course at full size on one GPU, in one call of at most 10 minutes (run by ``.ci/gpu_course.sh``).

Steps, in order of value, each with a time budget; a step that no longer fits is skipped with a note:

1. ``setup``     — the full CIFAR-10 training split in torchvision's layout, built from the JPEG tar with
                   the shipped subset's 1,000 validation images held out (``datafiles.build_local_copy``), in
                   ``<work>/data`` (``COURSE_DATA`` for every later step); checks ``load_cifar10`` reports
                   the local copy; registers an ipykernel for papermill;
2. ``bench``     — ``python -m course_utils bench --device cuda`` (plain DataLoader way vs the course's path);
3. ``schedule``  — the lesson's 50-epoch three-stage schedule: ResNet18+CBAM, CIFAR stem, 32×32, batch 128,
                   ~49,000 real images, validation on the 1,000 held-out images each epoch, timed;
4. ``notebooks`` — all six notebooks with ``COURSE_PRESET=full`` through papermill, each timed (``--parallel``
                   at once; on one GPU several notebooks together fill the gaps of one another's kernel launches);
5. ``schedule_compiled``, ``bench_compiled`` — the same with ``torch.compile``.

Writes ``<out>/figures.json`` (after every step, so a killed run still leaves its figures) and
``<out>/notebooks.tar.gz`` (the executed notebooks), then prints PASS/FAIL against ``TARGETS``.
``--tiny``: the same steps on the CPU at tiny sizes (CI): the local copy is built from a tiny JPEG tar
re-packed from the shipped subset (200 + 100 images, its ``val/`` images held out), the CIFAR stem, the
``full`` preset of every notebook with papermill ``-p`` size overrides; no ``torch.compile`` steps.
Exit status: 0 when every step that ran worked (targets missed or not), 1 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
KERNEL = "course-gpu"
# (figure key, comparison, limit, what) — the targets, for the full size on one H200.
TARGETS = [
    ("schedule.seconds", "<=", 60.0, "the lesson's 50 epochs (eager) in at most 60 s"),
    ("bench.train_ratio", ">=", 5.0, "course path at least 5x the plain DataLoader way in train images/s"),
    ("notebooks.seconds", "<=", 480.0, "all six notebooks at full in at most 8 minutes together"),
]
STEPS = ("setup", "bench", "schedule", "notebooks", "schedule_compiled", "bench_compiled")
# Seconds each step may take at most (full size), and what it needs at least to be worth starting.
BUDGET = {"setup": (90, 5), "bench": (75, 30), "schedule": (150, 40), "notebooks": (480, 60),
          "schedule_compiled": (180, 60), "bench_compiled": (120, 45)}
TINY = {  # sizes of --tiny, on the CPU
    "jpeg_tar": {"train_per_class": 20, "val_per_class": 10},  # 200 + 100 images from the shipped subset
    "schedule": {"train_size": 128, "val_size": 64, "epochs": (1, 1, 1), "batch_size": 64},
    "bench": ["--images", "128", "--repeats", "1", "--batch-size", "64", "--workers", "0", "--no-lesson"],
    "notebook": {"TRAIN_SIZE": 64, "VAL_SIZE": 64, "BATCH_SIZE": 32, "EPOCHS": [1, 1, 1], "TUNE_EPOCHS": 1},
    "05_homework_vgg16_cbam.ipynb": {"TRAIN_SIZE": 32, "VAL_SIZE": 32, "BATCH_SIZE": 16},
    # no BATCH_SIZE parameter: full's batch of 128 needs 128 images for one (drop_last) training batch
    "02_cbam_placement.ipynb": {"TRAIN_SIZE": 128},
    "03_differential_lr.ipynb": {"TRAIN_SIZE": 128},
}
TINY_STEPS = ("setup", "bench", "schedule", "notebooks")  # torch.compile on a CPU takes minutes: not in CI


def get(figures: dict, key: str):
    for part in key.split("."):
        if not isinstance(figures, dict) or part not in figures:
            return None
        figures = figures[part]
    return figures


def verdicts(figures: dict) -> list[dict]:
    """Each target with its measured value and ``PASS`` / ``FAIL`` / ``NOT MEASURED``."""
    out = []
    for key, op, limit, what in TARGETS:
        value = get(figures, key)
        if not isinstance(value, (int, float)):
            verdict = "NOT MEASURED"
        else:
            verdict = "PASS" if (value <= limit if op == "<=" else value >= limit) else "FAIL"
        out.append({"target": what, "key": key, "limit": f"{op} {limit:g}", "value": value, "verdict": verdict})
    return out


def notebook_parameters(path: Path) -> set[str]:
    """The names the notebook's ``parameters`` cell assigns."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    (cell,) = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    return {t.id for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def notebook_overrides(path: Path, tiny: bool, results: Path) -> dict:
    names = notebook_parameters(path)
    params = {"PRESET": "full"}
    if "RESULTS_DIR" in names:
        params["RESULTS_DIR"] = str(results)  # a fresh folder: full runs are trained, never read from a cache
    if tiny:
        sizes = {**TINY["notebook"], **TINY.get(path.name, {})}
        if "TUNE_EPOCHS" in names or path.name.startswith("03"):  # these notebooks' EPOCHS is one number
            sizes["EPOCHS"] = 1
        params.update({k: v for k, v in sizes.items() if k in names})
    return params


class Run:
    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.deadline = time.monotonic() + args.budget
        self.figures: dict = {"mode": "tiny (CPU)" if self.tiny else "full", "budget_s": args.budget,
                              "steps": {}, "notes": []}
        self.env = dict(os.environ, COURSE_DATA=str(self.work / "data"), COURSE_OFFLINE="1", PYTHONUNBUFFERED="1",
                        JUPYTER_PATH=str(self.work / "jupyter" / "share" / "jupyter"))
        self.env.pop("MPLBACKEND", None)  # the kernel sets its inline backend only where none is set
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.device = "cpu" if self.tiny else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self):
        self.figures["verdicts"] = verdicts(self.figures)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "figures.json").write_text(json.dumps(self.figures, indent=1, default=str) + "\n")

    def subprocess(self, cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
        """Run ``cmd`` with its output into ``log`` (and echoed); ``(returncode or None if timed out, seconds)``."""
        start = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = None
        seconds = time.monotonic() - start
        print(log.read_text()[-3000:], end="", flush=True)
        return rc, seconds

    # ------------------------------------------------------------------ steps
    def setup(self, budget: float) -> dict:
        sys.path.insert(0, str(ROOT))
        os.environ["COURSE_DATA"] = self.env["COURSE_DATA"]
        from course_utils import data as cdata
        from course_utils.machinery import datafiles

        data_dir = self.work / "data"
        shipped = ROOT / "data" / datafiles.SHIPPED_SUBSET
        if self.tiny:  # a tiny JPEG tar re-packed from the shipped subset (bytes unchanged): quick evaluations
            source = datafiles.build_subset(shipped, self.work / "tiny-cifar10.tar.gz", **TINY["jpeg_tar"])
            held_out_tar = source
        else:
            candidates = [Path(self.args.jpeg_tar)] if self.args.jpeg_tar else [
                ROOT / ".gpu-data" / "cifar10-train-jpeg.tar.gz", ROOT.parent / "shared" / "data" /
                "cifar10-train-jpeg.tar.gz"]
            source = next((p for p in candidates if p.is_file()), None)
            if source is None:
                raise FileNotFoundError(f"no CIFAR-10 JPEG tar at {', '.join(map(str, candidates))}: "
                                        f"run `bash .ci/gpu_prepare.sh` first and carry .gpu-data")
            held_out_tar = shipped
        if data_dir.exists():
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True)
        shutil.copy(shipped, data_dir / datafiles.SHIPPED_SUBSET)
        start = time.monotonic()
        built = datafiles.build_local_copy(source, data_dir, held_out_tar=held_out_tar)
        build_s = time.monotonic() - start
        data = cdata.load_cifar10(data_dir, download=False)
        if not data.source.startswith("local copy"):
            raise RuntimeError(f"load_cifar10 did not use the local copy but {data.source}")
        held_out = datafiles.read_image_tar(held_out_tar)["val"][0]
        if sorted(map(bytes, data.val_images.flatten(1).numpy())) != sorted(map(bytes, held_out.flatten(1).numpy())):
            raise RuntimeError(f"the local copy's validation images are not {held_out_tar.name}'s val/ images")
        kernel = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(self.work / "jupyter"),
                                 "--name", KERNEL, "--display-name", "Python 3 (course GPU run)"],
                                env=self.env, capture_output=True, text=True)
        if kernel.returncode:
            raise RuntimeError(f"ipykernel install failed: {kernel.stderr[-2000:]}")
        import torch
        info = {"source": str(source.name), "built": str(built), "build_seconds": round(build_s, 1),
                "train_images": len(data.train_labels), "val_images": len(data.val_labels),
                "load_cifar10": data.source, "python": sys.version.split()[0], "torch": torch.__version__,
                "kernel": KERNEL}
        try:
            import torchvision
            info["torchvision"] = torchvision.__version__
        except ImportError:
            pass
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
        return info

    def bench(self, budget: float, compiled: bool = False) -> dict:
        json_path = self.work / f"bench{'_compiled' * compiled}.json"
        cmd = [sys.executable, "-m", "course_utils", "bench", "--device", self.device, "--no-progress",
               "--json", str(json_path)]
        cmd += TINY["bench"] if self.tiny else ["--repeats", "3"] + ["--no-lesson"] * compiled
        cmd += ["--compile"] * compiled
        rc, seconds = self.subprocess(cmd, budget, self.work / f"bench{'_compiled' * compiled}.log")
        if rc != 0:
            raise RuntimeError("timed out" if rc is None else f"bench exited with {rc}")
        result = json.loads(json_path.read_text())
        return {"train_ratio": result["ratio"]["train"], "eval_ratio": result["ratio"]["eval"],
                "course_train_images_per_s": result["train"]["course"]["images_per_s"],
                "plain_train_images_per_s": result["train"]["plain"]["images_per_s"],
                "wall_seconds": round(seconds, 1), "result": result}

    def schedule(self, budget: float, compiled: bool = False) -> dict:
        json_path = self.work / f"schedule{'_compiled' * compiled}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_schedule", "--json", str(json_path),
               "--device", self.device] + ["--compile"] * compiled + ["--tiny"] * self.tiny
        partial = json_path.with_suffix(".partial.json")
        rc, seconds = self.subprocess(cmd + ["--partial", str(partial)], budget,
                                      self.work / f"schedule{'_compiled' * compiled}.log")
        if rc != 0:
            done = json.loads(partial.read_text()) if partial.is_file() else {}
            return {"error": ("timed out" if rc is None else f"the schedule run exited with {rc}")
                    + f" after {done.get('epochs_done', 0)} epochs", "partial": done}
        return {**json.loads(json_path.read_text()), "wall_seconds": round(seconds, 1)}

    def notebooks(self, budget: float) -> dict:
        executed = self.work / "executed"
        executed.mkdir(parents=True, exist_ok=True)
        env = dict(self.env, COURSE_PRESET="full")
        # notebooks at once share the CPU cores rather than each taking them all
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.args.parallel)))
        pending = list(NOTEBOOKS)
        running: dict = {}
        results: dict = {}
        start = time.monotonic()
        end = start + budget
        while pending or running:
            while pending and len(running) < self.args.parallel:
                path = pending.pop(0)
                params = notebook_overrides(path, self.tiny, self.work / "results")
                cmd = [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "notebooks"), "--kernel", KERNEL,
                       "--no-progress-bar", "--log-output" if self.tiny else "--no-log-output", "-y",
                       json.dumps(params), str(path), str(executed / path.name)]
                log = open(self.work / f"{path.stem}.log", "w")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                running[path.name] = (proc, time.monotonic(), log, params)
            time.sleep(0.2)
            for name, (proc, t0, log, params) in list(running.items()):
                rc = proc.poll()
                if rc is None and time.monotonic() < end:
                    continue
                if rc is None:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                log.close()
                results[name] = {"seconds": round(time.monotonic() - t0, 1), "parameters": params,
                                 "status": "ok" if rc == 0 else ("out of time" if rc is None else f"failed ({rc})")}
                if rc != 0:
                    print((self.work / f"{Path(name).stem}.log").read_text()[-3000:], flush=True)
                print(f"  {name}: {results[name]['status']}, {results[name]['seconds']} s", flush=True)
                del running[name]
            if time.monotonic() >= end:
                for path in pending:
                    results[path.name] = {"status": "skipped: out of time"}
                pending = []
        wall = time.monotonic() - start
        with tarfile.open(self.out / "notebooks.tar.gz", "w:gz") as tar:
            for nb in sorted(executed.glob("*.ipynb")):
                tar.add(nb, arcname=f"notebooks/{nb.name}")
        ok = all(r["status"] == "ok" for r in results.values())
        figures = {"each": {k: results[k] for k in sorted(results)}, "parallel": self.args.parallel,
                   "wall_seconds": round(wall, 1)}
        if ok:
            figures["seconds"] = round(wall, 1)
        else:
            bad = [k for k, r in results.items() if r["status"] != "ok"]
            figures["error"] = f"not every notebook ran: {', '.join(bad)}"
        return figures

    # ------------------------------------------------------------------ driver
    def main(self) -> int:
        steps = self.args.steps.split(",") if self.args.steps else list(TINY_STEPS if self.tiny else STEPS)
        unknown = set(steps) - set(STEPS)
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}: choose from {', '.join(STEPS)}")
        self.work.mkdir(parents=True, exist_ok=True)
        failed = False
        for step in steps:
            cap, least = BUDGET[step]
            budget = self.left() - 5 if self.tiny else min(cap, self.left() - 5)
            if budget < (1 if self.tiny else least):
                note = f"{step}: skipped, {max(self.left(), 0):.0f} s left (needs at least {least} s)"
                self.figures["notes"].append(note)
                print(note, flush=True)
                continue
            print(f"=== {step} (budget {budget:.0f} s)", flush=True)
            start = time.monotonic()
            try:
                if step.startswith("bench"):
                    result = self.bench(budget, compiled=step.endswith("compiled"))
                elif step.startswith("schedule"):
                    result = self.schedule(budget, compiled=step.endswith("compiled"))
                else:
                    result = getattr(self, step)(budget)
            except Exception as err:  # noqa: BLE001 — every step's failure is recorded, the next ones still run
                result = {"error": f"{type(err).__name__}: {err}"}
                failed = True
                if step == "setup":
                    self.figures["steps"][step] = {**result, "step_seconds": round(time.monotonic() - start, 1)}
                    self.figures["notes"].append("setup failed: the other steps need its data")
                    self.save()
                    print(f"setup FAILED: {result['error']}", flush=True)
                    return 1
            failed = failed or "error" in result
            result["step_seconds"] = round(time.monotonic() - start, 1)
            self.figures["steps"][step] = result
            self.figures.update({"bench": self.figures["steps"].get("bench", {}),
                                 "schedule": self.figures["steps"].get("schedule", {}),
                                 "notebooks": self.figures["steps"].get("notebooks", {})})
            self.save()
            print(f"=== {step}: {'FAILED ' + result['error'] if 'error' in result else 'done'} "
                  f"in {result['step_seconds']} s", flush=True)
        self.save()
        print(summary(self.figures), flush=True)
        return 1 if failed else 0


def summary(figures: dict) -> str:
    lines = [f"--- {figures['mode']}: figures in figures.json"]
    for v in figures["verdicts"]:
        value = "-" if v["value"] is None else f"{v['value']:.1f}"
        lines.append(f"{v['verdict']:12s} {v['target']} (measured {value}, target {v['limit']})")
    if figures["mode"].startswith("tiny"):
        lines.append("(tiny: the targets are for the full size on one H200; here they only exercise the logic)")
    lines += [f"note: {n}" for n in figures["notes"]]
    for step, r in figures["steps"].items():
        if "error" in r:
            lines.append(f"step {step} FAILED: {r['error']}")
    return "\n".join(lines)


def run_schedule(args) -> None:
    """One timed run of the lesson's three-stage schedule (a subprocess of the driver, so it can be killed)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from course_utils import data as cdata
    from course_utils.finetune import three_stage_schedule
    from course_utils.models import resnet18_cbam
    from course_utils.train import fit

    sizes = TINY["schedule"] if args.tiny else {"train_size": None, "val_size": None, "epochs": (5, 15, 30),
                                                "batch_size": 128}
    data = cdata.load_cifar10(train_size=sizes["train_size"], val_size=sizes["val_size"], download=False)
    torch.manual_seed(0)
    model = resnet18_cbam(weights=None, stem="cifar")  # offline: random weights; the time does not depend on them
    train_loader, val_loader = cdata.make_loaders(data, sizes["batch_size"], device=args.device)
    schedule = three_stage_schedule(epochs=sizes["epochs"])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    def progress(history):  # what a run killed at its budget leaves: epochs done, and their seconds
        Path(args.partial).write_text(json.dumps({"epochs_done": len(history), "of": schedule.epochs,
                                                  "seconds_so_far": round(time.perf_counter() - start, 2),
                                                  "epoch_seconds": [round(s, 2) for s in history["seconds"]]}))

    sync()
    start = time.perf_counter()
    history = fit(model, schedule, train_loader, val_loader, device=args.device, progress=False, compile=args.compile,
                  on_epoch_end=progress if args.partial else None)
    sync()
    seconds = time.perf_counter() - start
    rate = sorted(history["images_per_s"])[len(history) // 2]
    result = {"seconds": round(seconds, 2), "epochs": schedule.epochs, "compile": args.compile,
              "train_images": len(data.train_labels), "val_images": len(data.val_labels), "data": data.source,
              "batch_size": sizes["batch_size"], "stem": "cifar",
              "first_epoch_seconds": round(history.rows[0]["seconds"], 2),
              "median_train_images_per_s": round(rate), "final_val_acc": history["val_acc"][-1],
              "stages": history.stage_summary(), "torch": torch.__version__}
    if args.device == "cuda":
        result["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(f"{schedule.epochs} epochs, {result['train_images']} train + {result['val_images']} val images, "
          f"compile={args.compile}: {seconds:.1f} s (first epoch {result['first_epoch_seconds']} s), "
          f"median {rate:.0f} train img/s, final val_acc {result['final_val_acc']:.3f}")
    Path(args.json).write_text(json.dumps(result, indent=1))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("_schedule", help=argparse.SUPPRESS)
    one.add_argument("--json", required=True)
    one.add_argument("--device", default="cuda")
    one.add_argument("--compile", action="store_true")
    one.add_argument("--tiny", action="store_true")
    one.add_argument("--partial", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps (default 540 full: a 600 s device call; 900 tiny)")
    parser.add_argument("--steps", default=None, help=f"comma-separated, in this order (default: {','.join(STEPS)})")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "output" / "gpu-course"))
    parser.add_argument("--work", default=str(ROOT / "output" / "gpu-course-work"),
                        help="build folder: data, kernel, logs, executed notebooks (default: output/gpu-course-work)")
    parser.add_argument("--jpeg-tar", default=None, help="CIFAR-10 train split as JPEG (default: .gpu-data/ "
                                                         "or ../shared/data/)")
    parser.add_argument("--parallel", type=int, default=None, help="notebooks at once (default 6 full, 1 tiny)")
    args = parser.parse_args(argv)
    if args.command is None:
        args.budget = (900 if args.tiny else 540) if args.budget is None else args.budget
        args.parallel = args.parallel or (1 if args.tiny else 6)
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.command == "_schedule":
        run_schedule(arguments)
    else:
        sys.exit(Run(arguments).main())
