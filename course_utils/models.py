"""ResNet18 and VGG16 with CBAM, built from torchvision's pretrained networks.

Both models are composed plainly from the torchvision modules (so pretrained weights load by
torchvision's own API) and expose the same things to the rest of the course:

* ``layer_groups(model)`` — every parameter exactly once, in named groups ordered input → output;
* ``model.new_groups`` — the groups that start from random weights whatever ``weights`` says
  (the new head and CBAM always; the stem too with ``stem="cifar"``): the schedule's ``"new"``;
* ``model.stages`` — the stage names in forward order, and ``model.features(x)`` — each stage's output.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models._api import WeightsEnum
from torchvision.models.resnet import BasicBlock

from .cbam import CBAM
from .machinery.checks import whole_number
from .machinery.downloads import DownloadError, fetch, file_digest, mirror_url, sha256_prefix_in_name

PLACEMENTS = ("stage", "block", "high", None)
NEW_GROUPS = ("cbam", "head")  # the groups that start random, for a model without its own ``new_groups``
WEIGHTS_ENUMS = {"resnet18": tvm.ResNet18_Weights, "vgg16": tvm.VGG16_Weights}
WEIGHTS_MIRROR_ENV = "COURSE_WEIGHTS_MIRROR"  # a base URL or a folder holding e.g. resnet18-f37072fd.pth


class WeightsError(RuntimeError):
    """Pretrained weights could not be had or do not fit the model; the message says what to do."""


# ---------------------------------------------------------------------------- weights
def _torch_hub_file(weights_enum) -> Path:
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)


def weights_cache_path(arch: str, weights="imagenet") -> Path:
    """Where torchvision keeps ``arch``'s (``"resnet18"`` / ``"vgg16"``) pretrained weights and the course
    looks for them: ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth`` (by default under ``~/.cache/torch``)."""
    if arch not in WEIGHTS_ENUMS:
        raise ValueError(f"arch must be one of {', '.join(WEIGHTS_ENUMS)}, got {arch!r}")
    enum = _weights_enum(arch, weights)
    if enum is None:
        raise ValueError(f"weights={weights!r} is not one of torchvision's weights for {arch}")
    return _torch_hub_file(enum)


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` with errors that name the file and the fix."""
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


def _accepted(arch: str) -> str:
    enum = WEIGHTS_ENUMS[arch]
    return (
        f"None (random), 'imagenet', 'DEFAULT', a {enum.__name__} name ({', '.join(enum.__members__)}) or "
        f"enum (e.g. torchvision.models.{enum.__name__}.DEFAULT), or a path to a state_dict file"
    )


def _weights_enum(arch: str, weights) -> WeightsEnum | None:
    """The torchvision weights ``weights`` names for ``arch``, or None when it is not such a name (a path)."""
    enum = WEIGHTS_ENUMS[arch]
    if isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum):
            raise ValueError(
                f"weights={weights} are {type(weights).__name__.split('_')[0]}'s weights, not {arch}'s: "
                f"pass {enum.__name__} (e.g. {enum.__name__}.DEFAULT), or one of {_accepted(arch)}"
            )
        return weights
    if not isinstance(weights, str):
        return None
    name = weights.strip()
    if name.lower() == "imagenet":
        return enum.IMAGENET1K_V1
    owner, _, member = name.rpartition(".")
    if owner and owner in {e.__name__ for e in WEIGHTS_ENUMS.values()} | {
        f"torchvision.models.{e.__name__}" for e in WEIGHTS_ENUMS.values()
    }:
        if owner.rsplit(".", 1)[-1] != enum.__name__:
            raise ValueError(
                f"weights={weights!r} are {owner.rsplit('.', 1)[-1].split('_')[0]}'s weights, not "
                f"{arch}'s: pass one of {_accepted(arch)}"
            )
        name = member
    if name.upper() == "DEFAULT":
        return enum.DEFAULT
    if name.upper() in enum.__members__:
        return enum[name.upper()]
    if owner == enum.__name__:
        raise ValueError(f"{enum.__name__} has no {member!r}: pass one of {_accepted(arch)}")
    return None


def _pretrained_state(arch: str, weights) -> dict[str, torch.Tensor] | None:
    """The backbone's state_dict for ``weights``: None (random), torchvision's weights by name or enum
    (``"imagenet"``, ``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``ResNet18_Weights.IMAGENET1K_V1``: torchvision's
    cache, else the mirror ``$COURSE_WEIGHTS_MIRROR``, else torchvision's server) or a path."""
    if weights is None:
        return None
    enum = _weights_enum(arch, weights)
    if enum is None:
        if not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be {_accepted(arch)}; got {weights!r}")
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist (weights= takes {_accepted(arch)})")
        return _read_state_dict(path)
    cached = _torch_hub_file(enum)
    if cached.is_file():
        print(f"ImageNet weights for {arch}: {cached} (torchvision cache)")
        verify_weights_file(
            cached,
            fix=f"Delete it (it is downloaded again on the next run) or copy a complete {cached.name} there",
        )
        return _read_state_dict(cached)
    mirror = os.environ.get(WEIGHTS_MIRROR_ENV)
    url = mirror_url(mirror, cached.name) if mirror else enum.url
    print(f"Downloading {url} to {cached}" + (f" (mirror ${WEIGHTS_MIRROR_ENV})" if mirror else ""))
    try:
        fetch(url, cached, sha256_prefix=sha256_prefix_in_name(cached))
    except DownloadError as err:
        raise WeightsError(
            f"ImageNet weights for {arch} could not be had: {err}. Offline? Put the file {cached.name} "
            f"(from {enum.url}) at {cached} — torchvision's cache, set by $TORCH_HOME —, or name a folder or URL "
            f"holding it in ${WEIGHTS_MIRROR_ENV}, or pass weights=None to start from random weights."
        ) from err
    return _read_state_dict(cached)


def _load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor] | None, arch: str, head_prefix: str):
    """Load ``state`` into the torchvision backbone; its 1000-class head is dropped (the head is new)."""
    if state is None:
        return
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    expected = {k: v for k, v in backbone.state_dict().items() if not k.startswith(head_prefix)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
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
    backbone.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------- ResNet18
class BasicBlockCBAM(nn.Module):
    """A torchvision BasicBlock with CBAM on the residual branch before the addition (the paper's placement)."""

    def __init__(self, block: BasicBlock, cbam: CBAM):
        super().__init__()
        self.block = block
        self.cbam = cbam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        residual = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))
        shortcut = x if b.downsample is None else b.downsample(x)
        return b.relu(self.cbam(residual) + shortcut)


class ResNetCBAM(nn.Module):
    """stem → layer1..layer4 (each optionally followed by CBAM) → global pool → fc."""

    stages = ("stem", "layer1", "layer2", "layer3", "layer4")
    high_groups = stages[-2:]  # the schedule's "high": the last two stages

    def __init__(self, backbone: tvm.ResNet, num_classes: int, placement, stem: str, identity_init: bool):
        super().__init__()
        if stem == "imagenet":
            conv1, bn1, pool = backbone.conv1, backbone.bn1, backbone.maxpool
        elif stem == "cifar":  # a new 3×3/1 conv, a new BN, no max-pool: 32×32 stays 32×32
            conv1, bn1, pool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.stem = nn.Sequential(OrderedDict(conv1=conv1, bn1=bn1, relu=nn.ReLU(inplace=True), maxpool=pool))
        # The head is drawn before any CBAM so that one seed gives the same head whatever the placement
        # (comparisons between placements, and CBAM vs none, then differ only by the CBAM modules).
        fc = nn.Linear(512, num_classes)
        widths = (64, 128, 256, 512)
        cbam_at = {"stage": (1, 2, 3, 4), "high": (3, 4), "block": (), None: ()}[placement]
        for i, width in enumerate(widths, start=1):
            layer = getattr(backbone, f"layer{i}")
            if placement == "block":
                layer = nn.Sequential(
                    *[BasicBlockCBAM(blk, CBAM(width, identity_init=identity_init)) for blk in layer]
                )
            setattr(self, f"layer{i}", layer)
        self.cbam = nn.ModuleDict(
            {f"layer{i}": CBAM(widths[i - 1], identity_init=identity_init) for i in cbam_at}
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc
        self.placement, self.stem_kind = placement, stem
        self.new_groups = ("stem",) * (stem == "cifar") + ("cbam",) * (placement is not None) + ("head",)

    def features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Each stage's output (after its CBAM, if any), in forward order."""
        out = OrderedDict()
        x = out["stem"] = self.stem(x)
        for name in self.stages[1:]:
            x = getattr(self, name)(x)
            if name in self.cbam:
                x = self.cbam[name](x)
            out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stages[1:]:
            x = getattr(self, name)(x)
            if name in self.cbam:
                x = self.cbam[name](x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _check_num_classes(num_classes) -> int:
    return whole_number(num_classes, "num_classes", minimum=2, example="10 (CIFAR-10)")


def resnet18_cbam(
    num_classes: int = 10,
    weights=None,
    placement="stage",
    stem: str = "imagenet",
    identity_init: bool = False,
) -> ResNetCBAM:
    """ResNet18 (optionally ImageNet-pretrained) with CBAM and a new ``num_classes`` head.

    placement: ``"stage"`` one CBAM after each of layer1..layer4 (the course's), ``"block"`` inside every
    BasicBlock before the addition (the paper's), ``"high"`` after layer3 and layer4 only, ``None`` none.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    num_classes = _check_num_classes(num_classes)
    backbone = tvm.resnet18(weights=None)
    _load_backbone(backbone, _pretrained_state("resnet18", weights), "resnet18", head_prefix="fc.")
    return ResNetCBAM(backbone, num_classes, placement, stem, identity_init)


# ---------------------------------------------------------------------------- VGG16
VGG16_BLOCKS = ((0, 4), (5, 9), (10, 16), (17, 23), (24, 30))  # conv/ReLU runs of features, then a max-pool
VGG16_WIDTHS = (64, 128, 256, 512, 512)


class VGGCBAM(nn.Module):
    """block1..block5 (conv+ReLU, then CBAM, then max-pool) → global pool → new head."""

    stages = ("block1", "block2", "block3", "block4", "block5")
    high_groups = stages[-2:]  # the schedule's "high": the last two stages
    min_image_size = 32  # five 2×2 max-pools: 32×32 leaves 1×1 (train.check_batch refuses smaller inputs)

    def __init__(self, backbone: tvm.VGG, num_classes: int, placement, identity_init: bool):
        super().__init__()
        for i, (start, stop) in enumerate(VGG16_BLOCKS, start=1):
            setattr(self, f"block{i}", nn.Sequential(*backbone.features[start:stop]))
        head = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, num_classes))  # before the CBAMs: see ResNetCBAM
        cbam_at = {"stage": (1, 2, 3, 4, 5), "high": (4, 5), None: ()}[placement]
        self.cbam = nn.ModuleDict(
            {f"block{i}": CBAM(VGG16_WIDTHS[i - 1], identity_init=identity_init) for i in cbam_at}
        )
        self.maxpool = nn.MaxPool2d(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.placement = placement
        self.new_groups = ("cbam",) * (placement is not None) + ("head",)

    def features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Each block's output after its CBAM and max-pool, in forward order."""
        out = OrderedDict()
        for name in self.stages:
            x = getattr(self, name)(x)
            if name in self.cbam:
                x = self.cbam[name](x)
            x = out[name] = self.maxpool(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = next(reversed(self.features(x).values()))
        return self.head(torch.flatten(self.pool(x), 1))


def vgg16_cbam(
    num_classes: int = 10, weights=None, placement="stage", identity_init: bool = False
) -> VGGCBAM:
    """VGG16 (optionally ImageNet-pretrained) with a CBAM after each conv block (before its max-pool)."""
    if placement not in ("stage", "high", None):
        raise ValueError(f"placement for VGG16 must be 'stage', 'high' or None, got {placement!r}")
    num_classes = _check_num_classes(num_classes)
    backbone = tvm.vgg16(weights=None)
    _load_backbone(backbone, _pretrained_state("vgg16", weights), "vgg16", head_prefix="classifier.")
    return VGGCBAM(backbone, num_classes, placement, identity_init)


# ---------------------------------------------------------------------------- groups
def new_groups_of(model: nn.Module) -> tuple[str, ...]:
    """The groups of ``model`` that start from random weights (``model.new_groups``, else ``NEW_GROUPS``)."""
    return tuple(getattr(model, "new_groups", NEW_GROUPS))


def group_of(model: nn.Module, name: str) -> str:
    """The layer group a parameter or module name belongs to."""
    parts = name.split(".")
    if "cbam" in parts:
        return "cbam"
    if parts[0] in ("fc", "head"):
        return "head"
    if parts[0] in model.stages:
        return parts[0]
    raise ValueError(f"{name} belongs to no layer group of {type(model).__name__}")


def group_names(model: nn.Module) -> tuple[str, ...]:
    """Group names ordered input → output: the stages, then ``cbam`` (if any), then ``head``."""
    return tuple(model.stages) + ("cbam",) * (len(model.cbam) > 0 or model.placement == "block") + ("head",)


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter exactly once, in named groups ordered input → output."""
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in group_names(model)}
    for name, param in model.named_parameters():
        groups[group_of(model, name)].append(param)
    return {name: params for name, params in groups.items() if params}


def group_modules(
    model: nn.Module, kind: type = nn.modules.batchnorm._BatchNorm
) -> dict[str, list[nn.Module]]:
    """The modules of one kind (BatchNorm by default) in each layer group."""
    found: dict[str, list[nn.Module]] = {name: [] for name in group_names(model)}
    for name, module in model.named_modules():
        if name and isinstance(module, kind):
            found[group_of(model, name)].append(module)
    return found


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per layer group, plus ``total``."""
    counts = {name: sum(p.numel() for p in params) for name, params in layer_groups(model).items()}
    counts["total"] = sum(counts.values())
    return counts


def stage_table(model: nn.Module, image_size: int = 32) -> list[dict]:
    """One row per stage: output shape (C, H, W) and parameters, for a ``image_size``² input."""
    image_size = whole_number(image_size, "image_size", example="32")
    was_training = model.training
    model.eval()
    params = count_parameters(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return [
        {"stage": name, "shape": tuple(f.shape[1:]), "params": params.get(name, 0)}
        for name, f in feats.items()
    ]


def pretrained_or_random(build, **kwargs) -> tuple[nn.Module, bool]:
    """``build(weights="imagenet", **kwargs)``, or — when the weights cannot be had — random weights, loudly.

    Returns ``(model, pretrained)``; the notebooks use ``pretrained`` to say which conclusions then do not hold.
    """
    try:
        return build(weights="imagenet", **kwargs), True
    except WeightsError as err:
        from .machinery.presets import banner

        banner("没有 ImageNet 预训练权重 (no ImageNet weights) — using RANDOM weights", str(err))
        return build(weights=None, **kwargs), False


def transplant(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every parameter and buffer of ``src`` into ``dst`` where name and shape match; return the rest.

    Names are matched ignoring the ``.block`` wrapper of ``placement="block"``, so a trained plain model
    (``placement=None``) moves into any CBAM placement. Returns the ``dst`` state_dict keys left as they
    were (the new modules: CBAM, or a head or stem of another shape) — check it holds only what you expect.
    """

    def plain(key: str) -> str:
        return key.replace(".block.", ".")

    source = {plain(k): v for k, v in src.state_dict().items()}
    target = dst.state_dict()
    copied = {
        k: source[plain(k)]
        for k, v in target.items()
        if plain(k) in source and source[plain(k)].shape == v.shape
    }
    dst.load_state_dict(copied, strict=False)
    return [k for k in target if k not in copied]
