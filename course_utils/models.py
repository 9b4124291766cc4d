"""ResNet18 and VGG16 with CBAM, built from torchvision's pretrained networks.

Both models are composed plainly from the torchvision modules (so pretrained weights load by
torchvision's own API) and expose the same things to the rest of the course:

* ``layer_groups(model)`` — every parameter exactly once, in named groups ordered input → output;
* ``model.new_groups`` — the groups that start from random weights whatever ``weights`` says
  (the new head and CBAM always; the stem too with ``stem="cifar"``): the schedule's ``"new"``;
* ``model.stages`` — the stage names in forward order, and ``model.features(x)`` — each stage's output.

``weights=`` takes None (random), ``"imagenet"`` or any of torchvision's names and enums, or a state_dict
file; where the files come from and how they are checked is :mod:`course_utils.machinery.weights`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

from .cbam import CBAM
from .machinery.checks import whole_number
from .machinery.weights import WeightsError, check_backbone_state, pretrained_state

PLACEMENTS = ("stage", "block", "high", None)
NEW_GROUPS = ("cbam", "head")  # the groups that start random, for a model without its own ``new_groups``


# ---------------------------------------------------------------------------- pretrained backbones
def _load_backbone(backbone: nn.Module, arch: str, weights, head_prefix: str) -> None:
    """Load ``weights`` (see :func:`course_utils.machinery.weights.pretrained_state`) into the torchvision
    backbone, all but its 1000-class ImageNet head (the course's head is new); ``weights=None`` keeps it
    random."""
    state = pretrained_state(arch, weights)
    if state is None:
        return
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    expected = {k: v for k, v in backbone.state_dict().items() if not k.startswith(head_prefix)}
    check_backbone_state(state, expected, arch)
    backbone.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------- ResNet18
class BasicBlockCBAM(nn.Module):
    """A torchvision BasicBlock with CBAM on the residual branch before the addition (the paper's
    placement)."""

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
    _load_backbone(backbone, "resnet18", weights, head_prefix="fc.")
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
    _load_backbone(backbone, "vgg16", weights, head_prefix="classifier.")
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

    Returns ``(model, pretrained)``; the notebooks use ``pretrained`` to say which conclusions then do not
    hold.
    """
    try:
        return build(weights="imagenet", **kwargs), True
    except WeightsError as err:
        from .machinery.presets import banner

        banner(
            "没有 ImageNet 预训练权重 (no ImageNet weights)：改用随机权重 (RANDOM weights) 继续",
            "权重下载不下来（离线或网络不通）。课程照常运行，但依赖预训练权重的结论在这次运行里不成立，"
            "notebook 会逐条说明。要用预训练权重：联网运行一次，或把权重文件放进 torchvision 的缓存文件夹、"
            "或用环境变量 COURSE_WEIGHTS_MIRROR 指向存放它的文件夹或网址（见 README 的“离线使用与镜像"
            f" (offline use and mirrors)”一节）。详细信息 (details)：{err.__cause__ or err}",
        )
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
