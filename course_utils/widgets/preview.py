"""The schedule panel's live preview: the invalid-choice message, the learning-rate plot and the stage table
(the rows of :meth:`Schedule.table <course_utils.finetune.Schedule.table>`), redrawn in place."""

from __future__ import annotations

import html
import io
from collections.abc import Collection, Sequence

import ipywidgets as W

from ..finetune import Schedule


def html_table(rows: list[dict], css: str, caption: str = "") -> str:
    """``rows`` (dicts with the same keys) as an HTML table of class ``css``."""
    if not rows:
        return ""
    head = "".join(f"<th style='padding:2px 8px;text-align:left'>{html.escape(str(k))}</th>" for k in rows[0])

    def cell(key, value):
        wrap = "normal" if key in ("trainable", "schedule") else "nowrap"
        return f"<td style='padding:2px 8px;white-space:{wrap}'>{html.escape(str(value))}</td>"

    body = "".join("<tr>" + "".join(cell(k, v) for k, v in row.items()) + "</tr>" for row in rows)
    if caption:
        caption = f"<caption style='text-align:left;font-weight:bold'>{html.escape(caption)}</caption>"
    return (
        f"<table class='{css}' style='border-collapse:collapse;font-size:13px'>"
        f"{caption}<tr>{head}</tr>{body}</table>"
    )


def png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes, for a ``W.Image``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def css_html(css: str) -> W.HTML:
    """An empty ``W.HTML`` with a CSS class (the browser test finds the panel's parts by them)."""
    widget = W.HTML("")
    widget.add_class(css)
    return widget


class Preview:
    """``w_error`` (empty while the choice is valid), ``w_plot`` (each group's learning rate per epoch) and
    ``w_table`` (one row per stage)."""

    def __init__(self):
        self.w_error = css_html("schedule-error")
        self.w_plot = W.Image(format="png", layout=W.Layout(max_width="640px"))
        self.w_plot.add_class("schedule-preview-plot")
        self.w_table = css_html("schedule-preview-table")

    def show_error(self, message: str) -> None:
        """Show why the choice is invalid (``""``: clear it); the plot and the table stay as they were."""
        self.w_error.value = (
            "<div style='border:2px solid #c00;background:#fee;padding:6px;margin:4px 0'>"
            f"<b>⚠ 无效的选择 (invalid choice):</b> {html.escape(message)}<br>"
            "仍显示上一个有效的日程 (the preview keeps the last valid schedule).</div>"
            if message
            else ""
        )

    def show(
        self,
        schedule: Schedule,
        groups: Sequence[str],
        new_groups: Collection[str],
        high_groups: Collection[str] | None,
    ) -> None:
        """Redraw the plot and the table for ``schedule`` on a model with these groups."""
        from ..plots import plot_lr

        # The plot first: when the table's text changes (what a browser test waits for), both are new.
        self.w_plot.value = png(plot_lr(schedule.plan(groups, new_groups, high_groups)))
        rows = schedule.table(groups=groups, new_groups=new_groups, high_groups=high_groups, by_rate=True)
        self.w_table.value = html_table(rows, "schedule-table", f"日程 (schedule): {schedule.epochs} epochs")
