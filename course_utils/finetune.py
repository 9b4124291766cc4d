"""The fine-tuning schedule as data: stages of epochs, each with trainable groups and learning rates.

Read one line per stage, fastai-style::

    Schedule([Stage("head+cbam", 5, ["new"], 1e-3),
              Stage("+layer3/4", 15, ["new", "layer3", "layer4"], 1e-4),
              Stage("all", 30, "all", 1e-5)])

Group names are those of :func:`course_utils.models.layer_groups` plus four aliases resolved against
a model: ``"new"`` (the groups that start random: head, CBAM, and a new stem), ``"pretrained"`` (the
rest), ``"high"`` (the model's last two stages, ``model.high_groups``: ResNet18's layer3 and layer4,
VGG16's block4 and block5 — so one schedule fits both) and ``"all"``. ``lr`` is one float for every
trainable group, or a ``{group or alias: lr}`` dict where a group's own entry beats an alias. All
parameters are in the optimizer from the start; a frozen group simply has learning rate 0, no gradients
and its BatchNorm layers in eval mode.

What a group's BatchNorm layers do when it trains is the BatchNorm policy, one per run or per stage:
see :mod:`course_utils.batchnorm`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .batchnorm import check_bn_policy
from .machinery.checks import positive_number, stage_lengths, whole_number
from .machinery.devices import fused_adamw_supported
from .models import NEW_GROUPS, group_modules, layer_groups, new_groups_of

ALIASES = ("new", "pretrained", "high", "all")
HIGH_STAGES = 2  # "high": the last two stages of a model (its high-level, most task-specific features)


def default_high_groups(groups: Sequence[str], new_groups: Collection[str]) -> tuple[str, ...]:
    """``"high"`` for a list of group names without a model: the last two groups that are stages
    (neither new, nor ``cbam`` / ``head``)."""
    stages = [g for g in groups if g not in new_groups and g not in NEW_GROUPS]
    return tuple(stages[-HIGH_STAGES:])


def high_groups_of(model: nn.Module) -> tuple[str, ...]:
    """``"high"`` for ``model``: its ``high_groups`` (the course's models), else its last two ``stages``."""
    high = getattr(model, "high_groups", None)
    if high is None and getattr(model, "stages", None):
        high = tuple(model.stages)[-HIGH_STAGES:]
    return (
        tuple(high)
        if high is not None
        else default_high_groups(list(layer_groups(model)), new_groups_of(model))
    )


def expand_group(
    name: str,
    groups: Sequence[str],
    new_groups: Collection[str],
    where: str,
    high_groups: Collection[str] | None = None,
) -> list[str]:
    """The groups of ``groups`` that a name in a stage means: a group itself, or an alias (``ALIASES``)."""
    if name == "all":
        return list(groups)
    if name == "new":
        return [g for g in groups if g in new_groups]
    if name == "pretrained":
        return [g for g in groups if g not in new_groups]
    if name == "high":
        high = default_high_groups(groups, new_groups) if high_groups is None else high_groups
        return [g for g in groups if g in high]
    if name in groups:
        return [name]
    raise ValueError(
        f"{where}：没有名为 {name!r} 的层组 (unknown layer group {name!r})；这个模型的层组是 "
        f"{', '.join(groups)}（以及别名 (aliases) {', '.join(ALIASES)}）"
    )


def expand_groups(
    names: str | Sequence[str],
    groups: Sequence[str],
    new_groups: Collection[str],
    where: str,
    high_groups: Collection[str] | None = None,
) -> list[str]:
    """The groups (in ``groups``' order) that a stage's names and aliases mean."""
    names = (names,) if isinstance(names, str) else tuple(names)
    chosen = {g for name in names for g in expand_group(name, groups, new_groups, where, high_groups)}
    return [g for g in groups if g in chosen]


@dataclass(frozen=True)
class Stage:
    """``epochs`` epochs training the groups in ``trainable`` (names, aliases or ``"all"``) at ``lr``.

    ``bn``: this stage's BatchNorm policy (one of ``BN_POLICIES``), ``None`` = the run's
    (``fit``'s ``bn_policy``).
    """

    name: str
    epochs: int
    trainable: Collection[str] | str
    lr: float | Mapping[str, float]
    bn: str | None = None

    def __repr__(self):  # bn only where set: a schedule prints as it did before BatchNorm policies
        bn = "" if self.bn is None else f", bn={self.bn!r}"
        return (
            f"Stage(name={self.name!r}, epochs={self.epochs!r}, trainable={self.trainable!r}, "
            f"lr={self.lr!r}{bn})"
        )

    def __post_init__(self):
        trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)
        object.__setattr__(self, "trainable", trainable)
        if isinstance(self.lr, Mapping):
            object.__setattr__(self, "lr", dict(self.lr))
        try:  # numpy integers (papermill, np.arange) are whole numbers too
            object.__setattr__(self, "epochs", whole_number(self.epochs, "epochs"))
        except ValueError:
            raise ValueError(
                f"stage {self.name!r}: epochs must be a positive whole number, got {self.epochs!r}"
            ) from None
        if self.bn is not None:
            check_bn_policy(self.bn, f"stage {self.name!r}: bn")
        if not trainable:
            raise ValueError(
                f"stage {self.name!r} trains no group: name at least one in trainable "
                f"(a group such as 'head', or 'new' / 'pretrained' / 'all')"
            )
        lrs = self.lr.items() if isinstance(self.lr, dict) else [("lr", self.lr)]
        for key, value in lrs:
            positive_number(value, f"stage {self.name!r}: learning rate {key}={value!r}")


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does: its stage, the groups it trains, and the learning rate of every group
    (0 if frozen).

    ``bn``: the stage's BatchNorm policy (``None`` = the run's).
    """

    epoch: int
    stage: str
    trainable: frozenset[str]
    lr: dict[str, float] = field(hash=False)
    bn: str | None = None


class Schedule:
    """An ordered list of :class:`Stage`; ``plan(groups, new_groups)`` gives the per-epoch learning rates."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = tuple(stages)
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise ValueError(f"schedule stages must be Stage objects, got {stage!r}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def boundaries(self) -> list[tuple[str, int, int]]:
        """``(stage, first_epoch, last_epoch)`` per stage, epochs counted from 1."""
        out, start = [], 1
        for s in self.stages:
            out.append((s.name, start, start + s.epochs - 1))
            start += s.epochs
        return out

    def stage_at(self, epoch: int) -> Stage:
        for stage, (_, first, last) in zip(self.stages, self.boundaries()):
            if first <= epoch <= last:
                return stage
        raise ValueError(f"epoch {epoch} is outside the schedule's 1..{self.epochs}")

    def resolve(
        self,
        stage: Stage,
        groups: Sequence[str],
        new_groups: Collection[str] = NEW_GROUPS,
        high_groups: Collection[str] | None = None,
    ):
        """``(trainable groups, {group: lr})`` of one stage, for a model with ``groups``
        (``high_groups``: what ``"high"`` means; default :func:`default_high_groups`)."""
        where = f"stage {stage.name!r}"
        trainable = expand_groups(stage.trainable, groups, new_groups, where, high_groups)
        if not trainable:
            raise ValueError(
                f"{where} trains no group of this model (trainable={list(stage.trainable)}, "
                f"groups={list(groups)})"
            )
        if isinstance(stage.lr, dict):
            lr: dict[str, float] = {}
            precedence = {
                "all": 0,
                "new": 1,
                "pretrained": 1,
                "high": 1,
            }  # a group's own entry beats an alias
            for key, value in sorted(stage.lr.items(), key=lambda kv: precedence.get(kv[0], 2)):
                for g in expand_group(key, groups, new_groups, f"{where} lr", high_groups):
                    lr[g] = float(value)
            missing = [g for g in trainable if g not in lr]
            if missing:
                raise ValueError(
                    f"{where}: no learning rate for {', '.join(missing)}; add them to the lr dict "
                    f"or give one float"
                )
        else:
            lr = {g: float(stage.lr) for g in trainable}
        return trainable, {g: (lr[g] if g in trainable else 0.0) for g in groups}

    def plan(
        self,
        groups: Sequence[str],
        new_groups: Collection[str] = NEW_GROUPS,
        high_groups: Collection[str] | None = None,
    ) -> list[EpochPlan]:
        """One :class:`EpochPlan` per epoch; ``ValueError`` for any stage that does not fit the groups."""
        plans, epoch = [], 1
        for stage in self.stages:
            trainable, lr = self.resolve(stage, list(groups), new_groups, high_groups)
            for _ in range(stage.epochs):
                plans.append(EpochPlan(epoch, stage.name, frozenset(trainable), lr, stage.bn))
                epoch += 1
        return plans

    def plan_for(self, model: nn.Module) -> list[EpochPlan]:
        return self.plan(list(layer_groups(model)), new_groups_of(model), high_groups_of(model))

    def table(
        self,
        model: nn.Module | None = None,
        groups: Sequence[str] | None = None,
        new_groups: Collection[str] = NEW_GROUPS,
        high_groups: Collection[str] | None = None,
        *,
        by_rate: bool = False,
    ) -> list[dict]:
        """One row per stage: its epochs, trainable groups and learning rates, as the stage says them, or
        resolved for a model (or its ``groups``): ``layer3=0.0001, head=0.0001``; with ``by_rate=True``
        grouped by value instead, ``1.0e-04 (pretrained) · 1.0e-03 (new)`` (the schedule panel's preview)."""
        if model is not None:
            groups, new_groups, high_groups = layer_groups(model), new_groups_of(model), high_groups_of(model)
        rows = []
        for stage, (_, first, last) in zip(self.stages, self.boundaries()):
            row = {"stage": stage.name, "epochs": f"{first}-{last}", **({"bn": stage.bn} if stage.bn else {})}
            if groups is None:
                row["trainable"], row["lr"] = ", ".join(stage.trainable), _rates_text(stage.lr)
            else:
                trainable, lr = self.resolve(stage, list(groups), new_groups, high_groups)
                row["trainable"] = ", ".join(trainable)
                row["lr"] = (
                    _rates_by_value(trainable, lr, new_groups)
                    if by_rate
                    else _rates_text({g: lr[g] for g in trainable})
                )
            rows.append(row)
        return rows

    def summary(self) -> str:
        """One line, a row of :meth:`table` per stage: ``1-5 head+cbam @0.001 | 6-20 +high @0.0001 | ...``."""
        return " | ".join(f"{r['epochs']} {r['stage'].split(' ', 1)[-1]} @{r['lr']}" for r in self.table())

    def to_dict(self) -> list[dict]:
        """One dict per stage; ``bn`` only where a stage sets it (so older saved schedules stay equal)."""
        return [
            {
                "name": s.name,
                "epochs": s.epochs,
                "trainable": list(s.trainable),
                "lr": s.lr,
                **({"bn": s.bn} if s.bn is not None else {}),
            }
            for s in self.stages
        ]

    @classmethod
    def from_dict(cls, stages: list[dict]) -> Schedule:
        return cls([Stage(d["name"], d["epochs"], d["trainable"], d["lr"], d.get("bn")) for d in stages])

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "Schedule([\n" + "".join(f"  {s!r},\n" for s in self.stages) + "])"


def _rates_text(lr: float | Mapping[str, float]) -> str:
    """``0.001``, or ``new=0.001, pretrained=1e-05`` for a dict."""
    return ", ".join(f"{k}={v:g}" for k, v in lr.items()) if isinstance(lr, Mapping) else f"{lr:g}"


def _rates_by_value(trainable: Sequence[str], lr: Mapping[str, float], new_groups: Collection[str]) -> str:
    """``1.0e-03`` for one rate; for more, each with its groups: ``1.0e-04 (pretrained) · 1.0e-03 (new)``."""
    by_rate: dict[float, list[str]] = {}
    for g in trainable:
        by_rate.setdefault(lr[g], []).append(g)
    if len(by_rate) == 1:
        return f"{lr[trainable[0]]:.1e}"
    new = [g for g in trainable if g in new_groups]
    old = [g for g in trainable if g not in new_groups]

    def who(gs: list[str]) -> str:
        return "new" if gs == new else "pretrained" if gs == old else ", ".join(gs)

    return " · ".join(f"{rate:.1e} ({who(gs)})" for rate, gs in by_rate.items())


def three_stage_schedule(
    differential: bool = False,
    epochs: Sequence[int] = (5, 15, 30),
    lrs: Sequence[float] = (1e-3, 1e-4, 1e-5),
    ratio: float = 10.0,
) -> Schedule:
    """The course's schedule: new modules (head+CBAM) → + the high stages (``"high"``: ResNet18's layer3
    and layer4, VGG16's block4 and block5) → everything.

    ``differential=True`` keeps new modules ``ratio``× faster than pretrained ones in every stage
    (stage 1 trains only new modules at ``lrs[0]``; then new at ``lrs[i-1]``, pretrained at ``lrs[i]``).
    """
    e1, e2, e3 = stage_lengths(epochs)
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or len(lrs) != 3:
        raise ValueError(
            f"lrs must be three learning rates, one per stage, e.g. lrs=(1e-3, 1e-4, 1e-5); got {lrs!r}"
        )
    lr1, lr2, lr3 = lrs
    positive_number(ratio, "ratio (how many times faster new modules learn)", example="10")
    if differential:
        lr_2 = {"new": lr2 * ratio, "pretrained": lr2}
        lr_3 = {"new": lr3 * ratio, "pretrained": lr3}
    else:
        lr_2, lr_3 = lr2, lr3
    return Schedule(
        [
            Stage("1 head+cbam", e1, ["new"], lr1),
            Stage("2 +high", e2, ["new", "high"], lr_2),
            Stage("3 all", e3, "all", lr_3),
        ]
    )


def one_stage_schedule(epochs: int = 10, lr: float | Mapping[str, float] = 1e-4) -> Schedule:
    """Plain fine-tuning: everything trainable from the start at one learning rate (or a dict)."""
    return Schedule([Stage("all", whole_number(epochs, "epochs", example="10"), "all", lr)])


def fastai_schedule(
    epochs: Sequence[int] = (5, 15, 30), base_lr: float = 2e-3, lr_mult: float = 100.0
) -> Schedule:
    """fastai's ``fine_tune`` in two stages: the new modules alone at ``base_lr``, then everything with the
    head at ``base_lr/2`` and the pretrained body ``lr_mult``× slower (fastai spreads the middle layer
    groups between the two; the panel has one rate for all pretrained groups)."""
    e1, *rest = epochs
    return Schedule(
        [
            Stage("1 head+cbam", e1, ["new"], base_lr),
            Stage("2 all", sum(rest), "all", {"new": base_lr / 2, "pretrained": base_lr / 2 / lr_mult}),
        ]
    )


def with_bn(schedule: Schedule, policy: str) -> Schedule:
    """``schedule`` with every stage's BatchNorm policy set to ``policy`` (one line in a strategy table)."""
    check_bn_policy(policy)
    return Schedule([Stage(s.name, s.epochs, s.trainable, s.lr, policy) for s in schedule.stages])


# ------------------------------------------------------------------------------- optimizer
def no_weight_decay(module: nn.Module, param_name: str) -> bool:
    """Biases and normalisation weights get no weight decay."""
    return param_name.endswith("bias") or isinstance(
        module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    )


def make_optimizer(
    model: nn.Module, weight_decay: float = 1e-2, optimizer: str = "adamw"
) -> torch.optim.Optimizer:
    """Every parameter from the start, one param group per (layer group, decay or not).

    Each param group carries ``group`` (the layer-group name) and ``decay`` keys; learning rates are
    set per epoch by :func:`apply_epoch`.
    """
    groups = layer_groups(model)
    owner = {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    param_groups = []
    for group, params in groups.items():
        decay = [p for p in params if not no_weight_decay(*owner[id(p)])]
        plain = [p for p in params if no_weight_decay(*owner[id(p)])]
        for ps, wd in ((decay, weight_decay), (plain, 0.0)):
            if ps:
                param_groups.append(
                    {"params": ps, "lr": 0.0, "weight_decay": wd, "group": group, "decay": wd > 0}
                )
    if optimizer == "adamw":
        # fused: one kernel for the whole update instead of a dozen per parameter group; measured faster
        # on the CPU and on CUDA. Frozen parameters have no grad and are skipped, as by the plain AdamW.
        # MPS too where this torch has the kernel; elsewhere the plain implementation.
        fused = all(fused_adamw_supported(t) for t in {p.device.type for p in model.parameters()})
        return torch.optim.AdamW(param_groups, lr=0.0, fused=fused or None)
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")


def apply_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, plan: EpochPlan, bn_policy: str = "train"
) -> None:
    """Set this epoch's learning rates and freeze the rest: no grad, lr 0, BatchNorm in eval mode.

    Call after ``model.train()``: frozen groups' BatchNorm layers are switched back to eval so their
    running statistics stay exactly as they were. Under the BatchNorm policy ``"frozen"`` (``plan.bn``,
    else ``bn_policy``) the pretrained groups' BatchNorm stays in eval mode even when the group trains.
    """
    policy = check_bn_policy(plan.bn or bn_policy)
    new_groups = new_groups_of(model)
    for param_group in optimizer.param_groups:
        param_group["lr"] = plan.lr[param_group["group"]]
    for group, params in layer_groups(model).items():
        for p in params:
            p.requires_grad_(group in plan.trainable)
    for group, bns in group_modules(model).items():
        if group not in plan.trainable or (policy == "frozen" and group not in new_groups):
            for bn in bns:
                bn.eval()


# ------------------------------------------------------------------------------- how far each group moved
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to measure later how far each group moved (lesson 03: the interns move,
    the senior experts barely)."""
    return {name: p.detach().clone().cpu() for name, p in model.named_parameters()}


def weight_drift(model: nn.Module, start: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer group: ‖w − w₀‖ / ‖w₀‖ over all its parameters (0 = did not move)."""
    names = {id(p): n for n, p in model.named_parameters()}
    drift = {}
    for group, params in layer_groups(model).items():
        moved = sum(float((p.detach().cpu() - start[names[id(p)]]).pow(2).sum()) for p in params)
        size = sum(float(start[names[id(p)]].pow(2).sum()) for p in params)
        drift[group] = (moved / size) ** 0.5 if size > 0 else float(moved > 0)
    return drift
