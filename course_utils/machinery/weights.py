"""Pretrained weights for the course's models: torchvision's names, its cache, a mirror, checked files.

``pretrained_state(arch, weights)`` is all :mod:`course_utils.models` asks: the backbone's state_dict for
``weights`` — ``None`` (random), torchvision's weights by name or enum (``"imagenet"``, ``"DEFAULT"``,
``"IMAGENET1K_V1"``, ``ResNet18_Weights.IMAGENET1K_V1``) or a path to a state_dict file. Named weights come
from torchvision's cache (``$TORCH_HOME/hub/checkpoints``), else from the mirror ``$COURSE_WEIGHTS_MIRROR``,
else from torchvision's server. A file whose name carries torchvision's sha256 prefix
(``resnet18-f37072fd.pth``) is checked against it before it is loaded, and every failure raises
:class:`WeightsError` naming the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from .downloads import DownloadError, fetch, file_digest, mirror_url, sha256_prefix_in_name

WEIGHTS_ENUMS = {"resnet18": tvm.ResNet18_Weights, "vgg16": tvm.VGG16_Weights}
WEIGHTS_MIRROR_ENV = "COURSE_WEIGHTS_MIRROR"  # a base URL or a folder holding e.g. resnet18-f37072fd.pth


class WeightsError(RuntimeError):
    """Pretrained weights could not be had or do not fit the model; the message says what to do."""


# ---------------------------------------------------------------------------- names
def accepted(arch: str) -> str:
    """What ``weights=`` takes for ``arch``, for error messages."""
    enum = WEIGHTS_ENUMS[arch]
    return (
        f"None (random), 'imagenet', 'DEFAULT', a {enum.__name__} name ({', '.join(enum.__members__)}) or "
        f"enum (e.g. torchvision.models.{enum.__name__}.DEFAULT), or a path to a state_dict file"
    )


def _other_arch(owner: str) -> str:
    """``"VGG16"`` of ``VGG16_Weights`` or ``torchvision.models.VGG16_Weights``."""
    return owner.rsplit(".", 1)[-1].split("_")[0]


def torchvision_weights(arch: str, weights) -> WeightsEnum | None:
    """The torchvision weights ``weights`` names for ``arch``, or None when it is not such a name (a path).
    Another architecture's weights, or a member ``arch``'s enum lacks, raise ``ValueError``."""
    enum = WEIGHTS_ENUMS[arch]
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum):
            raise ValueError(
                f"weights={weights} are {_other_arch(type(weights).__name__)}'s weights, not {arch}'s: "
                f"pass {enum.__name__} (e.g. {enum.__name__}.DEFAULT), or one of {accepted(arch)}"
            )
        return weights
    if not isinstance(weights, str):
        return None
    name = weights.strip()
    if name.lower() == "imagenet":
        return enum.IMAGENET1K_V1
    owner, _, member = name.rpartition(".")
    known = {e.__name__ for e in WEIGHTS_ENUMS.values()}
    if owner and owner in known | {f"torchvision.models.{e}" for e in known}:
        if owner.rsplit(".", 1)[-1] != enum.__name__:
            raise ValueError(
                f"weights={weights!r} are {_other_arch(owner)}'s weights, not {arch}'s: "
                f"pass one of {accepted(arch)}"
            )
        name = member
    if name.upper() == "DEFAULT":
        return enum.DEFAULT
    if name.upper() in enum.__members__:
        return enum[name.upper()]
    if owner == enum.__name__:
        raise ValueError(f"{enum.__name__} has no {member!r}: pass one of {accepted(arch)}")
    return None


def _torch_hub_file(weights_enum: WeightsEnum) -> Path:
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def weights_cache_path(arch: str, weights="imagenet") -> Path:
    """Where torchvision keeps ``arch``'s (``"resnet18"`` / ``"vgg16"``) pretrained weights and the course
    looks for them: ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` (by default under
    ``~/.cache/torch``)."""
    if arch not in WEIGHTS_ENUMS:
        raise ValueError(f"arch must be one of {', '.join(WEIGHTS_ENUMS)}, got {arch!r}")
    enum = torchvision_weights(arch, weights)
    if enum is None:
        raise ValueError(f"weights={weights!r} is not one of torchvision's weights for {arch}")
    return _torch_hub_file(enum)


# ---------------------------------------------------------------------------- files
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files whose hash was checked


def verify_weights_file(path: str | os.PathLike, fix: str = "Delete it and download it again") -> None:
    """If the file's name carries torchvision's sha256 prefix (``resnet18-f37072fd.pth``), check the file
    against it: a partial (interrupted) or wrong file raises :class:`WeightsError` naming it and the fix."""
    path = Path(path)
    prefix = sha256_prefix_in_name(path)
    if prefix is None:
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    digest = file_digest(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            f"weights file {path} is incomplete or damaged ({stat.st_size:,} bytes; its sha256 starts "
            f"with {digest[: len(prefix)]}, its name says {prefix}) — an interrupted download? It is not "
            f"loaded. {fix}. （提示：权重文件不完整，请删除后重新下载）"
        )
    _VERIFIED.add(key)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a checked file, with errors that name the file and the fix."""
    path = Path(path)
    verify_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # UnpicklingError for code, RuntimeError/EOFError for truncation
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            why = "it contains Python objects that would run code when loaded, so it is refused"
        else:
            why = f"it is truncated or corrupted ({text})"
        raise WeightsError(
            f"cannot load weights file {path}: {why}. Delete it and download it again."
        ) from err
    if isinstance(state, dict) and "model" in state and "optimizer" in state:
        raise WeightsError(
            f"{path} is a training checkpoint written by fit, not backbone weights: continue it with "
            f"fit(..., checkpoint='{path}', resume=True), or load its 'model' entry into a model of "
            f"the same kind with model.load_state_dict(torch.load(path, weights_only=True)['model'])"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict (a dict of tensors)")
    return state


def _cached_or_downloaded(arch: str, enum: WeightsEnum) -> Path:
    """torchvision's cached file for ``enum``, downloaded (from the mirror, if one is set) when missing."""
    cached = _torch_hub_file(enum)
    if cached.is_file():
        print(f"{arch} 的 ImageNet 预训练权重 (weights)：{cached.name}，来自 torchvision 的缓存 (cache)")
        verify_weights_file(
            cached,
            fix=f"Delete it (it is downloaded again on the next run) or copy a complete {cached.name} there",
        )
        return cached
    mirror = os.environ.get(WEIGHTS_MIRROR_ENV)
    url = mirror_url(mirror, cached.name) if mirror else enum.url
    where = f"（镜像 (mirror) ${WEIGHTS_MIRROR_ENV}）" if mirror else ""
    print(f"正在下载 (downloading) {arch} 的 ImageNet 预训练权重{where}：{url} → {cached}")
    try:
        fetch(url, cached, sha256_prefix=sha256_prefix_in_name(cached))
    except DownloadError as err:
        raise WeightsError(
            f"ImageNet weights for {arch} could not be had: {err}. Offline? Put the file {cached.name} "
            f"(from {enum.url}) at {cached} — torchvision's cache, set by $TORCH_HOME —, or name a folder "
            f"or URL holding it in ${WEIGHTS_MIRROR_ENV}, or pass weights=None to start from random weights."
        ) from err
    return cached


def pretrained_state(arch: str, weights) -> dict[str, torch.Tensor] | None:
    """The backbone's state_dict for ``weights`` (see the module doc); None for ``weights=None``."""
    if weights is None:
        return None
    enum = torchvision_weights(arch, weights)
    if enum is not None:
        return read_state_dict(_cached_or_downloaded(arch, enum))
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be {accepted(arch)}; got {weights!r}")
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (weights= takes {accepted(arch)})")
    return read_state_dict(path)


# ---------------------------------------------------------------------------- fit
def check_backbone_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], arch: str
) -> None:
    """Raise :class:`WeightsError` unless ``state`` has exactly ``expected``'s keys and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong_shape):
        return
    details = []
    if missing:
        details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        details.append(
            f"{len(wrong_shape)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
            f"instead of {tuple(expected[k].shape)})"
        )
    raise WeightsError(f"these weights are not a torchvision {arch} state_dict: " + ", ".join(details))
