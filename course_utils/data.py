"""CIFAR-10 for the course, held as uint8 tensors, with augmentation as batched tensor ops.

Where the images come from (``load_cifar10`` always prints which one it used): a copy of the full CIFAR-10
in ``data/`` (torchvision's layout or its archive), else a mirror or torchvision's download, else — loudly —
the small real subset shipped with the course (5,000 training and 1,000 held-out images). Finding, checking
and building those files is :mod:`course_utils.machinery.datafiles`; here they are only tensors.

The fast path (:class:`TensorLoader`, airbench-style) keeps the whole split as one uint8 tensor on the
training device; random crop with padding, horizontal flip and normalisation run on whole batches there,
with a new random order every epoch that depends only on ``(seed, epoch)``. :func:`plain_loader` is the
usual torchvision way — PIL transforms in a ``DataLoader`` — kept for the benchmark and comparisons.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .machinery.checks import optional_whole_number, whole_number
from .machinery.datafiles import DATA_DIR, find_cifar10, subset_banner
from .machinery.devices import default_device
from .machinery.presets import banner

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class CifarData:
    """Train and validation splits as uint8 ``(N, 3, 32, 32)`` images and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    source: str
    full: bool  # the real 50,000/10,000 split (before any subsetting), not the shipped subset
    classes: tuple[str, ...] = CLASSES

    def __repr__(self):
        return (
            f"CifarData(train={len(self.train_labels)}, val={len(self.val_labels)}, "
            f"source={self.source!r}, full={self.full})"
        )


# ------------------------------------------------------------------------------ loading
def balanced_subset(labels: torch.Tensor, size: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` examples, as many of each class as possible, in a seeded random order."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if size is None or size >= n:
        return order
    shuffled = labels[order]
    rank = torch.zeros(n, dtype=torch.long)  # how many of the same class come earlier in `order`
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return order[torch.argsort(rank * n + torch.arange(n))[:size]]


def _pick(labels: torch.Tensor, size: int | None, seed: int, name: str, source: str) -> torch.Tensor:
    """:func:`balanced_subset` of one split, warning (at load_cifar10's caller) when ``size`` is too many."""
    if size is not None and size > len(labels):
        warnings.warn(
            f"{name}={size} but {source} holds only {len(labels)} images of that split: "
            f"using all {len(labels)}（提示：{name} 比现有的图片多，改用全部 {len(labels)} 张）",
            UserWarning,
            stacklevel=3,
        )
    return balanced_subset(labels, size, seed)


def load_cifar10(
    root: str | os.PathLike = DATA_DIR,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    verbose: bool = True,
    mirror: str | os.PathLike | None = None,
) -> CifarData:
    """CIFAR-10 from the best source at hand (see the module doc), optionally a balanced random subset.

    ``train_size`` / ``val_size``: how many images of each split (class-balanced), None for all; more than
    the source holds gives all it holds, with a warning. ``mirror``: a base URL or folder holding
    ``cifar-10-python.tar.gz`` (default ``$COURSE_CIFAR10_MIRROR``). When no source can be read, a
    ``DataUnavailableError`` says which files to put where.
    """
    train_size = optional_whole_number(
        train_size, "train_size", example="5000", none_means="all training images"
    )
    val_size = optional_whole_number(val_size, "val_size", example="1000", none_means="all validation images")
    seed = whole_number(seed, "seed", minimum=0, example="0")
    found = find_cifar10(root, download=download, mirror=mirror)
    (train_images, train_labels), (val_images, val_labels) = found.train, found.val
    train_idx = _pick(train_labels, train_size, seed, "train_size", found.source)
    val_idx = _pick(val_labels, val_size, seed + 1, "val_size", found.source).sort().values  # keeps its order
    data = CifarData(
        train_images[train_idx],
        train_labels[train_idx],
        val_images[val_idx],
        val_labels[val_idx],
        found.source,
        found.full,
    )
    if verbose:
        if not found.full:
            banner(*subset_banner(found))
        n_train, n_val = len(data.train_labels), len(data.val_labels)
        print(f"CIFAR-10：{n_train} 张训练图片 / {n_val} 张验证图片 (train / val)，来自 {found.source}")
    return data


# ------------------------------------------------------------------------------ augmentation
def normalization(pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for pretrained weights (what they were trained with), CIFAR-10's otherwise."""
    return (IMAGENET_MEAN, IMAGENET_STD) if pretrained else (CIFAR_MEAN, CIFAR_STD)


def crop_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Batched random crop with zero padding and horizontal flip, as two gathers (rows, then columns).

    ``images`` (N, C, H, W) any dtype; ``dy``, ``dx`` in ``[0, 2·pad]`` and ``flip`` (bool) per image.
    The flip is folded into the column indices. Gathering with expanded (N, 1, H, 1) / (N, 1, 1, W)
    indices allocates no per-pixel index tensors: 2-10x faster on the CPU than one 4-index gather.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))  # (N, C, H, W + 2·pad)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def resize(images: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size``×``size``; antialiased when shrinking. Where the device
    has no kernel for it (the antialiased one on MPS in some torch releases) it is done on the CPU and moved
    back."""
    resize_to = functools.partial(
        F.interpolate, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
    )
    try:
        return resize_to(images)
    except NotImplementedError:
        if images.device.type == "cpu":
            raise
        return resize_to(images.cpu()).to(images.device)


def _described(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_images_and_labels(images, labels) -> None:
    """``ValueError`` unless ``images`` is a non-empty uint8 (N, C, H, W) tensor with N integer labels."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            "images must be a uint8 (N, C, H, W) tensor (as load_cifar10 gives them), "
            f"got {_described(images)}"
        )
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor of class indices, got {_described(labels)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images: a TensorLoader needs at least one image")


class TensorLoader:
    """Batches of normalised float images from a uint8 tensor kept on ``device``.

    ``train=True``: a new order, crops and flips every epoch, fixed by ``(seed, epoch)``; call
    ``set_epoch`` (``fit`` does) or let each pass over the loader advance the epoch by one.
    ``train=False``: in order, no augmentation, every image once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 128,
        *,
        train: bool = False,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        pad: int = 4,
        flip: bool = True,
        image_size: int | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ):
        _check_images_and_labels(images, labels)
        batch_size = whole_number(batch_size, "batch_size", example="128")
        image_size = optional_whole_number(
            image_size, "image_size", example="224", none_means="keep the size"
        )
        pad = whole_number(pad, "pad", minimum=0, example="4")
        seed = whole_number(seed, "seed", minimum=0, example="0")
        labels = labels.long()
        self.device = torch.device(device) if device else default_device()
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, pad, flip
        self.image_size, self.seed, self.channels_last = image_size, seed, channels_last
        self.drop_last = train if drop_last is None else drop_last
        mean_t = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std_t), mean_t / std_t
        self.epoch = 0  # the epoch the next pass uses; each pass advances it by one

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_randomness(self, epoch: int):
        """``(order, dy, dx, flip)`` of one epoch, on the CPU: the same for the same seed and epoch.

        Drawn on the CPU whatever the device, so CPU, CUDA and MPS runs see the same epochs (a CUDA generator
        would draw other numbers); ~10 ms per epoch for 49,000 images, copied to the device once per epoch.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return order, dy, dx, flip

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.float().mul_(self._scale).sub_(self._shift)
        if self.image_size and self.image_size != x.shape[-1]:
            x = resize(x, self.image_size, antialias=self.image_size < x.shape[-1])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            order, dy, dx, flip = (t.to(self.device) for t in self.epoch_randomness(self.epoch))
            self.epoch += 1  # after set_epoch(e) too: a pass without set_epoch must not repeat epoch e
        for i in range(len(self)):
            if self.train:
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                batch = crop_flip(self.images[idx], dy[idx], dx[idx], flip[idx], self.pad)
                yield self.normalize(batch), self.labels[idx]
            else:
                sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
                yield self.normalize(self.images[sl]), self.labels[sl]


def make_loaders(
    data: CifarData,
    batch_size: int = 128,
    *,
    pretrained: bool = False,
    image_size: int | None = None,
    device=None,
    seed: int = 0,
    channels_last: bool = False,
) -> tuple[TensorLoader, TensorLoader]:
    """The course's fast train and validation loaders for ``data``."""
    if not isinstance(data, CifarData):
        raise TypeError(
            f"data must be what load_cifar10() returns (a CifarData), got {type(data).__name__}; "
            f"for your own tensors use TensorLoader(images, labels, batch_size, train=True)"
        )
    batch_size = whole_number(batch_size, "batch_size", example="128")
    mean, std = normalization(pretrained)
    common = dict(mean=mean, std=std, image_size=image_size, device=device, channels_last=channels_last)
    return (
        TensorLoader(data.train_images, data.train_labels, batch_size, train=True, seed=seed, **common),
        TensorLoader(data.val_images, data.val_labels, max(batch_size, 256), train=False, **common),
    )


# ------------------------------------------------------------------------------ the plain way
class PilDataset(torch.utils.data.Dataset):
    """uint8 tensor images served as PIL images through torchvision transforms (the usual way)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = np.ascontiguousarray(
            images.permute(0, 2, 3, 1).numpy()
        )  # HWC, as torchvision's CIFAR10 keeps it
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def plain_transforms(
    train: bool, mean=CIFAR_MEAN, std=CIFAR_STD, image_size: int | None = None, lesson: bool = False
):
    """torchvision transforms on PIL images; ``lesson=True`` adds the original lesson's ColorJitter and
    rotation."""
    from torchvision import transforms as T

    steps = []
    if train:
        steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if lesson:
            steps += [T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.RandomRotation(15)]
    if image_size and image_size != 32:
        steps.append(T.Resize(image_size))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def in_notebook() -> bool:
    """Whether this runs in Jupyter/IPython or an interactive prompt (``__main__`` has no file)."""
    return "ipykernel" in sys.modules or not hasattr(sys.modules.get("__main__"), "__file__")


def default_num_workers(workers: int = 2) -> int:
    """``workers`` DataLoader processes, but none from a notebook where new processes are *spawned*
    (Windows and macOS): each worker would start a fresh Python that re-imports the notebook's
    ``__main__`` and cannot unpickle what was defined in it — the hang/crash of fastai #2240."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return 0 if method == "spawn" and in_notebook() else workers


def plain_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    *,
    train: bool = False,
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
    image_size: int | None = None,
    lesson: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """The plain torchvision pipeline: PIL transforms in a ``DataLoader`` with worker processes
    (``num_workers``, default :func:`default_num_workers`: 2, none from a notebook on Windows/macOS)."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    dataset = PilDataset(images, labels, plain_transforms(train, mean, std, image_size, lesson))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
