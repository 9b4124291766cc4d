"""BatchNorm in fine-tuning: what a group's BatchNorm layers do when it trains (the BatchNorm policy), and
two measurements of the mismatch between stored and batch statistics.

What a group's BatchNorm layers do when the group trains is the BatchNorm policy (``BN_POLICIES``), one
per run (``fit(..., bn_policy=...)``) or per stage (``Stage(..., bn="frozen")``, ``None`` = the run's):

* ``"train"`` — trained groups' BatchNorm in train mode (batch statistics, running statistics updated),
  frozen groups' in eval mode. At the epoch a group is unfrozen its layers switch from the stored
  statistics to the batch's at once: the dip at a stage boundary.
* ``"frozen"`` — pretrained groups' BatchNorm stays in eval mode for the whole run, its running
  statistics exactly as loaded (as ``FrozenBatchNorm2d`` in detectron2/timm); its weight and bias still
  train when the group does. New groups' BatchNorm (CBAM's, a new stem's) trains as under ``"train"``.
* ``"recalibrate"`` — as ``"train"``, but before the stage starts the running statistics of the groups it
  unfreezes (before the first stage: of every pretrained group) are re-estimated on training batches
  (:func:`recalibrate_bn`, AdaBN, Li et al. 2016), so that the stored and the batch statistics agree.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence

import torch
from torch import nn

from .machinery.checks import whole_number
from .models import group_modules, group_names, group_of, new_groups_of

BN_POLICIES = ("train", "frozen", "recalibrate")


def check_bn_policy(policy, where: str = "bn_policy") -> str:
    """``policy`` if it is one of ``BN_POLICIES``, else a ``ValueError`` that lists them."""
    if policy not in BN_POLICIES:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, BN_POLICIES))}, got {policy!r}")
    return policy


def recalibration_groups(
    model: nn.Module, plans: Sequence, epoch: int, bn_policy: str = "train"
) -> list[str]:
    """The groups whose BatchNorm statistics are re-estimated before epoch ``epoch`` (counted from 1);
    ``plans``: one :class:`~course_utils.finetune.EpochPlan` per epoch.

    Only at the first epoch of a stage whose policy (``plan.bn``, else ``bn_policy``) is ``"recalibrate"``:
    before the first stage every pretrained group, before a later one the groups it unfreezes (trained
    now, frozen in the stage before). Only groups that have BatchNorm layers; ``[]`` when there is nothing to
    do.
    """
    plan = plans[epoch - 1]
    if check_bn_policy(plan.bn or bn_policy) != "recalibrate" or (
        epoch > 1 and plans[epoch - 2].stage == plan.stage
    ):
        return []
    new_groups = new_groups_of(model)
    if epoch == 1:
        chosen = [g for g in group_names(model) if g not in new_groups]
    else:
        chosen = [
            g for g in group_names(model) if g in plan.trainable and g not in plans[epoch - 2].trainable
        ]
    with_bn = {g for g, bns in group_modules(model).items() if bns}
    return [g for g in chosen if g in with_bn]


def recalibration_batches(loader, num_batches: int, epoch: int | None = None):
    """The first ``num_batches`` batches the loader gives for ``epoch``, leaving the loader and RNGs as they
    were.

    With ``set_epoch`` (the course's loaders, a ``DistributedSampler``…) the batches are epoch ``epoch``'s
    own (so they are fixed by the loader's seed and the epoch, and resume gives the same ones); the
    loader's ``epoch`` attribute is put back afterwards. The global torch and Python RNGs are forked, so a
    shuffling ``DataLoader`` or a random transform draws nothing from them: training sees the same order.
    """
    saved_epoch = getattr(loader, "epoch", None)
    python_state = random.getstate()
    devices = (
        list(range(torch.cuda.device_count()))
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0 if epoch is None else epoch)
            random.seed(0 if epoch is None else epoch)
            if epoch is not None and hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = []
            for batch in loader:
                batches.append(batch)
                if len(batches) == num_batches:
                    break
            return batches
    finally:
        random.setstate(python_state)
        if saved_epoch is not None:
            loader.epoch = saved_epoch


def bn_layers_of(model: nn.Module, groups: Collection[str]) -> list[nn.Module]:
    """The BatchNorm layers of ``groups``; a ``ValueError`` names a group the model does not have."""
    known = group_modules(model)
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(
            f"unknown layer group(s) {', '.join(unknown)}; this model's groups are {', '.join(known)}"
        )
    return [bn for g in groups for bn in known[g]]


def recalibrate_bn(
    model: nn.Module,
    groups: Collection[str],
    loader,
    num_batches: int = 16,
    *,
    epoch: int | None = None,
    device=None,
    channels_last: bool = False,
) -> dict:
    """Re-estimate the running statistics of the BatchNorm layers of ``groups`` on ``num_batches`` training
    batches.

    Forward passes only (``torch.no_grad``), the ``groups``' BatchNorm layers in train mode and everything
    else in eval mode (no dropout, other BatchNorms on their stored statistics): no parameter changes and
    no other buffer. The statistics are reset and averaged over the batches with ``momentum=None``
    (a cumulative average: every batch counts the same, the estimate does not depend on the order), then
    each layer's momentum is put back. The batches come from :func:`recalibration_batches` (the loader's
    epoch ``epoch``; no RNG or loader state is consumed). Leaves the model in eval mode.

    Returns ``{"groups", "layers", "batches", "images", "seconds"}``.
    """
    start = time.perf_counter()
    whole_number(num_batches, "num_batches", example="16")
    layers = bn_layers_of(model, groups)
    device = torch.device(device) if device else next(model.parameters()).device
    batches = recalibration_batches(loader, num_batches, epoch)
    if not batches:
        raise ValueError("the loader gave no batches to recalibrate BatchNorm on")
    momenta = [bn.momentum for bn in layers]
    model.eval()
    images_seen = 0
    try:
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for images, _ in batches:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                model(images)
                images_seen += len(images)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.eval()
    return {
        "groups": list(groups),
        "layers": len(layers),
        "batches": len(batches),
        "images": images_seen,
        "seconds": time.perf_counter() - start,
    }


def bn_statistics(
    model: nn.Module, images: torch.Tensor, groups: Collection[str] | None = None
) -> list[dict]:
    """Per BatchNorm layer (of ``groups``, default all): its stored statistics against those of ``images``.

    One forward pass in eval mode under ``torch.no_grad`` (nothing changes); each row has the layer, its
    group, the channel averages of the stored ``running_mean`` / ``running_var`` and of the batch's mean /
    variance of the layer's input, and ``var ratio`` = batch / stored variance (1 = the stored statistics
    fit these images; ≪ 1: eval mode divides by too large a variance and shrinks the features).
    """
    was_training = model.training
    model.eval()
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (groups is None or group_of(model, name) in groups)
    }
    batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, name=name: batch.__setitem__(
                name, (args[0].float().mean(dim=(0, 2, 3)), args[0].float().var(dim=(0, 2, 3)))
            )
        )
        for name, m in found.items()
    ]
    try:
        with torch.no_grad():
            model(images.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows = []
    for name, m in found.items():
        mean, var = batch[name]
        rows.append(
            {
                "layer": name,
                "group": group_of(model, name),
                "stored mean": m.running_mean.float().mean().item(),
                "batch mean": mean.mean().item(),
                "stored var": m.running_var.float().mean().item(),
                "batch var": var.mean().item(),
                "var ratio": (var / m.running_var.float()).mean().item(),
            }
        )
    return rows


def bn_switch_effect(model: nn.Module, images: torch.Tensor, groups: Collection[str] | None = None) -> float:
    """How much the logits change (relative L2, ‖train − eval‖ / ‖eval‖) when the BatchNorm layers of
    ``groups`` (default all) use the batch's statistics instead of the stored ones — what unfreezing them
    does at a stage boundary. Works on a copy: the model and its statistics are left as they are."""
    import copy

    probe = copy.deepcopy(model).eval()
    images = images.to(next(probe.parameters()).device)
    with torch.no_grad():
        eval_logits = probe(images).float()
        for name, m in probe.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                groups is None or group_of(probe, name) in groups
            ):
                m.train()
        batch_logits = probe(images).float()
    return ((batch_logits - eval_logits).norm() / eval_logits.norm()).item()
