"""The checks of a batch against a model: ``fit`` and ``evaluate`` look at each loader's first batch before
anything changes, and a batch that cannot work is refused with a :class:`BatchError` (a ``ValueError``) that
names what the batch holds, what the model expects, and the fix (with a Chinese hint for students).
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn


class BatchError(ValueError):
    """A batch does not fit the model (found by :func:`check_batch` before any training step)."""


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
    for check in (_not_tensors, _image_layout, _label_layout, _label_values, _image_values):
        found = check(model, images, labels, num_classes)
        if found:
            problem, fix, hint = found
            raise BatchError(f"{where}: {problem}. Fix: {fix}. （提示：{hint}）")
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


# Each check below returns None, or (what the batch holds against what the model expects, the fix, a hint).
def _not_tensors(model, images, labels, num_classes):
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return (
            f"a batch must be (images, labels) tensors, "
            f"got ({type(images).__name__}, {type(labels).__name__})",
            "give fit/evaluate a loader of (images, labels) tensor pairs, e.g. data.make_loaders(...) or a "
            "torch.utils.data.DataLoader over a dataset with transforms.ToTensor()",
            "每个 batch 应该是 (images, labels) 两个张量 (tensor)",
        )
    return None


def _image_layout(model, images, labels, num_classes):
    if images.ndim != 4:
        return (
            f"images of shape {tuple(images.shape)}, but the model expects a 4-D batch (N, C, H, W)",
            "batch the images (a single image: images.unsqueeze(0))",
            "图像张量的形状应为 (N, C, H, W)",
        )
    if not images.is_floating_point():
        raw = " (raw pixel values 0–255)" if images.dtype == torch.uint8 else ""
        return (
            f"images of dtype {images.dtype}{raw}, but the model expects normalised floating-point images "
            f"(torch.float32)",
            "convert and normalise them: data.TensorLoader / data.make_loaders do it for you "
            "(TensorLoader.normalize), or use transforms.ToTensor() followed by "
            "transforms.Normalize(mean, std)",
            "图像必须是归一化后的浮点张量 (float)：用 TensorLoader.normalize 或 transforms.ToTensor()",
        )
    channels = model_in_channels(model)
    if channels is not None and images.shape[1] != channels:
        plural = "s" * (images.shape[1] != 1)
        return (
            f"images of shape {tuple(images.shape)}: {images.shape[1]} channel{plural}, but "
            f"the model's first convolution expects {channels}",
            "images.permute(0, 3, 1, 2) turns (N, H, W, C) into (N, C, H, W)"
            if images.shape[-1] == channels
            else f"give the model {channels}-channel images "
            f"(grey images: images.expand(-1, {channels}, -1, -1))",
            f"通道数 (channels) 应为 {channels}，形状为 (N, C, H, W)",
        )
    return None


def _label_layout(model, images, labels, num_classes):
    if labels.ndim != 1:
        return (
            f"labels of shape {tuple(labels.shape)}, but the model expects one class index per image, "
            f"shape (N,)",
            "pass class indices (one-hot labels: labels.argmax(1))",
            "标签 (labels) 应该是每张图一个类别编号",
        )
    if len(images) != len(labels):
        return (
            f"{len(images)} images but {len(labels)} labels in one batch",
            "the loader must yield as many labels as images",
            "一个 batch 里图像和标签的数量必须相同",
        )
    if len(labels) == 0:
        return "an empty batch (0 images)", "drop empty batches from the loader", "batch 不能为空"
    if labels.dtype not in (torch.int64, torch.uint8):
        return (
            f"labels of dtype {labels.dtype}, but cross-entropy needs integer class indices (torch.int64)",
            "labels.long()",
            "标签必须是整数类别编号 (torch.int64)",
        )
    return None


def _label_values(model, images, labels, num_classes):
    num_classes = model_num_classes(model) if num_classes is None else num_classes
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        expected = f"in 0..{num_classes - 1}" if num_classes is not None else "at least 0"
        return (
            f"labels from {low} to {high}, but the model's head has num_classes={num_classes}: labels must "
            f"lie {expected}",
            "build the model with num_classes equal to the number of classes in the data "
            "(e.g. models.resnet18_cbam(num_classes=10) for CIFAR-10), or fix the labels",
            f"标签必须在 0..num_classes-1 之间 (num_classes={num_classes})",
        )
    return None


def _image_values(model, images, labels, num_classes):
    smallest = getattr(model, "min_image_size", None)
    if smallest and min(images.shape[-2:]) < smallest:
        return (
            f"images of {images.shape[-2]}×{images.shape[-1]} pixels, but {type(model).__name__} needs at "
            f"least {smallest}×{smallest} (its max-pools halve the size {smallest.bit_length() - 1} times)",
            f"use larger images (data.make_loaders(..., image_size={smallest}))",
            f"图像至少要 {smallest}×{smallest}",
        )
    if not torch.isfinite(images).all():
        return (
            "images contain NaN or infinite values",
            "check how the images were made (normalisation by a zero std?)",
            "图像中有 NaN 或无穷大",
        )
    return None


def checked_batches(model: nn.Module, loader, where: str):
    """An iterator over ``loader`` (iterating it once) whose first batch was checked by
    :func:`check_batch`."""
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
        if size is not None and getattr(loader, "drop_last", False) and loader_length(loader) == 0:
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


def loader_length(loader) -> int | None:
    """``len(loader)``, or None for an iterable without a length (a generator)."""
    try:
        return len(loader)
    except TypeError:  # a generator or another iterable without a length
        return None
