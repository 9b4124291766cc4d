"""What ``fit`` guards against, behind named calls so that its loop reads as the lesson:

* :func:`check_fit_arguments` — arguments torch would reject only mid-epoch (or never), refused first;
* :class:`ModelGuard` — however ``fit`` ends, the model is usable: refused before training, it is exactly as
  it was given; after training began (returned, diverged, interrupted), no group stays frozen and the model
  is in eval mode; the memory that the steps kept goes back to the system;
* :class:`NonFiniteLossWatch` and :func:`check_finite_weights` — a NaN/inf loss or weight stops the run with
  :class:`TrainingDiverged`, and the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import torch
from torch import nn

from . import devices
from .checks import whole_number


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""


def check_fit_arguments(
    model, schedule, *, label_smoothing=0.0, on_epoch_end=None, bn_policy="train", bn_batches=16
):
    """``fit``'s arguments that torch would only reject mid-epoch (or never), refused before anything
    changes."""
    from ..batchnorm import check_bn_policy
    from ..finetune import Schedule

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
    check_bn_policy(bn_policy)
    whole_number(bn_batches, "bn_batches", example="16")
    devices.malloc_setting()  # a wrong COURSE_MALLOC, refused here rather than when the first step begins


class ModelGuard:
    """``with ModelGuard(model) as guard: ...; guard.training_begins(); ...`` — see the module's docstring.

    Refused before :meth:`training_begins` (bad arguments, a bad batch, a checkpoint that cannot be used or
    written), the model is left exactly as it was given: the same ``requires_grad`` and train/eval mode of
    every module. After it, however the run ends, every parameter is trainable and the model in eval mode."""

    def __init__(self, model: nn.Module):
        self.model, self.began = model, False
        self.requires = [p.requires_grad for p in model.parameters()]
        self.modes = [m.training for m in model.modules()]

    def __enter__(self) -> ModelGuard:
        return self

    def training_begins(self) -> None:
        self.began = True

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and not self.began:
            for p, required in zip(self.model.parameters(), self.requires):
                p.requires_grad_(required)
            for m, training in zip(self.model.modules(), self.modes):
                m.training = training
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.model.eval()
        devices.release_freed_memory()  # what the steps kept (keep_freed_memory) goes back to the kernel
        return False


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
        """Before the step of ``batch`` (0, 1, 2, ... in order): ``(batch, loss)`` if known to be bad, else
        None."""
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


def kept(checkpoint, history) -> str:
    """What a ``TrainingDiverged`` message says about the run's checkpoint."""
    return (
        f"the last good checkpoint {checkpoint} (epoch {len(history)}) is kept"
        if checkpoint
        else "no checkpoint was asked for"
    )


def diverged(what: str, plan, checkpoint, history, batch: int | None = None) -> TrainingDiverged:
    """The error that stops a run whose loss or weights became NaN/inf in ``plan``'s epoch."""
    where = f"epoch {plan.epoch} ({plan.stage})" + ("" if batch is None else f", batch {batch}")
    return TrainingDiverged(
        f"{what} in {where}; {kept(checkpoint, history)}. Lower the learning rate of this stage ({plan.lr})."
    )


def check_finite_weights(model: nn.Module, plan, checkpoint, history) -> None:
    """After an epoch: every float parameter and buffer finite, else :class:`TrainingDiverged` — the loss is
    checked before each step, so the last step of an epoch could still leave NaN/inf weights, and those must
    never be written over the last good checkpoint. One host sync, not one per tensor."""
    floats = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()
    bad = next((n for (n, _), ok in zip(floats, finite) if not ok), None)
    if bad is not None:
        raise diverged(f"{bad} became NaN or infinite", plan, checkpoint, history)
