"""Runs that are trained once and reloaded afterwards, and the rows of the tables that compare them.

A notebook that compares strategies trains several models on the same data and budget; re-rendering it
should not train them all again. :func:`run_cached` saves each run's :class:`~course_utils.train.History`
as JSON under ``results/<preset>/<name>-<hash>.json`` — the hash covers the run's name, its schedule and
its ``config`` (sizes, seed, model options…), so changing any of them trains afresh — and reloads the file
when it is there, saying so.

:func:`bn_policy_study` trains the course's three-stage schedule once per BatchNorm policy and seed, from
random weights or from a plain ResNet18 first trained on the same images (a backbone with real BatchNorm
statistics), and measures the jump at each stage boundary; :func:`summarize_study` gives means ± spread.

The rows these functions return are shown with :func:`course_utils.plots.print_table`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import data as cdata
from .batchnorm import BN_POLICIES, bn_statistics
from .finetune import Schedule, three_stage_schedule
from .machinery.checkpoints import check_writable
from .machinery.guards import check_fit_arguments
from .models import layer_groups, resnet18_cbam, transplant
from .train import History, fit, seed_everything

RESULTS_ROOT = Path(os.environ.get("COURSE_RESULTS", Path(__file__).resolve().parents[1] / "results"))


def results_dir(preset: str, root: str | os.PathLike | None = None) -> Path:
    """Where a preset's runs are kept: ``results/<preset>`` at the repository root (or
    ``$COURSE_RESULTS``)."""
    return Path(root or RESULTS_ROOT) / preset


def config_hash(config) -> str:
    """A short, stable hash of a JSON-able value (dict order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_path(name: str, schedule: Schedule, results_dir: str | os.PathLike, config: Mapping) -> Path:
    """The file a run is saved to: ``<results_dir>/<name>-<hash of name, schedule and config>.json``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"
    key = {"name": name, "schedule": schedule.to_dict(), "config": dict(config)}
    return Path(results_dir) / f"{slug}-{config_hash(key)}.json"


def _with_fit_options(config: Mapping, fit_kwargs: Mapping) -> dict:
    """``config`` plus the BatchNorm options given to ``fit``, when set (so the file name changes with them;
    runs without them keep their earlier names)."""
    chosen = {k: fit_kwargs[k] for k in ("bn_policy", "bn_batches") if k in fit_kwargs}
    return {**config, "fit": chosen} if chosen else dict(config)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(RESULTS_ROOT.parent))
    except ValueError:
        return str(path)


def trainable_per_epoch(model, schedule: Schedule) -> list[int]:
    """How many parameters each epoch of ``schedule`` trains on ``model``."""
    sizes = {g: sum(p.numel() for p in ps) for g, ps in layer_groups(model).items()}
    return [sum(sizes[g] for g in plan.trainable) for plan in schedule.plan_for(model)]


def run_cached(
    name: str,
    build_model: Callable[[], object],
    schedule: Schedule,
    loaders: Sequence,
    results_dir: str | os.PathLike,
    config: Mapping,
    *,
    retrain: bool = False,
    **fit_kwargs,
) -> History:
    """Train ``build_model()`` through ``schedule`` on ``loaders`` = (train, val), or reload the saved run.

    The model is built after ``seed_everything(config["seed"])`` (default 0), so runs with the same seed
    start from the same random numbers. ``config``: everything besides the schedule that changes the
    result (JSON-able). ``retrain=True`` trains even when a saved run exists (and replaces it).
    ``fit_kwargs`` go to :func:`~course_utils.train.fit`. The History's ``meta`` keeps ``name``,
    ``config``, ``total_params`` and ``trainable_params`` (per epoch).
    """
    path = run_path(name, schedule, results_dir, _with_fit_options(config, fit_kwargs))
    if path.exists() and not retrain:
        history = History.load(path)
        print(f"{name}：读取了之前训练的结果 {_shown(path)}（要重新训练：删掉它，或传 retrain=True）")
        return history
    check_writable(path)  # before training, not after it
    seed_everything(int(config.get("seed", 0)))
    model = build_model()
    trainable = trainable_per_epoch(model, schedule)
    train_loader, val_loader = loaders
    history = fit(model, schedule, train_loader, val_loader, **fit_kwargs)
    history.meta.update(
        name=name,
        config=dict(config),
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
    )
    history.save(path)
    print(
        f"{name}：训练了 {len(history)} 轮 (epochs)，用时 {sum(history['seconds']):.0f} 秒，"
        f"保存在 {_shown(path)}"
    )
    return history


def comparison_table(histories: Mapping[str, History]) -> list[dict]:
    """One row per run: final and best validation accuracy, training seconds, trainable parameters.

    ``trainable params`` is the number trained in the first and in the last epoch ("a → b" when a
    schedule unfreezes groups on the way, one number when it never changes).
    """
    rows = []
    for label, h in histories.items():
        val = [v for v in h["val_acc"] if v is not None]
        counts = h.meta.get("trainable_params") or []
        if counts:
            trainable = f"{counts[0]:,}" if counts[0] == counts[-1] else f"{counts[0]:,} → {counts[-1]:,}"
        else:
            trainable = "?"
        rows.append(
            {
                "strategy": label,
                "epochs": len(h),
                "final val acc": round(val[-1], 3) if val else None,
                "best val acc": round(max(val), 3) if val else None,
                "seconds": round(sum(h["seconds"]), 1),
                "trainable params": trainable,
            }
        )
    return rows


# ------------------------------------------------------------------------------ BatchNorm policies
def train_backbone(
    train_loader,
    val_loader=None,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    seed: int = 0,
    stem: str = "imagenet",
    progress: bool = False,
    **fit_kwargs,
):
    """A plain ResNet18 (no CBAM) trained from random weights on ``train_loader``: a backbone whose
    BatchNorm statistics are real (estimated on these images), the stand-in for pretrained weights offline."""
    seed_everything(seed)
    plain = resnet18_cbam(weights=None, placement=None, stem=stem)
    fit(
        plain,
        Schedule.from_dict([{"name": "backbone", "epochs": epochs, "trainable": ["all"], "lr": lr}]),
        train_loader,
        val_loader,
        progress=progress,
        **fit_kwargs,
    )
    return plain


def boundary_jumps(history: History) -> list[dict]:
    """Per stage after the first: how the epoch-mean training loss and the validation accuracy changed
    from the last epoch of the stage before to the first epoch of this one (a dip: loss up, accuracy down)."""
    rows, by_epoch = [], {r["epoch"]: r for r in history.rows}
    for stage, first, _ in history.stages()[1:]:
        before, after = by_epoch[first - 1], by_epoch[first]
        rows.append(
            {
                "stage": stage,
                "epoch": first,
                "train_loss_jump": after["train_loss"] - before["train_loss"],
                "val_acc_jump": None if after["val_acc"] is None else after["val_acc"] - before["val_acc"],
            }
        )
    return rows


def bn_policy_study(
    cifar,
    *,
    start: str = "random",
    policies: Sequence[str] = BN_POLICIES,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: Sequence[int] = (2, 2, 2),
    lrs: Sequence[float] = (1e-3, 1e-4, 1e-5),
    batch_size: int = 128,
    backbone_epochs: int = 3,
    backbone_lr: float = 1e-3,
    bn_batches: int = 16,
    stem: str = "imagenet",
    device=None,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """The course's three-stage schedule under each BatchNorm policy, for each seed, on ``cifar`` (CifarData).

    ``start``: ``"random"`` (random weights, as offline) or ``"trained"`` (a plain ResNet18 trained first for
    ``backbone_epochs`` on the same training images, :func:`train_backbone`, moved into the CBAM model with
    :func:`~course_utils.models.transplant`: real BatchNorm statistics). Every policy of one seed starts from
    the same weights and sees the same batches. Returns ``(rows, histories)``: one row per (policy, seed) —
    the jump at each boundary (``jump2_loss``, ``jump2_acc``, ``jump3_…``), the validation accuracy at the
    end of each stage (``acc1``, ``acc2``, ``acc3`` = final) and the recalibration seconds — and
    ``{(policy, seed): History}``.
    """
    if start not in ("random", "trained"):
        raise ValueError(f"start must be 'random' or 'trained', got {start!r}")
    schedule = three_stage_schedule(epochs=tuple(epochs), lrs=tuple(lrs))
    rows, histories = [], {}
    for seed in seeds:
        train_loader, val_loader = cdata.make_loaders(cifar, batch_size, seed=seed, device=device)
        backbone = None
        if start == "trained":
            backbone = train_backbone(
                train_loader,
                val_loader,
                epochs=backbone_epochs,
                lr=backbone_lr,
                seed=seed,
                stem=stem,
                progress=progress,
                device=device,
            )
        for policy in policies:
            seed_everything(seed)
            history = fit(
                _study_model(stem, backbone),
                schedule,
                train_loader,
                val_loader,
                bn_policy=policy,
                bn_batches=bn_batches,
                progress=progress,
                device=device,
            )
            histories[policy, seed] = history
            rows.append({"start": start, "policy": policy, "seed": seed, **policy_row(history)})
    return rows, histories


def _study_model(stem: str, backbone=None):
    """ResNet18 with a CBAM after each stage: random, or with ``backbone``'s weights moved in (all but
    CBAM's)."""
    model = resnet18_cbam(weights=None, placement="stage", stem=stem)
    if backbone is not None:
        left = transplant(backbone, model)
        assert all("cbam" in k.split(".") for k in left), left
    return model


def policy_row(history: History) -> dict:
    """One run's numbers for a BatchNorm-policy table: the jump at each stage boundary (``jump2_loss``,
    ``jump2_acc``, …: training loss and validation accuracy, first epoch of the stage minus the last of the
    stage before), the validation accuracy at the end of each stage (``acc1``, …; the last = final) and the
    seconds spent recalibrating (``recal_s``)."""
    row = {}
    for i, jump in enumerate(boundary_jumps(history), start=2):
        row[f"jump{i}_loss"], row[f"jump{i}_acc"] = jump["train_loss_jump"], jump["val_acc_jump"]
    for i, summary in enumerate(history.stage_summary(), start=1):
        row[f"acc{i}"] = summary["val_acc"]
    row["recal_s"] = sum(r["seconds"] for r in history.meta.get("bn_recalibrations", []))
    return row


def summarize_study(rows: Sequence[Mapping]) -> list[dict]:
    """Per (start, policy): each numeric column of :func:`bn_policy_study`'s rows as ``"mean ± std"`` over
    seeds (sample standard deviation; ``± 0`` for one seed), and ``n`` seeds."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["start"], row["policy"]), []).append(row)
    out = []
    for (start, policy), sel in groups.items():
        summary = {"start": start, "policy": policy, "n": len(sel)}
        for key in sel[0]:
            if key in ("start", "policy", "seed") or key == "recal_s":
                continue
            values = [r[key] for r in sel if r.get(key) is not None]
            mean = statistics.fmean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key] = f"{mean:+.3f} ± {spread:.3f}" if "jump" in key else f"{mean:.3f} ± {spread:.3f}"
        out.append(summary)
    return out


def compare_bn_policies(
    model_fn: Callable[[], object],
    schedule: Schedule,
    train_loader,
    val_loader,
    *,
    policies: Sequence[str] = BN_POLICIES,
    seed: int = 0,
    probe=None,
    layer: str | None = None,
    on_epoch_end: Callable[[History], object] | None = None,
    **fit_kwargs,
) -> tuple[dict, dict]:
    """``schedule`` once per BatchNorm policy from ``model_fn()`` (after ``seed_everything(seed)``, so every
    policy starts from the same weights and sees the same batches).

    With ``probe`` (a batch of images) and ``layer`` (a BatchNorm's name, e.g. ``"layer3.0.bn1"``), that
    layer's stored and batch statistics (:func:`~course_utils.batchnorm.bn_statistics`) are recorded before
    training and after every epoch. ``on_epoch_end`` is called after every epoch of every policy, as in
    ``fit``. Returns ``({policy: History}, {policy: [row per epoch, from epoch 0]})``.
    """
    histories, stats = {}, {}
    for policy in policies:
        seed_everything(seed)
        model = model_fn()
        check_fit_arguments(model, schedule, on_epoch_end=on_epoch_end)  # before recording anything
        schedule.plan_for(model)  # an unknown group is named before recording anything
        record = _bn_recorder(model, probe, layer, stats.setdefault(policy, []))
        record(None)

        def after_epoch(history, record=record):
            record(history)
            if on_epoch_end is not None:
                on_epoch_end(history)

        histories[policy] = fit(
            model,
            schedule,
            train_loader,
            val_loader,
            bn_policy=policy,
            on_epoch_end=after_epoch,
            **fit_kwargs,
        )
    return histories, stats


def _bn_recorder(model, probe, layer: str | None, rows: list) -> Callable[[History | None], None]:
    """A function that appends ``layer``'s BatchNorm statistics on ``probe`` to ``rows`` (``None``: before
    training), or does nothing without a probe and a layer."""

    def record(history: History | None) -> None:
        if probe is None or layer is None:
            return
        stats = next(r for r in bn_statistics(model, probe) if r["layer"] == layer)
        epoch, stage = (0, "(start)") if history is None else (len(history), history.rows[-1]["stage"])
        rows.append({"epoch": epoch, "stage": stage, **stats})

    return record
