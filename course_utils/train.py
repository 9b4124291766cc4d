"""``fit``: train a model through a :class:`~course_utils.finetune.Schedule`, one epoch plan at a time.

Each epoch: set the plan's learning rates, freeze what the plan freezes (no grad, lr 0, BatchNorm in
eval mode), train, evaluate, record a row of :class:`History`, and — when asked — write a checkpoint
atomically (temporary file, fsync, rename), so a run killed at any moment resumes from its last epoch.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import devices
from .finetune import Schedule, apply_epoch, make_optimizer

COLUMNS = ("epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupted, of another model or schedule, or would be overwritten)."""


class History:
    """One row per epoch (``COLUMNS``); ``history["val_acc"]`` is a column, ``history.rows`` the rows."""

    def __init__(self, rows: list[dict] | None = None, meta: dict | None = None):
        self.rows = list(rows or [])
        self.meta = dict(meta or {})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, column: str) -> list:
        if column not in COLUMNS:
            raise KeyError(f"{column!r} is not a History column; columns are {', '.join(COLUMNS)}")
        return [row[column] for row in self.rows]

    def append(self, row: dict) -> None:
        self.rows.append({c: row.get(c) for c in COLUMNS})

    def stages(self) -> list[tuple[str, int, int]]:
        """``(stage, first_epoch, last_epoch)`` for the stages seen so far."""
        out: list[tuple[str, int, int]] = []
        for row in self.rows:
            if out and out[-1][0] == row["stage"]:
                out[-1] = (row["stage"], out[-1][1], row["epoch"])
            else:
                out.append((row["stage"], row["epoch"], row["epoch"]))
        return out

    def stage_summary(self) -> list[dict]:
        """Per stage: epochs, wall time, and train/val accuracy at its end."""
        rows = []
        for stage, first, last in self.stages():
            sel = [r for r in self.rows if first <= r["epoch"] <= last]
            rows.append({"stage": stage, "epochs": f"{first}-{last}", "seconds": round(sum(r["seconds"] for r in sel), 1),
                         "train_acc": sel[-1]["train_acc"], "val_acc": sel[-1]["val_acc"],
                         "best_val_acc": max((r["val_acc"] for r in sel if r["val_acc"] is not None), default=None)})
        return rows

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(d.get("rows", []), d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: f.write(json.dumps(self.to_dict(), indent=1).encode()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "History":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a History JSON file ({err})") from err

    def __repr__(self):
        last = self.rows[-1] if self.rows else {}
        return f"History({len(self)} epochs, last val_acc={last.get('val_acc')})"


# ------------------------------------------------------------------------------ checkpoints
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, history: History, schedule: Schedule) -> None:
    """Model, optimizer, history, schedule and RNG states, written atomically (readable with weights_only=True)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history.to_dict()),
        "schedule": json.dumps(schedule.to_dict()),
        "epoch": len(history),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["history"] = History.from_dict(json.loads(state["history"]))
        state["schedule"] = Schedule.from_dict(json.loads(state["schedule"]))
    except Exception as err:
        raise CheckpointError(f"cannot resume from {path}: not a readable course checkpoint ({err}). "
                              f"Move it away to start afresh.") from err
    return state


# ------------------------------------------------------------------------------ loops
def default_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU; ``$COURSE_DEVICE`` overrides (see :mod:`course_utils.devices`)."""
    return devices.default_device()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX.

    On other CPUs (most laptops: AVX2 only) bf16 is emulated and slower than fp32, so it stays off there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def default_amp(device: torch.device, image_size=None) -> bool:
    """``fit``/``evaluate``'s default for ``amp``: bf16 autocast wherever the hardware has bf16 (measured
    faster on CUDA and on an AVX512-BF16 CPU, same accuracy); fp32 elsewhere.

    On the CPU, not for inputs smaller than 32×32 (``image_size``: an int or ``(H, W)``): there a stride-2
    3×3 convolution meets a 1×1 map (ResNet's layer4 at 16×16 input), and oneDNN's bf16 kernel for its
    weight gradient returns NaN or infinity now and then (measured with torch 2.14.1: 16-51 of 100 steps).
    """
    device = torch.device(device)
    if not native_bf16(device):
        return False
    if device.type == "cpu" and image_size is not None:
        sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return min(sides) >= 32
    return True


def default_channels_last(model: nn.Module, device: torch.device) -> bool:
    """``fit``'s default for ``channels_last``: on CUDA always; on the CPU for ResNets (measured faster),
    not for VGG (measured slower); not on MPS, whose convolutions work in NCHW."""
    device_type = torch.device(device).type
    return device_type == "cuda" or (device_type == "cpu" and type(model).__name__.startswith("ResNet"))


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def evaluate(model: nn.Module, loader, device=None, amp: bool | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``loader`` in eval mode under ``torch.inference_mode``."""
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if amp is None:
                amp = default_amp(device, images.shape[-2:])
            with _autocast(device, amp):
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    model.train(was_training)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def predict(model: nn.Module, loader, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted, true)`` labels over ``loader``, on the CPU (for a confusion matrix)."""
    device = torch.device(device) if device else next(model.parameters()).device
    model.eval()
    preds, trues = [], []
    with torch.inference_mode():
        for images, labels in loader:
            preds.append(model(images.to(device)).argmax(1).cpu())
            trues.append(labels.cpu())
    return torch.cat(preds), torch.cat(trues)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _unfreeze_on_exit(fit_fn):
    """However ``fit`` ends — returned, diverged, or interrupted (Kernel → Interrupt) — no group is left
    frozen (``requires_grad=False``) and the model is in eval mode, not half train / half eval."""
    @functools.wraps(fit_fn)
    def wrapper(model, *args, **kwargs):
        try:
            return fit_fn(model, *args, **kwargs)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
            model.eval()
    return wrapper


@_unfreeze_on_exit
def fit(model: nn.Module, schedule: Schedule, train_loader, val_loader=None, *, device=None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        weight_decay: float = 1e-2, optimizer: str = "adamw", label_smoothing: float = 0.0,
        amp: bool | None = None, channels_last: bool | None = None, compile: bool = False,
        on_epoch_end=None) -> History:
    """Train ``model`` through ``schedule``; returns the :class:`History` (one row per epoch).

    ``train_loader``/``val_loader``: any iterables of ``(images, labels)`` batches (a ``set_epoch``
    method, if present, is called each epoch so shuffling depends only on the epoch).
    ``checkpoint``: a file written atomically after every epoch; ``resume=True`` continues from it
    (an existing checkpoint is never overwritten without ``resume=True``).
    ``amp``: bf16 autocast (default: :func:`default_amp` — on CUDA, and on CPUs with native bf16 for
    inputs of at least 32×32).
    ``channels_last`` (default: :func:`default_channels_last` — on CUDA, and for ResNets on the CPU). ``compile``: ``torch.compile`` the model.
    ``on_epoch_end(history)`` is called after each epoch (live plots).
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device else default_device()
    plans = schedule.plan_for(model)  # validates the schedule against this model before any training
    if channels_last is None:
        channels_last = default_channels_last(model, device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = make_optimizer(model, weight_decay=weight_decay, optimizer=optimizer)
    history = History(meta={"schedule": schedule.to_dict(), "model": type(model).__name__, "device": str(device)})

    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint and checkpoint.exists():
        if not resume:
            raise CheckpointError(f"checkpoint {checkpoint} already exists: pass resume=True to continue that run, "
                                  f"or choose another path (it is never overwritten by a new run)")
        state = load_checkpoint(checkpoint)
        if state["schedule"] != schedule:
            raise CheckpointError(f"checkpoint {checkpoint} was written by another schedule "
                                  f"({state['schedule'].to_dict()}); resume with that schedule or use another path")
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {checkpoint} belongs to another model: {err}") from err
        history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    elif resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path>")

    step_model = torch.compile(model) if compile else model
    epochs = tqdm(plans, desc="epochs", disable=not progress, initial=len(history), total=len(plans))
    for plan in plans[len(history):]:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(plan.epoch)
        model.train()
        apply_epoch(model, opt, plan)
        start = time.perf_counter()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        batches = tqdm(train_loader, desc=f"epoch {plan.epoch} [{plan.stage}]", leave=False, disable=not progress)
        for i, (images, labels) in enumerate(batches):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if amp is None:  # decided by the first batch's size (see default_amp)
                amp = default_amp(device, images.shape[-2:])
            with _autocast(device, amp):
                logits = step_model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                kept = f"the last good checkpoint {checkpoint} (epoch {len(history)}) is kept" if checkpoint \
                    else "no checkpoint was asked for"
                raise TrainingDiverged(f"loss became {loss.item()} in epoch {plan.epoch} ({plan.stage}), batch {i}; "
                                       f"{kept}. Lower the learning rate of this stage ({plan.lr}).")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        if seen == 0:
            raise ValueError("train_loader gave no batches: is the training set smaller than one batch?")
        # The loss is checked before each step, so the last step of an epoch could still leave NaN/inf
        # weights: never write those over the last good checkpoint.
        bad = next((n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            kept = f"the last good checkpoint {checkpoint} (epoch {len(history)}) is kept" if checkpoint \
                else "no checkpoint was asked for"
            raise TrainingDiverged(f"{bad} became NaN or infinite in epoch {plan.epoch} ({plan.stage}); {kept}. "
                                   f"Lower the learning rate of this stage ({plan.lr}).")
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, val_loader, device, amp) if val_loader is not None else (None, None)
        history.append({
            "epoch": plan.epoch, "stage": plan.stage,
            "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "val_loss": val_loss, "val_acc": val_acc, "lr": dict(plan.lr),
            "seconds": time.perf_counter() - start, "images_per_s": seen / train_seconds,
        })
        if checkpoint:
            save_checkpoint(checkpoint, model, opt, history, schedule)
        epochs.update(1)
        epochs.set_postfix(stage=plan.stage, train_acc=f"{history.rows[-1]['train_acc']:.3f}",
                           val_acc="-" if val_acc is None else f"{val_acc:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(history)
    epochs.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
