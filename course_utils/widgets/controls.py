"""The schedule panel's controls: the template menu, the number of stages, the stage boundaries, per stage
the groups it unfreezes and its learning rate(s), and the BatchNorm policy; read and set as one dict of
values (:data:`~course_utils.widgets.values.DEFAULT_VALUES` plus ``bn_policy``)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import ipywidgets as W

from ..batchnorm import BN_POLICIES, check_bn_policy
from ..finetune import expand_groups
from .values import CUSTOM, MAX_STAGES, TEMPLATES, values_from_schedule

LR_SLIDER = dict(base=10, min=-7, max=-1, step=0.1, readout_format=".1e")  # 1e-7 .. 1e-1, log scale


# ------------------------------------------------------------------------------ the widgets
def _slider(cls, description: str, css: str, width: str = "420px", label: str = "150px", **kw):
    slider = cls(
        description=description,
        continuous_update=False,
        style={"description_width": label},
        layout=W.Layout(width=width),
        **kw,
    )
    slider.add_class(css)
    return slider


def _lr_slider(description: str, css: str) -> W.FloatLogSlider:
    return _slider(W.FloatLogSlider, description, css, width="300px", label="80px", **LR_SLIDER)


def _bn_buttons(policy: str) -> W.ToggleButtons:
    """The run's BatchNorm policy (``fit``'s ``bn_policy``): no part of a template, kept when one is
    chosen."""
    buttons = W.ToggleButtons(
        options=list(BN_POLICIES),
        value=check_bn_policy(policy),
        description="BatchNorm",
        style={"button_width": "84px"},
        tooltips=[
            "unfrozen groups' BN in train mode (the default)",
            "pretrained groups' BN statistics stay as loaded",
            "re-estimate the statistics of the groups a stage unfreezes",
        ],
    )
    buttons.add_class("schedule-bn-policy")
    return buttons


def _group_toggles(stage: int, groups: Sequence[str]) -> dict[str, W.ToggleButton]:
    """One button per layer group: pressed = stage ``stage`` trains it."""
    return {
        g: W.ToggleButton(
            description=g,
            tooltip=f"stage {stage} trains {g}",
            layout=W.Layout(width="auto", min_width="56px"),
        )
        for g in groups
    }


def _find_lr_button(stage: int) -> W.Button:
    button = W.Button(
        description="找学习率 find LR",
        icon="search",
        tooltip=f"run the LR finder for stage {stage} on a fresh copy of the model",
        layout=W.Layout(width="auto"),
    )
    button.add_class(f"schedule-find-lr-{stage}")
    return button


# ------------------------------------------------------------------------------ the controls
class Controls:
    """The panel's inputs for a model with ``groups`` (``new_groups`` start random, ``high_groups`` are what
    ``"high"`` means). A template is laid out for the stage lengths ``epochs``; the boundary sliders go up
    to ``top`` epochs. ``on_change(callback)``: ``callback()`` after each change, once per template or
    :meth:`set_values` however many controls it moves. Each stage's column also holds its "find LR" button
    (``w_find_lr``), which the panel connects."""

    def __init__(
        self,
        groups: Sequence[str],
        new_groups: Collection[str],
        high_groups: Collection[str] | None,
        *,
        epochs: Sequence[int],
        top: int,
        bn_policy: str = "train",
    ):
        self.groups, self.new_groups, self.high_groups, self.epochs = groups, new_groups, high_groups, epochs
        self._quiet = False  # while True, changes are the controls' own: no callbacks
        self._callbacks: list[Callable[[], None]] = []
        self.w_template = W.Dropdown(
            options=[*TEMPLATES, CUSTOM], description="模板 template", layout=W.Layout(width="420px")
        )
        self.w_template.add_class("schedule-template")
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
        self.w_bn = _bn_buttons(bn_policy)
        self.w_end1 = _slider(W.IntSlider, "阶段1结束 stage 1 ends", "schedule-end1", min=1, max=top)
        self.w_end2 = _slider(W.IntSlider, "阶段2结束 stage 2 ends", "schedule-end2", min=1, max=top)
        self.w_total = _slider(W.IntSlider, "总轮数 total epochs", "schedule-total", min=1, max=top)
        stages = range(1, MAX_STAGES + 1)
        self.w_lr = [_lr_slider("lr", f"schedule-lr-{i}") for i in stages]
        self.w_lr_new = [_lr_slider("lr 新模块", f"schedule-lr-new-{i}") for i in stages]
        self.w_train = [_group_toggles(i, groups) for i in stages]
        self.w_find_lr = [_find_lr_button(i) for i in stages]
        self.columns = [self._column(i) for i in range(MAX_STAGES)]
        for w in self._value_widgets():
            w.observe(self._on_change, names="value")
        self.w_template.observe(self._on_template, names="value")

    def _column(self, i: int) -> W.VBox:
        toggles = W.HBox(list(self.w_train[i].values()), layout=W.Layout(flex_flow="row wrap", width="300px"))
        toggles.add_class(f"schedule-trainable-{i + 1}")
        return W.VBox(
            [
                W.HTML(f"<b>阶段 {i + 1} (stage {i + 1})</b> — 解冻 (unfreeze):"),
                toggles,
                self.w_lr[i],
                self.w_lr_new[i],
                self.w_find_lr[i],
            ],
            layout=W.Layout(border="1px solid #ddd", padding="4px", margin="2px"),
        )

    def rows(self) -> list[W.Widget]:
        """The controls laid out, top to bottom."""
        wrap = W.Layout(flex_flow="row wrap")
        return [
            W.HBox([self.w_template, self.w_stages, self.w_differential], layout=wrap),
            self.w_bn,
            W.HBox([self.w_end1, self.w_end2, self.w_total], layout=wrap),
            W.HBox(self.columns, layout=wrap),
        ]

    @property
    def lr_range(self) -> tuple[float, float]:
        """The learning-rate sliders' lowest and highest value."""
        return LR_SLIDER["base"] ** LR_SLIDER["min"], LR_SLIDER["base"] ** LR_SLIDER["max"]

    # -- values
    def _value_widgets(self) -> Iterator[W.ValueWidget]:
        """The controls that make the schedule (the BatchNorm policy does not: a template keeps it)."""
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

    def set_values(self, values: Mapping, *, template: str = CUSTOM) -> None:
        """Set some or all controls at once (one callback); the template menu then shows ``template``."""
        v = {**self.values, **values}
        bn_policy = check_bn_policy(v["bn_policy"])  # before any control moves
        self._quiet = True
        try:
            top = max(v["end1"], v["end2"], v["total"], self.w_total.max)
            for w in (self.w_end1, self.w_end2, self.w_total):
                w.max = top
            self.w_bn.value = bn_policy
            self.w_stages.value = v["stages"]
            self.w_differential.value = bool(v["differential"])
            self.w_end1.value, self.w_end2.value, self.w_total.value = v["end1"], v["end2"], v["total"]
            for w, x in zip(self.w_lr, v["lr"]):
                w.value = x
            for w, x in zip(self.w_lr_new, v["lr_new"]):
                w.value = x
            for i, toggles in enumerate(self.w_train):
                where = f"stage {i + 1}"
                chosen = expand_groups(
                    v["trainable"][i], self.groups, self.new_groups, where, self.high_groups
                )
                for g, t in toggles.items():
                    t.value = g in chosen
            self.w_template.value = template
        finally:
            self._quiet = False
        self._changed()

    def use_template(self, name: str) -> None:
        """Set the controls to the template ``name`` (a key of :data:`TEMPLATES`) for the stage lengths."""
        if name not in TEMPLATES:
            raise ValueError(f"unknown template {name!r}; the templates are: {', '.join(TEMPLATES)}")
        schedule = TEMPLATES[name](self.epochs)
        values = values_from_schedule(schedule, self.groups, self.new_groups, self.high_groups)
        self.set_values(values, template=name)

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    # -- reactions
    def _on_template(self, change) -> None:
        if not self._quiet and change["new"] in TEMPLATES:
            self.use_template(change["new"])

    def _on_change(self, _change) -> None:
        if self._quiet:
            return
        self._quiet = True
        try:
            self.w_template.value = CUSTOM  # a control changed by hand: no template any more
        finally:
            self._quiet = False
        self._changed()

    def _changed(self) -> None:
        self._sync()
        for callback in self._callbacks:
            callback()

    def _sync(self) -> None:
        """Show the columns of the stages in use, and in each the sliders its groups need."""
        n, diff = self.w_stages.value, self.w_differential.value
        self.w_end1.disabled, self.w_end2.disabled = n < 2, n < 3
        for i, column in enumerate(self.columns):
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
