"""CIFAR-10 for the course, held as uint8 tensors, with augmentation as batched tensor ops.

Where the images come from, in this order (``load_cifar10`` always prints which one it used):

1. a copy already downloaded into ``data/cifar-10-batches-py`` (torchvision's layout), or torchvision's
   archive ``data/cifar-10-python.tar.gz`` (checked by torchvision's md5, then extracted);
2. a mirror, when one is named (``load_cifar10(mirror=...)`` or ``$COURSE_CIFAR10_MIRROR``: a base URL or a
   folder holding ``cifar-10-python.tar.gz``), else torchvision's ``CIFAR10(root="data", download=True)`` —
   the archive is checked by torchvision's md5 before use, a wrong or truncated one is refused by name;
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
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import socket
import sys
import tarfile
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .machinery.checks import optional_whole_number, whole_number
from .machinery.devices import default_device
from .machinery.downloads import DownloadError, fetch, file_digest, mirror_url

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA_DIR = Path(os.environ.get("COURSE_DATA", Path(__file__).resolve().parents[1] / "data"))
SHIPPED_SUBSET = "cifar10_subset.tar.gz"
LOCAL_COPY_MANIFEST = "course_local_copy.json"  # written by build_local_copy
DOWNLOAD_TIMEOUT_S = 10
CIFAR10_MIRROR_ENV = "COURSE_CIFAR10_MIRROR"  # a base URL or a folder holding cifar-10-python.tar.gz


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
        return (
            f"CifarData(train={len(self.train_labels)}, val={len(self.val_labels)}, "
            f"source={self.source!r}, full={self.full})"
        )


# ------------------------------------------------------------------------------ sources
def _from_torchvision(root: Path, download: bool):
    CIFAR10 = _torchvision_cifar10(root)
    splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    return [
        (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
        for ds in splits
    ]


def _torchvision_cifar10(root: Path):
    """torchvision's ``CIFAR10`` reader; for a copy made by :func:`build_local_copy`, the same reader checking
    the md5 sums that the builder wrote into its manifest instead of those of the official release."""
    from torchvision.datasets import CIFAR10

    manifest = root / CIFAR10.base_folder / LOCAL_COPY_MANIFEST
    if not manifest.is_file():
        return CIFAR10
    try:
        md5 = json.loads(manifest.read_text())["md5"]
        train_list = [[name, md5[name]] for name, _ in CIFAR10.train_list]
        test_list = [[name, md5[name]] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]}
    except (ValueError, KeyError, TypeError) as err:
        raise RuntimeError(f"its manifest {manifest.name} is unreadable ({err})") from err
    return type(
        "LocalCopyCIFAR10", (CIFAR10,), {"train_list": train_list, "test_list": test_list, "meta": meta}
    )


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
        raise DataUnavailableError(
            f"cannot read {path}: it is truncated or corrupted ({err}). "
            f"Restore it with `git checkout -- {path.name}` in data/."
        ) from err
    return {
        split: (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
        for split, (images, labels) in splits.items()
    }


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


def _cifar10_archive(root: Path, mirror, notes: list[str]) -> bool:
    """Make sure ``root/cifar-10-python.tar.gz`` is torchvision's archive (md5), fetching it from ``mirror``
    when given; True when a verified archive is there. A wrong or truncated one is named in ``notes``."""
    from torchvision.datasets import CIFAR10

    archive = root / CIFAR10.filename
    if archive.is_file():
        digest = file_digest(archive, "md5")
        if digest == CIFAR10.tgz_md5:
            return True
        notes.append(
            f"{archive} is not torchvision's CIFAR-10 archive ({archive.stat().st_size:,} bytes, md5 "
            f"{digest} instead of {CIFAR10.tgz_md5}): an interrupted download? It was not used; delete it"
        )
        return False
    if mirror:
        url = mirror_url(mirror, CIFAR10.filename)
        try:
            fetch(url, archive, md5=CIFAR10.tgz_md5)
            return True
        except DownloadError as err:
            notes.append(f"the mirror failed: {err}")
    return False


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
    ``cifar-10-python.tar.gz`` (default ``$COURSE_CIFAR10_MIRROR``).
    """
    train_size = optional_whole_number(
        train_size, "train_size", example="5000", none_means="all training images"
    )
    val_size = optional_whole_number(val_size, "val_size", example="1000", none_means="all validation images")
    seed = whole_number(seed, "seed", minimum=0, example="0")
    mirror = mirror if mirror is not None else os.environ.get(CIFAR10_MIRROR_ENV) or None
    root = Path(root)
    notes = []
    source = None
    if not (root / "cifar-10-batches-py").is_dir() and _cifar10_archive(root, mirror, notes):
        try:  # a verified archive: torchvision extracts it without downloading
            (train, val), source = (
                _from_torchvision(root, download=True),
                f"archive {root / 'cifar-10-python.tar.gz'}",
            )
        except (OSError, RuntimeError, tarfile.TarError) as err:
            notes.append(f"extracting {root / 'cifar-10-python.tar.gz'} failed ({err})")
    if source is None and (root / "cifar-10-batches-py").is_dir():
        try:
            (train, val), source = (
                _from_torchvision(root, download=False),
                f"local copy {root / 'cifar-10-batches-py'}",
            )
        except RuntimeError as err:
            notes.append(
                f"the copy in {root / 'cifar-10-batches-py'} is incomplete or corrupted ({err}); "
                f"delete that folder to download it again"
            )
    offline = os.environ.get("COURSE_OFFLINE", "") in ("1", "true")
    if source is None and (offline or not download):
        notes.append(
            "no download attempted (" + ("COURSE_OFFLINE is set" if offline else "download=False") + ")"
        )
    if (
        source is None
        and download
        and not offline
        and not mirror
        and not (root / "cifar-10-python.tar.gz").exists()
    ):
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
                "no CIFAR-10 to be had: "
                + "; ".join(notes + [f"and the shipped subset {shipped} is missing"])
                + f". Put torchvision's cifar-10-python.tar.gz into {root} (or its extracted "
                f"cifar-10-batches-py folder), name a folder or URL holding it in ${CIFAR10_MIRROR_ENV}, "
                f"or restore {SHIPPED_SUBSET} from the repository."
            )
        splits = read_image_tar(shipped)
        if "train" not in splits or "val" not in splits:
            raise DataUnavailableError(
                f"{shipped} lacks its train/ or val/ images (found {sorted(splits)}): it is "
                f"truncated or corrupted. Restore it with `git checkout -- {SHIPPED_SUBSET}` "
                f"in data/."
            )
        train, val = splits["train"], splits["val"]
        source = f"shipped subset {shipped}"
    for name, size, split in (("train_size", train_size, train), ("val_size", val_size, val)):
        if size is not None and size > len(split[1]):
            warnings.warn(
                f"{name}={size} but {source} holds only {len(split[1])} images of that split: "
                f"using all {len(split[1])}",
                UserWarning,
                stacklevel=2,
            )
    train_idx = balanced_subset(train[1], train_size, seed)
    val_idx = balanced_subset(val[1], val_size, seed + 1).sort().values
    data = CifarData(train[0][train_idx], train[1][train_idx], val[0][val_idx], val[1][val_idx], source, full)
    if verbose:
        message = (
            f"CIFAR-10: {len(data.train_labels)} train / {len(data.val_labels)} val images from {source}"
        )
        if not full:
            message = (
                "!" * 78 + "\n! " + "\n! ".join(notes) + "\n! USING THE SHIPPED SUBSET: only "
                f"{len(train[1])} train / {len(val[1])} held-out images.\n! Accuracies are far below "
                "those of the full 50,000 images. Go online once (or copy CIFAR-10 into data/)\n"
                "! for the real numbers.\n" + "!" * 78 + "\n" + message
            )
        print(message)
    return data


def build_subset(
    source_tar: str | os.PathLike,
    out: str | os.PathLike,
    train_per_class: int = 500,
    val_per_class: int = 100,
    seed: int = 0,
) -> Path:
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


def build_local_copy(
    source_tar: str | os.PathLike,
    root: str | os.PathLike = DATA_DIR,
    held_out_tar: str | os.PathLike | None = None,
    held_out_split: str = "val",
    train_batches: int = 5,
) -> Path:
    """CIFAR-10 in torchvision's on-disk layout, ``root/cifar-10-batches-py/``, built from JPEGs.

    ``source_tar``: ``<split>/<class>/*.jpg`` members (e.g. the training split as JPEG,
    ``cifar10-train-jpeg.tar.gz``). Every source image whose JPEG bytes equal one of ``held_out_tar``'s
    ``held_out_split`` images (default: the shipped subset's 1,000 ``val/`` images, which are byte-identical
    copies from that tar) goes into ``test_batch``, all others into ``data_batch_1..train_batches``, so the
    validation split (torchvision's test split) never holds a training image and equals the shipped subset's.
    Each held-out image must be found in the source (else ``ValueError``). The pickles have the official
    release's format; ``course_local_copy.json`` beside them records their md5 sums (torchvision checks
    those of the official files, which differ), which ``load_cifar10`` checks instead, the provenance and
    the counts. Written into a temporary folder and renamed at the end; an existing folder is never replaced.
    """
    source_tar, root = Path(source_tar), Path(root)
    held_out_tar = Path(held_out_tar) if held_out_tar else DATA_DIR / SHIPPED_SUBSET
    target = root / "cifar-10-batches-py"
    if target.exists():
        raise ValueError(
            f"{target} exists already: delete it to build the local copy again "
            f"(it is never replaced, it may be torchvision's download)"
        )

    def jpegs(path: Path):
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")):
                        split, cls = member.name.split("/")[-3:-1]
                        yield member.name, split, cls, tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataUnavailableError(f"cannot read {path}: it is truncated or corrupted ({err})") from err

    held_out = {
        hashlib.sha256(blob).digest() for _, split, _, blob in jpegs(held_out_tar) if split == held_out_split
    }
    if not held_out:
        raise ValueError(f"{held_out_tar} has no {held_out_split}/<class>/*.jpg images to hold out")
    splits = {"train": [], "test": []}
    found = set()
    for name, _, cls, blob in jpegs(source_tar):
        if cls not in CLASSES:
            raise ValueError(f"{source_tar}:{name}: {cls!r} is not a CIFAR-10 class ({', '.join(CLASSES)})")
        digest = hashlib.sha256(blob).digest()
        if digest in held_out:
            found.add(digest)
        splits["test" if digest in held_out else "train"].append(
            (name, CLASSES.index(cls), _decode(blob, f"{source_tar}:{name}"))
        )
    if found != held_out:
        raise ValueError(
            f"{len(held_out - found)} of the {len(held_out)} held-out images of {held_out_tar} are not "
            f"in {source_tar}: build from the tar the subset was made from (data/README.md)"
        )
    if len(splits["train"]) < train_batches:
        raise ValueError(f"{source_tar} has only {len(splits['train'])} training images")

    def batch(rows, label):
        rows = sorted(rows)  # by member name: the same files for the same tar, whatever its order
        images = np.stack([image for _, _, image in rows])  # (N, 32, 32, 3) -> (N, 3072), channel planes
        return {
            "batch_label": label,
            "labels": [c for _, c, _ in rows],
            "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(rows), -1)),
            "filenames": [n.rsplit("/", 1)[-1] for n, _, _ in rows],
        }

    tmp = root / f".cifar-10-batches-py.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        train_rows = sorted(splits["train"])
        bounds = np.linspace(0, len(train_rows), train_batches + 1).astype(int)
        files = {
            f"data_batch_{k + 1}": batch(
                train_rows[bounds[k] : bounds[k + 1]], f"training batch {k + 1} of {train_batches}"
            )
            for k in range(train_batches)
        }
        files["test_batch"] = batch(splits["test"], f"held-out images of {held_out_tar.name}")
        files["batches.meta"] = {
            "label_names": list(CLASSES),
            "num_vis": 3072,
            "num_cases_per_batch": len(files["data_batch_1"]["labels"]),
        }
        md5 = {}
        for name, content in files.items():
            blob = pickle.dumps(content, protocol=4)
            (tmp / name).write_bytes(blob)
            md5[name] = hashlib.md5(blob).hexdigest()
        (tmp / LOCAL_COPY_MANIFEST).write_text(
            json.dumps(
                {
                    "source": source_tar.name,
                    "held_out": f"{held_out_tar.name}:{held_out_split}/",
                    "train": len(train_rows),
                    "test": len(splits["test"]),
                    "md5": md5,
                },
                indent=1,
            )
            + "\n"
        )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return target


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
    """Bilinear resize of a float batch to ``size``×``size``; antialiased when shrinking. Where the device has
    no kernel for it (the antialiased one on MPS in some torch releases) it is done on the CPU and moved back."""
    resize_to = functools.partial(
        F.interpolate, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
    )
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
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = (
                f"{images.dtype} {tuple(images.shape)}"
                if isinstance(images, torch.Tensor)
                else type(images).__name__
            )
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor (as load_cifar10 gives them), got {got}"
            )
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            got = (
                f"{labels.dtype} {tuple(labels.shape)}"
                if isinstance(labels, torch.Tensor)
                else type(labels).__name__
            )
            raise ValueError(f"labels must be a 1-D integer tensor of class indices, got {got}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("no images: a TensorLoader needs at least one image")
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
