"""Figures speak to a Chinese-speaking student: bilingual labels where a font draws Chinese, English where
none does (never boxes in place of characters)."""

import warnings

import pytest

from course_utils import finetune, plots


def lr_figure_labels(fig):
    ax = fig.axes[0]
    return ax.get_xlabel(), ax.get_ylabel(), ax.get_title()


def test_labels_are_bilingual_where_a_font_draws_chinese(monkeypatch):
    plan = finetune.three_stage_schedule(epochs=(1, 1, 1)).plan(["layer4", "cbam", "head"], ["cbam", "head"])
    monkeypatch.setattr(plots, "CJK_FONT", "Noto Sans CJK SC")
    assert lr_figure_labels(plots.plot_lr(plan)) == (
        "轮 (epoch)",
        "学习率；空白 = 冻结 (lr; gap = frozen)",
        "每个层组的学习率 (learning rate per group)",
    )
    assert plots.metric_label("val_acc") == "验证准确率 (val accuracy)" and plots.metric_label("x") == "x"
    monkeypatch.setattr(plots, "CJK_FONT", None)
    assert lr_figure_labels(plots.plot_lr(plan)) == ("epoch", "lr; gap = frozen", "learning rate per group")
    assert plots.metric_label("val_acc") == "val accuracy"


def test_chinese_labels_draw_without_missing_glyphs():
    if plots.CJK_FONT is None:
        pytest.skip("no CJK font installed: the figures use English labels (checked above)")
    history = {"epoch": [1, 2], "train_loss": [2.0, 1.5], "val_loss": [2.1, 1.7], "train_acc": [0.2, 0.4]}
    history["val_acc"] = [0.2, 0.3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plots.plot_comparison({"a": history, "b": history})  # lays the text out: finds its glyphs
        fig.canvas.draw()
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]
    assert "验证准确率" in fig.axes[0].get_ylabel()


def test_tables_with_chinese_headers_stay_aligned():
    text = plots.format_table(
        [{"策略 (strategy)": "(a) 无 CBAM", "准确率": 0.1}, {"策略 (strategy)": "b", "准确率": 0.25}]
    )
    widths = {plots.text_width(line) for line in text.splitlines()}
    assert len(widths) == 1, text  # every row ends in the same column: numbers right-aligned under 准确率
    assert text.splitlines()[2].endswith(" 0.100") and plots.text_width("无") == 2
