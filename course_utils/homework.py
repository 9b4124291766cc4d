"""Feedback on the homework of notebook 05 (``notebooks/05_homework_vgg16_cbam.ipynb``, exercise 8): the
student's own VGG16 + CBAM class, checked against the course's :func:`course_utils.models.vgg16_cbam`.

:func:`check_vgg16_cbam` runs five checks and says, in Chinese with the English terms in brackets, what is
wrong and how to fix it; :func:`report` prints them (and says "还没有写完" while the model is ``None``):

1. output shape — a (2, 3, 32, 32) batch gives (2, 10) logits;
2. parameters — CBAM, head and backbone counted apart, against ``models.vgg16_cbam(weights=None)``;
3. CBAM positions — a forward pre-hook on every :class:`~course_utils.cbam.CBAM` records what it sees:
   five of them, with 64, 128, 256, 512, 512 channels, each after its block's last conv and ReLU and
   before the max-pool (the feature map still at the block's size, no negative inputs);
4. pretrained weights — the 13 backbone convs, in forward order, hold ``reference``'s conv weights (any
   model with VGG16's convs: torchvision's ``vgg16``, or the course's model the weights were copied from);
5. the schedule — what each stage of ``finetune.three_stage_schedule()`` trains in this model, which works
   only where ``models.group_of`` can sort the parameter names into the course's layer groups.

Each check is one row ``{"check", "status", "message"}``, status ``"ok"``, ``"problem"`` or ``"skipped"``.
The checks use no global random numbers (the input comes from their own generator), so running them
changes nothing that follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate

import torch
from torch import nn

from . import finetune, models
from .cbam import CBAM

IMAGE_SIZE = 32
NUM_CLASSES = 10
CONVS_PER_BLOCK = tuple((stop - start) // 2 for start, stop in models.VGG16_BLOCKS)  # conv+ReLU pairs
LAST_CONV = tuple(accumulate(CONVS_PER_BLOCK))  # convs run by the end of each block: 2, 4, 7, 10, 13


@dataclass
class Trace:
    """What one forward pass of a (2, 3, 32, 32) batch showed: the output (or the error), each CBAM call
    (``channels``, ``size``, ``convs_before``, ``negative``) and the backbone convs in the order they ran."""

    output: torch.Tensor | None = None
    error: str | None = None
    calls: list[dict] = field(default_factory=list)
    convs: list[nn.Conv2d] = field(default_factory=list)


def row(check: str, ok: bool, message: str) -> dict:
    return {"check": check, "status": "ok" if ok else "problem", "message": message}


def cbam_modules(model: nn.Module) -> list[CBAM]:
    return [m for m in model.modules() if isinstance(m, CBAM)]


def backbone_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The model's ``nn.Conv2d`` layers outside its CBAMs, in the order they were registered."""
    inside = {id(m) for c in cbam_modules(model) for m in c.modules()}
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in inside]


def block_of(conv_index: int) -> int:
    """The VGG16 block (1..5) of the ``conv_index``-th backbone conv (counted from 0)."""
    return next(b for b, last in enumerate(LAST_CONV, start=1) if conv_index < last)


def trace(model: nn.Module) -> Trace:
    """Run the model once in eval mode with hooks on its CBAMs and backbone convs."""
    found = Trace()

    def on_conv(module, inputs, output):
        found.convs.append(module)

    def on_cbam(module, inputs):
        x = inputs[0]
        found.calls.append(
            {
                "channels": x.shape[1],
                "size": x.shape[-1],
                "convs_before": len(found.convs),
                "negative": bool((x < 0).any()),
            }
        )

    handles = [c.register_forward_hook(on_conv) for c in backbone_convs(model)]
    handles += [c.register_forward_pre_hook(on_cbam) for c in cbam_modules(model)]
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    model.eval()
    try:
        with torch.no_grad():
            found.output = model(x)
    except Exception as err:  # the student's bug: report it as feedback, do not raise
        found.error = f"{type(err).__name__}: {err}"
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found


# ---------------------------------------------------------------------------- 1. output shape
def check_output(found: Trace) -> dict:
    name = "输出形状 (output shape)"
    if found.error:
        return row(name, False, f"forward 出错 (error)：{found.error}。先让 forward 能跑通。")
    shape = tuple(found.output.shape) if isinstance(found.output, torch.Tensor) else None
    if shape == (2, NUM_CLASSES):
        return row(name, True, f"输入 (2, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) → 输出 (2, {NUM_CLASSES})。")
    if shape is None:
        hint = "forward 应返回一个张量 (tensor)：分类头 (head) 的 logits。"
    elif len(shape) != 2:
        hint = "输出应是两维的 (batch, classes)：在 head 之前用 torch.flatten(x, 1) 展平 (flatten)。"
    elif shape[1] == 1000:
        hint = "你保留了 ImageNet 的 1000 类分类头 (classifier)：换成新的 nn.Linear(512, 10)。"
    else:
        hint = f"最后的 nn.Linear 的 out_features 应为 {NUM_CLASSES} (CIFAR-10 的 10 类)。"
    return row(name, False, f"输出是 {shape}，应为 (2, {NUM_CLASSES})：{hint}")


# ---------------------------------------------------------------------------- 2. parameters
def part_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the CBAMs, of the head (the ``nn.Linear`` layers) and of the rest (the backbone)."""
    cbam = sum(p.numel() for c in cbam_modules(model) for p in c.parameters())
    head = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return {"cbam": cbam, "head": head, "backbone": sum(p.numel() for p in model.parameters()) - cbam - head}


@cache
def course_counts() -> dict[str, int]:
    """:func:`part_counts` of ``models.vgg16_cbam(weights=None, placement="stage")``, built on the meta
    device (no memory, no random numbers drawn)."""
    with torch.device("meta"):
        return part_counts(models.vgg16_cbam(NUM_CLASSES, weights=None, placement="stage"))


PART_HINTS = {
    "cbam": "CBAM 参数不对：每段 (block1–block5) 一个 CBAM，"
    "通道数 (channels) 依次为 64, 128, 256, 512, 512。",
    "head": "分类头 (head) 应只有一个 nn.Linear(512, 10)（前面是全局平均池化和 Dropout，它们没有参数）；"
    "参数多得多说明保留了原来的 classifier。",
    "backbone": "主干 (backbone) 应是 VGG16 features 里的 13 个卷积层：多了可能是用了 vgg16_bn (BatchNorm) "
    "或多加了层，少了说明漏了卷积层。",
}


def check_parameters(model: nn.Module) -> dict:
    name = "参数数量 (parameters)"
    mine, course = part_counts(model), course_counts()
    wrong = [part for part in course if mine[part] != course[part]]
    if not wrong:
        total = sum(course.values())
        return row(
            name,
            True,
            f"CBAM {course['cbam']:,} + head {course['head']:,} + 主干 (backbone) {course['backbone']:,} "
            f"= {total:,}，与 models.vgg16_cbam 相同。",
        )
    said = " ".join(
        f"{part} 有 {mine[part]:,} 个，应为 {course[part]:,}。{PART_HINTS[part]}" for part in wrong
    )
    return row(name, False, said)


# ---------------------------------------------------------------------------- 3. CBAM positions
def call_problem(call: dict) -> tuple[int, str | None]:
    """``(block, problem or None)`` for one CBAM call, the block being the one whose convs ran before it."""
    n = call["convs_before"]
    if n == 0:
        return 0, "在第一个卷积之前 (before the first conv)：CBAM 应放在每段的卷积之后。"
    block = block_of(n - 1)
    size = IMAGE_SIZE >> (block - 1)
    if n != LAST_CONV[block - 1]:
        return (
            block,
            f"在 block{block} 的中间（它前面只跑了 {n} 个卷积）：应放在 block{block} 的最后一个 ReLU 之后。",
        )
    if call["size"] != size:
        return block, (
            f"在 block{block} 的最大池化之后 (after the max-pool)，看到的是 {call['size']}×{call['size']}："
            f"应放在池化之前，让空间注意力 (spatial attention) 看 {size}×{size} 的特征图。"
        )
    if call["negative"]:
        return (
            block,
            f"输入有负数：它在 block{block} 最后一个 ReLU 之前 (before the ReLU)，应放在 ReLU 之后。",
        )
    return block, None


def check_cbam_positions(model: nn.Module, found: Trace) -> dict:
    name = "CBAM 位置 (positions)"
    n_modules = len(cbam_modules(model))
    if n_modules == 0:
        return row(
            name, False, "模型里没有 course_utils.cbam.CBAM 模块：用 CBAM(channels) 建 5 个，每段一个。"
        )
    if found.error:
        return row(name, False, "forward 出错，无法检查 CBAM 的位置：先修好 forward。")
    problems, seen = [], []
    for k, call in enumerate(found.calls, start=1):
        block, problem = call_problem(call)
        if problem:
            problems.append(f"第 {k} 个 CBAM {problem}")
        elif block in seen:
            problems.append(f"block{block} 后面有两个 CBAM：每段只要一个。")
        seen.append(block)
    problems += [
        f"block{b} 后面缺一个 CBAM (CBAM({w}))。"
        for b, w in enumerate(models.VGG16_WIDTHS, start=1)
        if b not in seen
    ]
    if n_modules != len(found.calls):
        problems.append(
            f"模型有 {n_modules} 个 CBAM，forward 调用了 {len(found.calls)} 次："
            "每个 CBAM 都要在 forward 里用到。"
        )
    if problems:
        more = f" (另有 {len(problems) - 2} 处问题)" if len(problems) > 2 else ""
        return row(name, False, " ".join(problems[:2]) + more)
    sizes = ", ".join(f"{c['size']}×{c['size']}" for c in found.calls)
    widths = ", ".join(str(c["channels"]) for c in found.calls)
    return row(
        name,
        True,
        f"{len(found.calls)} 个 CBAM，通道数 (channels) {widths}，特征图 (feature map) {sizes}："
        "都在各段最后一个 ReLU 之后、最大池化之前。",
    )


# ---------------------------------------------------------------------------- 4. pretrained weights
def same_conv(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    same_bias = (a.bias is None and b.bias is None) or (
        a.bias is not None
        and b.bias is not None
        and torch.equal(a.bias.detach().cpu(), b.bias.detach().cpu())
    )
    return same_bias and torch.equal(a.weight.detach().cpu(), b.weight.detach().cpu())


def check_weights(model: nn.Module, found: Trace, reference: nn.Module | None) -> dict:
    name = "预训练权重 (pretrained weights)"
    if reference is None:
        message = "没有给 reference，跳过：传入你的权重来源，例如 torchvision 的 vgg16 模型。"
        return {"check": name, "status": "skipped", "message": message}
    mine, theirs = (found.convs if not found.error else backbone_convs(model)), backbone_convs(reference)
    if len(mine) != len(theirs):
        return row(name, False, f"你的主干有 {len(mine)} 个卷积层 (conv)，reference 有 {len(theirs)} 个。")
    shapes = [k for k, (a, b) in enumerate(zip(mine, theirs)) if a.weight.shape != b.weight.shape]
    if shapes:
        k = shapes[0]
        return row(
            name,
            False,
            f"第 {k + 1} 个卷积的形状 {tuple(mine[k].weight.shape)} 和 reference 的 "
            f"{tuple(theirs[k].weight.shape)} 不同：卷积的顺序不对或不是 VGG16 的卷积。",
        )
    differ = [k for k, (a, b) in enumerate(zip(mine, theirs)) if not same_conv(a, b)]
    if not differ:
        return row(
            name, True, f"{len(mine)} 个卷积层的权重和偏置 (bias) 与 reference 逐位相同 (bit for bit)。"
        )
    where = (
        f"全部 {len(mine)} 个卷积层：主干 (backbone) 还是随机初始化的"
        if len(differ) == len(mine)
        else ", ".join(f"block{block_of(k)} 第 {k + 1} 个卷积" for k in differ)
    )
    return row(
        name,
        False,
        f"这些卷积的权重和 reference 不同：{where}。预训练的层要直接用 reference 的卷积 "
        "(用 backbone.features 切出各段)，或把权重复制过来 (load_state_dict)，不要新建卷积层。",
    )


# ---------------------------------------------------------------------------- 5. the schedule
GROUP_NAMES_HINT = (
    "课程的日程 (schedule) 按层组 (layer groups) 找参数，models.group_of 只看参数名："
    "第一段是 model.stages 里的名字 (block1…block5) → 那个 stage；名字里有 cbam → cbam 组；"
    "第一段是 head 或 fc → head 组。请用 self.block1…self.block5、self.cbam (nn.ModuleDict)、self.head，"
    '并在类里写 stages = ("block1", ..., "block5")。'
)


def expected_trainable(model: nn.Module, convs: list[nn.Conv2d]) -> list[set[int]]:
    """The parameters (ids) each of the three stages should train: new (CBAM + head), + block4/5, all."""
    new = {id(p) for m in model.modules() if isinstance(m, (CBAM, nn.Linear)) for p in m.parameters()}
    high = {id(p) for k, conv in enumerate(convs) if block_of(k) >= 4 for p in conv.parameters()}
    return [new, new | high, {id(p) for p in model.parameters()}]


def resolve_three_stages(model: nn.Module) -> tuple[dict[str, list[nn.Parameter]], list[list[str]]]:
    """The model's layer groups and the groups each stage of ``three_stage_schedule()`` trains in it."""
    schedule = finetune.three_stage_schedule()
    groups = models.layer_groups(model)
    new, high = models.new_groups_of(model), finetune.high_groups_of(model)
    return groups, [schedule.resolve(stage, list(groups), new, high)[0] for stage in schedule.stages]


def misplaced(model: nn.Module, wanted: set[int], trains: set[int]) -> str:
    """Which parameters a stage freezes but should train, else which it trains but should not."""
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = sorted(names[i] for i in wanted - trains)
    if frozen:
        return f"该训练却被冻结 (frozen)：{', '.join(frozen[:3])}"
    return f"不该训练却在训练 (trained)：{', '.join(sorted(names[i] for i in trains - wanted)[:3])}"


def check_schedule(model: nn.Module, found: Trace) -> dict:
    name = "三阶段日程 (three_stage_schedule)"
    try:
        groups, resolved = resolve_three_stages(model)
    except (AttributeError, TypeError, ValueError) as err:
        return row(name, False, f"{GROUP_NAMES_HINT} ({type(err).__name__}: {err})")
    stages = [stage.name for stage in finetune.three_stage_schedule().stages]
    said = " | ".join(f"{stage}: {', '.join(trainable)}" for stage, trainable in zip(stages, resolved))
    convs = found.convs if not found.error and len(found.convs) == LAST_CONV[-1] else backbone_convs(model)
    for stage, trainable, wanted in zip(stages, resolved, expected_trainable(model, convs)):
        trains = {id(p) for g in trainable for p in groups[g]}
        if trains != wanted:
            wrong = misplaced(model, wanted, trains)
            return row(name, False, f"阶段 {stage!r}（{said}）里{wrong}。{GROUP_NAMES_HINT}")
    return row(name, True, f"每个阶段训练的部分都对：{said}。")


# ---------------------------------------------------------------------------- all of it
def check_vgg16_cbam(model: nn.Module, reference: nn.Module | None = None) -> list[dict]:
    """The five checks of the module docstring on the student's VGG16 + CBAM, one row each.

    ``reference``: the model whose conv weights the student's backbone should hold (for example the
    torchvision ``vgg16`` it was built from, or a ``models.vgg16_cbam`` its weights were copied from);
    ``None`` skips that check.
    """
    found = trace(model)
    return [
        check_output(found),
        check_parameters(model),
        check_cbam_positions(model, found),
        check_weights(model, found, reference),
        check_schedule(model, found),
    ]


def report(model: nn.Module | None, reference: nn.Module | None = None) -> list[dict] | None:
    """Print :func:`check_vgg16_cbam`'s rows, one line each, then how many problems are left."""
    if model is None:
        print(
            "MY_MODEL 还是 None：还没有写完 (not done yet)。"
            "写好 MyVGG16CBAM 之后给 MY_MODEL 赋值，再运行这个单元格。"
        )
        return None
    rows = check_vgg16_cbam(model, reference)
    for r in rows:
        print(f"[{r['status']}] {r['check']}: {r['message']}")
    problems = sum(r["status"] == "problem" for r in rows)
    print("全部通过 (all checks passed)。" if not problems else f"还有 {problems} 个问题 (problems) 要改。")
    return rows
