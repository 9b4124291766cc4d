"""What the course shows: figures — curves with stages shaded, learning rates per group, weight drift,
attention maps, feature maps, confusion matrices and strategy comparisons — and plain-text tables.

Every ``plot_…`` function returns a closed matplotlib ``Figure`` (shown once when it is a cell's last value,
or with ``display(fig)``), so nothing is drawn twice and no figures pile up in widget outputs.
:func:`print_table` prints rows (dicts) as plain text, which nbval compares exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from .finetune import EpochPlan, Schedule

STAGE_COLORS = ("#e8f0fe", "#fef3e0", "#e6f4ea", "#fce8e6", "#f3e8fd")
# Fonts that draw Chinese, by platform: Debian's fonts-noto-cjk, macOS, Windows, others.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "PingFang SC",
    "Heiti SC",
    "Hiragino Sans GB",
    "Microsoft YaHei",
    "SimHei",
    "Arial Unicode MS",
)


def cjk_font() -> str | None:
    """The first installed font family of :data:`CJK_FONTS` that matplotlib knows, or ``None``."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def use_cjk_fallback() -> str | None:
    """Let figures draw Chinese: the installed CJK font follows the default sans-serif font in
    ``font.family``, so Latin text looks as before and each Chinese glyph comes from the CJK font
    (matplotlib 3.6+ falls back per glyph along ``font.family``, not along ``font.sans-serif``). Returns the
    family or ``None``."""
    family = cjk_font()
    families = list(plt.rcParams["font.family"])
    if family and family not in families:
        plt.rcParams["font.family"] = [*families, family]
    return family


CJK_FONT = use_cjk_fallback()
METRICS = {  # a History column → what a figure calls it
    "loss": ("损失", "loss"),
    "acc": ("准确率", "accuracy"),
    "train_loss": ("训练损失", "train loss"),
    "train_acc": ("训练准确率", "train accuracy"),
    "val_loss": ("验证损失", "val loss"),
    "val_acc": ("验证准确率", "val accuracy"),
}


def zh(chinese: str, english: str) -> str:
    """A figure's label for a Chinese-speaking student: ``"轮 (epoch)"`` where a font draws Chinese, else
    ``"epoch"`` (never boxes where the characters should be)."""
    return f"{chinese} ({english})" if CJK_FONT else english


def metric_label(metric: str) -> str:
    """``"val_acc"`` → ``"验证准确率 (val accuracy)"``; a name the course does not know stays as it is."""
    return zh(*METRICS[metric]) if metric in METRICS else metric


def _figure(ncols: int = 1, nrows: int = 1, size=(5.5, 3.6), **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    plt.close(fig)
    return fig, axes.ravel()


def stage_spans(source) -> list[tuple[str, int, int]]:
    """``(stage, first_epoch, last_epoch)`` from a Schedule, a History or a list of EpochPlans."""
    if isinstance(source, Schedule):
        return source.boundaries()
    if hasattr(source, "stages") and callable(source.stages):  # History
        return source.stages()
    spans: list[tuple[str, int, int]] = []
    for p in source:
        if spans and spans[-1][0] == p.stage:
            spans[-1] = (p.stage, spans[-1][1], p.epoch)
        else:
            spans.append((p.stage, p.epoch, p.epoch))
    return spans


def shade_stages(ax, source, label: bool = True) -> None:
    """Shade each stage's epochs (epoch e spans e-0.5 .. e+0.5) and name it at the top."""
    for i, (name, first, last) in enumerate(stage_spans(source)):
        ax.axvspan(first - 0.5, last + 0.5, color=STAGE_COLORS[i % len(STAGE_COLORS)], zorder=0)
        if label:
            ax.text(
                (first + last) / 2,
                1.0,
                name,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
            )


def mark_recalibrations(ax, history, label: bool = True) -> None:
    """A dashed vertical line where ``fit`` re-estimated BatchNorm statistics (before that epoch's first
    step)."""
    for i, rec in enumerate(getattr(history, "meta", {}).get("bn_recalibrations", [])):
        ax.axvline(
            rec["epoch"] - 0.5,
            color="0.35",
            ls="--",
            lw=1,
            zorder=1,
            label=zh("BN 重新估计", "BN recalibrated") if label and i == 0 else None,
        )


def plot_history(history, title: str | None = None):
    """Loss and accuracy, train and validation, per epoch, with the stages shaded (and BatchNorm
    recalibrations dashed)."""
    fig, (ax_loss, ax_acc) = _figure(2)
    epochs = history["epoch"]
    for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
        shade_stages(ax, history)
        mark_recalibrations(ax, history)
        ax.plot(epochs, history[f"train_{key}"], "o-", label=zh("训练", "train"), ms=3)
        if any(v is not None for v in history[f"val_{key}"]):
            ax.plot(epochs, history[f"val_{key}"], "s-", label=zh("验证", "val"), ms=3)
        ax.set_xlabel(zh("轮", "epoch"))
        ax.set_ylabel(metric_label(key))
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, y=1.04)
    fig.tight_layout()
    return fig


def plot_lr(source, ax=None, log: bool = True, title: str | None = None):
    """Learning rate of every group per epoch (0 = frozen, drawn as a gap), stages shaded.

    ``source``: a History (what was in force) or a list of :class:`EpochPlan` (what a schedule will do).
    """
    if ax is None:
        fig, (ax,) = _figure(1, size=(7, 3.4))
    else:
        fig = ax.figure
    if isinstance(source, Sequence) and source and isinstance(source[0], EpochPlan):
        epochs, lrs = [p.epoch for p in source], [p.lr for p in source]
    else:
        epochs, lrs = source["epoch"], source["lr"]
    shade_stages(ax, source)
    groups = list(lrs[0]) if lrs else []
    for i, group in enumerate(groups):
        values = np.array([lr[group] for lr in lrs], dtype=float)
        values[values == 0] = np.nan  # frozen: no line
        offset = 1 + 0.04 * (i - len(groups) / 2) if log else 1  # keep equal lines visible side by side
        ax.step(epochs, values * offset, where="mid", label=group, lw=2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(zh("轮", "epoch"))
    ax.set_ylabel(zh("学习率；空白 = 冻结", "lr; gap = frozen"))
    ax.set_title(title or zh("每个层组的学习率", "learning rate per group"), fontsize=10, pad=14)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


def plot_weight_drift(
    drifts: Mapping[str, Mapping[str, float]] | Mapping[str, float], title: str | None = None
):
    """Bars of :func:`~course_utils.finetune.weight_drift` per group; pass ``{run_name: drift}`` to compare
    runs side by side."""
    if drifts and not isinstance(next(iter(drifts.values())), Mapping):
        drifts = {"": drifts}
    fig, (ax,) = _figure(1, size=(7, 3.4))
    groups = list(next(iter(drifts.values())))
    width = 0.8 / len(drifts)
    for i, (run, drift) in enumerate(drifts.items()):
        ax.bar(np.arange(len(groups)) + i * width, [drift[g] for g in groups], width, label=run or None)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_ylabel(zh("权重漂移", "weight drift") + " ‖w − w₀‖ / ‖w₀‖")
    ax.set_title(title or zh("每个层组的权重移动了多远", "how far each group moved"), fontsize=10)
    if len(drifts) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _show_image(ax, image_u8: torch.Tensor):
    ax.imshow(image_u8.permute(1, 2, 0).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def attention_maps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``images`` (normalised, N×3×H×W) in eval mode; each CBAM's spatial map, named by where it sits."""
    model.eval()
    with torch.no_grad():
        model(images.to(next(model.parameters()).device))
    return {
        name.replace(".cbam", "").replace("cbam.", ""): m.last_attention.cpu()
        for name, m in model.named_modules()
        if hasattr(m, "last_attention") and m.last_attention is not None
    }


def plot_attention(
    model: nn.Module,
    images_u8: torch.Tensor,
    images: torch.Tensor,
    classes: Sequence[str] = (),
    labels: torch.Tensor | None = None,
    max_maps: int = 4,
):
    """Each image (row) with the spatial attention of up to ``max_maps`` CBAMs laid over it (columns)."""
    maps = attention_maps(model, images)
    names = list(maps)[-max_maps:]
    n = len(images_u8)
    fig, axes = _figure(len(names) + 1, n, size=(1.7, 1.7))
    axes = axes.reshape(n, len(names) + 1)
    size = images_u8.shape[-1]
    for r in range(n):
        _show_image(axes[r, 0], images_u8[r])
        if labels is not None and classes:
            axes[r, 0].set_ylabel(classes[int(labels[r])], fontsize=8)
        for c, name in enumerate(names, start=1):
            attn = maps[name][r : r + 1]
            low, high = float(attn.min()), float(attn.max())
            attn = torch.nn.functional.interpolate(attn, size=(size, size), mode="nearest")[0, 0]
            _show_image(axes[r, c], images_u8[r])
            axes[r, c].imshow(
                ((attn - low) / max(high - low, 1e-6)).numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1
            )
            axes[r, c].set_xlabel(f"{low:.2f}–{high:.2f}", fontsize=7)
            if r == 0:
                axes[r, c].set_title(f"{name} ({maps[name].shape[-2]}×{maps[name].shape[-1]})", fontsize=8)
    fig.suptitle(
        zh(
            "空间门：红 = 门值高（每张图按自己的最小→最大着色，范围写在下面）",
            "spatial attention: red = high gate",
        ),
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_feature_maps(
    features: Mapping[str, torch.Tensor], image_u8: torch.Tensor | None = None, channels: int = 6
):
    """For one image: the first ``channels`` channels of each stage's output (rows), with its size."""
    names = list(features)
    fig, axes = _figure(channels + 1, len(names), size=(1.4, 1.5))
    axes = axes.reshape(len(names), channels + 1)
    for r, name in enumerate(names):
        fmap = features[name][0].detach().float().cpu()
        if image_u8 is not None:
            _show_image(axes[r, 0], image_u8)
        else:
            axes[r, 0].axis("off")
        axes[r, 0].set_ylabel(f"{name}\n{fmap.shape[0]}×{fmap.shape[1]}×{fmap.shape[2]}", fontsize=8)
        for c in range(channels):
            axes[r, c + 1].imshow(fmap[c].numpy(), cmap="viridis")
            axes[r, c + 1].set_xticks([])
            axes[r, c + 1].set_yticks([])
    fig.tight_layout()
    return fig


def confusion_matrix(predicted: torch.Tensor, true: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """``cm[t, p]`` = how many images of class t were predicted as p."""
    return torch.bincount(true.long() * num_classes + predicted.long(), minlength=num_classes**2).view(
        num_classes, num_classes
    )


def plot_confusion(predicted: torch.Tensor, true: torch.Tensor, classes: Sequence[str]):
    """The confusion matrix, rows normalised to the fraction of each true class."""
    cm = confusion_matrix(predicted, true, len(classes)).float()
    rates = cm / cm.sum(1, keepdim=True).clamp(min=1)
    fig, (ax,) = _figure(1, size=(5.2, 4.6))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel(zh("预测的类别", "predicted"))
    ax.set_ylabel(zh("真实的类别", "true"))
    for t in range(len(classes)):
        for p in range(len(classes)):
            if cm[t, p] > 0:
                ax.text(
                    p,
                    t,
                    int(cm[t, p]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rates[t, p] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def plot_comparison(histories: Mapping[str, object], metric: str = "val_acc", title: str | None = None):
    """One line per run of ``metric`` over epochs, and a bar of each run's final value."""
    fig, (ax_line, ax_bar) = _figure(2)
    finals = {}
    for name, history in histories.items():
        ax_line.plot(history["epoch"], history[metric], "o-", ms=3, label=name)
        finals[name] = history[metric][-1]
    ax_line.set_xlabel(zh("轮", "epoch"))
    ax_line.set_ylabel(metric_label(metric))
    ax_line.legend(fontsize=7)
    ax_bar.barh(list(finals), list(finals.values()), color=[f"C{i}" for i in range(len(finals))])
    ax_bar.invert_yaxis()
    zh_name, en_name = METRICS.get(metric, (metric, metric))
    ax_bar.set_xlabel(zh(f"最后一轮的{zh_name}", f"final {en_name}"))
    for i, v in enumerate(finals.values()):
        ax_bar.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(
    histories: Mapping[str, object],
    metrics: Sequence[str] = ("train_loss", "val_acc"),
    title: str | None = None,
):
    """Runs of the same schedule side by side: one panel per metric, one line per run, the stages shaded
    (from the first run) and each run's BatchNorm recalibrations dashed in its colour."""
    fig, axes = _figure(len(metrics))
    first = next(iter(histories.values()))
    for ax, metric in zip(axes, metrics):
        shade_stages(ax, first)
        for i, (name, history) in enumerate(histories.items()):
            ax.plot(history["epoch"], history[metric], "o-", ms=3, color=f"C{i}", label=name)
            for rec in getattr(history, "meta", {}).get("bn_recalibrations", []):
                ax.axvline(rec["epoch"] - 0.5, color=f"C{i}", ls="--", lw=1, zorder=1)
        ax.set_xlabel(zh("轮", "epoch"))
        ax.set_ylabel(metric_label(metric))
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, y=1.04)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ tables
def format_table(rows: Sequence[Mapping], floatfmt: str | Mapping[str, str] = ".3f") -> str:
    """``rows`` (dicts with the same keys) as a plain-text table, numbers right-aligned.

    ``floatfmt``: the format of floats, or ``{column: format}`` (other columns: ``.3f``).
    """
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    formats = dict(floatfmt) if isinstance(floatfmt, Mapping) else dict.fromkeys(keys, floatfmt)
    cells = [[_cell(r.get(k), formats.get(k, ".3f")) for k in keys] for r in rows]
    numeric = [all(_is_number(r.get(k)) for r in rows) for k in keys]
    widths = [max(text_width(k), *(text_width(c[i]) for c in cells)) for i, k in enumerate(keys)]

    def line(values):
        pads = [" " * (w - text_width(v)) for v, w in zip(values, widths)]
        return "  ".join(pad + v if num else v + pad for v, pad, num in zip(values, pads, numeric)).rstrip()

    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def text_width(text: str) -> int:
    """Columns ``text`` takes in a monospaced font: a Chinese character takes two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value, floatfmt: str) -> str:
    if isinstance(value, float):
        return format(value, floatfmt)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_table(
    rows: Sequence[Mapping], title: str | None = None, floatfmt: str | Mapping[str, str] = ".3f"
) -> None:
    """Print :func:`format_table` (with a title line): plain text, so nbval compares it exactly."""
    if title:
        print(title)
    print(format_table(rows, floatfmt))
