"""``fit``: train a model through a :class:`~course_utils.finetune.Schedule`, one epoch plan at a time.

Each epoch: set the plan's learning rates, freeze what the plan freezes (no grad, lr 0, BatchNorm in
eval mode), train, evaluate, record a row of :class:`History`, and — when asked — write a checkpoint
atomically (temporary file, fsync, rename), so a run killed at any moment resumes from its last epoch.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import random
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import check_bn_policy, recalibrate_bn, recalibration_groups
from .finetune import Schedule, apply_epoch, make_optimizer
from .machinery import devices, precision
from .machinery.precision import native_bf16  # noqa: F401  (train.native_bf16, as before)

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


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupted, of another model or schedule, or would be overwritten)."""


class BatchError(ValueError):
    """A batch does not fit the model (found by :func:`check_batch` before any training step)."""


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
        _atomic_write(path, lambda f: f.write(json.dumps(self.to_dict(), indent=1).encode()))
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


def check_writable(path: str | os.PathLike) -> None:
    """Make sure ``path`` (a checkpoint, a saved run) can be written — its folder created, a file written
    there — before any work is done; raise :class:`CheckpointError` naming the folder and the fix otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a file name: give one, e.g. {path / 'run.ckpt'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe"):
            pass
    except OSError as err:
        raise CheckpointError(
            f"cannot write {path}: its folder {folder} cannot be created or written "
            f"({type(err).__name__}: {err}). Choose a folder you can write to. "
            f"（提示：这个文件夹无法创建或写入 (folder not writable)）"
        ) from err


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer, history: History, schedule: Schedule
) -> None:
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
        raise CheckpointError(
            f"cannot resume from {path}: not a readable course checkpoint ({err}). "
            f"Move it away to start afresh."
        ) from err
    return state


# ------------------------------------------------------------------------------ loops
def default_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU; ``$COURSE_DEVICE`` overrides (see :mod:`course_utils.machinery.devices`)."""
    return devices.default_device()


def default_amp(
    device: torch.device, image_size=None, model: nn.Module | None = None, channels_last: bool | None = None
) -> bool:
    """``fit``/``evaluate``'s default for ``amp``: :func:`course_utils.machinery.precision.choose` — ``COURSE_AMP``,
    else on a CPU with native bf16 the faster of bf16/fp32 as measured for ``model`` at ``image_size``
    (cached per machine), else bf16 wherever the hardware has it natively; on the CPU never below 32×32
    (``image_size``: an int or ``(H, W)``; oneDNN's bf16 weight-gradient NaNs, see :func:`~course_utils.machinery.precision.rule_amp`).
    """
    return precision.choose(device, model, image_size, amp=None, channels_last=channels_last).amp


def default_channels_last(model: nn.Module, device: torch.device, image_size=None, batch_size=None) -> bool:
    """``fit``'s default for ``channels_last``: :func:`course_utils.machinery.precision.choose` — ``COURSE_CHANNELS_LAST``,
    else measured on a CPU with native bf16 (where ``image_size`` is known), else on CUDA always and on the
    CPU for ResNets (measured faster), not for VGG (measured slower)."""
    return precision.choose(device, model, image_size, batch_size).channels_last


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


# ------------------------------------------------------------------------------ input checks
UNNORMALISED_MAX = 20.0  # normalised CIFAR/ImageNet pixels lie within about ±3; 0–255 floats go far above


def model_in_channels(model: nn.Module) -> int | None:
    """The number of channels the model's first convolution takes (None without a convolution)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def model_num_classes(model: nn.Module) -> int | None:
    """The number of classes of the model's head: its last ``nn.Linear``'s outputs (None without one)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else None


def check_batch(
    model: nn.Module, images, labels, num_classes: int | None = None, where: str = "the batch"
) -> None:
    """Raise :class:`BatchError` (a ``ValueError``) naming what a batch holds, what ``model`` expects and the
    fix; warn when the images look like unnormalised 0–255 pixel values. ``num_classes`` defaults to the
    model's head. ``fit`` and ``evaluate`` call it on each loader's first batch, before anything changes."""

    def fail(problem: str, fix: str, hint: str):
        raise BatchError(f"{where}: {problem}. Fix: {fix}. （提示：{hint}）")

    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        fail(
            f"a batch must be (images, labels) tensors, got ({type(images).__name__}, {type(labels).__name__})",
            "give fit/evaluate a loader of (images, labels) tensor pairs, e.g. data.make_loaders(...) or a "
            "torch.utils.data.DataLoader over a dataset with transforms.ToTensor()",
            "每个 batch 应该是 (images, labels) 两个张量 (tensor)",
        )
    if images.ndim != 4:
        fail(
            f"images of shape {tuple(images.shape)}, but the model expects a 4-D batch (N, C, H, W)",
            "batch the images (a single image: images.unsqueeze(0))",
            "图像张量的形状应为 (N, C, H, W)",
        )
    if not images.is_floating_point():
        raw = " (raw pixel values 0–255)" if images.dtype == torch.uint8 else ""
        fail(
            f"images of dtype {images.dtype}{raw}, but the model expects normalised floating-point images "
            f"(torch.float32)",
            "convert and normalise them: data.TensorLoader / data.make_loaders do it for you "
            "(TensorLoader.normalize), or use transforms.ToTensor() followed by transforms.Normalize(mean, std)",
            "图像必须是归一化后的浮点张量 (float)：用 TensorLoader.normalize 或 transforms.ToTensor()",
        )
    channels = model_in_channels(model)
    if channels is not None and images.shape[1] != channels:
        nhwc = images.shape[-1] == channels
        fail(
            f"images of shape {tuple(images.shape)}: {images.shape[1]} channel{'s' * (images.shape[1] != 1)}, but "
            f"the model's first convolution expects {channels}",
            "images.permute(0, 3, 1, 2) turns (N, H, W, C) into (N, C, H, W)"
            if nhwc
            else f"give the model {channels}-channel images (grey images: images.expand(-1, {channels}, -1, -1))",
            f"通道数 (channels) 应为 {channels}，形状为 (N, C, H, W)",
        )
    if labels.ndim != 1:
        fail(
            f"labels of shape {tuple(labels.shape)}, but the model expects one class index per image, shape (N,)",
            "pass class indices (one-hot labels: labels.argmax(1))",
            "标签 (labels) 应该是每张图一个类别编号",
        )
    if len(images) != len(labels):
        fail(
            f"{len(images)} images but {len(labels)} labels in one batch",
            "the loader must yield as many labels as images",
            "一个 batch 里图像和标签的数量必须相同",
        )
    if len(labels) == 0:
        fail("an empty batch (0 images)", "drop empty batches from the loader", "batch 不能为空")
    if labels.dtype not in (torch.int64, torch.uint8):
        fail(
            f"labels of dtype {labels.dtype}, but cross-entropy needs integer class indices (torch.int64)",
            "labels.long()",
            "标签必须是整数类别编号 (torch.int64)",
        )
    num_classes = model_num_classes(model) if num_classes is None else num_classes
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        expected = f"in 0..{num_classes - 1}" if num_classes is not None else "at least 0"
        fail(
            f"labels from {low} to {high}, but the model's head has num_classes={num_classes}: labels must lie "
            f"{expected}",
            "build the model with num_classes equal to the number of classes in the data "
            "(e.g. models.resnet18_cbam(num_classes=10) for CIFAR-10), or fix the labels",
            f"标签必须在 0..num_classes-1 之间 (num_classes={num_classes})",
        )
    smallest = getattr(model, "min_image_size", None)
    if smallest and min(images.shape[-2:]) < smallest:
        fail(
            f"images of {images.shape[-2]}×{images.shape[-1]} pixels, but {type(model).__name__} needs at least "
            f"{smallest}×{smallest} (its max-pools halve the size {smallest.bit_length() - 1} times)",
            f"use larger images (data.make_loaders(..., image_size={smallest}))",
            f"图像至少要 {smallest}×{smallest}",
        )
    if not torch.isfinite(images).all():
        fail(
            "images contain NaN or infinite values",
            "check how the images were made (normalisation by a zero std?)",
            "图像中有 NaN 或无穷大",
        )
    top = float(images.abs().max())
    if top > UNNORMALISED_MAX:
        warnings.warn(
            f"{where}: the images reach {top:.0f}: they look like 0–255 pixel values, not normalised "
            f"ones (about -3..3). Training will work badly. Fix: divide by 255 and normalise "
            f"(TensorLoader.normalize, or transforms.ToTensor() + transforms.Normalize). "
            f"（提示：图像看起来没有归一化 (not normalised)）",
            UserWarning,
            stacklevel=3,
        )


def check_fit_arguments(model, schedule, *, label_smoothing: float = 0.0, on_epoch_end=None) -> None:
    """``fit``'s arguments that torch would only reject mid-epoch (or never), refused before anything changes:
    the schedule is also resolved against the model (``plan_for``: an unknown group is named)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (e.g. models.resnet18_cbam()), got {type(model).__name__}"
        )
    if not isinstance(schedule, Schedule):
        hint = (
            "wrap the stages: finetune.Schedule([...])"
            if isinstance(schedule, (list, tuple))
            else "e.g. finetune.three_stage_schedule() or finetune.Schedule([finetune.Stage(...), ...])"
        )
        raise TypeError(f"schedule must be a finetune.Schedule, got {type(schedule).__name__}: {hint}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0 <= label_smoothing <= 1
    ):
        raise ValueError(f"label_smoothing must be a number from 0 to 1 (e.g. 0.1), got {label_smoothing!r}")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(
            f"on_epoch_end must be a function called with the History after each epoch, "
            f"got {type(on_epoch_end).__name__}"
        )
    devices.malloc_setting()  # a wrong COURSE_MALLOC, refused here rather than from prepare_model
    schedule.plan_for(model)


def checked_batches(model: nn.Module, loader, where: str):
    """An iterator over ``loader`` (iterating it once) whose first batch was checked by :func:`check_batch`."""
    try:
        batches = iter(loader)
    except TypeError:
        hint = (
            " (that is the data itself: make loaders from it, data.make_loaders(data))"
            if type(loader).__name__ == "CifarData"
            else ""
        )
        raise BatchError(
            f"{where} must be an iterable of (images, labels) batches, got {type(loader).__name__}"
            f"{hint}. （提示：传入 loader，例如 data.make_loaders(data) 的返回值）"
        ) from None
    first = next(batches, None)
    if first is None:
        size = getattr(loader, "batch_size", None)
        if size is not None and getattr(loader, "drop_last", False) and _length(loader) == 0:
            raise BatchError(
                f"{where} gave no batches: batch_size={size} is more than its images, and a training "
                f"loader drops the last incomplete batch (drop_last). Lower batch_size or pass "
                f"drop_last=False. （提示：batch_size 比训练集还大）"
            )
        raise BatchError(
            f"{where} gave no batches: is the data set smaller than one batch (drop_last)? "
            f"A generator gives its batches only once: pass a loader or a list to train several "
            f"epochs. （提示：数据集比一个 batch 还小，或生成器已用完）"
        )
    images, labels = first if isinstance(first, (tuple, list)) and len(first) == 2 else (first, None)
    check_batch(model, images, labels, where=f"{where}'s first batch")
    return itertools.chain([first], batches)


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # a generator or another iterable without a length
        return None


def evaluate(model: nn.Module, loader, device=None, amp: bool | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``loader`` in eval mode under ``torch.inference_mode``.

    The first batch is checked against the model first (:func:`check_batch`); ``loader`` is iterated once."""
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


def prepare_model(
    model: nn.Module,
    device: torch.device,
    channels_last: bool | None,
    image_size=None,
    batch_size: int | None = None,
) -> bool:
    """Per-run setup of ``fit`` (and of ``lr_find``): the model on ``device``, channels-last when asked
    (default: :func:`default_channels_last` for this input size and batch size), and on a Linux CPU the
    memory of each step kept for the next (:func:`~course_utils.machinery.devices.keep_freed_memory`); returns the
    channels-last choice."""
    if channels_last is None:
        channels_last = default_channels_last(model, device, image_size, batch_size)
    devices.keep_freed_memory(device)  # on a Linux CPU: no page faults per step (see devices.py)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return channels_last


def start_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, plan, bn_policy: str = "train") -> None:
    """Per-epoch setup of ``fit`` (and of :func:`course_utils.lr_finder.lr_find`): training mode, then the
    plan's learning rates, freezing and BatchNorm policy (:func:`~course_utils.finetune.apply_epoch`)."""
    model.train()
    apply_epoch(model, optimizer, plan, bn_policy)


def batch_to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    """A training batch on ``device`` (images in channels-last memory format when asked)."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


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
    """One optimizer step of ``fit`` on a batch already on the model's device: forward under autocast,
    cross-entropy, ``check_loss(loss)`` (``fit``'s NaN/inf check, :class:`NonFiniteLossWatch`: when it
    returns something other than None, the step is not taken and ``train_step`` returns None), backward,
    step. Returns ``(loss, logits)``. :func:`course_utils.lr_finder.lr_find` takes the same step."""
    with _autocast(images.device, amp):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if check_loss is not None and check_loss(loss) is not None:
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteLossWatch:
    """Finds the first batch of an epoch whose loss is NaN or infinite, for ``fit``'s ``TrainingDiverged``.

    On the CPU the host checks each loss before its step (``check`` returns ``(batch, loss)`` at once): the
    CPU computes synchronously, so this costs nothing. On CUDA, asking the host every step would wait for
    the GPU each step and stall its queue. There, with a fused optimizer (``make_optimizer``'s AdamW), the
    check stays on the device: the optimizer's ``found_inf`` (the flag ``torch.amp.GradScaler`` uses) is set
    from the first bad batch on, and the fused step skips its update on the device, so the weights and the
    optimizer state stay exactly those after the last good batch. The host looks every ``sync_every``
    batches and at the end of the epoch (``first_bad``: one sync), so a diverged epoch stops at most
    ``sync_every`` batches late; the BatchNorm running statistics of those extra forward passes are the only
    difference from stopping at once. Without a fused optimizer (SGD; MPS) the host checks each step.
    ``DEFER_ON``: the device types that check on the device.
    """

    DEFER_ON = ("cuda",)

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, sync_every: int = 64):
        self.optimizer, self.sync_every = optimizer, sync_every
        self.defer = torch.device(device).type in self.DEFER_ON and bool(optimizer.defaults.get("fused"))
        self.losses: list[torch.Tensor] = []
        self.found: tuple[int, float] | None = None  # what the last check returned
        if self.defer:
            self.found_inf = torch.zeros((), device=device)  # 1.0 from the first bad batch on
            optimizer.found_inf = self.found_inf

    def check(self, loss: torch.Tensor, batch: int) -> tuple[int, float] | None:
        """Before the step of ``batch`` (0, 1, 2, ... in order): ``(batch, loss)`` if known to be bad, else None."""
        if not self.defer:
            self.found = None if torch.isfinite(loss) else (batch, loss.item())
            return self.found
        loss = loss.detach()
        self.losses.append(loss)
        self.found_inf.masked_fill_(~torch.isfinite(loss), 1.0)
        self.found = self.first_bad() if len(self.losses) % self.sync_every == 0 else None
        return self.found

    def first_bad(self) -> tuple[int, float] | None:
        """``(batch, loss)`` of the epoch's first non-finite loss so far, or None."""
        if not self.defer or self.found_inf.item() == 0:
            return None
        losses = torch.stack(self.losses).float().cpu()
        batch = int((~torch.isfinite(losses)).nonzero()[0])
        return batch, losses[batch].item()

    def close(self) -> None:
        """Unhook the optimizer (one with ``found_inf`` set skips every step while it is 1)."""
        if self.defer and getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf


def _kept(checkpoint: Path | None, history: History) -> str:
    """What a ``TrainingDiverged`` message says about the run's checkpoint."""
    return (
        f"the last good checkpoint {checkpoint} (epoch {len(history)}) is kept"
        if checkpoint
        else "no checkpoint was asked for"
    )


def _unfreeze_on_exit(fit_fn):
    """However ``fit`` ends — returned, diverged, or interrupted (Kernel → Interrupt) — no group is left
    frozen (``requires_grad=False``) and the model is in eval mode, not half train / half eval.

    Refused before any training step (bad arguments, a bad batch, a checkpoint that cannot be used or
    written), the model is left exactly as it was given: the same ``requires_grad`` and train/eval mode of
    every module."""
    signature = inspect.signature(fit_fn)

    @functools.wraps(fit_fn)
    def wrapper(model, *args, **kwargs):
        bound = signature.bind(model, *args, **kwargs)
        bound.apply_defaults()
        check_fit_arguments(
            **{k: bound.arguments[k] for k in ("model", "schedule", "label_smoothing", "on_epoch_end")}
        )
        requires = [p.requires_grad for p in model.parameters()]
        modes = [m.training for m in model.modules()]
        try:
            history = fit_fn(model, *args, **kwargs)
        except (BatchError, CheckpointError):
            devices.release_freed_memory()
            for p, required in zip(model.parameters(), requires):
                p.requires_grad_(required)
            for m, training in zip(model.modules(), modes):
                m.training = training
            raise
        except BaseException:
            _unfreeze(model)
            devices.release_freed_memory()
            raise
        _unfreeze(model)
        devices.release_freed_memory()  # what the steps kept (keep_freed_memory) goes back to the kernel
        return history

    return wrapper


def _unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


@_unfreeze_on_exit
def fit(
    model: nn.Module,
    schedule: Schedule,
    train_loader,
    val_loader=None,
    *,
    device=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    weight_decay: float = 1e-2,
    optimizer: str = "adamw",
    label_smoothing: float = 0.0,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    on_epoch_end=None,
    bn_policy: str = "train",
    bn_batches: int = 16,
) -> History:
    """Train ``model`` through ``schedule``; returns the :class:`History` (one row per epoch).

    ``train_loader``/``val_loader``: any iterables of ``(images, labels)`` batches (a ``set_epoch``
    method, if present, is called each epoch so shuffling depends only on the epoch), each iterated
    exactly once per epoch. Their first batches are checked against the model before anything changes
    (:func:`check_batch`: a :class:`BatchError`, a ``ValueError``, names what is wrong and the fix).
    ``checkpoint``: a file written atomically after every epoch; ``resume=True`` continues from it
    (an existing checkpoint is never overwritten without ``resume=True``); its folder is created and
    probed with a temporary file before the first epoch.
    ``amp``: bf16 autocast (default: :func:`default_amp` — on CUDA; on CPUs with native bf16, for inputs
    of at least 32×32, where a short measurement cached per machine finds it faster; ``COURSE_AMP``).
    ``channels_last`` (default: :func:`default_channels_last` — on CUDA, and for ResNets on the CPU). ``compile``: ``torch.compile`` the model.
    ``on_epoch_end(history)`` is called after each epoch (live plots).
    ``bn_policy``: what BatchNorm does in the stages that do not set their own ``bn`` — ``"train"``,
    ``"frozen"`` or ``"recalibrate"`` (see :mod:`course_utils.finetune`); a recalibration uses
    ``bn_batches`` training batches and is recorded in ``history.meta["bn_recalibrations"]``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device else default_device()
    plans = schedule.plan_for(model)  # validates the schedule against this model before any training
    check_bn_policy(bn_policy)
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches <= 0:
        raise ValueError(f"bn_batches must be a positive whole number of batches, got {bn_batches!r}")
    channels_last = prepare_model(
        model,
        device,
        channels_last,
        precision.loader_image_size(train_loader),
        getattr(train_loader, "batch_size", None),
    )
    opt = make_optimizer(model, weight_decay=weight_decay, optimizer=optimizer)
    history = History(
        meta={
            "schedule": schedule.to_dict(),
            "model": type(model).__name__,
            "device": str(device),
            "bn_policy": bn_policy,
            "bn_batches": bn_batches,
        }
    )

    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint:
        check_writable(checkpoint)  # before any epoch, not after the first one
    if checkpoint and checkpoint.exists():
        if not resume:
            raise CheckpointError(
                f"checkpoint {checkpoint} already exists: pass resume=True to continue that run, "
                f"or choose another path (it is never overwritten by a new run)"
            )
        state = load_checkpoint(checkpoint)
        if state["schedule"] != schedule:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written by another schedule "
                f"({state['schedule'].to_dict()}); resume with that schedule or use another path"
            )
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {checkpoint} belongs to another model: {err}") from err
        history = state["history"]
        saved_bn = (history.meta.get("bn_policy", "train"), history.meta.get("bn_batches", bn_batches))
        if saved_bn != (bn_policy, bn_batches):
            raise CheckpointError(
                f"checkpoint {checkpoint} was written with bn_policy={saved_bn[0]!r}, "
                f"bn_batches={saved_bn[1]}; resume with those or use another path"
            )
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    elif resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path>")

    step_model = torch.compile(model) if compile else model
    # The first batch of each loader is checked against the model before anything changes (check_batch).
    todo = plans[len(history) :]
    val_first = checked_batches(model, val_loader, "val_loader") if val_loader is not None and todo else None
    epochs = tqdm(plans, desc="epochs", disable=not progress, initial=len(history), total=len(plans))
    for plan in todo:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(plan.epoch)
        batches = (
            checked_batches(model, train_loader, "train_loader") if plan is todo[0] else iter(train_loader)
        )
        # tqdm gets an iterator and the length: given the loader itself, tqdm.auto iterates it twice (tqdm #1598)
        batches = tqdm(
            batches,
            total=_length(train_loader),
            desc=f"epoch {plan.epoch} [{plan.stage}]",
            leave=False,
            disable=not progress,
        )
        recalibrate = recalibration_groups(model, plans, plan.epoch, bn_policy)
        if (
            recalibrate
        ):  # BatchNorm policy "recalibrate": before the stage's first step (after the batch check)
            done = recalibrate_bn(
                model,
                recalibrate,
                train_loader,
                bn_batches,
                epoch=plan.epoch,
                device=device,
                channels_last=channels_last,
            )
            history.meta.setdefault("bn_recalibrations", []).append(
                {"epoch": plan.epoch, "stage": plan.stage, **done}
            )
        start_epoch(model, opt, plan, bn_policy)
        start = time.perf_counter()
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        watch, diverged = NonFiniteLossWatch(opt, device), None
        for i, (images, labels) in enumerate(batches):
            images, labels = batch_to_device(images, labels, device, channels_last)
            if amp is None:  # decided by the first batch's size (see default_amp)
                amp = default_amp(device, images.shape[-2:], model, channels_last)
            step = train_step(
                step_model,
                opt,
                images,
                labels,
                amp=amp,
                label_smoothing=label_smoothing,
                check_loss=lambda loss: watch.check(loss, i),
            )
            if step is None:  # a NaN/inf loss: this step was not taken
                diverged = watch.found
                break
            loss, logits = step
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        diverged = diverged or watch.first_bad()
        watch.close()
        if diverged is not None:
            kept = _kept(checkpoint, history)
            raise TrainingDiverged(
                f"loss became {diverged[1]} in epoch {plan.epoch} ({plan.stage}), "
                f"batch {diverged[0]}; "
                f"{kept}. Lower the learning rate of this stage ({plan.lr})."
            )
        if seen == 0:
            raise ValueError(
                "train_loader gave no batches: is the training set smaller than one batch? "
                "(A generator gives its batches only once: pass a loader or a list.)"
            )
        # The loss is checked before each step, so the last step of an epoch could still leave NaN/inf
        # weights: never write those over the last good checkpoint.
        floats = [
            (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()
        ]
        finite = torch.stack(
            [torch.isfinite(t).all() for _, t in floats]
        ).cpu()  # one host sync, not one per tensor
        bad = next((n for (n, _), ok in zip(floats, finite) if not ok), None)
        if bad is not None:
            kept = _kept(checkpoint, history)
            raise TrainingDiverged(
                f"{bad} became NaN or infinite in epoch {plan.epoch} ({plan.stage}); {kept}. "
                f"Lower the learning rate of this stage ({plan.lr})."
            )
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = (
            evaluate(model, val_first or val_loader, device, amp) if val_loader is not None else (None, None)
        )
        val_first = None
        history.append(
            {
                "epoch": plan.epoch,
                "stage": plan.stage,
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": dict(plan.lr),
                "seconds": time.perf_counter() - start,
                "images_per_s": seen / train_seconds,
            }
        )
        if checkpoint:
            save_checkpoint(checkpoint, model, opt, history, schedule)
        epochs.update(1)
        epochs.set_postfix(
            stage=plan.stage,
            train_acc=f"{history.rows[-1]['train_acc']:.3f}",
            val_acc="-" if val_acc is None else f"{val_acc:.3f}",
        )
        if on_epoch_end is not None:
            on_epoch_end(history)
    epochs.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
