"""``python -m course_utils bench``: the plain torchvision way against the course's fast path.

In one run, on the same model, batch size, optimizer (AdamW) and images, it times

* **plain** — the way the original lesson trains: torchvision transforms on PIL images in a ``DataLoader``
  with worker processes (``RandomCrop(32, 4)`` + ``RandomHorizontalFlip``), fp32, NCHW, a textbook loop;
  the row **lesson** is the same with the lesson's full augmentation (+ ``ColorJitter`` + ``RandomRotation``);
* **course** — :func:`course_utils.train.fit` fed by :class:`course_utils.data.TensorLoader` (uint8 images
  held on the device, crop/flip/normalise as batched tensor ops), with fit's own defaults per device
  (bf16 autocast and channels_last as :func:`course_utils.machinery.precision.choose` decides — on CUDA
  both; on a CPU with native bf16 the faster of fp32/bf16 × NCHW/channels_last in a short measurement
  cached per machine, reported in the table; cuDNN autotuning; a fused AdamW step);

train steps (forward, backward, optimizer step, *including* data loading and augmentation) and evaluation
separately. The plain path runs in a process of its own (spawned, :class:`PlainProcess`), as the original
lesson would: nothing the course sets for its own process (``fit``'s allocator setting on a Linux CPU,
:func:`course_utils.machinery.devices.keep_freed_memory`; cuDNN autotuning) reaches it, and the two
processes never compute at the same time — each waits while the other one's pass runs. Each repeat is one
pass over the
images; the paths take turns (plain, lesson, course, plain, …) so a change in machine load hits them
alike; a first pass of each is a warm-up and not counted. Figures are
the medians of the repeats. The images are the CIFAR-10 the project has (a local copy, else the shipped
subset, tiled to ``--images``) or, failing that, synthetic uint8 images of the same shape — never the network.

``--accuracy EPOCHS`` answers the other question — does the fast path learn as well? — by training both
paths from the same random initialisation on the ``quick`` preset's real split, once per seed
(:func:`run_accuracy`).

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
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data as cdata
from ..finetune import Schedule, Stage
from ..models import resnet18_cbam, vgg16_cbam
from ..train import evaluate, fit
from . import checks, devices, precision
from .datafiles import DataUnavailableError
from .devices import default_device

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
        except DataUnavailableError as err:
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
        rows, eval_loader = _plain_rows(spec, device)
        memory = PeakMemory(device)
        conn.send(("ready", None))
        while (command := conn.recv()) != "stop":
            if command in ("train", "eval"):
                conn.send((command, _plain_pass(command, rows, eval_loader, memory, device)))
    except BaseException:  # the parent raises it with this traceback
        conn.send(("error", traceback.format_exc()))


def _plain_rows(spec: dict, device: torch.device) -> tuple[dict, object]:
    """``({row: (model, AdamW, training DataLoader)}, evaluation DataLoader)`` of the plain path: a fresh
    model from the same seed per row, each row's DataLoader with its augmentation (``lesson``: the full
    one)."""
    x, y = torch.from_numpy(spec["images"]), torch.from_numpy(spec["labels"])
    rows = {}
    for name, lesson in spec["rows"].items():
        torch.manual_seed(spec["seed"])
        model = MODELS[spec["model"]](num_classes=10, weights=None).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        loader = cdata.plain_loader(
            x,
            y,
            spec["batch_size"],
            train=True,
            image_size=spec["size"],
            lesson=lesson,
            num_workers=spec["workers"],
            seed=spec["seed"],
        )
        rows[name] = (model, opt, loader)
    eval_loader = cdata.plain_loader(
        x, y, spec["batch_size"], train=False, image_size=spec["size"], num_workers=spec["workers"]
    )
    return rows, eval_loader


def _plain_pass(command: str, rows: dict, eval_loader, memory: PeakMemory, device: torch.device):
    """``"train"``: ``{row: figures}`` of one training pass of every plain row; ``"eval"``: the figures of
    one evaluation pass of the plain model (figures: see :func:`_timed_pass`)."""
    if command == "train":
        return {
            name: _timed_pass(memory, device, partial(plain_train_epoch, model, loader, opt, device))
            for name, (model, opt, loader) in rows.items()
        }
    model = rows["plain"][0]
    return _timed_pass(memory, device, lambda: plain_evaluate(model, eval_loader, device)[0])


def _timed_pass(memory: PeakMemory, device: torch.device, run) -> tuple[int, float, tuple[float, float]]:
    """``(images, seconds, (peak MB, step MB))`` of one pass: ``run()`` returns the images it saw."""
    memory.reset()
    start = time.perf_counter()
    seen = run()
    _sync(device)
    return seen, time.perf_counter() - start, memory.peak()


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
            with suppress(OSError):
                self.conn.send("stop")
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
    setup = _BenchSetup.checked(
        device, model, image_size, images, repeats, batch_size, workers, threads, synthetic, seed, progress
    )
    load_start = os.getloadavg()
    # plain: a fresh model and optimizer per augmentation, DataLoader with workers, in a process of its own
    rows = {"plain": False, **({"lesson": True} if lesson else {})}
    spec = setup.plain_spec(rows)
    # course: fit over a TensorLoader; one fit epoch per repeat (+1 warm-up)
    torch.manual_seed(seed)
    course_model = MODELS[model](num_classes=10, weights=None).to(setup.device)
    # fit's defaults, resolved once here (measured on a native-bf16 CPU, or cached) so that the loader
    # hands over batches already in that layout and the table can say what was chosen and why
    choice = precision.choose(
        setup.device, course_model, image_size, batch_size, amp=amp, channels_last=channels_last
    )
    course_loader = setup.course_loader(train=True, channels_last=choice.channels_last)
    memory = PeakMemory(setup.device)
    with PlainProcess(spec) as plain_process:
        course_run = _CourseRun(course_model, choice, memory, setup)
        plain, course = _time_training(plain_process, course_run, course_loader, rows, compile)
        evaluation = _time_evaluation(plain_process, course_run)
    train = {name: _summary(p["samples"], p["mem"]) for name, p in plain.items()}
    train["course"] = _summary(course["samples"], course["mem"])
    evaluation = {name: _summary(e["samples"], e["mem"]) for name, e in evaluation.items()}
    timed_epoch = statistics.median(s for _, s in course["samples"])
    return {
        "config": setup.config(compile, choice),
        "machine": machine_info(setup.device, load_start),
        "train": train,
        "eval": evaluation,
        "ratio": _ratios(train, evaluation),
        "course_first_epoch_overhead_s": max(course["warmup_s"] - timed_epoch, 0.0),
        "memory_method": memory.method,
    }


@dataclass
class _BenchSetup:
    """What :func:`run_bench` times, checked: the device, the model's name, the images, the sizes."""

    device: torch.device
    model: str
    image_size: int
    images: torch.Tensor
    labels: torch.Tensor
    source: str  # what the images are, in words
    repeats: int
    batch_size: int
    workers: int
    seed: int
    progress: bool

    @classmethod
    def checked(
        cls,
        device,
        model,
        image_size,
        images,
        repeats,
        batch_size,
        workers,
        threads,
        synthetic,
        seed,
        progress,
    ) -> _BenchSetup:
        """Refuse what cannot be timed (before anything is built); set the thread count; get the images."""
        # no DataLoader workers from a notebook on Windows/macOS
        workers = cdata.default_num_workers() if workers is None else workers
        device = torch.device(device) if device else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA device")
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        repeats = checks.whole_number(repeats, "repeats", example="3")
        if threads:
            torch.set_num_threads(threads)
        n = images or DEFAULT_IMAGES.get(device.type, 2048)
        if n < batch_size:
            raise ValueError(f"--images {n} is less than one batch of {batch_size}")
        x, y, source = bench_images(n, synthetic, seed)
        return cls(device, model, image_size, x, y, source, repeats, batch_size, workers, seed, progress)

    @property
    def n(self) -> int:
        """Images per pass."""
        return len(self.labels)

    @property
    def size(self) -> int | None:
        """The loaders' ``image_size``: ``None`` for CIFAR's own 32 pixels (no resizing)."""
        return None if self.image_size == 32 else self.image_size

    def plain_spec(self, rows: dict) -> dict:
        """What the plain path's process needs to build its rows (:func:`_plain_process`)."""
        return {
            "device": str(self.device),
            "model": self.model,
            "seed": self.seed,
            "size": self.size,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "images": self.images.numpy(),
            "labels": self.labels.numpy(),
        }

    def course_loader(self, train: bool, channels_last: bool) -> cdata.TensorLoader:
        """The course path's loader: the images on the device, batches in the layout fit computes in."""
        extra = {"seed": self.seed} if train else {}
        return cdata.TensorLoader(
            self.images,
            self.labels,
            self.batch_size,
            train=train,
            image_size=self.size,
            device=self.device,
            channels_last=channels_last,
            **extra,
        )

    def config(self, compile: bool, choice: precision.Choice) -> dict:
        return {
            "device": str(self.device),
            "model": self.model,
            "image_size": self.image_size,
            "images": self.n,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "compile": compile,
            "course_amp": choice.amp,
            "course_channels_last": choice.channels_last,
            "precision": choice.as_dict(),
            "course_malloc": devices.malloc_state(),
            "optimizer": "AdamW",
            "threads": torch.get_num_threads(),
            "data": self.source,
            "seed": self.seed,
        }


@dataclass
class _CourseRun:
    """The course path's model, its precision choice and the memory meter, with the setup they run under."""

    model: torch.nn.Module
    choice: precision.Choice
    memory: PeakMemory
    setup: _BenchSetup


def _samples() -> dict:
    return {"samples": [], "mem": []}


def _keep(row: dict, seen: int, seconds: float, mem: tuple[float, float]) -> None:
    row["samples"].append((seen, seconds))
    row["mem"].append(mem)


def _time_training(plain_process: PlainProcess, run: _CourseRun, course_loader, rows: dict, compile: bool):
    """One fit epoch per repeat (+1 warm-up) on the course path and, after each, one pass of every plain row
    in its process (the paths take turns). Returns ``(plain, course)``: each row's samples and peaks."""
    from tqdm.auto import tqdm

    setup, memory = run.setup, run.memory
    plain = {name: _samples() for name in rows}
    course = {**_samples(), "warmup_s": None}
    bar = tqdm(total=(1 + setup.repeats) * (len(plain) + 1), desc="bench train", disable=not setup.progress)

    def after_course_epoch(history) -> None:
        seen = len(course_loader) * setup.batch_size  # drop_last: every batch is full
        train_seconds = seen / history.rows[-1]["images_per_s"]  # fit's own timing of its training loop
        if len(history) == 1:
            course["warmup_s"] = train_seconds
        else:
            _keep(course, seen, train_seconds, memory.peak())
        bar.update(1)
        # the memory fit keeps between its steps goes back to the kernel while the other process trains,
        # as it would be without the course's setting (on a VM, pages another process holds must be
        # faulted in from the host: slower)
        devices.release_freed_memory()
        for name, figures in plain_process.train_pass().items():
            if len(history) > 1:  # the first pass is a warm-up
                _keep(plain[name], *figures)
            bar.update(1)
        memory.reset()  # for fit's next epoch

    memory.reset()
    fit(
        run.model,
        Schedule([Stage("bench", 1 + setup.repeats, "all", LR)]),
        course_loader,
        None,
        device=setup.device,
        progress=False,
        amp=run.choice.amp,
        channels_last=run.choice.channels_last,
        compile=compile,
        on_epoch_end=after_course_epoch,
    )
    bar.close()
    return plain, course


def _time_evaluation(plain_process: PlainProcess, run: _CourseRun) -> dict:
    """Evaluation: the plain DataLoader without augmentation + no_grad (the plain model, in its process) vs
    fit's evaluate on an eval TensorLoader, taking turns; ``{path: samples and peaks}``."""
    from tqdm.auto import tqdm

    setup = run.setup
    loader = setup.course_loader(train=False, channels_last=run.choice.channels_last)
    ev = {"plain": _samples(), "course": _samples()}

    def course_pass() -> int:
        evaluate(run.model, loader, setup.device, run.choice.amp)
        return setup.n

    devices.keep_freed_memory(setup.device)  # as inside fit, which evaluates between its epochs
    for r in tqdm(range(1 + setup.repeats), desc="bench eval", disable=not setup.progress):
        devices.release_freed_memory()
        plain_figures = plain_process.eval_pass()
        course_figures = _timed_pass(run.memory, setup.device, course_pass)
        if r:  # the first pass is a warm-up
            _keep(ev["plain"], *plain_figures)
            _keep(ev["course"], *course_figures)
    devices.release_freed_memory()
    return ev


def _ratios(train: dict, evaluation: dict) -> dict:
    """Course / plain images per second: training, evaluation, and training against the lesson's row."""
    speed = {name: row["images_per_s"] for name, row in train.items()}
    ratio = {
        "train": speed["course"] / speed["plain"],
        "eval": evaluation["course"]["images_per_s"] / evaluation["plain"]["images_per_s"],
    }
    if "lesson" in speed:
        ratio["train_vs_lesson"] = speed["course"] / speed["lesson"]
    return ratio


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

    # no DataLoader workers from a notebook on Windows/macOS
    workers = cdata.default_num_workers() if workers is None else workers
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
        results["plain"].append(
            _plain_accuracy(plain_model, data, epochs, batch_size, workers, seed, device, bar)
        )
        results["course"].append(
            _course_accuracy(course_model, data, epochs, batch_size, seed, device, choice, bar)
        )
    bar.close()
    summary = {name: _accuracy_summary(accs) for name, accs in results.items()}
    return {
        "config": _accuracy_config(device, model, epochs, seeds, batch_size, data, choice),
        "machine": machine_info(device),
        "accuracy": summary,
        "difference": summary["course"]["mean"] - summary["plain"]["mean"],
    }


def _plain_accuracy(model, data, epochs: int, batch_size: int, workers: int, seed: int, device, bar) -> float:
    """The plain path's validation accuracy after ``epochs``: PIL transforms in a DataLoader, fp32, AdamW,
    the textbook loop."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    train_loader = cdata.plain_loader(
        data.train_images, data.train_labels, batch_size, train=True, num_workers=workers, seed=seed
    )
    val_loader = cdata.plain_loader(data.val_images, data.val_labels, 256, num_workers=workers)
    for _ in range(epochs):
        plain_train_epoch(model, train_loader, opt, device)
        bar.update(1)
    return plain_evaluate(model, val_loader, device)[1]


def _course_accuracy(model, data, epochs: int, batch_size: int, seed: int, device, choice, bar) -> float:
    """The course path's validation accuracy after ``epochs``: fit on TensorLoaders with its defaults."""
    train_fast, val_fast = cdata.make_loaders(
        data, batch_size, device=device, seed=seed, channels_last=choice.channels_last
    )
    history = fit(
        model,
        Schedule([Stage("all", epochs, "all", LR)]),
        train_fast,
        val_fast,
        device=device,
        progress=False,
        amp=choice.amp,
        channels_last=choice.channels_last,
        on_epoch_end=lambda h: bar.update(1),
    )
    return history.rows[-1]["val_acc"]


def _accuracy_summary(accs: list[float]) -> dict:
    return {
        "val_acc": accs,
        "mean": statistics.mean(accs),
        "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
    }


def _accuracy_config(device, model: str, epochs: int, seeds: int, batch_size: int, data, choice) -> dict:
    return {
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
    lines += _speed_rows(result["train"], names)
    lines += ["", f"{'':32s} {'eval img/s':>12s}"]
    enames = {"plain": "plain: DataLoader, no_grad", "course": "course: evaluate (inference_mode)"}
    lines += _speed_rows(result["eval"], enames)
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


def _speed_rows(rows: dict, names: dict) -> list[str]:
    """One table line per path: images/s, ratio to the plain path, peak and step memory."""
    base = rows["plain"]["images_per_s"]
    return [
        f"{names[key]:32s} {row['images_per_s']:12.0f} {row['images_per_s'] / base:6.2f}x "
        f"{row['peak_mb']:9.0f} {row['step_mb']:8.0f}"
        for key, row in rows.items()
    ]


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
