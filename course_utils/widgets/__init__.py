"""The instructor's schedule designer: controls → a :class:`~course_utils.finetune.Schedule`, a live
preview, and a "Train" button that adds each run to a comparison table.

:func:`schedule_designer` builds the panel, a :class:`ScheduleDesigner` made of three parts:

* ``panel.controls`` (:mod:`~course_utils.widgets.controls`): a template menu (:data:`TEMPLATES`), the stage
  boundaries, per stage the groups it unfreezes and its learning rate(s), the BatchNorm policy;
* ``panel.preview`` (:mod:`~course_utils.widgets.preview`): the plot and the table of the current schedule,
  or why the choice is invalid;
* ``panel.output`` (:mod:`~course_utils.widgets.runs`): the Train button, the runs so far, and each stage's
  "find LR" result (:func:`~course_utils.lr_finder.lr_find` for that stage on a fresh copy of the model,
  its curve shown and the stage's slider(s) set to the suggestion).

The logic is in plain functions (:mod:`~course_utils.widgets.values`), tested without a browser:
:func:`schedule_from_values` turns the controls' values (a dict, see :data:`DEFAULT_VALUES`) into a
``Schedule`` or raises ``ValueError`` with a message a student can act on; :func:`values_from_schedule` is
the inverse. An invalid choice shows that message in the panel and keeps the last valid schedule
(``panel.schedule``); it never raises into the notebook. Stable CSS classes (``schedule-end1``,
``schedule-preview-table``, ``schedule-error``, ``schedule-find-lr-1``, ``schedule-lr-curve``, …) let a
browser test find the parts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence

import ipywidgets as W
from torch import nn

from ..finetune import Schedule, high_groups_of
from ..machinery.checks import optional_whole_number, stage_lengths
from ..models import layer_groups, new_groups_of
from .controls import Controls
from .preview import Preview
from .runs import RunOutput, finder_message
from .values import (
    CUSTOM,
    DEFAULT_VALUES,
    MAX_STAGES,
    RATIO,
    TEMPLATES,
    schedule_from_values,
    suggested_rates,
    values_from_schedule,
)

__all__ = [
    "CUSTOM",
    "DEFAULT_VALUES",
    "MAX_STAGES",
    "RATIO",
    "TEMPLATES",
    "ScheduleDesigner",
    "schedule_designer",
    "schedule_from_values",
    "values_from_schedule",
]
FINDER_SHARES = ("device", "weight_decay", "optimizer", "label_smoothing", "amp", "channels_last")


class ScheduleDesigner(W.VBox):
    """The panel: templates, boundary sliders, per-stage learning rates and groups, live preview, Train.

    ``panel.schedule``: the current (last valid) :class:`Schedule`; ``panel.values``: the controls'
    values (assignable, also partially); ``panel.error``: the message of an invalid choice, else ``""``;
    ``panel.train()``: train the current schedule from a normal cell; ``panel.runs``: the runs so far;
    ``panel.find_lr(stage)``: what stage ``stage``'s "find LR" button does (``panel.finder_results``).
    The BatchNorm policy (``values["bn_policy"]``) is the run's ``fit(..., bn_policy=...)``; choosing a
    template keeps it.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader=None,
        val_loader=None,
        *,
        model_fn=None,
        epochs: Sequence[int] = (5, 15, 30),
        template: str | None = None,
        max_epochs: int | None = None,
        fit_kwargs: Mapping | None = None,
        finder_kwargs: Mapping | None = None,
        bn_policy: str = "train",
    ):
        self.groups = list(layer_groups(model))
        self.new_groups = tuple(g for g in self.groups if g in new_groups_of(model))
        self.high_groups = tuple(g for g in self.groups if g in high_groups_of(model))
        self.base_model = None if model_fn is not None else copy.deepcopy(model)  # what fresh_model copies
        self.model_fn = model_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.fit_kwargs = dict(fit_kwargs or {})
        self.finder_kwargs = dict(finder_kwargs or {})  # for lr_find (num_steps, start_lr, …)
        self.finder_results: dict[int, object] = {}  # stage number → its last LRFinderResult
        self.epochs = stage_lengths(epochs)
        self.error = ""
        self._schedule: Schedule | None = None
        top = optional_whole_number(max_epochs, "max_epochs", none_means="twice the templates' total")
        top = max(10, 2 * sum(self.epochs)) if top is None else top
        groups = (self.groups, self.new_groups, self.high_groups)
        self.controls = Controls(*groups, epochs=self.epochs, top=top, bn_policy=bn_policy)
        self.preview = Preview()
        self.output = RunOutput()
        out = self.output
        super().__init__(
            [*self.controls.rows(), self.preview.w_error, out.w_lr_status, out.w_lr_curve]
            + [self.preview.w_plot, self.preview.w_table, *out.rows()]
        )
        self.add_class("schedule-designer")
        out.w_button.on_click(lambda _button: self._on_train_clicked())
        for stage, button in enumerate(self.controls.w_find_lr, start=1):
            button.on_click(lambda _button, stage=stage: self._on_find_lr_clicked(stage))
        self.controls.on_change(self.refresh)
        self.controls.use_template(next(iter(TEMPLATES)) if template is None else template)

    @property
    def values(self) -> dict:
        return self.controls.values

    @values.setter
    def values(self, values: Mapping) -> None:
        self.controls.set_values(values)

    @property
    def schedule(self) -> Schedule:
        """The current schedule; while the controls are invalid, the last valid one."""
        return self._schedule

    @property
    def runs(self) -> list[dict]:
        """One dict per run so far: ``schedule``, ``history``, ``seconds``."""
        return self.output.runs

    def refresh(self) -> None:
        """Recompute the schedule from the controls and redraw the preview (or show why it is invalid)."""
        try:
            schedule = schedule_from_values(self.values, self.groups, self.new_groups, self.high_groups)
        except ValueError as err:
            self.error = str(err)
        else:
            self.error = ""
        self.preview.show_error(self.error)
        self.output.set_ready(not self.error)
        if not self.error and schedule != self._schedule:
            self._schedule = schedule
            self.preview.show(schedule, self.groups, self.new_groups, self.high_groups)

    def fresh_model(self) -> nn.Module:
        """A new model for a run: ``model_fn()``, or a copy of the model the panel was made with."""
        return self.model_fn() if self.model_fn is not None else copy.deepcopy(self.base_model)

    def _valid_schedule(self, needs: str) -> Schedule:
        if self.error:
            raise ValueError(f"the panel's current choice is invalid: {self.error}")
        if self.train_loader is None:
            raise ValueError(f"this panel has no data: pass {needs} to schedule_designer")
        return self._schedule

    def train(
        self, model: nn.Module | None = None, *, on_epoch_end=None, in_panel: bool = False, **fit_kwargs
    ):
        """Train the panel's schedule (on ``model`` or a fresh one) with progress bars and live curves;
        the run becomes a row of the comparison table. Returns the :class:`~course_utils.train.History`."""
        from ..train import fit

        schedule = self._valid_schedule("train_loader (and val_loader)")
        model = self.fresh_model() if model is None else model
        title = f"第 {len(self.runs) + 1} 次运行 (run)：{schedule.summary()}"
        live = self.output.live_curves(title, in_panel, on_epoch_end)
        kwargs = {"bn_policy": self.values["bn_policy"], **self.fit_kwargs, **fit_kwargs}
        start = time.perf_counter()
        history = fit(model, schedule, self.train_loader, self.val_loader, on_epoch_end=live, **kwargs)
        self.output.add(schedule, history, time.perf_counter() - start)
        return history

    def find_lr(self, stage: int, **finder_kwargs):
        """Run :func:`~course_utils.lr_finder.lr_find` for stage ``stage`` (1 = the first) of the current
        schedule on a fresh model (:meth:`fresh_model` — never the panel's own), show its curve, and set
        that stage's learning-rate slider(s) to the suggestion (in differential mode both, ratio kept).
        Later stages are swept from the panel's model too, not after the earlier stages' training (for that,
        call ``lr_finder.lr_find`` on a model trained so far, as notebook 03 does).
        Returns the :class:`~course_utils.lr_finder.LRFinderResult`."""
        from ..lr_finder import lr_find

        schedule = self._valid_schedule("train_loader")
        if not 1 <= stage <= len(schedule.stages):
            raise ValueError(f"stage {stage} is not in the current schedule of {len(schedule.stages)} stages")
        shared = {k: v for k, v in self.fit_kwargs.items() if k in FINDER_SHARES}
        kwargs = {**shared, **self.finder_kwargs, **finder_kwargs}
        result = lr_find(self.fresh_model(), schedule, self.train_loader, which=stage, **kwargs)
        self.finder_results[stage] = result
        new_only = all(g in self.new_groups for g in result.shares)
        lr = result.suggested_stage().lr
        rates, clipped = suggested_rates(self.values, stage, lr, new_only, *self.controls.lr_range)
        self.values = rates
        self.output.show_finder(result, finder_message(stage, result, clipped, *self.controls.lr_range))
        return result

    def _on_train_clicked(self) -> None:
        if self.error:
            return
        running = f"训练中 (training) run {len(self.runs) + 1} …"
        status = self.output.w_status
        if self.output.in_panel(
            status, running, "训练失败 (training failed)", lambda: self.train(in_panel=True)
        ):
            status.value = f"完成 (done): run {len(self.runs)}"

    def _on_find_lr_clicked(self, stage: int) -> None:
        self.output.in_panel(
            self.output.w_lr_status,
            f"阶段 {stage} (stage {stage})：学习率查找器 (LR finder) 正在运行 …",
            f"学习率查找器出错 (LR finder failed)，阶段 {stage}",
            lambda: self.find_lr(stage),
        )


def schedule_designer(model: nn.Module, train_loader=None, val_loader=None, **kwargs) -> ScheduleDesigner:
    """The schedule panel for ``model``'s layer groups (see :class:`ScheduleDesigner` for ``kwargs``:
    ``model_fn`` to build each run's model, ``epochs`` the templates' stage lengths, ``template``,
    ``max_epochs``, ``fit_kwargs``, ``finder_kwargs`` for the "find LR" buttons' ``lr_find``). Make it a
    cell's last value to show it."""
    return ScheduleDesigner(model, train_loader, val_loader, **kwargs)
