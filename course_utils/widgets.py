"""The instructor's schedule designer: sliders → a :class:`~course_utils.finetune.Schedule`, a live
preview, and a "Train" button that adds each run to a comparison table.

Two plain functions hold the logic, so it is tested without a browser:

* :func:`schedule_from_values` — widget values (a dict, see :data:`DEFAULT_VALUES`) → ``Schedule``,
  raising ``ValueError`` with a message a student can act on for any invalid choice;
* :func:`values_from_schedule` — the inverse, used by the presets (:data:`PRESETS`).

:func:`schedule_designer` builds the panel (:class:`ScheduleDesigner`, an ``ipywidgets.VBox``). An invalid
choice shows a message in the panel and keeps the last valid schedule (``panel.schedule``); it never
raises into the notebook. Each stage has a "find LR" button: :func:`~course_utils.lr_finder.lr_find` for
that stage on a fresh copy of the model, its curve shown in the panel and the stage's slider(s) set to the
suggestion. Stable CSS classes (``schedule-end1``, ``schedule-preview-table``, ``schedule-error``,
``schedule-find-lr-1``, ``schedule-lr-curve``, …) let a browser test find the parts.
"""

from __future__ import annotations

import copy
import html
import io
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import ipywidgets as W
from torch import nn

from .batchnorm import BN_POLICIES, check_bn_policy
from .finetune import (
    Schedule,
    Stage,
    default_high_groups,
    high_groups_of,
    one_stage_schedule,
    three_stage_schedule,
)
from .models import layer_groups

MAX_STAGES = 3
RATIO = 10.0  # new modules vs pretrained ones, when a preset or the panel needs a second rate

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


# ------------------------------------------------------------------------------ values ⇄ schedule
def _expand(
    names, groups: Sequence[str], new: Collection[str], where: str, high: Collection[str] | None = None
) -> list[str]:
    names = (names,) if isinstance(names, str) else tuple(names)
    chosen = {g for name in names for g in Schedule._expand(name, groups, new, where, high)}
    return [g for g in groups if g in chosen]


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
        while (
            j + 1 < len(rest)
            and rest[j].startswith("layer")
            and rest[j + 1].startswith("layer")
            and rest[j][5:].isdigit()
            and rest[j + 1][5:].isdigit()
            and int(rest[j + 1][5:]) == int(rest[j][5:]) + 1
        ):
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


def _check_lr(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def schedule_from_values(
    values: Mapping,
    groups: Sequence[str],
    new_groups: Collection[str] = ("cbam", "head"),
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
    n = v["stages"]
    if n not in range(1, MAX_STAGES + 1):
        raise ValueError(f"the number of stages must be 1, 2 or 3, got {n!r}")
    ends = {1: [v["total"]], 2: [v["end1"], v["total"]], 3: [v["end1"], v["end2"], v["total"]]}[n]
    ends = [int(e) for e in ends]
    if ends[-1] < 1:
        raise ValueError(f"the total must be at least 1 epoch, got {ends[-1]}")
    if ends[0] < 1:
        raise ValueError(f"stage 1 is empty: it must end at epoch 1 or later, not {ends[0]}")
    for i in range(1, n):
        end, prev = ends[i], ends[i - 1]
        if i == n - 1:  # the last stage ends with the total
            where, fix = (
                f"the total is {end} epochs",
                f"raise the total above {prev} or end stage {i} earlier",
            )
        else:
            where, fix = (
                f"stage {i + 1} ends at epoch {end}",
                f"move the end of stage {i + 1} past epoch {prev}",
            )
        if end < prev:
            raise ValueError(
                f"stage {i + 1} would end before stage {i}: {where}, but stage {i} ends at epoch "
                f"{prev}. To fix it, {fix}."
            )
        if end == prev:
            raise ValueError(
                f"stage {i + 1} is empty: {where}, and stage {i} ends at epoch {prev} too. "
                f"To give stage {i + 1} at least one epoch, {fix}."
            )
    stages, previous, first = [], [], 1
    for i in range(n):
        where = f"stage {i + 1}"
        trainable = _expand(v["trainable"][i], groups, new, where, high_groups)
        if not trainable:
            raise ValueError(
                f"stage {i + 1} trains nothing: choose at least one group for it to unfreeze "
                f"(nothing trainable means nothing can learn)."
            )
        lr = _check_lr(v["lr"][i], f"the learning rate of stage {i + 1}")
        if v["differential"]:
            lr_new = _check_lr(v["lr_new"][i], f"the learning rate of new modules in stage {i + 1}")
            has_new, has_old = any(g in new for g in trainable), any(g not in new for g in trainable)
            lr = {"new": lr_new, "pretrained": lr} if has_new and has_old else lr_new if has_new else lr
        name = _stage_name(i + 1, n, trainable, previous, groups, new, high_groups)
        stages.append(Stage(name, ends[i] - first + 1, _compress(trainable, groups, new, high_groups), lr))
        previous, first = trainable, ends[i] + 1
    schedule = Schedule(stages)
    schedule.plan(
        groups, new, high_groups
    )  # every stage resolves against these groups (raises ValueError otherwise)
    return schedule


def values_from_schedule(
    schedule: Schedule,
    groups: Sequence[str],
    new_groups: Collection[str] = ("cbam", "head"),
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
    trainables, rates = [], []
    for stage in schedule.stages:
        trainable, lr = schedule.resolve(stage, groups, new, high_groups)
        rates_new = {lr[g] for g in trainable if g in new}
        rates_old = {lr[g] for g in trainable if g not in new}
        if len(rates_new) > 1 or len(rates_old) > 1:
            raise ValueError(
                f"stage {stage.name!r} has more than one learning rate among its new or its "
                f"pretrained groups ({lr}); the panel has one slider for each"
            )
        rates.append((next(iter(rates_new), None), next(iter(rates_old), None)))
        trainables.append(tuple(trainable))
    differential = any(a is not None and b is not None and a != b for a, b in rates)
    lr_old, lr_new = [], []
    for (
        a,
        b,
    ) in rates:  # "lr" is the stage's rate (of its pretrained groups); "lr_new" that of its new modules
        lr_old.append(a if b is None else b)
        # Outside differential mode the new modules' slider waits at RATIO× the stage's rate, so that
        # ticking "differential" gives the course's differential schedule.
        lr_new.append(a if b is None else b * RATIO if a is None or not differential else a)
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


#: Preset menu: label → schedule for the stage lengths ``epochs`` (e1, e2, e3); all keep the same total.
PRESETS: dict[str, Callable[[Sequence[int]], Schedule]] = {
    "三阶段 three-stage (course)": lambda e: three_stage_schedule(epochs=e),
    "三阶段 + 差异化学习率 three-stage, differential": lambda e: three_stage_schedule(
        differential=True, epochs=e
    ),
    "两阶段 fastai-style two stages": fastai_schedule,
    "一阶段全量微调 one stage, full fine-tuning": lambda e: one_stage_schedule(sum(e), 1e-4),
}
CUSTOM = "自定义 custom"


def schedule_summary(schedule: Schedule) -> str:
    """One line: ``1-5 head+cbam @1e-3 | 6-20 +layer3-4 @1e-4 | 21-50 all @1e-5``."""
    parts = []
    for stage, (_, first, last) in zip(schedule.stages, schedule.boundaries()):
        lr = (
            ", ".join(f"{k} {v:.0e}" for k, v in stage.lr.items())
            if isinstance(stage.lr, dict)
            else f"{stage.lr:.0e}"
        )
        parts.append(f"{first}-{last} {stage.name.split(' ', 1)[-1]} @{lr}")
    return " | ".join(parts)


def preview_rows(
    schedule: Schedule,
    groups: Sequence[str],
    new_groups: Collection[str] = ("cbam", "head"),
    high_groups: Collection[str] | None = None,
) -> list[dict]:
    """The preview table: per stage its epochs, trainable groups, and learning rates grouped by value."""
    rows = []
    for stage, (_, first, last) in zip(schedule.stages, schedule.boundaries()):
        trainable, lr = schedule.resolve(stage, list(groups), new_groups, high_groups)
        by_rate: dict[float, list[str]] = {}
        for g in trainable:
            by_rate.setdefault(lr[g], []).append(g)
        new = [g for g in trainable if g in new_groups]
        old = [g for g in trainable if g not in new_groups]

        def who(gs):
            return "new" if gs == new else "pretrained" if gs == old else ", ".join(gs)

        rows.append(
            {
                "stage": stage.name,
                "epochs": f"{first}-{last}",
                "n": stage.epochs,
                "trainable": ", ".join(trainable),
                "lr": " · ".join(
                    f"{rate:.1e} ({who(gs)})" if len(by_rate) > 1 else f"{rate:.1e}"
                    for rate, gs in by_rate.items()
                ),
            }
        )
    return rows


def _html_table(rows: list[dict], css: str, caption: str = "") -> str:
    if not rows:
        return ""
    head = "".join(f"<th style='padding:2px 8px;text-align:left'>{html.escape(str(k))}</th>" for k in rows[0])

    def cell(key, value):
        wrap = "normal" if key in ("trainable", "schedule") else "nowrap"
        return f"<td style='padding:2px 8px;white-space:{wrap}'>{html.escape(str(value))}</td>"

    body = "".join("<tr>" + "".join(cell(k, v) for k, v in row.items()) + "</tr>" for row in rows)
    cap = (
        f"<caption style='text-align:left;font-weight:bold'>{html.escape(caption)}</caption>"
        if caption
        else ""
    )
    return f"<table class='{css}' style='border-collapse:collapse;font-size:13px'>{cap}<tr>{head}</tr>{body}</table>"


def _png(fig, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# ------------------------------------------------------------------------------ the panel
class ScheduleDesigner(W.VBox):
    """The panel: presets, boundary sliders, per-stage learning rates and groups, live preview, Train.

    ``panel.schedule``: the current (last valid) :class:`Schedule`; ``panel.values``: the controls'
    values (assignable, also partially); ``panel.error``: the message of an invalid choice, else ``""``;
    ``panel.train()``: train the current schedule from a normal cell; ``panel.runs``: the runs so far;
    ``panel.find_lr(stage)``: what stage ``stage``'s "find LR" button does (``panel.finder_results``).
    The BatchNorm policy (``bn_policy``, buttons ``schedule-bn-policy``, ``values["bn_policy"]``) is the
    run's ``fit(..., bn_policy=...)``; choosing a preset keeps it.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader=None,
        val_loader=None,
        *,
        model_fn=None,
        epochs: Sequence[int] = (5, 15, 30),
        preset: str | None = None,
        max_epochs: int | None = None,
        fit_kwargs: Mapping | None = None,
        finder_kwargs: Mapping | None = None,
        bn_policy: str = "train",
    ):
        self.groups = list(layer_groups(model))
        self.new_groups = tuple(g for g in self.groups if g in getattr(model, "new_groups", ("cbam", "head")))
        self.high_groups = tuple(g for g in self.groups if g in high_groups_of(model))
        self._template = None if model_fn is not None else copy.deepcopy(model)
        self.model_fn = model_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.fit_kwargs = dict(fit_kwargs or {})
        self.finder_kwargs = dict(finder_kwargs or {})  # for lr_find (num_steps, start_lr, …)
        self.finder_results: dict[int, object] = {}  # stage number → its last LRFinderResult
        self.epochs = tuple(int(e) for e in epochs)
        self.runs: list[dict] = []
        self.error = ""
        self._schedule: Schedule | None = None
        self._quiet = False
        self._busy = False
        top = max(10, 2 * sum(self.epochs)) if max_epochs is None else int(max_epochs)

        def slider(cls, description, css, width="420px", label="150px", **kw):
            s = cls(
                description=description,
                continuous_update=False,
                style={"description_width": label},
                layout=W.Layout(width=width),
                **kw,
            )
            s.add_class(css)
            return s

        self.w_preset = W.Dropdown(
            options=[*PRESETS, CUSTOM], description="预设 preset", layout=W.Layout(width="420px")
        )
        self.w_preset.add_class("schedule-preset")
        self.w_stages = W.ToggleButtons(
            options=[("1", 1), ("2", 2), ("3", 3)],
            value=3,
            description="阶段数 stages",
            style={"button_width": "36px"},
        )
        self.w_differential = W.Checkbox(
            value=False,
            description="差异化学习率 differential (new vs pretrained)",
            indent=False,
            layout=W.Layout(width="auto"),
        )
        # the BatchNorm policy of the run (fit's bn_policy): not part of a preset, kept when a preset is chosen
        self.w_bn = W.ToggleButtons(
            options=list(BN_POLICIES),
            value=check_bn_policy(bn_policy),
            description="BatchNorm",
            style={"button_width": "84px"},
            tooltips=[
                "unfrozen groups' BN in train mode (the default)",
                "pretrained groups' BN statistics stay as loaded",
                "re-estimate the statistics of the groups a stage unfreezes",
            ],
        )
        self.w_bn.add_class("schedule-bn-policy")
        self.w_end1 = slider(W.IntSlider, "阶段1结束 stage 1 ends", "schedule-end1", min=1, max=top)
        self.w_end2 = slider(W.IntSlider, "阶段2结束 stage 2 ends", "schedule-end2", min=1, max=top)
        self.w_total = slider(W.IntSlider, "总轮数 total epochs", "schedule-total", min=1, max=top)
        lr_kw = dict(base=10, min=-7, max=-1, step=0.1, readout_format=".1e", width="300px", label="80px")
        self.w_lr = [
            slider(W.FloatLogSlider, "lr", f"schedule-lr-{i + 1}", **lr_kw) for i in range(MAX_STAGES)
        ]
        self.w_lr_new = [
            slider(W.FloatLogSlider, "lr 新模块", f"schedule-lr-new-{i + 1}", **lr_kw)
            for i in range(MAX_STAGES)
        ]
        self.w_train = [
            {
                g: W.ToggleButton(
                    description=g,
                    tooltip=f"stage {i + 1} trains {g}",
                    layout=W.Layout(width="auto", min_width="56px"),
                )
                for g in self.groups
            }
            for i in range(MAX_STAGES)
        ]
        self.w_find_lr = [
            W.Button(
                description="找学习率 find LR",
                icon="search",
                tooltip=f"run the LR finder for stage {i + 1} on a fresh copy of the model",
                layout=W.Layout(width="auto"),
            )
            for i in range(MAX_STAGES)
        ]
        for i, button in enumerate(self.w_find_lr):
            button.add_class(f"schedule-find-lr-{i + 1}")
            button.on_click(lambda _b, stage=i + 1: self._on_find_lr_clicked(stage))
        self._columns = []
        for i in range(MAX_STAGES):
            toggles = W.HBox(
                list(self.w_train[i].values()), layout=W.Layout(flex_flow="row wrap", width="300px")
            )
            toggles.add_class(f"schedule-trainable-{i + 1}")
            column = W.VBox(
                [
                    W.HTML(f"<b>阶段 {i + 1} (stage {i + 1})</b> — 解冻 (unfreeze):"),
                    toggles,
                    self.w_lr[i],
                    self.w_lr_new[i],
                    self.w_find_lr[i],
                ],
                layout=W.Layout(border="1px solid #ddd", padding="4px", margin="2px"),
            )
            self._columns.append(column)
        self.w_error = W.HTML("")
        self.w_error.add_class("schedule-error")
        self.w_plot = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self.w_plot.add_class("schedule-preview-plot")
        self.w_table = W.HTML("")
        self.w_table.add_class("schedule-preview-table")
        self.w_button = W.Button(description="训练 Train", icon="play", button_style="primary")
        self.w_button.add_class("schedule-train")
        self.w_status = W.HTML("")
        self.w_status.add_class("schedule-train-status")
        self.w_progress = W.Output()
        self.w_curves = W.Image(format="png", layout=W.Layout(max_width="760px", display="none"))
        self.w_curves.add_class("schedule-curves")
        self.w_runs = W.HTML("")
        self.w_runs.add_class("schedule-runs-table")
        self.w_lr_status = W.HTML("")
        self.w_lr_status.add_class("schedule-find-lr-status")
        self.w_lr_curve = W.Image(format="png", layout=W.Layout(max_width="640px", display="none"))
        self.w_lr_curve.add_class("schedule-lr-curve")
        self.w_button.on_click(self._on_train_clicked)

        for w in self._value_widgets():
            w.observe(self._on_change, names="value")
        self.w_preset.observe(self._on_preset, names="value")
        super().__init__(
            [
                W.HBox(
                    [self.w_preset, self.w_stages, self.w_differential], layout=W.Layout(flex_flow="row wrap")
                ),
                self.w_bn,
                W.HBox([self.w_end1, self.w_end2, self.w_total], layout=W.Layout(flex_flow="row wrap")),
                W.HBox(self._columns, layout=W.Layout(flex_flow="row wrap")),
                self.w_error,
                self.w_lr_status,
                self.w_lr_curve,
                self.w_plot,
                self.w_table,
                W.HBox([self.w_button, self.w_status]),
                self.w_progress,
                self.w_curves,
                self.w_runs,
            ]
        )
        self.add_class("schedule-designer")
        preset = next(iter(PRESETS)) if preset is None else preset
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; the presets are: {', '.join(PRESETS)}")
        self._quiet = True
        self.w_preset.value = preset
        self._quiet = False
        self._apply_preset(preset)

    # -- values
    def _value_widgets(self):
        yield from (self.w_stages, self.w_differential, self.w_end1, self.w_end2, self.w_total)
        yield from self.w_lr
        yield from self.w_lr_new
        for toggles in self.w_train:
            yield from toggles.values()

    @property
    def values(self) -> dict:
        return {
            "stages": self.w_stages.value,
            "end1": self.w_end1.value,
            "end2": self.w_end2.value,
            "total": self.w_total.value,
            "differential": self.w_differential.value,
            "lr": tuple(w.value for w in self.w_lr),
            "lr_new": tuple(w.value for w in self.w_lr_new),
            "trainable": tuple(tuple(g for g, t in toggles.items() if t.value) for toggles in self.w_train),
            "bn_policy": self.w_bn.value,
        }

    @values.setter
    def values(self, values: Mapping) -> None:
        self.set_values(values)

    def set_values(self, values: Mapping, *, custom: bool = True) -> None:
        """Set some or all controls at once (one redraw); the preset menu then shows "custom"."""
        v = {**self.values, **values}
        self._quiet = True
        try:
            top = max(v["end1"], v["end2"], v["total"], self.w_total.max)
            for w in (self.w_end1, self.w_end2, self.w_total):
                w.max = top
            self.w_bn.value = check_bn_policy(v["bn_policy"])
            self.w_stages.value = v["stages"]
            self.w_differential.value = bool(v["differential"])
            self.w_end1.value, self.w_end2.value, self.w_total.value = v["end1"], v["end2"], v["total"]
            for w, x in zip(self.w_lr, v["lr"]):
                w.value = x
            for w, x in zip(self.w_lr_new, v["lr_new"]):
                w.value = x
            for i, toggles in enumerate(self.w_train):
                chosen = set(
                    _expand(
                        v["trainable"][i], self.groups, self.new_groups, f"stage {i + 1}", self.high_groups
                    )
                )
                for g, t in toggles.items():
                    t.value = g in chosen
            if custom:
                self.w_preset.value = CUSTOM
        finally:
            self._quiet = False
        self.refresh()

    @property
    def schedule(self) -> Schedule:
        """The current schedule; while the controls are invalid, the last valid one."""
        return self._schedule

    def _apply_preset(self, name: str) -> None:
        values = values_from_schedule(
            PRESETS[name](self.epochs), self.groups, self.new_groups, self.high_groups
        )
        self.set_values(values, custom=False)

    def _on_preset(self, change) -> None:
        if not self._quiet and change["new"] in PRESETS:
            self._apply_preset(change["new"])

    def _on_change(self, change) -> None:
        if self._quiet:
            return
        self._quiet = True
        try:
            self.w_preset.value = CUSTOM
        finally:
            self._quiet = False
        self.refresh()

    # -- preview
    def _sync_controls(self) -> None:
        n, diff = self.w_stages.value, self.w_differential.value
        self.w_end1.disabled, self.w_end2.disabled = n < 2, n < 3
        for i, column in enumerate(self._columns):
            column.layout.display = None if i < n else "none"
            for t in self.w_train[i].values():
                t.button_style = "info" if t.value else ""  # pressed = trained, in colour
            chosen = [g for g, t in self.w_train[i].items() if t.value]
            has_new = any(g in self.new_groups for g in chosen)
            has_old = any(g not in self.new_groups for g in chosen)
            self.w_lr_new[i].layout.display = None if diff else "none"
            self.w_lr_new[i].disabled = diff and not has_new
            self.w_lr[i].description = "lr 预训练" if diff else "lr"
            self.w_lr[i].disabled = diff and not has_old and has_new

    def refresh(self) -> None:
        """Recompute the schedule from the controls and redraw the preview (or show why it is invalid)."""
        self._sync_controls()
        try:
            schedule = schedule_from_values(self.values, self.groups, self.new_groups, self.high_groups)
        except ValueError as err:
            self.error = str(err)
            self.w_error.value = (
                "<div style='border:2px solid #c00;background:#fee;padding:6px;margin:4px 0'>"
                f"<b>⚠ 无效的选择 (invalid choice):</b> {html.escape(self.error)}<br>"
                "仍显示上一个有效的日程 (the preview keeps the last valid schedule).</div>"
            )
            self.w_button.disabled = True
            self.w_button.tooltip = "fix the invalid choice first"
            return
        self.error = ""
        self.w_error.value = ""
        self.w_button.disabled = self._busy
        self.w_button.tooltip = "train this schedule on a fresh model"
        if schedule == self._schedule:
            return
        self._schedule = schedule
        self._draw_preview()

    def _draw_preview(self) -> None:
        from .plots import plot_lr

        schedule = self._schedule
        # The plot first: when the table's text changes (what a browser test waits for), both are new.
        self.w_plot.value = _png(plot_lr(schedule.plan(self.groups, self.new_groups, self.high_groups)))
        self.w_table.value = _html_table(
            preview_rows(schedule, self.groups, self.new_groups, self.high_groups),
            "schedule-table",
            f"日程 (schedule): {schedule.epochs} epochs",
        )

    # -- training
    def fresh_model(self) -> nn.Module:
        """A new model for a run: ``model_fn()``, or a copy of the model the panel was made with."""
        return self.model_fn() if self.model_fn is not None else copy.deepcopy(self._template)

    def train(
        self, model: nn.Module | None = None, *, on_epoch_end=None, in_panel: bool = False, **fit_kwargs
    ):
        """Train the panel's schedule (on ``model`` or a fresh one) with progress bars and live curves;
        the run becomes a row of the comparison table. Returns the :class:`~course_utils.train.History`."""
        from IPython import get_ipython
        from IPython.display import display

        from .plots import plot_history
        from .train import fit

        if self.error:
            raise ValueError(f"the panel's current choice is invalid: {self.error}")
        if self.train_loader is None:
            raise ValueError(
                "this panel has no data: pass train_loader (and val_loader) to schedule_designer"
            )
        schedule = self._schedule
        model = self.fresh_model() if model is None else model
        handle = None

        def live(history):
            nonlocal handle
            fig = plot_history(history, f"run {len(self.runs) + 1}: {schedule_summary(schedule)}")
            if in_panel:
                self.w_curves.value = _png(fig)
                self.w_curves.layout.display = None
            elif get_ipython() is None:  # plain Python: no live figure
                pass
            elif handle is None:
                handle = display(fig, display_id=True)
            else:
                handle.update(fig)
            if on_epoch_end is not None:
                on_epoch_end(history)

        start = time.perf_counter()
        history = fit(
            model,
            schedule,
            self.train_loader,
            self.val_loader,
            on_epoch_end=live,
            **{"bn_policy": self.w_bn.value, **self.fit_kwargs, **fit_kwargs},
        )
        self.add_run(schedule, history, time.perf_counter() - start)
        return history

    def add_run(self, schedule: Schedule, history, seconds: float) -> None:
        """Append a run to :attr:`runs` and to the comparison table."""
        self.runs.append({"schedule": schedule, "history": history, "seconds": seconds})
        self.w_runs.value = _html_table(self.comparison(), "schedule-runs", "对比 (runs so far)")

    def comparison(self) -> list[dict]:
        """One row per run: its schedule, final and best validation accuracy, and wall time."""
        rows = []
        for i, run in enumerate(self.runs, start=1):
            acc = [a for a in run["history"]["val_acc"] if a is not None]
            rows.append(
                {
                    "run": i,
                    "schedule": schedule_summary(run["schedule"]),
                    "BN": run["history"].meta.get("bn_policy", "train"),
                    "epochs": len(run["history"]),
                    "final val acc": f"{acc[-1]:.3f}" if acc else "-",
                    "best val acc": f"{max(acc):.3f}" if acc else "-",
                    "seconds": f"{run['seconds']:.1f}",
                }
            )
        return rows

    def _in_panel(self, status: W.HTML, running: str, failed: str, action) -> bool:
        """Run ``action()`` with the panel busy and its output in the progress area; an exception is shown
        in ``status`` (a widget callback must not raise into the notebook). Returns whether it succeeded."""
        if self._busy:
            return False
        self._busy = True
        self.w_button.disabled = True
        status.value = running
        try:
            self.w_progress.clear_output()
            with self.w_progress:
                action()
            return True
        except Exception as err:
            status.value = (
                f"<span style='color:#c00'><b>{failed}:</b> "
                f"{html.escape(type(err).__name__)}: {html.escape(str(err))}</span>"
            )
            return False
        finally:
            self._busy = False
            self.w_button.disabled = bool(self.error)

    def _on_train_clicked(self, _button=None) -> None:
        if self.error:
            return
        running = f"训练中 (training) run {len(self.runs) + 1} …"
        if self._in_panel(
            self.w_status, running, "训练失败 (training failed)", lambda: self.train(in_panel=True)
        ):
            self.w_status.value = f"完成 (done): run {len(self.runs)}"

    # -- learning-rate finder
    def find_lr(self, stage: int, **finder_kwargs):
        """Run :func:`~course_utils.lr_finder.lr_find` for stage ``stage`` (1 = the first) of the current
        schedule on a fresh model (:meth:`fresh_model` — never the panel's own), show its curve, and set
        that stage's learning-rate slider(s) to the suggestion (in differential mode both, ratio kept).
        Later stages are swept from the panel's model too, not after the earlier stages' training (for that,
        call ``lr_finder.lr_find`` on a model trained so far, as notebook 03 does).
        Returns the :class:`~course_utils.lr_finder.LRFinderResult`."""
        from .lr_finder import lr_find

        if self.error:
            raise ValueError(f"the panel's current choice is invalid: {self.error}")
        if self.train_loader is None:
            raise ValueError("this panel has no data: pass train_loader to schedule_designer")
        schedule = self._schedule
        if not 1 <= stage <= len(schedule.stages):
            raise ValueError(f"stage {stage} is not in the current schedule of {len(schedule.stages)} stages")
        shared = {
            k: v
            for k, v in self.fit_kwargs.items()
            if k in ("device", "weight_decay", "optimizer", "label_smoothing", "amp", "channels_last")
        }
        result = lr_find(
            self.fresh_model(),
            schedule,
            self.train_loader,
            which=stage,
            **{**shared, **self.finder_kwargs, **finder_kwargs},
        )
        self.finder_results[stage] = result
        self.w_lr_curve.value = _png(result.plot())
        self.w_lr_curve.layout.display = None
        self.w_lr_status.value = self._apply_suggestion(stage, result)
        return result

    def _apply_suggestion(self, stage: int, result) -> str:
        """Set stage ``stage``'s slider(s) to ``result``'s suggestion; returns the panel's message."""
        i = stage - 1
        lr = result.suggested_stage().lr
        lrs, lrs_new = (
            list(self.w_lr[j].value for j in range(MAX_STAGES)),
            list(w.value for w in self.w_lr_new),
        )
        if isinstance(lr, dict):  # differential: {"new": …, "pretrained": …}
            lrs_new[i], lrs[i] = lr["new"], lr["pretrained"]
        elif self.w_differential.value and all(g in self.new_groups for g in result.shares):
            lrs_new[i] = lr  # only new modules: their slider
        else:
            lrs[i] = lr
            if (
                not self.w_differential.value
            ):  # the new modules' slider waits at RATIO× (see values_from_schedule)
                lrs_new[i] = lr if all(g in self.new_groups for g in result.shares) else lr * RATIO
        low, high = self.w_lr[i].base ** self.w_lr[i].min, self.w_lr[i].base ** self.w_lr[i].max
        clipped = [x for x in (lrs[i], lrs_new[i]) if not low <= x <= high]
        self.set_values(
            {
                "lr": tuple(min(max(x, low), high) for x in lrs),
                "lr_new": tuple(min(max(x, low), high) for x in lrs_new),
            }
        )
        rates = ", ".join(f"{g} {x:.1e}" for g, x in result.suggested_lrs().items())
        note = (
            f" <span style='color:#c60'>(outside the sliders' {low:.0e}..{high:.0e}: set to the nearest end)</span>"
            if clipped
            else ""
        )
        stopped = "stopped at divergence" if result.diverged else "no divergence up to the end of the sweep"
        return (
            f"<b>阶段 {stage} (stage {stage})</b> LR finder: suggestion {result.suggestion():.1e} "
            f"(valley; {len(result)} steps, {stopped}) → {html.escape(rates)}{note}"
        )

    def _on_find_lr_clicked(self, stage: int) -> None:
        self._in_panel(
            self.w_lr_status,
            f"阶段 {stage} (stage {stage}): LR finder running …",
            f"LR finder failed (stage {stage})",
            lambda: self.find_lr(stage),
        )


def schedule_designer(model: nn.Module, train_loader=None, val_loader=None, **kwargs):
    """The schedule panel for ``model``'s layer groups (see :class:`ScheduleDesigner` for ``kwargs``:
    ``model_fn`` to build each run's model, ``epochs`` the presets' stage lengths, ``preset``,
    ``max_epochs``, ``fit_kwargs``, ``finder_kwargs`` for the "find LR" buttons' ``lr_find``). Make it a
    cell's last value to show it."""
    return ScheduleDesigner(model, train_loader, val_loader, **kwargs)
