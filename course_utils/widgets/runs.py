"""The schedule panel's output of runs: the Train button with its status, progress and live curves, the
table comparing the runs so far, and the "find LR" buttons' message and curve."""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as W

from ..finetune import Schedule
from .preview import css_html, html_table, png


def _error_html(failed: str, err: Exception) -> str:
    return (
        f"<span style='color:#c00'><b>{failed}:</b> "
        f"{html.escape(type(err).__name__)}: {html.escape(str(err))}</span>"
    )


def finder_message(stage: int, result, clipped: bool, low: float, high: float) -> str:
    """What the panel says after the LR finder for stage ``stage``: its suggestion and the rates set."""
    rates = ", ".join(f"{g} {x:.1e}" for g, x in result.suggested_lrs().items())
    outside = f"超出滑块范围 {low:.0e}..{high:.0e}，已设为最近的一端 (clipped)"
    note = f" <span style='color:#c60'>({outside})</span>" if clipped else ""
    stopped = (
        "损失发散处停止 (stopped at divergence)" if result.diverged else "扫到最后也没有发散 (no divergence)"
    )
    return (
        f"<b>阶段 {stage} (stage {stage})</b> 学习率查找器 (LR finder)：建议值 (suggestion) "
        f"{result.suggestion():.1e}（valley 规则；{len(result)} 步，{stopped}）→ {html.escape(rates)}{note}"
    )


class RunOutput:
    """``runs``: one dict per run (``schedule``, ``history``, ``seconds``); the widgets that show them.

    :meth:`in_panel` runs a button's action with the panel busy (the Train button disabled) and its output
    in the progress area; an exception is shown in the panel, never raised into the notebook.
    """

    def __init__(self):
        self.runs: list[dict] = []
        self.busy = False
        self.ready = False  # the panel's choice is valid: the Train button may be pressed
        self.w_button = W.Button(description="训练 Train", icon="play", button_style="primary")
        self.w_button.add_class("schedule-train")
        self.w_status = css_html("schedule-train-status")
        self.w_progress = W.Output()
        self.w_curves = W.Image(format="png", layout=W.Layout(max_width="760px", display="none"))
        self.w_curves.add_class("schedule-curves")
        self.w_runs = css_html("schedule-runs-table")
        self.w_lr_status = css_html("schedule-find-lr-status")
        self.w_lr_curve = W.Image(format="png", layout=W.Layout(max_width="640px", display="none"))
        self.w_lr_curve.add_class("schedule-lr-curve")

    def rows(self) -> list[W.Widget]:
        """The Train button and what it shows, top to bottom (the LR finder's widgets go elsewhere)."""
        return [W.HBox([self.w_button, self.w_status]), self.w_progress, self.w_curves, self.w_runs]

    def set_ready(self, ready: bool) -> None:
        """Enable the Train button for a valid choice (unless a run is going on), disable it otherwise."""
        self.ready = ready
        self.w_button.disabled = self.busy or not ready
        self.w_button.tooltip = (
            "train this schedule on a fresh model" if ready else "fix the invalid choice first"
        )

    def in_panel(self, status: W.HTML, running: str, failed: str, action: Callable[[], object]) -> bool:
        """Run ``action()`` with ``running`` in ``status``; on an exception ``failed`` and the error there.
        Returns whether it succeeded (``False`` at once while another action runs)."""
        if self.busy:
            return False
        self.busy = True
        self.w_button.disabled = True
        status.value = running
        try:
            self.w_progress.clear_output()
            with self.w_progress:
                action()
            return True
        except Exception as err:
            status.value = _error_html(failed, err)
            return False
        finally:
            self.busy = False
            self.w_button.disabled = not self.ready

    def live_curves(self, title: str, in_panel: bool, on_epoch_end=None) -> Callable:
        """``fit``'s ``on_epoch_end``: the curves so far, in the panel (``in_panel``) or in the cell's output
        (under IPython; none in plain Python), then ``on_epoch_end(history)``."""
        from IPython import get_ipython
        from IPython.display import display

        from ..plots import plot_history

        handle = None

        def live(history):
            nonlocal handle
            fig = plot_history(history, title)
            if in_panel:
                self.w_curves.value = png(fig)
                self.w_curves.layout.display = None
            elif get_ipython() is None:  # plain Python: no live figure
                pass
            elif handle is None:
                handle = display(fig, display_id=True)
            else:
                handle.update(fig)
            if on_epoch_end is not None:
                on_epoch_end(history)

        return live

    def add(self, schedule: Schedule, history, seconds: float) -> None:
        """Append a run to :attr:`runs` and to the comparison table."""
        self.runs.append({"schedule": schedule, "history": history, "seconds": seconds})
        self.w_runs.value = html_table(self.comparison(), "schedule-runs", "对比 (runs so far)")

    def comparison(self) -> list[dict]:
        """One row per run: its schedule, final and best validation accuracy, and wall time."""
        rows = []
        for i, run in enumerate(self.runs, start=1):
            acc = [a for a in run["history"]["val_acc"] if a is not None]
            rows.append(
                {
                    "run": i,
                    "schedule": run["schedule"].summary(),
                    "BN": run["history"].meta.get("bn_policy", "train"),
                    "epochs": len(run["history"]),
                    "final val acc": f"{acc[-1]:.3f}" if acc else "-",
                    "best val acc": f"{max(acc):.3f}" if acc else "-",
                    "seconds": f"{run['seconds']:.1f}",
                }
            )
        return rows

    def show_finder(self, result, message: str) -> None:
        """An LR finder's curve and the panel's message about it."""
        self.w_lr_curve.value = png(result.plot())
        self.w_lr_curve.layout.display = None
        self.w_lr_status.value = message
