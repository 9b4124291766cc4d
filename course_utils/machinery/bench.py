"""``python -m course_utils bench``: the plain torchvision way against the course's fast path.

In one run, on the same model, batch size, optimizer (AdamW) and images, it times

* **plain** — the way the original lesson trains: torchvision transforms on PIL images in a ``DataLoader``
  with worker processes (``RandomCrop(32, 4)`` + ``RandomHorizontalFlip``), fp32, NCHW, a textbook loop;
  the row **lesson** is the same with the lesson's full augmentation (+ ``ColorJitter`` + ``RandomRotation``);
* **course** — :func:`course_utils.train.fit` fed by :class:`course_utils.data.TensorLoader` (uint8 images
  held on the device, crop/flip/normalise as batched tensor ops), with fit's own defaults per device
  (bf16 autocast and channels_last as :func:`course_utils.machinery.precision.choose` decides — on CUDA both; on a CPU
  with native bf16 the faster of fp32/bf16 × NCHW/channels_last in a short measurement cached per machine,
  reported in the table; cuDNN autotuning; a fused AdamW step);

train steps (forward, backward, optimizer step, *including* data loading and augmentation) and evaluation
separately. The plain path runs in a process of its own (spawned, :class:`PlainProcess`), as the original
lesson would: nothing the course sets for its own process (``fit``'s allocator setting on a Linux CPU,
:func:`course_utils.machinery.devices.keep_freed_memory`; cuDNN autotuning) reaches it, and the two processes never
compute at the same time — each waits while the other one's pass runs. Each repeat is one pass over the
images; the paths take turns (plain, lesson, course, plain, …) so a change in machine load hits them
alike; a first pass of each is a warm-up and not counted. Figures are
the medians of the repeats. The images are the CIFAR-10 the project has (a local copy, else the shipped
subset, tiled to ``--images``) or, failing that, synthetic uint8 images of the same shape — never the network.

``--accuracy EPOCHS`` answers the other question — does the fast path learn as well? — by training both paths
from the same random initialisation on the ``quick`` preset's real split, once per seed (:func:`run_accuracy`).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the
peak resident set of the path's own process (``VmHWM`` in ``/proc/self/status``, reset before each pass
through ``/proc/self/clear_refs``; the plain path's DataLoader worker processes are not included). Where
the reset is not possible it falls back to ``resource.getrusage(...).ru_maxrss``, the peak since the process
started. ``step MB`` is the peak minus what was resident when the pass began (the plain process holds both
plain rows' models).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data as cdata
from ..finetune import Schedule, Stage
from ..models import resnet18_cbam, vgg16_cbam
from ..train import default_device, evaluate, fit
from . import devices, precision

MODELS = {"resnet18_cbam": resnet18_cbam, "vgg16_cbam": vgg16_cbam}
DEFAULT_IMAGES = {"cpu": 2048, "cuda": 10240}
LR = 1e-3


# ------------------------------------------------------------------------------ data
def bench_images(n: int, synthetic: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` uint8 (3, 32, 32) training images and labels: the project's CIFAR-10, tiled; else synthetic.

    Never downloads: a local full copy in ``data/`` if there is one, else the shipped subset.
    """
    if not synthetic:
        try:
            data = cdata.load_cifar10(download=False, verbose=False, seed=seed)
        except cdata.DataUnavailableError as err:
            print(f"bench: no CIFAR-10 at hand ({err}); using synthetic images", file=sys.stderr)
        else:
            idx = torch.arange(n) % len(data.train_labels)
            kind = "CIFAR-10" if data.full else "shipped CIFAR-10 subset"
            tiled = f", tiled {n / len(data.train_labels):.1f}x" if n > len(data.train_labels) else ""
            return (
                data.train_images[idx],
                data.train_labels[idx],
                f"{kind} ({len(data.train_labels)} images{tiled})",
            )
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % 10, "synthetic uint8 images"


# ------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one pass: CUDA allocator peak, or the process's peak RSS on the CPU (see module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (reset before each pass)"
        elif self._reset_rss():
            self.method = "peak RSS of the process, VmHWM reset via /proc/self/clear_refs before each pass"
        else:
            self.method = "resource.getrusage ru_maxrss: peak RSS since the process started (cannot reset)"
        self._base = 0.0

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def _reset_rss(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._status_kb("VmHWM") is not None
        except OSError:
            return False

    def _current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = self._status_kb("VmRSS")
        return rss / 1024 if rss is not None else 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "clear_refs" in self.method:
            self._reset_rss()
        self._base = self._current_mb()

    def peak(self) -> tuple[float, float]:
        """``(peak MB, peak MB above what was resident at reset)``."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif "clear_refs" in self.method:
            peak = self._status_kb("VmHWM") / 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return peak, max(peak - self._base, 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ the plain way
def plain_train_epoch(model, loader, optimizer, device) -> int:
    """One epoch the textbook way: fp32, NCHW, ``loss.item()`` every step. Returns the images seen."""
    model.train()
    seen, running_loss = 0, 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        seen += len(labels)
    return seen


def plain_evaluate(model, loader, device) -> tuple[int, float]:
    """Accuracy the textbook way (``torch.no_grad``). Returns ``(images seen, accuracy)``."""
    model.eval()
    seen, correct = 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            correct += (model(images).argmax(1) == labels).sum().item()
            seen += len(labels)
    return seen, correct / max(seen, 1)


def _plain_process(conn, spec: dict) -> None:
    """The plain path's process (spawned by :class:`PlainProcess`): builds the plain models, optimizers and
    DataLoaders, then answers ``"train"`` (one pass of every plain row) and ``"eval"`` until ``"stop"``."""
    try:
        torch.set_num_threads(spec["threads"])
        device = torch.device(spec["device"])
        x, y = torch.from_numpy(spec["images"]), torch.from_numpy(spec["labels"])
        rows = {}
        for name, lesson in spec["rows"].items():
            torch.manual_seed(spec["seed"])
            model = MODELS[spec["model"]](num_classes=10, weights=None).to(device)
            rows[name] = (
                model,
                torch.optim.AdamW(model.parameters(), lr=LR),
                cdata.plain_loader(
                    x,
                    y,
                    spec["batch_size"],
                    train=True,
                    image_size=spec["size"],
                    lesson=lesson,
                    num_workers=spec["workers"],
                    seed=spec["seed"],
                ),
            )
        eval_loader = cdata.plain_loader(
            x, y, spec["batch_size"], train=False, image_size=spec["size"], num_workers=spec["workers"]
        )
        memory = PeakMemory(device)
        conn.send(("ready", None))
        while (command := conn.recv()) != "stop":
            if command == "train":
                out = {}
                for name, (model, opt, loader) in rows.items():
                    memory.reset()
                    start = time.perf_counter()
                    seen = plain_train_epoch(model, loader, opt, device)
                    _sync(device)
                    out[name] = (seen, time.perf_counter() - start, memory.peak())
                conn.send(("train", out))
            elif command == "eval":
                memory.reset()
                start = time.perf_counter()
                seen, _ = plain_evaluate(rows["plain"][0], eval_loader, device)
                _sync(device)
                conn.send(("eval", (seen, time.perf_counter() - start, memory.peak())))
    except BaseException:  # the parent raises it with this traceback
        conn.send(("error", traceback.format_exc()))


class PlainProcess:
    """The plain path in a process of its own, driven pass by pass from the course's process.

    Spawned (a fresh interpreter on every OS), so that it trains as the original lesson does, in a Python
    that ``course_utils`` has configured nothing in; while it runs a pass, the caller waits on the pipe."""

    START_TIMEOUT_S = 600

    def __init__(self, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # not a daemon: its DataLoader starts worker processes of its own
        self.process = ctx.Process(
            target=_plain_process, args=(child, spec), name="bench-plain", daemon=False
        )
        self.process.start()
        child.close()
        self._receive("ready", self.START_TIMEOUT_S)

    def _receive(self, expected: str, timeout: float | None = None):
        try:
            if timeout is not None and not self.conn.poll(timeout):
                raise RuntimeError(f"bench: the plain path's process did not start within {timeout:.0f} s")
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"bench: the plain path's process ended (exit code {self.process.exitcode})"
            ) from None
        if kind == "error":
            raise RuntimeError(f"bench: the plain path failed in its process:\n{payload}")
        assert kind == expected, (kind, expected)
        return payload

    def train_pass(self) -> dict:
        """``{row: (images, seconds, (peak MB, step MB))}`` of one pass of every plain row."""
        self.conn.send("train")
        return self._receive("train")

    def eval_pass(self) -> tuple:
        self.conn.send("eval")
        return self._receive("eval")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------ the benchmark
def _summary(samples: list[tuple[int, float]], mem: list[tuple[float, float]]) -> dict:
    rates = [n / s for n, s in samples]
    return {
        "images_per_s": statistics.median(rates),
        "runs_images_per_s": rates,
        "seconds": [s for _, s in samples],
        "images": samples[0][0] if samples else 0,
        "peak_mb": max(p for p, _ in mem),
        "step_mb": max(d for _, d in mem),
    }


def run_bench(
    device: str | None = None,
    model: str = "resnet18_cbam",
    image_size: int = 32,
    images: int | None = None,
    repeats: int = 3,
    batch_size: int = 128,
    workers: int | None = None,
    lesson: bool = True,
    compile: bool = False,
    amp: bool | None = None,
    channels_last: bool | None = None,
    threads: int | None = None,
    synthetic: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Time plain vs course train steps and evaluation; returns the figures (see :func:`format_table`).

    ``amp``/``channels_last``: ``None`` = :func:`~course_utils.train.fit`'s defaults for the course path.
    """
    from tqdm.auto import tqdm

    workers = (
        cdata.default_num_workers() if workers is None else workers
    )  # none from a notebook on Windows/macOS

    device = torch.device(device) if device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    n = images or DEFAULT_IMAGES.get(device.type, 2048)
    if n < batch_size:
        raise ValueError(f"--images {n} is less than one batch of {batch_size}")
    size = None if image_size == 32 else image_size
    x, y, source = bench_images(n, synthetic, seed)
    load_start = os.getloadavg()

    def build():
        torch.manual_seed(seed)
        return MODELS[model](num_classes=10, weights=None).to(device)

    # plain: a fresh model and optimizer per augmentation, DataLoader with worker processes, in its own process
    rows = {"plain": False, **({"lesson": True} if lesson else {})}
    plain = {name: {"samples": [], "mem": []} for name in rows}
    spec = {
        "device": str(device),
        "model": model,
        "seed": seed,
        "size": size,
        "batch_size": batch_size,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "images": x.numpy(),
        "labels": y.numpy(),
    }
    # course: fit over a TensorLoader; one fit epoch per repeat (+1 warm-up)
    course_model = build()
    # fit's defaults, resolved once here (measured on a native-bf16 CPU, or cached) so that the loader
    # hands over batches already in that layout and the table can say what was chosen and why
    choice = precision.choose(
        device, course_model, image_size, batch_size, amp=amp, channels_last=channels_last
    )
    cl, course_amp = choice.channels_last, choice.amp
    course_loader = cdata.TensorLoader(
        x, y, batch_size, train=True, image_size=size, device=device, seed=seed, channels_last=cl
    )
    course = {"samples": [], "mem": [], "warmup_s": None}
    memory = PeakMemory(device)
    ev = {"plain": {"samples": [], "mem": []}, "course": {"samples": [], "mem": []}}
    with PlainProcess(spec) as plain_process:
        bar = tqdm(total=(1 + repeats) * (len(plain) + 1), desc="bench train", disable=not progress)

        def plain_pass(epoch: int) -> None:
            for name, (seen, seconds, mem) in plain_process.train_pass().items():
                if epoch > 0:
                    plain[name]["samples"].append((seen, seconds))
                    plain[name]["mem"].append(mem)
                bar.update(1)

        def after_course_epoch(history) -> None:
            seen = len(course_loader) * batch_size  # drop_last: every batch is full
            train_seconds = seen / history.rows[-1]["images_per_s"]  # fit's own timing of its training loop
            if len(history) == 1:
                course["warmup_s"] = train_seconds
            else:
                course["samples"].append((seen, train_seconds))
                course["mem"].append(memory.peak())
            bar.update(1)
            # the memory fit keeps between its steps goes back to the kernel while the other process trains,
            # as it would be without the course's setting (on a VM, pages another process holds must be
            # faulted in from the host: slower)
            devices.release_freed_memory()
            plain_pass(len(history) - 1)
            memory.reset()  # for fit's next epoch

        memory.reset()
        fit(
            course_model,
            Schedule([Stage("bench", 1 + repeats, "all", LR)]),
            course_loader,
            None,
            device=device,
            progress=False,
            amp=course_amp,
            channels_last=cl,
            compile=compile,
            on_epoch_end=after_course_epoch,
        )
        bar.close()

        # evaluation: plain DataLoader without augmentation + no_grad (the plain model, in its process),
        # vs fit's evaluate on an eval TensorLoader
        course_eval_loader = cdata.TensorLoader(
            x, y, batch_size, train=False, image_size=size, device=device, channels_last=cl
        )
        devices.keep_freed_memory(device)  # as inside fit, which evaluates between its epochs
        for r in tqdm(range(1 + repeats), desc="bench eval", disable=not progress):
            devices.release_freed_memory()
            seen, seconds, mem = plain_process.eval_pass()
            if r:
                ev["plain"]["samples"].append((seen, seconds))
                ev["plain"]["mem"].append(mem)
            memory.reset()
            start = time.perf_counter()
            evaluate(course_model, course_eval_loader, device, course_amp)
            _sync(device)
            if r:
                ev["course"]["samples"].append((n, time.perf_counter() - start))
                ev["course"]["mem"].append(memory.peak())
        devices.release_freed_memory()

    train = {name: _summary(p["samples"], p["mem"]) for name, p in plain.items()}
    train["course"] = _summary(course["samples"], course["mem"])
    evaluation = {name: _summary(e["samples"], e["mem"]) for name, e in ev.items()}
    timed_epoch = statistics.median(s for _, s in course["samples"])
    ratio = {
        "train": train["course"]["images_per_s"] / train["plain"]["images_per_s"],
        "eval": evaluation["course"]["images_per_s"] / evaluation["plain"]["images_per_s"],
    }
    if lesson:
        ratio["train_vs_lesson"] = train["course"]["images_per_s"] / train["lesson"]["images_per_s"]
    return {
        "config": {
            "device": str(device),
            "model": model,
            "image_size": image_size,
            "images": n,
            "repeats": repeats,
            "batch_size": batch_size,
            "workers": workers,
            "compile": compile,
            "course_amp": course_amp,
            "course_channels_last": cl,
            "precision": choice.as_dict(),
            "course_malloc": devices.malloc_state(),
            "optimizer": "AdamW",
            "threads": torch.get_num_threads(),
            "data": source,
            "seed": seed,
        },
        "machine": machine_info(device, load_start),
        "train": train,
        "eval": evaluation,
        "ratio": ratio,
        "course_first_epoch_overhead_s": max(course["warmup_s"] - timed_epoch, 0.0),
        "memory_method": memory.method,
    }


def run_accuracy(
    device: str | None = None,
    model: str = "resnet18_cbam",
    epochs: int = 8,
    seeds: int = 3,
    train_size: int | None = 5000,
    val_size: int | None = 1000,
    batch_size: int = 128,
    workers: int | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    progress: bool = True,
) -> dict:
    """Does the fast path learn as well as the plain one? Both train ``model`` from the same random
    initialisation for ``epochs`` at a constant AdamW learning rate on the same CIFAR-10 split (default:
    the ``quick`` preset's 5,000/1,000), once per seed; returns each path's validation accuracies and
    their mean and spread, as measured by each path's own evaluation. ``amp``/``channels_last``: the course
    path's (``None``: fit's defaults, see :mod:`course_utils.machinery.precision`)."""
    from tqdm.auto import tqdm

    workers = (
        cdata.default_num_workers() if workers is None else workers
    )  # none from a notebook on Windows/macOS

    device = torch.device(device) if device else default_device()
    data = cdata.load_cifar10(train_size=train_size, val_size=val_size, download=False, verbose=False)
    results = {"plain": [], "course": []}
    choice = precision.choose(
        device,
        MODELS[model](num_classes=10, weights=None),
        data.train_images.shape[-2:],
        batch_size,
        amp=amp,
        channels_last=channels_last,
    )
    bar = tqdm(total=2 * seeds * epochs, desc="accuracy", disable=not progress)
    for seed in range(seeds):
        torch.manual_seed(seed)
        plain_model = MODELS[model](num_classes=10, weights=None).to(device)
        course_model = MODELS[model](num_classes=10, weights=None).to(device)
        course_model.load_state_dict(plain_model.state_dict())
        # plain: PIL transforms in a DataLoader, fp32, AdamW, the textbook loop
        opt = torch.optim.AdamW(plain_model.parameters(), lr=LR)
        train_loader = cdata.plain_loader(
            data.train_images, data.train_labels, batch_size, train=True, num_workers=workers, seed=seed
        )
        val_loader = cdata.plain_loader(data.val_images, data.val_labels, 256, num_workers=workers)
        for _ in range(epochs):
            plain_train_epoch(plain_model, train_loader, opt, device)
            bar.update(1)
        results["plain"].append(plain_evaluate(plain_model, val_loader, device)[1])
        del train_loader, val_loader
        # course: fit on TensorLoaders with its defaults
        train_fast, val_fast = cdata.make_loaders(
            data, batch_size, device=device, seed=seed, channels_last=choice.channels_last
        )
        history = fit(
            course_model,
            Schedule([Stage("all", epochs, "all", LR)]),
            train_fast,
            val_fast,
            device=device,
            progress=False,
            amp=choice.amp,
            channels_last=choice.channels_last,
            on_epoch_end=lambda h: bar.update(1),
        )
        results["course"].append(history.rows[-1]["val_acc"])
    bar.close()
    summary = {
        name: {
            "val_acc": accs,
            "mean": statistics.mean(accs),
            "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        }
        for name, accs in results.items()
    }
    return {
        "config": {
            "device": str(device),
            "model": model,
            "epochs": epochs,
            "seeds": seeds,
            "lr": LR,
            "train": len(data.train_labels),
            "val": len(data.val_labels),
            "data": data.source,
            "course_amp": choice.amp,
            "course_channels_last": choice.channels_last,
            "precision": choice.as_dict(),
            "batch_size": batch_size,
        },
        "machine": machine_info(device),
        "accuracy": summary,
        "difference": summary["course"]["mean"] - summary["plain"]["mean"],
    }


def format_accuracy(result: dict) -> str:
    c, a = result["config"], result["accuracy"]
    lines = [
        f"{c['model']}, random init, {c['epochs']} epochs at AdamW lr {c['lr']:g}, {c['train']} train / "
        f"{c['val']} val images ({c['data']}), {c['seeds']} seeds, device {c['device']}",
        "",
        f"{'':34s} {'val acc mean':>12s} {'stdev':>7s}   per seed",
    ]
    names = {
        "plain": "plain: PIL DataLoader, fp32",
        "course": "course: TensorLoader + fit" + (", bf16" if c["course_amp"] else ", fp32"),
    }
    for key, row in a.items():
        lines.append(
            f"{names[key]:34s} {row['mean']:12.3f} {row['stdev']:7.3f}   "
            + " ".join(f"{v:.3f}" for v in row["val_acc"])
        )
    noise = max(a["plain"]["stdev"], a["course"]["stdev"])
    lines += ["", f"course - plain: {result['difference']:+.3f} (largest seed-to-seed stdev {noise:.3f})"]
    if "precision" in c:
        lines.append(f"course precision: {precision.Choice(**c['precision'])}")
    return "\n".join(lines)


def machine_info(device: torch.device, load_start=None) -> dict:
    info = {
        "cpu": precision.cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if load_start is not None:
        info["load_avg_start"] = round(load_start[0], 2)
        info["load_avg_end"] = round(os.getloadavg()[0], 2)
    return info


def format_table(result: dict) -> str:
    """The figures as a small text table."""
    c, m = result["config"], result["machine"]
    lines = [
        f"{c['model']} at {c['image_size']}px, batch {c['batch_size']}, {c['images']} images "
        f"({c['data']}), {c['repeats']} repeats (median), AdamW",
        f"device: {c['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; CPU: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, {c['threads']} threads",
        "",
        f"{'':32s} {'train img/s':>12s} {'ratio':>7s} {'peak MB':>9s} {'step MB':>8s}",
    ]
    names = {
        "plain": f"plain: PIL crop+flip, {c['workers']} workers",
        "lesson": "plain: lesson (+jitter+rotation)",
        "course": "course: TensorLoader + fit",
    }
    base = result["train"]["plain"]["images_per_s"]
    for key, row in result["train"].items():
        lines.append(
            f"{names[key]:32s} {row['images_per_s']:12.0f} {row['images_per_s'] / base:6.2f}x "
            f"{row['peak_mb']:9.0f} {row['step_mb']:8.0f}"
        )
    lines += ["", f"{'':32s} {'eval img/s':>12s}"]
    base = result["eval"]["plain"]["images_per_s"]
    enames = {"plain": "plain: DataLoader, no_grad", "course": "course: evaluate (inference_mode)"}
    for key, row in result["eval"].items():
        lines.append(
            f"{enames[key]:32s} {row['images_per_s']:12.0f} {row['images_per_s'] / base:6.2f}x "
            f"{row['peak_mb']:9.0f} {row['step_mb']:8.0f}"
        )
    r = result["ratio"]
    lines += [
        "",
        f"course / plain (crop+flip, same augmentation): train {r['train']:.2f}x, eval {r['eval']:.2f}x"
        + (
            f"; vs the lesson's full pipeline: train {r['train_vs_lesson']:.2f}x"
            if "train_vs_lesson" in r
            else ""
        ),
        f"course path: {'bf16 autocast' if c['course_amp'] else 'fp32'}, "
        f"{'channels_last' if c['course_channels_last'] else 'NCHW'}"
        f"{', torch.compile' if c['compile'] else ''}; first-epoch overhead "
        f"{result['course_first_epoch_overhead_s']:.1f} s (warm-up{', compilation' if c['compile'] else ''})",
        f"precision choice: {precision.Choice(**c['precision'])}" if "precision" in c else "",
        f"course process memory: {c['course_malloc']}; the plain path ran in a process of its own"
        if "course_malloc" in c
        else "",
        f"memory: {result['memory_method']}",
    ]
    # the benchmark's own threads and workers raise the load while it runs, so only the load it started
    # under says whether something else was competing for the CPU
    if "load_avg_start" in m and m["load_avg_start"] > (m["cpu_count"] or 1) / 2:
        lines.append(
            f"WARNING: the machine was busy when the benchmark began (load average "
            f"{m['load_avg_start']} on {m['cpu_count']} cores): figures may be noisy; rerun it idle"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def _on_off(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument("--model", choices=tuple(MODELS), default="resnet18_cbam")
    parser.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help=f"images per pass (default {DEFAULT_IMAGES['cpu']} on cpu, {DEFAULT_IMAGES['cuda']} on cuda)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per path; the median is reported"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the plain path (default as in the lesson: 2)",
    )
    parser.add_argument("--no-lesson", action="store_true", help="skip the lesson-augmentation row")
    parser.add_argument("--compile", action="store_true", help="torch.compile the course path's model")
    parser.add_argument(
        "--amp",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast on the course path (auto: fit's default)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="channels_last on the course path (auto: fit's default)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic uint8 images instead of CIFAR-10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--accuracy",
        type=int,
        metavar="EPOCHS",
        default=None,
        help="instead of timing: train both paths EPOCHS epochs on the quick preset's split, "
        "once per seed (--repeats seeds), and compare validation accuracy",
    )
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="also write the figures to this JSON file"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.accuracy is not None:
        result = run_accuracy(
            device=args.device,
            model=args.model,
            epochs=args.accuracy,
            seeds=args.repeats,
            batch_size=args.batch_size,
            workers=args.workers,
            amp=_on_off(args.amp),
            channels_last=_on_off(args.channels_last),
            progress=not args.no_progress,
        )
        print(format_accuracy(result))
        return _write_json(result, args.json)
    result = run_bench(
        device=args.device,
        model=args.model,
        image_size=args.image_size,
        images=args.images,
        repeats=args.repeats,
        batch_size=args.batch_size,
        workers=args.workers,
        lesson=not args.no_lesson,
        compile=args.compile,
        amp=_on_off(args.amp),
        channels_last=_on_off(args.channels_last),
        threads=args.threads,
        synthetic=args.synthetic,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(format_table(result))
    return _write_json(result, args.json)


def _write_json(result: dict, json_path: str | None) -> dict:
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"figures written to {path}")
    return result
