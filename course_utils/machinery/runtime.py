"""Where and how ``fit`` computes, behind named calls: the device, bf16 autocast and channels-last (chosen by
:mod:`~course_utils.machinery.precision`), and on a Linux CPU the memory of each step kept for the next
(:func:`~course_utils.machinery.devices.keep_freed_memory`). None of it changes what a run learns.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from . import devices, precision


def default_amp(
    device: torch.device, image_size=None, model: nn.Module | None = None, channels_last: bool | None = None
) -> bool:
    """``fit``/``evaluate``'s default for ``amp``: :func:`.precision.choose` — ``COURSE_AMP``,
    else on a CPU with native bf16 the faster of bf16/fp32 as measured for ``model`` at ``image_size``
    (cached per machine), else bf16 wherever the hardware has it natively; on the CPU never below 32×32
    (``image_size``: an int or ``(H, W)``; oneDNN's bf16 weight-gradient NaNs, see
    :func:`.precision.rule_amp`).
    """
    return precision.choose(device, model, image_size, amp=None, channels_last=channels_last).amp


def default_channels_last(model: nn.Module, device: torch.device, image_size=None, batch_size=None) -> bool:
    """``fit``'s default for ``channels_last``: :func:`.precision.choose` — ``COURSE_CHANNELS_LAST``,
    else measured on a CPU with native bf16 (where ``image_size`` is known), else on CUDA always and on the
    CPU for ResNets (measured faster), not for VGG (measured slower)."""
    return precision.choose(device, model, image_size, batch_size).channels_last


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool | None, loader=None) -> bool:
    """Per-run setup of ``fit`` (and of ``lr_find``): the model on ``device``, channels-last when asked
    (default: :func:`default_channels_last` for the image and batch size ``loader`` gives), and on a Linux
    CPU the memory of each step kept for the next (:func:`.devices.keep_freed_memory`); returns the
    channels-last choice."""
    if channels_last is None:
        image_size, batch_size = precision.loader_image_size(loader), getattr(loader, "batch_size", None)
        channels_last = default_channels_last(model, device, image_size, batch_size)
    devices.keep_freed_memory(device)  # on a Linux CPU: no page faults per step (see devices.py)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return channels_last


def batch_to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    """A training batch on ``device`` (images in channels-last memory format when asked)."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels
