"""CIFAR-10 for the course, held as uint8 tensors, with augmentation as batched tensor ops.

Where the images come from, in this order (``load_cifar10`` always prints which one it used):

1. a copy already downloaded into ``data/cifar-10-batches-py`` (torchvision's layout);
2. torchvision's ``CIFAR10(root="data", download=True)`` — needs the network;
3. the small real subset shipped with the course, ``data/cifar10_subset.tar.gz``
   (5,000 training and 1,000 held-out images; see ``data/README.md``) — loudly, since accuracies
   on it are far below what the full 50,000 images give.

The fast path (:class:`TensorLoader`, airbench-style) keeps the whole split as one uint8 tensor on the
training device; random crop with padding, horizontal flip and normalisation run on whole batches there,
with a new random order every epoch that depends only on ``(seed, epoch)``. :func:`plain_loader` is the
usual torchvision way — PIL transforms in a ``DataLoader`` — kept for the benchmark and comparisons.
"""
from __future__ import annotations

import functools
import io
import multiprocessing
import os
import socket
import sys
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .devices import default_device

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA_DIR = Path(os.environ.get("COURSE_DATA", Path(__file__).resolve().parents[1] / "data"))
SHIPPED_SUBSET = "cifar10_subset.tar.gz"
DOWNLOAD_TIMEOUT_S = 10


class DataUnavailableError(RuntimeError):
    """No CIFAR-10 source could be read; the message says which files to put where."""


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
        return (f"CifarData(train={len(self.train_labels)}, val={len(self.val_labels)}, "
                f"source={self.source!r}, full={self.full})")


# ------------------------------------------------------------------------------ sources
def _from_torchvision(root: Path, download: bool):
    from torchvision.datasets import CIFAR10

    splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    return [(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
            for ds in splits]


def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    if image.shape != (32, 32, 3):
        raise DataUnavailableError(f"{name} is {image.shape}, not a 32×32 colour image")
    return image


def read_image_tar(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``split/<class>/*.jpg`` inside a tar(.gz) → ``{split: (uint8 images, labels)}``."""
    splits: dict[str, tuple[list, list]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split, cls, _ = member.name.split("/")[-3:]
                images, labels = splits.setdefault(split, ([], []))
                images.append(_decode(tar.extractfile(member).read(), f"{path}:{member.name}"))
                labels.append(CLASSES.index(cls))
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise DataUnavailableError(f"cannot read {path}: it is truncated or corrupted ({err}). "
                                   f"Restore it with `git checkout -- {path.name}` in data/.") from err
    return {split: (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
            for split, (images, labels) in splits.items()}


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


def load_cifar10(root: str | os.PathLike = DATA_DIR, train_size: int | None = None, val_size: int | None = None,
                 seed: int = 0, download: bool = True, verbose: bool = True) -> CifarData:
    """CIFAR-10 from the best source at hand (see the module doc), optionally a balanced random subset."""
    root = Path(root)
    notes = []
    source = None
    if (root / "cifar-10-batches-py").is_dir():
        try:
            (train, val), source = _from_torchvision(root, download=False), f"local copy {root / 'cifar-10-batches-py'}"
        except RuntimeError as err:
            notes.append(f"the copy in {root / 'cifar-10-batches-py'} is incomplete or corrupted ({err}); "
                         f"delete that folder to download it again")
    offline = os.environ.get("COURSE_OFFLINE", "") in ("1", "true")
    if source is None and (offline or not download):
        notes.append("no download attempted (" + ("COURSE_OFFLINE is set" if offline else "download=False") + ")")
    if source is None and download and not offline:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            (train, val), source = _from_torchvision(root, download=True), f"torchvision download into {root}"
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            notes.append(f"downloading CIFAR-10 failed ({type(err).__name__}: {err})")
        finally:
            socket.setdefaulttimeout(old_timeout)
    full = source is not None
    if not full:
        shipped = root / SHIPPED_SUBSET
        if not shipped.is_file():
            raise DataUnavailableError(
                "no CIFAR-10 to be had: " + "; ".join(notes + [f"and the shipped subset {shipped} is missing"])
                + f". Put torchvision's cifar-10-python.tar.gz into {root} (or its extracted "
                  f"cifar-10-batches-py folder), or restore {SHIPPED_SUBSET} from the repository.")
        splits = read_image_tar(shipped)
        if "train" not in splits or "val" not in splits:
            raise DataUnavailableError(f"{shipped} lacks its train/ or val/ images (found {sorted(splits)}): it is "
                                       f"truncated or corrupted. Restore it with `git checkout -- {SHIPPED_SUBSET}` "
                                       f"in data/.")
        train, val = splits["train"], splits["val"]
        source = f"shipped subset {shipped}"
    train_idx = balanced_subset(train[1], train_size, seed)
    val_idx = balanced_subset(val[1], val_size, seed + 1).sort().values
    data = CifarData(train[0][train_idx], train[1][train_idx], val[0][val_idx], val[1][val_idx], source, full)
    if verbose:
        message = f"CIFAR-10: {len(data.train_labels)} train / {len(data.val_labels)} val images from {source}"
        if not full:
            message = ("!" * 78 + "\n! " + "\n! ".join(notes) + "\n! USING THE SHIPPED SUBSET: only "
                       f"{len(train[1])} train / {len(val[1])} held-out images.\n! Accuracies are far below "
                       "those of the full 50,000 images. Go online once (or copy CIFAR-10 into data/)\n"
                       "! for the real numbers.\n" + "!" * 78 + "\n" + message)
        print(message)
    return data


def build_subset(source_tar: str | os.PathLike, out: str | os.PathLike, train_per_class: int = 500,
                 val_per_class: int = 100, seed: int = 0) -> Path:
    """Re-pack a seeded, balanced sample of ``train/<class>/*.jpg`` into ``train/`` and ``val/`` (bytes unchanged).

    This is how ``data/cifar10_subset.tar.gz`` was made from the CIFAR-10 training split as JPEG.
    """
    import random

    out = Path(out)
    by_class: dict[str, list[tarfile.TarInfo]] = {c: [] for c in CLASSES}
    with tarfile.open(source_tar) as src:
        members = [m for m in src.getmembers() if m.isfile()]
        for m in members:
            by_class[m.name.split("/")[-2]].append(m)
        rng = random.Random(seed)
        picked = []
        for cls in CLASSES:
            chosen = rng.sample(sorted(by_class[cls], key=lambda m: m.name), train_per_class + val_per_class)
            picked += [(f"train/{cls}/{m.name.split('/')[-1]}", m) for m in chosen[:train_per_class]]
            picked += [(f"val/{cls}/{m.name.split('/')[-1]}", m) for m in chosen[train_per_class:]]
        tmp = out.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz", compresslevel=9) as dst:
            for name, m in sorted(picked, key=lambda x: x[0]):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = m.size, 0o644, 0
                dst.addfile(info, src.extractfile(m))
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ augmentation
def normalization(pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for pretrained weights (what they were trained with), CIFAR-10's otherwise."""
    return (IMAGENET_MEAN, IMAGENET_STD) if pretrained else (CIFAR_MEAN, CIFAR_STD)


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
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
    """Bilinear resize of a float batch to ``size``×``size``; antialiased when shrinking. Where the device has
    no kernel for it (the antialiased one on MPS in some torch releases) it is done on the CPU and moved back."""
    resize_to = functools.partial(F.interpolate, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=antialias)
    try:
        return resize_to(images)
    except NotImplementedError:
        if images.device.type == "cpu":
            raise
        return resize_to(images.cpu()).to(images.device)


class TensorLoader:
    """Batches of normalised float images from a uint8 tensor kept on ``device``.

    ``train=True``: a new order, crops and flips every epoch, fixed by ``(seed, epoch)``; call
    ``set_epoch`` (``fit`` does) or let each pass over the loader advance the epoch by one.
    ``train=False``: in order, no augmentation, every image once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *, train: bool = False,
                 mean=CIFAR_MEAN, std=CIFAR_STD, pad: int = 4, flip: bool = True, image_size: int | None = None,
                 device: str | torch.device | None = None, seed: int = 0, drop_last: bool | None = None,
                 channels_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
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
        """``(order, dy, dx, flip)`` of one epoch, on the CPU: the same for the same seed and epoch."""
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
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                batch = crop_flip(self.images[idx], dy[idx], dx[idx], flip[idx], self.pad)
                yield self.normalize(batch), self.labels[idx]
            else:
                sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
                yield self.normalize(self.images[sl]), self.labels[sl]


def make_loaders(data: CifarData, batch_size: int = 128, *, pretrained: bool = False, image_size: int | None = None,
                 device=None, seed: int = 0, channels_last: bool = False) -> tuple[TensorLoader, TensorLoader]:
    """The course's fast train and validation loaders for ``data``."""
    mean, std = normalization(pretrained)
    common = dict(mean=mean, std=std, image_size=image_size, device=device, channels_last=channels_last)
    return (TensorLoader(data.train_images, data.train_labels, batch_size, train=True, seed=seed, **common),
            TensorLoader(data.val_images, data.val_labels, max(batch_size, 256), train=False, **common))


# ------------------------------------------------------------------------------ the plain way
class PilDataset(torch.utils.data.Dataset):
    """uint8 tensor images served as PIL images through torchvision transforms (the usual way)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # HWC, as torchvision's CIFAR10 keeps it
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def plain_transforms(train: bool, mean=CIFAR_MEAN, std=CIFAR_STD, image_size: int | None = None, lesson: bool = False):
    """torchvision transforms on PIL images; ``lesson=True`` adds the original lesson's ColorJitter and rotation."""
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


def plain_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *, train: bool = False,
                 mean=CIFAR_MEAN, std=CIFAR_STD, image_size: int | None = None, lesson: bool = False,
                 num_workers: int | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """The plain torchvision pipeline: PIL transforms in a ``DataLoader`` with worker processes
    (``num_workers``, default :func:`default_num_workers`: 2, none from a notebook on Windows/macOS)."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    dataset = PilDataset(images, labels, plain_transforms(train, mean, std, image_size, lesson))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed))
