"""Training (lesson 04): ``fit`` runs a :class:`~course_utils.finetune.Schedule` one epoch at a time.

Read :func:`fit` first: for each epoch's plan it calls :func:`~course_utils.finetune.apply_epoch` (freeze,
one learning rate per group), runs the training steps (:func:`train_epoch`, one :func:`train_step` per
batch), evaluates, and records a row of :class:`History`. What keeps a run safe and fast stays behind named
calls in :mod:`course_utils.machinery`: argument and batch checks (``guards``, ``batches``), checkpoints
(``checkpoints``), device, precision and memory (``runtime``), the NaN/inf watch (``guards``).

``fit``'s options: ``checkpoint`` — a file written atomically after every epoch; ``resume=True`` continues
from it (an existing checkpoint is never overwritten without it). ``amp`` — bf16 autocast, ``channels_last``
— the memory format (default for both: :mod:`course_utils.machinery.precision` decides per device and
model). ``compile`` — ``torch.compile`` the model. ``on_epoch_end(history)`` — called after each epoch (live
plots). ``bn_policy`` — what BatchNorm does in stages that do not set their own ``bn``: ``"train"``,
``"frozen"`` or ``"recalibrate"`` (see :mod:`course_utils.batchnorm`; a recalibration uses ``bn_batches``
training batches and is recorded in ``history.meta["bn_recalibrations"]``). ``train_loader``/``val_loader``
— any iterables of ``(images, labels)`` batches, each iterated once per epoch (a ``set_epoch`` method, if
present, is called each epoch); their first batches are checked against the model before anything changes
(:class:`~course_utils.machinery.batches.BatchError` names what is wrong and the fix).
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .batchnorm import recalibrate_bn, recalibration_groups
from .finetune import Schedule, apply_epoch, make_optimizer
from .machinery.batches import BatchError, checked_batches, loader_length
from .machinery.checkpoints import CheckpointError, atomic_write, save_checkpoint, start_or_resume
from .machinery.devices import default_device
from .machinery.guards import (
    ModelGuard,
    NonFiniteLossWatch,
    TrainingDiverged,
    check_finite_weights,
    check_fit_arguments,
    diverged,
)
from .machinery.runtime import autocast, batch_to_device, default_amp, prepare_model

__all__ = ["History", "fit", "train_epoch", "train_step", "evaluate", "predict", "seed_everything"]
__all__ += ["BatchError", "CheckpointError", "TrainingDiverged"]  # what fit raises

COLUMNS = (
    "epoch",
    "stage",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "images_per_s",
)


def fit(model: nn.Module, schedule: Schedule, train_loader, val_loader=None, *, device=None,
        checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        weight_decay: float = 1e-2, optimizer: str = "adamw", label_smoothing: float = 0.0,
        amp: bool | None = None, channels_last: bool | None = None, compile: bool = False,
        on_epoch_end=None, bn_policy: str = "train", bn_batches: int = 16) -> History:  # fmt: skip
    """Train ``model`` through ``schedule``; returns the :class:`History`, one row per epoch (options: see
    the module's docstring). However it ends, no group is left frozen and the model is in eval mode."""
    check_fit_arguments(model, schedule, label_smoothing=label_smoothing, on_epoch_end=on_epoch_end,
                        bn_policy=bn_policy, bn_batches=bn_batches)  # fmt: skip
    with ModelGuard(model) as guard:
        device = torch.device(device) if device else default_device()
        plans = schedule.plan_for(model)  # one EpochPlan per epoch: its stage, trainable groups, lr per group
        channels_last = prepare_model(model, device, channels_last, train_loader)
        opt = make_optimizer(model, weight_decay=weight_decay, optimizer=optimizer)  # all parameters, lr 0
        meta = {"schedule": schedule.to_dict(), "model": type(model).__name__, "device": str(device),
                "bn_policy": bn_policy, "bn_batches": bn_batches}  # fmt: skip
        history = start_or_resume(checkpoint, resume, model, opt, schedule, History(meta=meta), bn_policy,
                                  bn_batches)  # continues a run from its checkpoint  # fmt: skip
        todo = plans[len(history) :]
        first_val, first_train = _first_batches_checked(model, train_loader, val_loader, todo)
        step_model = torch.compile(model) if compile else model
        bar = tqdm(total=len(plans), initial=len(history), desc="轮 (epochs)", disable=not progress)
        guard.training_begins()
        for plan in todo:
            batches = first_train if plan is todo[0] else _epoch_batches(train_loader, plan.epoch)
            _recalibrate_if_due(model, plans, plan, bn_policy, train_loader, bn_batches, device,
                                channels_last, history)  # BatchNorm policy "recalibrate"  # fmt: skip
            model.train()
            apply_epoch(model, opt, plan, bn_policy)  # freeze the rest: no grad, lr 0, BatchNorm in eval mode
            batches = tqdm(batches, total=loader_length(train_loader), leave=False, disable=not progress,
                           desc=f"第 {plan.epoch} 轮 [{plan.stage}]")  # fmt: skip
            stats = train_epoch(step_model, opt, batches, device=device, amp=amp, channels_last=channels_last,
                                label_smoothing=label_smoothing, amp_model=model)  # fmt: skip
            if stats["bad_loss"] is not None:
                batch, loss = stats["bad_loss"]
                raise diverged(f"loss became {loss}", plan, checkpoint, history, batch=batch)
            check_finite_weights(model, plan, checkpoint, history)
            amp = stats["amp"]
            val_loss = val_acc = None
            if val_loader is not None:
                val_loss, val_acc = evaluate(model, first_val or val_loader, device, amp)
                first_val = None
            history.append({"epoch": plan.epoch, "stage": plan.stage, **stats["row"], "val_loss": val_loss,
                            "val_acc": val_acc, "lr": dict(plan.lr),
                            "seconds": time.perf_counter() - stats["start"]})  # fmt: skip
            if checkpoint:
                save_checkpoint(checkpoint, model, opt, history, schedule)
            _show_progress(bar, history)
            if on_epoch_end is not None:
                on_epoch_end(history)
        bar.close()
    return history


def train_epoch(
    model, optimizer, batches, *, device, amp=None, channels_last=False, label_smoothing=0.0, amp_model=None
):
    """One pass over ``batches``, a :func:`train_step` each (the inner loop of :func:`fit`). Stops at the
    first NaN/inf loss, before its step (``bad_loss = (batch, loss)``; on CUDA found a few batches late, see
    :class:`~course_utils.machinery.guards.NonFiniteLossWatch`). ``amp=None``: decided by the first batch's
    size for ``amp_model`` (default ``model``). Returns ``{"row", "amp", "bad_loss", "start"}``, ``row``
    holding ``train_loss``, ``train_acc``, ``images_per_s``."""
    watch, bad_loss = NonFiniteLossWatch(optimizer, device), None
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    start = time.perf_counter()
    for i, (images, labels) in enumerate(batches):
        images, labels = batch_to_device(images, labels, device, channels_last)
        if amp is None:
            amp = default_amp(device, images.shape[-2:], amp_model or model, channels_last)
        step = train_step(model, optimizer, images, labels, amp=amp, label_smoothing=label_smoothing,
                          check_loss=functools.partial(watch.check, batch=i))  # fmt: skip
        if step is None:  # a NaN/inf loss: this step was not taken
            bad_loss = watch.found
            break
        loss, logits = step
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    bad_loss = bad_loss or watch.first_bad()
    watch.close()
    if bad_loss is None and seen == 0:
        raise ValueError("train_loader gave no batches: is the training set smaller than one batch? "
                         "(A generator gives its batches only once: pass a loader or a list.)")  # fmt: skip
    seconds = time.perf_counter() - start
    row = {"train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
           "images_per_s": seen / seconds}  # fmt: skip
    return {"row": row, "amp": amp, "bad_loss": bad_loss, "start": start}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    amp: bool,
    label_smoothing: float = 0.0,
    check_loss=None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One optimizer step on a batch already on the model's device: forward (under bf16 autocast when
    ``amp``), cross-entropy, ``check_loss(loss)`` (``fit``'s NaN/inf check: when it returns something other
    than None, the step is not taken and ``train_step`` returns None), backward, step. Returns ``(loss,
    logits)``. :func:`course_utils.lr_finder.lr_find` takes the same step."""
    with autocast(images.device, amp):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if check_loss is not None and check_loss(loss) is not None:
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def start_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, plan, bn_policy: str = "train") -> None:
    """Training mode, then the plan's learning rates, freezing and BatchNorm policy
    (:func:`~course_utils.finetune.apply_epoch`): the start of each epoch of ``fit`` and of ``lr_find``."""
    model.train()
    apply_epoch(model, optimizer, plan, bn_policy)


def evaluate(model: nn.Module, loader, device=None, amp: bool | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``loader`` in eval mode under ``torch.inference_mode``.

    The first batch is checked against the model first (``check_batch``); ``loader`` is iterated once."""
    device = torch.device(device) if device else next(model.parameters()).device
    batches = checked_batches(model, loader, "the evaluation loader")
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if amp is None:
                amp = default_amp(device, images.shape[-2:], model)
            with autocast(device, amp):
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
    """The same random numbers (initial weights, shuffling, augmentation) on every run with ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)


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
            rows.append(
                {
                    "stage": stage,
                    "epochs": f"{first}-{last}",
                    "seconds": round(sum(r["seconds"] for r in sel), 1),
                    "train_acc": sel[-1]["train_acc"],
                    "val_acc": sel[-1]["val_acc"],
                    "best_val_acc": max(
                        (r["val_acc"] for r in sel if r["val_acc"] is not None), default=None
                    ),
                }
            )
        return rows

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(d.get("rows", []), d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(self.to_dict(), indent=1).encode()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a History JSON file ({err})") from err

    def __repr__(self):
        last = self.rows[-1] if self.rows else {}
        return f"History({len(self)} epochs, last val_acc={last.get('val_acc')})"


# ------------------------------------------------------------------------------ fit's small steps
def _epoch_batches(loader, epoch: int):
    """The loader's batches for ``epoch`` (``set_epoch`` first, if it has one: shuffling depends on the
    epoch)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return iter(loader)


def _first_batches_checked(model, train_loader, val_loader, todo):
    """``(val batches, first epoch's train batches)``, each loader's first batch checked against the model
    (``machinery.batches.check_batch``) before anything changes; ``None`` where there is nothing to do."""
    if not todo:
        return None, None
    val = checked_batches(model, val_loader, "val_loader") if val_loader is not None else None
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(todo[0].epoch)
    return val, checked_batches(model, train_loader, "train_loader")


def _recalibrate_if_due(model, plans, plan, bn_policy, loader, bn_batches, device, channels_last, history):
    """BatchNorm policy ``"recalibrate"``: before a stage's first step, re-estimate the statistics of the
    groups it unfreezes (:func:`~course_utils.batchnorm.recalibrate_bn`), recorded in ``history.meta``."""
    groups = recalibration_groups(model, plans, plan.epoch, bn_policy)
    if groups:
        done = recalibrate_bn(model, groups, loader, bn_batches, epoch=plan.epoch, device=device,
                              channels_last=channels_last)  # fmt: skip
        history.meta.setdefault("bn_recalibrations", []).append(
            {"epoch": plan.epoch, "stage": plan.stage, **done}
        )


def _show_progress(bar, history: History) -> None:
    row = history.rows[-1]
    bar.update(1)
    val_acc = "-" if row["val_acc"] is None else f"{row['val_acc']:.3f}"
    bar.set_postfix(stage=row["stage"], train_acc=f"{row['train_acc']:.3f}", val_acc=val_acc)
