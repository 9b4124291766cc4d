"""The schedule panel's values ⇄ a :class:`~course_utils.finetune.Schedule`: plain functions, no widgets.

* :func:`schedule_from_values` — the controls' values (a dict, see :data:`DEFAULT_VALUES`) → ``Schedule``,
  raising ``ValueError`` with a message a student can act on for any invalid choice;
* :func:`values_from_schedule` — the inverse, used by the panel's templates (:data:`TEMPLATES`);
* :func:`suggested_rates` — the values after an LR finder's suggestion for one stage.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from ..finetune import (
    Schedule,
    Stage,
    default_high_groups,
    expand_groups,
    fastai_schedule,
    one_stage_schedule,
    three_stage_schedule,
)
from ..machinery.checks import positive_number, whole_number
from ..models import NEW_GROUPS

MAX_STAGES = 3
RATIO = 10.0  # new modules vs pretrained ones, when a template or the panel needs a second rate

#: What the panel's controls hold. ``lr[i]`` is stage i's learning rate (in differential mode: of its
#: pretrained groups), ``lr_new[i]`` that of its new modules (differential mode only); ``trainable[i]``
#: the groups stage i unfreezes (group names or the aliases ``new`` / ``pretrained`` / ``high`` / ``all``).
#: Stage 1 runs epochs 1..end1, stage 2 end1+1..end2, stage 3 end2+1..total (fewer with ``stages`` < 3).
DEFAULT_VALUES = {
    "stages": 3,
    "end1": 5,
    "end2": 20,
    "total": 50,
    "differential": False,
    "lr": (1e-3, 1e-4, 1e-5),
    "lr_new": (1e-3, 1e-3, 1e-4),
    "trainable": (("new",), ("new", "high"), ("all",)),
}

#: The panel's template menu: label → schedule for the stage lengths ``epochs`` (e1, e2, e3); all keep the
#: same total, so runs compare fairly.
TEMPLATES: dict[str, Callable[[Sequence[int]], Schedule]] = {
    "三阶段 three-stage (course)": lambda e: three_stage_schedule(epochs=e),
    "三阶段 + 差异化学习率 three-stage, differential": lambda e: three_stage_schedule(
        differential=True, epochs=e
    ),
    "两阶段 fastai-style two stages": fastai_schedule,
    "一阶段全量微调 one stage, full fine-tuning": lambda e: one_stage_schedule(sum(e), 1e-4),
}
CUSTOM = "自定义 custom"  # what the template menu shows once a control has been changed by hand


# ------------------------------------------------------------------------------ group names
def _high(groups: Sequence[str], new: Collection[str], high: Collection[str] | None) -> list[str]:
    return [g for g in groups if g in (default_high_groups(groups, new) if high is None else high)]


def _compress(
    trainable: Sequence[str], groups: Sequence[str], new: Sequence[str], high: Collection[str] | None = None
) -> list[str] | str:
    """Concrete groups → the schedule's spelling: ``"all"``, ``["new", "high", ...]`` or plain names."""
    if set(trainable) == set(groups):
        return "all"
    high = _high(groups, new, high)
    if new and set(new) <= set(trainable):
        rest = [g for g in trainable if g not in new]
        if high and set(high) <= set(rest):
            return ["new", "high"] + [g for g in rest if g not in high]
        return ["new"] + rest
    return list(trainable)


def _consecutive_layers(a: str, b: str) -> bool:
    """``layer2`` then ``layer3``: two layers in a row."""
    x, y = a.removeprefix("layer"), b.removeprefix("layer")
    return a != x and b != y and x.isdigit() and y.isdigit() and int(y) == int(x) + 1


def _describe(chosen: Sequence[str], new: Sequence[str], high: Sequence[str] = ()) -> str:
    """``head+cbam`` for the new modules (output side first), ``high`` for the high stages, runs of layers
    as ``layer1-2``."""
    parts = list(reversed(new)) if new and set(new) <= set(chosen) else []
    covered = set(parts)
    if high and set(high) <= set(chosen):
        parts.append("high")
        covered |= set(high)
    rest = [g for g in chosen if g not in covered]
    i = 0
    while i < len(rest):
        j = i
        while j + 1 < len(rest) and _consecutive_layers(rest[j], rest[j + 1]):
            j += 1
        parts.append(rest[i] if j == i else f"{rest[i]}-{rest[j][5:]}")
        i = j + 1
    return "+".join(parts)


def _stage_name(
    i: int, n: int, trainable: Sequence[str], previous: Sequence[str], groups, new, high=None
) -> str:
    if set(trainable) == set(groups):
        return "all" if n == 1 else f"{i} all"  # the names three_stage_schedule / one_stage_schedule use
    high = _high(groups, new, high)
    added = [g for g in trainable if g not in previous]
    if previous and set(previous) <= set(trainable) and added:
        return f"{i} +{_describe(added, [g for g in new if g in added], high)}"
    return f"{i} {_describe(trainable, new, high)}"


# ------------------------------------------------------------------------------ values → schedule
def _stage_ends(v: Mapping) -> list[int]:
    """The last epoch of each stage; ``ValueError`` for a stage that is empty or ends before the previous."""
    n = v["stages"]
    if n not in range(1, MAX_STAGES + 1):
        raise ValueError(f"阶段数 (stages) 只能是 1、2 或 3，而不是 {n!r}")
    keys = ("end1", "end2")[: n - 1] + ("total",)
    ends = [whole_number(v[key], key, minimum=0) for key in keys]
    if ends[-1] < 1:
        raise ValueError(f"总轮数 (total epochs) 至少是 1，而不是 {ends[-1]}")
    if ends[0] < 1:
        raise ValueError(f"阶段 1 是空的 (empty)：它最早在第 1 轮结束，而不是第 {ends[0]} 轮")
    for i in range(1, n):
        end, prev = ends[i], ends[i - 1]
        if end > prev:
            continue
        if i == n - 1:  # the last stage ends with the total
            where, fix = f"总轮数是 {end}", f"把总轮数调到 {prev} 以上，或让阶段 {i} 早一点结束"
        else:
            where, fix = f"阶段 {i + 1} 在第 {end} 轮结束", f"把阶段 {i + 1} 的结束移到第 {prev} 轮之后"
        if end < prev:
            raise ValueError(
                f"阶段 {i + 1} 会在阶段 {i} 之前结束 (ends before the previous stage)：{where}，"
                f"而阶段 {i} 在第 {prev} 轮才结束。改法 (fix)：{fix}。"
            )
        raise ValueError(
            f"阶段 {i + 1} 是空的 (empty)：{where}，阶段 {i} 也在第 {prev} 轮结束。"
            f"要让阶段 {i + 1} 至少有 1 轮：{fix}。"
        )
    return ends


def _stage_lr(v: Mapping, i: int, trainable: Sequence[str], new: Collection[str]) -> float | dict:
    """Stage ``i``'s ``lr``: one rate, or in differential mode ``{"new": …, "pretrained": …}`` where it
    trains both kinds."""
    lr = positive_number(v["lr"][i], f"the learning rate of stage {i + 1}")
    if not v["differential"]:
        return lr
    lr_new = positive_number(v["lr_new"][i], f"the learning rate of new modules in stage {i + 1}")
    has_new, has_old = any(g in new for g in trainable), any(g not in new for g in trainable)
    return {"new": lr_new, "pretrained": lr} if has_new and has_old else lr_new if has_new else lr


def schedule_from_values(
    values: Mapping,
    groups: Sequence[str],
    new_groups: Collection[str] = NEW_GROUPS,
    high_groups: Collection[str] | None = None,
) -> Schedule:
    """The :class:`Schedule` the panel's values describe, for a model with ``groups`` (input → output).

    ``values`` has the keys of :data:`DEFAULT_VALUES` (missing keys take those defaults); ``high_groups``:
    what the alias ``"high"`` means (default: the last two stages among ``groups``). Raises
    ``ValueError`` with a clear message for an invalid choice: a stage that ends before the previous one,
    an empty stage, a stage that trains nothing, an unknown group or a learning rate that is not positive.
    """
    v = {**DEFAULT_VALUES, **values}
    groups = list(groups)
    new = [g for g in groups if g in new_groups]
    ends = _stage_ends(v)
    stages, previous, first = [], [], 1
    for i, end in enumerate(ends):
        trainable = expand_groups(v["trainable"][i], groups, new, f"stage {i + 1}", high_groups)
        if not trainable:
            raise ValueError(
                f"阶段 {i + 1} 什么都不训练 (trains nothing)：至少选一个要解冻的层组 (layer group)，"
                f"没有可训练的参数就什么也学不到。"
            )
        name = _stage_name(i + 1, len(ends), trainable, previous, groups, new, high_groups)
        spelling = _compress(trainable, groups, new, high_groups)
        stages.append(Stage(name, end - first + 1, spelling, _stage_lr(v, i, trainable, new)))
        previous, first = trainable, end + 1
    schedule = Schedule(stages)
    schedule.plan(groups, new, high_groups)  # every stage resolves against these groups (else ValueError)
    return schedule


# ------------------------------------------------------------------------------ schedule → values
def _stage_rates(
    schedule: Schedule, groups, new, high_groups
) -> list[tuple[tuple, float | None, float | None]]:
    """Per stage: its trainable groups, the rate of its new modules and that of its pretrained groups."""
    out = []
    for stage in schedule.stages:
        trainable, lr = schedule.resolve(stage, groups, new, high_groups)
        rates_new = {lr[g] for g in trainable if g in new}
        rates_old = {lr[g] for g in trainable if g not in new}
        if len(rates_new) > 1 or len(rates_old) > 1:
            raise ValueError(
                f"stage {stage.name!r} has more than one learning rate among its new or its "
                f"pretrained groups ({lr}); the panel has one slider for each"
            )
        out.append((tuple(trainable), next(iter(rates_new), None), next(iter(rates_old), None)))
    return out


def values_from_schedule(
    schedule: Schedule,
    groups: Sequence[str],
    new_groups: Collection[str] = NEW_GROUPS,
    high_groups: Collection[str] | None = None,
) -> dict:
    """The panel's values for ``schedule`` (at most 3 stages; at most two learning rates per stage:
    one for new modules, one for pretrained groups). Raises ``ValueError`` for what the panel cannot show."""
    groups = list(groups)
    new = [g for g in groups if g in new_groups]
    if len(schedule.stages) > MAX_STAGES:
        raise ValueError(
            f"the panel shows at most {MAX_STAGES} stages; this schedule has {len(schedule.stages)}"
        )
    stages = _stage_rates(schedule, groups, new, high_groups)
    trainables = [trainable for trainable, _, _ in stages]
    differential = any(a is not None and b is not None and a != b for _, a, b in stages)
    # "lr" is the stage's rate (of its pretrained groups, if any); "lr_new" that of its new modules. Outside
    # differential mode the new modules' slider waits at RATIO× the stage's rate, so that ticking
    # "differential" gives the course's differential schedule.
    lr_old = [a if b is None else b for _, a, b in stages]
    lr_new = [a if b is None else b * RATIO if a is None or not differential else a for _, a, b in stages]
    ends = [last for _, _, last in schedule.boundaries()]
    n = len(ends)
    while len(trainables) < MAX_STAGES:  # unused stages keep harmless values for their (hidden) controls
        trainables.append(tuple(groups))
        lr_old.append(lr_old[-1] / RATIO)
        lr_new.append(lr_new[-1] / RATIO)
    return {
        "stages": n,
        "end1": ends[0],
        "end2": ends[1] if n >= 3 else max(ends[-1], ends[0]),
        "total": ends[-1],
        "differential": differential,
        "lr": tuple(lr_old),
        "lr_new": tuple(lr_new),
        "trainable": tuple(trainables),
    }


# ------------------------------------------------------------------------------ an LR finder's suggestion
def suggested_rates(
    values: Mapping, stage: int, lr: float | Mapping[str, float], new_only: bool, low: float, high: float
) -> tuple[dict, bool]:
    """``{"lr": …, "lr_new": …}`` with stage ``stage``'s slider(s) set to an LR finder's suggestion ``lr``
    (one rate, or ``{"new": …, "pretrained": …}`` in differential mode); ``new_only``: the stage trains
    only new modules. Rates outside ``low..high`` (the sliders' range) are set to the nearest end; the
    second value says whether one was."""
    i = stage - 1
    lrs, lrs_new = list(values["lr"]), list(values["lr_new"])
    if isinstance(lr, Mapping):
        lrs_new[i], lrs[i] = lr["new"], lr["pretrained"]
    elif values["differential"] and new_only:
        lrs_new[i] = lr  # only new modules: their slider
    else:
        lrs[i] = lr
        if not values["differential"]:  # the new modules' slider waits at RATIO× (see values_from_schedule)
            lrs_new[i] = lr if new_only else lr * RATIO
    clipped = any(not low <= x <= high for x in (lrs[i], lrs_new[i]))

    def clip(rates: list[float]) -> tuple[float, ...]:
        return tuple(min(max(x, low), high) for x in rates)

    return {"lr": clip(lrs), "lr_new": clip(lrs_new)}, clipped
