"""A learning-rate finder for one stage of a :class:`~course_utils.finetune.Schedule`.

``lr_find(model, stage, train_loader)`` trains what ``fit`` would train in that stage — the same code
path (:func:`~course_utils.train.start_epoch` and :func:`~course_utils.train.train_step`): the stage's
trainable groups, frozen groups with no gradient, learning rate 0 and BatchNorm in eval mode — while one
multiplier grows exponentially from ``start_lr`` to ``end_lr``. Each trainable group's learning rate is
that multiplier times its share of the stage's largest rate, so a differential stage keeps its ratios
(new modules 10× the pretrained ones stay 10× at every step). It stops, without raising, once the
smoothed loss exceeds ``diverge`` × its best or the loss is NaN/inf.

Afterwards the model is exactly as it was (bit for bit): parameters, buffers, gradients, every
``requires_grad``, each module's train/eval mode, device and memory format; so are a passed optimizer's
state, the loader's epoch counter and the global RNGs (``random``, torch CPU, CUDA, MPS). Running the finder
before ``fit`` does not change what ``fit`` then does. The same seed gives the same curve.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .finetune import EpochPlan, Schedule, Stage, make_optimizer
from .machinery import checks, devices
from .machinery.devices import default_device
from .machinery.runtime import batch_to_device, default_amp, prepare_model
from .train import start_epoch, train_step

SKIP_START = 0.1  # the first 10 % of the steps (the loss still settles at tiny rates) are not considered
SKIP_END = 5  # nor the last 5 (the blow-up), as fastai does


# ------------------------------------------------------------------------------ suggestion rules
def valley(lrs: np.ndarray, losses: np.ndarray) -> int:
    """fastai's "valley": the longest stretch over which the (smoothed) loss keeps falling — the longest
    decreasing subsequence — and the point halfway along it. Returns an index into ``lrs``."""
    n = len(losses)
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[end]:
            end = i
    start = end - run[end] + 1
    sections = (end - start) / 3
    return start + int(sections) + int(sections / 2)


def steepest(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Steepest descent: where the smoothed loss falls fastest per decade of learning rate."""
    slope = np.diff(losses) / np.diff(np.log10(lrs))
    return int(np.argmin(slope))


RULES = {"valley": valley, "steepest": steepest}


@dataclass
class LRFinderResult:
    """The sweep, one entry per step: ``multiplier``, ``lrs`` (``{group: lr}`` of every group, 0 if
    frozen), ``loss`` (raw) and ``smoothed`` (bias-corrected exponential moving average).

    ``stage``: the stage swept (its LRs are what :meth:`suggested_stage` scales); ``shares``: each
    trainable group's rate as a fraction of the stage's largest; ``diverged``: whether the sweep
    stopped early (and at which ``multiplier`` — the last one recorded); ``notes``: what the finder
    wants you to know (a loader cycled, …).
    """

    stage: Stage
    shares: dict[str, float]
    multiplier: list[float] = field(default_factory=list)
    lrs: list[dict[str, float]] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.multiplier)

    def record(self, multiplier: float, lrs: dict[str, float], loss: float, smoothed: float) -> None:
        """Append one step of the sweep."""
        self.multiplier.append(multiplier)
        self.lrs.append(lrs)
        self.loss.append(loss)
        self.smoothed.append(smoothed)

    def _window(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The part of the curve the rules look at: without the first 10 % and the last 5 steps, and
        only finite losses; ``(multipliers, smoothed losses, offset of the first)``."""
        m = np.asarray(self.multiplier, dtype=float)
        s = np.asarray(self.smoothed, dtype=float)
        finite = np.isfinite(s)
        last = int(np.nonzero(finite)[0][-1]) + 1 if finite.any() else 0
        first = int(len(m) * SKIP_START)
        stop = last - SKIP_END
        if stop - first < 5:  # a very short curve: use all of its finite part
            first, stop = 0, last
        if stop - first < 3:
            raise ValueError(
                f"the sweep has only {last} usable steps: too few for a suggestion. Lower start_lr "
                f"or raise num_steps / diverge."
            )
        return m[first:stop], s[first:stop], first

    def suggestion(self, rule: str = "valley") -> float:
        """The suggested multiplier — the stage's largest learning rate (each group gets its share of it).

        Rule ``"valley"`` (fastai's, the default): the middle of the longest stretch over which the
        smoothed loss keeps falling. Rule ``"steepest"``: where it falls fastest per decade.

        Why valley, measured on the shipped 5,000-image subset (ResNet18+CBAM, random weights — no ImageNet
        weights offline —, batch 128, 100 steps, seeds 0-2; stage 2 of the course's schedule swept on the
        same fresh model): both rules moved by about 0.3-0.4 decades from seed to seed, but where they land
        differs. In stage 1 the steepest descent was 1.7e-1 / 3.5e-1 / 4.2e-1, only 0.2 decades below the
        minimum of the smoothed loss (2.4e-1 / 5.1e-1 / 7.4e-1), i.e. right where the loss turns up; the
        valley was 2.2e-2 / 2.6e-2 / 5.5e-2, 1.1-1.3 decades below it, in the middle of the descent. Two
        epochs of stage 1 at each (seed 0): valley 25.2 % validation accuracy, steepest 23.5 % (the lesson's
        1e-3: 10.2 %, no learning on random features). In stage 2: valley 2.3e-3 / 2.3e-3 / 5.9e-3, steepest
        1.3e-3 / 6.3e-4 / 9.1e-4; two epochs of stage 2 after one of stage 1 (seed 0): valley 34.2 %,
        steepest 34.5 %, the lesson's 1e-4 33.8 % — no difference beyond noise there. A steepest slope is a
        derivative of a noisy curve: one steep stretch of a few steps decides it, anywhere on the curve; the
        valley needs the loss to keep falling over the longest stretch and takes its middle, so it stays
        inside the descent with a margin to the blow-up.

        The smoothed curve lags the raw loss by about ``smooth / (1 - smooth)`` steps (49 for 0.98: four
        decades of a 100-step sweep from 1e-7 to 10), which moves any rule to the right; more steps (or a
        smaller ``smooth``) give a sharper curve. ``plot`` shows the raw loss too.
        """
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")
        m, s, _ = self._window()
        return float(m[RULES[rule](m, s)])

    def suggested_lrs(self, rule: str = "valley") -> dict[str, float]:
        """``{trainable group: suggested lr}`` — the suggestion times each group's share."""
        top = self.suggestion(rule)
        return {g: top * share for g, share in self.shares.items()}

    def suggested_stage(self, rule: str = "valley") -> Stage:
        """The same :class:`Stage` with its learning rates scaled to the suggestion: the largest becomes
        :meth:`suggestion`, the others keep their ratio to it; a float stays a float, a dict a dict."""
        top = self.suggestion(rule)
        lr = self.stage.lr
        if isinstance(lr, dict):
            biggest = max(lr.values())
            return replace(self.stage, lr={k: top * v / biggest for k, v in lr.items()})
        return replace(self.stage, lr=top)

    def plot(self, ax=None, rule: str = "valley"):
        """The raw and smoothed loss against the multiplier (log axis), the suggestion marked; returns the
        figure."""
        import matplotlib.pyplot as plt

        from .plots import zh

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            plt.close(fig)
        else:
            fig = ax.figure
        ax.plot(self.multiplier, self.loss, color="#bbb", lw=1, label=zh("损失", "loss"))
        ax.plot(self.multiplier, self.smoothed, color="C0", lw=2, label=zh("平滑后的损失", "smoothed loss"))
        ax.set_xscale("log")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # from a little below the minimum to a little above the start: the blow-up is cut off
            low, high = min(finite), max(finite[0], min(finite))
            span = max(high - low, 0.05 * abs(high), 1e-3)
            ax.set_ylim(low - 0.2 * span, high + 0.5 * span)
        try:
            best = self.suggestion(rule)
            i = int(np.argmin(np.abs(np.log(np.asarray(self.multiplier)) - math.log(best))))
            ax.axvline(best, color="C3", ls="--", lw=1)
            ax.plot([best], [self.smoothed[i]], "o", color="C3", label=f"{rule}: {best:.1e}")
        except ValueError:
            pass
        shares = ", ".join(f"{g}×{s:g}" for g, s in self.shares.items())
        ax.set_xlabel(zh("学习率", "learning rate") + f" (multiplier; {shares})")
        ax.set_ylabel(zh("训练损失", "training loss"))
        ax.set_title(zh("学习率查找器：阶段", "LR finder: stage") + f" {self.stage.name}", fontsize=10)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        return fig

    def __repr__(self):
        try:
            tip = f", suggestion={self.suggestion():.2e}"
        except ValueError:
            tip = ""
        return f"LRFinderResult(stage={self.stage.name!r}, {len(self)} steps, diverged={self.diverged}{tip})"


# ------------------------------------------------------------------------------ the sweep
def _select_stage(stage, which, model: nn.Module) -> tuple[Stage, EpochPlan]:
    """The :class:`Stage` and the :class:`EpochPlan` of its first epoch for ``model`` (raises ValueError)."""
    if isinstance(stage, Schedule):
        names = [s.name for s in stage.stages]
        if which is None:
            raise ValueError(f"a Schedule needs which=<stage number from 1, or name>; its stages are {names}")
        if isinstance(which, str):
            if which not in names:
                raise ValueError(f"no stage named {which!r}; the schedule's stages are {names}")
            index = names.index(which)
        elif isinstance(which, int) and not isinstance(which, bool) and 1 <= which <= len(names):
            index = which - 1
        else:
            raise ValueError(
                f"which must be a stage number 1..{len(names)} (stage 1 is the first) or one of "
                f"{names}, got {which!r}"
            )
        first_epoch = stage.boundaries()[index][1]
        stage = stage.stages[index]
    elif isinstance(stage, Stage):
        if which is not None:
            raise ValueError("which= selects a stage of a Schedule; with a single Stage leave it out")
        first_epoch = 1
    else:
        raise ValueError(
            f"stage must be a Stage, or a Schedule with which=<stage>, got {type(stage).__name__}"
        )
    plan = Schedule([stage]).plan_for(model)[0]  # raises if the stage trains nothing of this model
    return stage, replace(plan, epoch=first_epoch)


def _batches(loader, first_epoch: int, num_steps: int, notes: list[str]):
    """``num_steps`` batches, cycling the loader (next epoch each pass) if it has fewer."""
    passes = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(first_epoch + passes)
        got = 0
        for batch in iter(loader):
            got += 1
            yield batch
        if got == 0:
            raise ValueError("train_loader gave no batches: is the training set smaller than one batch?")
        passes += 1
        if passes == 1:
            notes.append(
                f"数据加载器 (loader) 只有 {got} 个批次，少于 num_steps={num_steps}：循环使用了它 (cycled)，"
                f"同样的图片会被看不止一遍"
            )


class _Snapshot:
    """Everything the sweep may change, copied, and put back bit for bit by :meth:`restore`."""

    def __init__(self, model: nn.Module, optimizer, loader):
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.tensors = {id(t): (t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]}
        self.grads = {
            id(p): (p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()
        }
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        self.loader_epoch = getattr(loader, "epoch", None)
        self.rngs = _rng_states()

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.tensors.values():
                t.data = saved  # value, dtype, device and memory format as they were
        for p, grad in self.grads.values():
            p.grad = grad
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.modes:
            m.training = flag
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        if self.loader_epoch is not None:
            self.loader.epoch = self.loader_epoch
        _set_rng_states(*self.rngs)


@contextmanager
def _restored_afterwards(model: nn.Module, optimizer, loader, seed: int):
    """For the sweep: the global RNGs seeded with ``seed``; on the way out (also on an error) everything
    put back as it was (:class:`_Snapshot`) and the memory the sweep freed given back."""
    snapshot = _Snapshot(model, optimizer, loader)
    try:
        torch.manual_seed(seed)
        random.seed(seed)
        yield
    finally:
        snapshot.restore()
        devices.release_freed_memory()


def _rng_states() -> tuple:
    """The global RNGs' states: ``random``, torch CPU, CUDA and MPS (``None`` where there is none)."""
    return (
        random.getstate(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
    )


def _set_rng_states(python_rng, torch_rng, cuda_rng, mps_rng) -> None:
    random.setstate(python_rng)
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if mps_rng is not None:
        torch.mps.set_rng_state(mps_rng)


def _check_sweep(start_lr, end_lr, num_steps, smooth, diverge) -> tuple[float, float, int]:
    """The sweep's settings, checked before anything changes: ``(start_lr, end_lr, num_steps)``."""
    start_lr = checks.positive_number(start_lr, "start_lr", example="1e-7")
    end_lr = checks.positive_number(end_lr, "end_lr", example="10")
    if start_lr >= end_lr:
        raise ValueError(f"start_lr ({start_lr:g}) must be below end_lr ({end_lr:g}): the sweep goes up")
    num_steps = checks.whole_number(num_steps, "num_steps", minimum=10, example="100")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
    if not diverge > 1:
        raise ValueError(f"diverge must be above 1 (a multiple of the best loss), got {diverge!r}")
    return start_lr, end_lr, num_steps


def _passed_optimizer(optimizer, model: nn.Module):
    """The optimizer to sweep with when one was passed (checked: made by ``make_optimizer`` for ``model``),
    ``None`` for ``"adamw"`` / ``"sgd"`` (a new one is made)."""
    if isinstance(optimizer, str):
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(
                f"optimizer must be 'adamw', 'sgd' or an optimizer from make_optimizer, got {optimizer!r}"
            )
        return None
    missing = [i for i, g in enumerate(optimizer.param_groups) if "group" not in g]
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if missing or any(id(p) not in owned for p in model.parameters()):
        raise ValueError(
            "the optimizer must be made by course_utils.finetune.make_optimizer(model) for this "
            "model (its param groups carry the layer-group names the stage refers to)"
        )
    return optimizer


def _shares(plan: EpochPlan) -> dict[str, float]:
    """Each trainable group's learning rate as a fraction of the stage's largest."""
    trainable = [g for g in plan.lr if g in plan.trainable]
    top = max(plan.lr[g] for g in trainable)
    return {g: plan.lr[g] / top for g in trainable}


def _multipliers(start_lr: float, end_lr: float, num_steps: int):
    """``num_steps`` multipliers from ``start_lr`` to ``end_lr``, each a fixed factor above the last."""
    ratio = (end_lr / start_lr) ** (1 / (num_steps - 1))
    return (start_lr * ratio**step for step in range(num_steps))


class _SmoothedLoss:
    """The loss's exponential moving average, bias-corrected (as fastai's finder): ``add`` returns it."""

    def __init__(self, smooth: float):
        self.smooth, self.average, self.steps = smooth, 0.0, 0

    def add(self, loss: float) -> float:
        self.average = self.smooth * self.average + (1 - self.smooth) * loss
        self.steps += 1
        return self.average / (1 - self.smooth**self.steps)


class _StageTrainer:
    """``fit``'s training for one stage, a step at a time: the model prepared as ``fit`` prepares it (device,
    channels_last), the optimizer set up for the stage's first epoch (frozen groups at learning rate 0,
    BatchNorm as the stage has it), and the precision ``fit`` would pick (decided at the first batch)."""

    def __init__(
        self, model, plan, loader, optimizer, device, weight_decay, label_smoothing, amp, channels_last
    ):
        self.model, self.device, self.amp, self.label_smoothing = model, device, amp, label_smoothing
        self.channels_last = prepare_model(model, device, channels_last, loader)
        if isinstance(optimizer, str):
            optimizer = make_optimizer(model, weight_decay=weight_decay, optimizer=optimizer)
        self.optimizer = optimizer
        start_epoch(model, optimizer, plan)

    def set_lr(self, multiplier: float, shares: dict[str, float]) -> None:
        """Each group's learning rate: ``multiplier`` × its share (0 for a frozen group)."""
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = multiplier * shares.get(param_group["group"], 0.0)

    def lrs(self) -> dict[str, float]:
        """``{group: lr}`` as in force."""
        return {pg["group"]: pg["lr"] for pg in self.optimizer.param_groups}

    def step(self, images, labels) -> float:
        """One training step (:func:`~course_utils.train.train_step`); returns its loss."""
        images, labels = batch_to_device(images, labels, self.device, self.channels_last)
        if self.amp is None:
            self.amp = default_amp(self.device, images.shape[-2:], self.model, self.channels_last)
        loss, _ = train_step(
            self.model, self.optimizer, images, labels, amp=self.amp, label_smoothing=self.label_smoothing
        )
        return loss.item()


def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not progress)


def lr_find(
    model: nn.Module,
    stage: Stage | Schedule,
    train_loader,
    *,
    which: int | str | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.98,
    diverge: float = 4.0,
    seed: int = 0,
    device=None,
    progress: bool = True,
    optimizer: str | torch.optim.Optimizer = "adamw",
    weight_decay: float = 1e-2,
    label_smoothing: float = 0.0,
    amp: bool | None = None,
    channels_last: bool | None = None,
) -> LRFinderResult:
    """Sweep the learning rate of one stage; returns an :class:`LRFinderResult` (``.suggestion()``,
    ``.suggested_stage()``, ``.plot()``). The model is left exactly as it was.

    ``stage``: a :class:`Stage`, or a :class:`Schedule` with ``which`` = the stage's number (1 = the
    first, as the course counts them) or name. The multiplier — the stage's largest rate — goes from
    ``start_lr`` to ``end_lr`` exponentially over ``num_steps`` steps; groups with a smaller rate in the
    stage get the same fraction of it. ``smooth``: the loss EMA's factor; the sweep stops once the
    smoothed loss exceeds ``diverge`` × its best, or on NaN/inf. ``seed`` seeds the global RNGs during
    the sweep (all restored afterwards); a loader with ``set_epoch`` gets the stage's first epoch, as in
    ``fit``. ``optimizer``: ``"adamw"`` / ``"sgd"`` (``fit``'s, new) or an optimizer made by
    :func:`~course_utils.finetune.make_optimizer` for this model (used, then restored).
    ``device``, ``weight_decay``, ``label_smoothing``, ``amp``, ``channels_last``: as in ``fit``.
    """
    # every check before anything changes
    start_lr, end_lr, num_steps = _check_sweep(start_lr, end_lr, num_steps, smooth, diverge)
    stage, plan = _select_stage(stage, which, model)
    passed = _passed_optimizer(optimizer, model)
    device = torch.device(device) if device else default_device()
    result = LRFinderResult(stage=stage, shares=_shares(plan))
    with _restored_afterwards(model, passed, train_loader, seed):  # the model is left exactly as it was
        trainer = _StageTrainer(
            model, plan, train_loader, optimizer, device, weight_decay, label_smoothing, amp, channels_last
        )
        batches = _batches(train_loader, plan.epoch, num_steps, result.notes)
        loss_average, best = _SmoothedLoss(smooth), math.inf
        with _progress_bar(num_steps, f"学习率查找器 (lr_find) [{stage.name}]", progress) as bar:
            for multiplier, (images, labels) in zip(_multipliers(start_lr, end_lr, num_steps), batches):
                trainer.set_lr(multiplier, result.shares)  # every group: multiplier × its share
                loss = trainer.step(images, labels)  # fit's own training step
                smoothed = loss_average.add(loss)
                result.record(multiplier, trainer.lrs(), loss, smoothed)
                bar.update(1)
                if not math.isfinite(smoothed) or smoothed > diverge * best:  # the loss exploded: stop
                    result.diverged = True
                    break
                best = min(best, smoothed)
    for note in result.notes if progress else []:
        print(f"学习率查找器 (lr_find)：{note}")
    return result
