"""Where CIFAR-10's files come from, for :func:`course_utils.data.load_cifar10`. In this order:

1. a copy already downloaded into ``data/cifar-10-batches-py`` (torchvision's layout), or torchvision's
   archive ``data/cifar-10-python.tar.gz`` (checked by torchvision's md5, then extracted);
2. a mirror, when one is named (``load_cifar10(mirror=...)`` or ``$COURSE_CIFAR10_MIRROR``: a base URL or a
   folder holding ``cifar-10-python.tar.gz``), else torchvision's ``CIFAR10(root="data", download=True)`` —
   the archive is checked by torchvision's md5 before use, a wrong or truncated one is refused by name;
3. the small real subset shipped with the course, ``data/cifar10_subset.tar.gz``
   (5,000 training and 1,000 held-out images; see ``data/README.md``) — loudly, since accuracies
   on it are far below what the full 50,000 images give.

Also here: how the shipped subset was made (:func:`build_subset`) and :func:`build_local_copy`, which writes
CIFAR-10 in torchvision's layout from a tar of JPEGs (what ``.ci/gpu_course.sh`` does on a machine offline).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import tarfile
import urllib.error
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .downloads import DOWNLOAD_TIMEOUT_S, DownloadError, fetch, file_digest, mirror_url

DATA_DIR = Path(os.environ.get("COURSE_DATA", Path(__file__).resolve().parents[2] / "data"))
SHIPPED_SUBSET = "cifar10_subset.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder
ARCHIVE = "cifar-10-python.tar.gz"  # torchvision's CIFAR10.filename
LOCAL_COPY_MANIFEST = "course_local_copy.json"  # written by build_local_copy
CIFAR10_MIRROR_ENV = "COURSE_CIFAR10_MIRROR"  # a base URL or a folder holding cifar-10-python.tar.gz

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 (N, 3, 32, 32) images, int64 labels


class DataUnavailableError(RuntimeError):
    """No CIFAR-10 source could be read; the message says which files to put where."""


class Found(NamedTuple):
    """The two splits of the first source that could be read, and what failed before it."""

    train: Split
    val: Split
    source: str  # e.g. "local copy data/cifar-10-batches-py", "shipped subset data/cifar10_subset.tar.gz"
    full: bool  # the real 50,000/10,000 split, not the shipped subset
    notes: list[str]  # why each earlier source was not used


def _class_names() -> tuple[str, ...]:
    from ..data import CLASSES  # the lesson module names them; imported here, where they are needed

    return CLASSES


# ------------------------------------------------------------------------------ torchvision's layout
def torchvision_cifar10(root: Path):
    """torchvision's ``CIFAR10`` reader; for a copy made by :func:`build_local_copy`, the same reader checking
    the md5 sums that the builder wrote into its manifest instead of those of the official release."""
    from torchvision.datasets import CIFAR10

    manifest = Path(root) / CIFAR10.base_folder / LOCAL_COPY_MANIFEST
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


def from_torchvision(root: Path, download: bool) -> list[Split]:
    """``[train, val]`` read (extracted, downloaded when ``download``) by torchvision's CIFAR10."""
    CIFAR10 = torchvision_cifar10(root)
    splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    return [
        (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
        for ds in splits
    ]


def cifar10_archive(root: Path, mirror, notes: list[str]) -> bool:
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


# ------------------------------------------------------------------------------ the sources, in order
def _from_archive(root: Path, mirror, notes: list[str]):
    if (root / BATCHES_FOLDER).is_dir() or not cifar10_archive(root, mirror, notes):
        return None
    try:  # a verified archive: torchvision extracts it without downloading
        return (*from_torchvision(root, download=True), f"archive {root / ARCHIVE}")
    except (OSError, RuntimeError, tarfile.TarError) as err:
        notes.append(f"extracting {root / ARCHIVE} failed ({err})")
        return None


def _from_local_copy(root: Path, notes: list[str]):
    if not (root / BATCHES_FOLDER).is_dir():
        return None
    try:
        return (*from_torchvision(root, download=False), f"local copy {root / BATCHES_FOLDER}")
    except RuntimeError as err:
        notes.append(
            f"the copy in {root / BATCHES_FOLDER} is incomplete or corrupted ({err}); "
            f"delete that folder to download it again"
        )
        return None


def _from_download(root: Path, download: bool, mirror, notes: list[str]):
    offline = os.environ.get("COURSE_OFFLINE", "") in ("1", "true")
    if offline or not download:
        notes.append(
            "no download attempted (" + ("COURSE_OFFLINE is set" if offline else "download=False") + ")"
        )
        return None
    if mirror or (root / ARCHIVE).exists():  # the mirror or the archive there was tried, and failed
        return None
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return (*from_torchvision(root, download=True), f"torchvision download into {root}")
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        notes.append(f"downloading CIFAR-10 failed ({type(err).__name__}: {err})")
        return None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _shipped_subset(root: Path, notes: list[str]) -> tuple[Split, Split, str]:
    shipped = root / SHIPPED_SUBSET
    if not shipped.is_file():
        raise DataUnavailableError(
            "no CIFAR-10 to be had: "
            + "; ".join(notes + [f"and the shipped subset {shipped} is missing"])
            + f". Put torchvision's {ARCHIVE} into {root} (or its extracted {BATCHES_FOLDER} folder), "
            f"name a folder or URL holding it in ${CIFAR10_MIRROR_ENV}, or restore {SHIPPED_SUBSET} "
            f"from the repository."
        )
    splits = read_image_tar(shipped)
    if "train" not in splits or "val" not in splits:
        raise DataUnavailableError(
            f"{shipped} lacks its train/ or val/ images (found {sorted(splits)}): it is truncated or "
            f"corrupted. Restore it with `git checkout -- {SHIPPED_SUBSET}` in data/."
        )
    return splits["train"], splits["val"], f"shipped subset {SHIPPED_SUBSET}"


def find_cifar10(root: str | os.PathLike, *, download: bool = True, mirror=None) -> Found:
    """CIFAR-10's train and val splits from the first source that can be read (see the module doc).
    ``mirror`` defaults to ``$COURSE_CIFAR10_MIRROR``; :class:`DataUnavailableError` when nothing can be
    read."""
    mirror = mirror if mirror is not None else os.environ.get(CIFAR10_MIRROR_ENV) or None
    root, notes = Path(root), []
    found = (
        _from_archive(root, mirror, notes)
        or _from_local_copy(root, notes)
        or _from_download(root, download, mirror, notes)
    )
    if found is not None:
        return Found(*found, full=True, notes=notes)
    return Found(*_shipped_subset(root, notes), full=False, notes=notes)


def subset_banner(found: Found) -> tuple[str, str]:
    """``(title, text)`` of the warning shown when the shipped subset stands in for CIFAR-10 (for
    :func:`~course_utils.machinery.presets.banner`): what it means for the numbers, and why it happened."""
    title = "正在使用随课程附带的 CIFAR-10 小子集 (shipped subset)"
    text = (
        f"小子集共有 {len(found.train[1]):,} 张训练图和 {len(found.val[1]):,} 张验证图，"
        "本次运行取用多少见下一行。"
        "准确率会远低于用完整的 50,000 张训练图得到的结果；联网运行一次（或把 CIFAR-10 放进 data/）"
        "就会改用完整的数据集。详细信息 (details)：" + "; ".join(found.notes)
    )
    return title, text


# ------------------------------------------------------------------------------ JPEG tars
def _decode(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    if image.shape != (32, 32, 3):
        raise DataUnavailableError(f"{name} is {image.shape}, not a 32×32 colour image")
    return image


def read_image_tar(path: Path) -> dict[str, Split]:
    """``split/<class>/*.jpg`` inside a tar(.gz) → ``{split: (uint8 images, labels)}``."""
    classes = _class_names()
    splits: dict[str, tuple[list, list]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split, cls, _ = member.name.split("/")[-3:]
                images, labels = splits.setdefault(split, ([], []))
                images.append(_decode(tar.extractfile(member).read(), f"{path}:{member.name}"))
                labels.append(classes.index(cls))
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise DataUnavailableError(
            f"cannot read {path}: it is truncated or corrupted ({err}). "
            f"Restore it with `git checkout -- {Path(path).name}` in data/."
        ) from err
    return {
        split: (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
        for split, (images, labels) in splits.items()
    }


def build_subset(
    source_tar: str | os.PathLike,
    out: str | os.PathLike,
    train_per_class: int = 500,
    val_per_class: int = 100,
    seed: int = 0,
) -> Path:
    """Re-pack a seeded, balanced sample of ``train/<class>/*.jpg`` into ``train/`` and ``val/`` (bytes
    unchanged).

    This is how ``data/cifar10_subset.tar.gz`` was made from the CIFAR-10 training split as JPEG.
    """
    import random

    classes = _class_names()
    out = Path(out)
    by_class: dict[str, list[tarfile.TarInfo]] = {c: [] for c in classes}
    with tarfile.open(source_tar) as src:
        members = [m for m in src.getmembers() if m.isfile()]
        for m in members:
            by_class[m.name.split("/")[-2]].append(m)
        rng = random.Random(seed)
        picked = []
        for cls in classes:
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


# ------------------------------------------------------------------------------ the local copy
def _jpegs(path: Path):
    """``(member name, split, class, JPEG bytes)`` of every JPEG in a tar."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")):
                    split, cls = member.name.split("/")[-3:-1]
                    yield member.name, split, cls, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataUnavailableError(f"cannot read {path}: it is truncated or corrupted ({err})") from err


def _split_by_held_out(source_tar: Path, held_out_tar: Path, held_out_split: str) -> dict[str, list]:
    """``{"train": rows, "test": rows}`` of ``(member name, label, image)``: a source image goes to "test"
    when its JPEG bytes equal one of ``held_out_tar``'s ``held_out_split`` images, to "train" otherwise."""
    classes = _class_names()
    held_out = {
        hashlib.sha256(blob).digest() for _, split, _, blob in _jpegs(held_out_tar) if split == held_out_split
    }
    if not held_out:
        raise ValueError(f"{held_out_tar} has no {held_out_split}/<class>/*.jpg images to hold out")
    splits: dict[str, list] = {"train": [], "test": []}
    found = set()
    for name, _, cls, blob in _jpegs(source_tar):
        if cls not in classes:
            raise ValueError(f"{source_tar}:{name}: {cls!r} is not a CIFAR-10 class ({', '.join(classes)})")
        digest = hashlib.sha256(blob).digest()
        if digest in held_out:
            found.add(digest)
        splits["test" if digest in held_out else "train"].append(
            (name, classes.index(cls), _decode(blob, f"{source_tar}:{name}"))
        )
    if found != held_out:
        raise ValueError(
            f"{len(held_out - found)} of the {len(held_out)} held-out images of {held_out_tar} are not "
            f"in {source_tar}: build from the tar the subset was made from (data/README.md)"
        )
    return splits


def _batch(rows: list, label: str) -> dict:
    """One batch file's content in the official release's format."""
    rows = sorted(rows)  # by member name: the same files for the same tar, whatever its order
    images = np.stack([image for _, _, image in rows])  # (N, 32, 32, 3) -> (N, 3072), channel planes
    return {
        "batch_label": label,
        "labels": [c for _, c, _ in rows],
        "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(rows), -1)),
        "filenames": [n.rsplit("/", 1)[-1] for n, _, _ in rows],
    }


def _batch_files(splits: dict[str, list], train_batches: int, held_out_name: str) -> dict[str, dict]:
    """``data_batch_1..train_batches``, ``test_batch`` and ``batches.meta``, by file name."""
    train_rows = sorted(splits["train"])
    bounds = np.linspace(0, len(train_rows), train_batches + 1).astype(int)
    files = {
        f"data_batch_{k + 1}": _batch(
            train_rows[bounds[k] : bounds[k + 1]], f"training batch {k + 1} of {train_batches}"
        )
        for k in range(train_batches)
    }
    files["test_batch"] = _batch(splits["test"], f"held-out images of {held_out_name}")
    files["batches.meta"] = {
        "label_names": list(_class_names()),
        "num_vis": 3072,
        "num_cases_per_batch": len(files["data_batch_1"]["labels"]),
    }
    return files


def _write_folder(folder: Path, files: dict[str, dict], manifest: dict) -> None:
    """The pickles, and the manifest recording their md5 sums."""
    md5 = {}
    for name, content in files.items():
        blob = pickle.dumps(content, protocol=4)
        (folder / name).write_bytes(blob)
        md5[name] = hashlib.md5(blob).hexdigest()
    (folder / LOCAL_COPY_MANIFEST).write_text(json.dumps({**manifest, "md5": md5}, indent=1) + "\n")


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
    target = root / BATCHES_FOLDER
    if target.exists():
        raise ValueError(
            f"{target} exists already: delete it to build the local copy again "
            f"(it is never replaced, it may be torchvision's download)"
        )
    splits = _split_by_held_out(source_tar, held_out_tar, held_out_split)
    if len(splits["train"]) < train_batches:
        raise ValueError(f"{source_tar} has only {len(splits['train'])} training images")
    manifest = {
        "source": source_tar.name,
        "held_out": f"{held_out_tar.name}:{held_out_split}/",
        "train": len(splits["train"]),
        "test": len(splits["test"]),
    }
    tmp = root / f".{BATCHES_FOLDER}.tmp{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        _write_folder(tmp, _batch_files(splits, train_batches, held_out_tar.name), manifest)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return target
