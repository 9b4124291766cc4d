"""Runs that are trained once and reloaded afterwards, and the tables that compare them.

A notebook that compares strategies trains several models on the same data and budget; re-rendering it
should not train them all again. :func:`run_cached` saves each run's :class:`~course_utils.train.History`
as JSON under ``results/<preset>/<name>-<hash>.json`` — the hash covers the run's name, its schedule and
its ``config`` (sizes, seed, model options…), so changing any of them trains afresh — and reloads the file
when it is there, saying so.

:func:`resolve_config` sizes a notebook: the generic preset, then the notebook's own preset table, then
the ``parameters`` cell's values that are not ``None`` (papermill ``-p``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .finetune import Schedule
from .models import layer_groups
from .presets import check_sizes, preset_name, resolve
from .train import History, check_writable, fit, seed_everything

RESULTS_ROOT = Path(os.environ.get("COURSE_RESULTS", Path(__file__).resolve().parents[1] / "results"))


def resolve_config(preset: str | None, table: Mapping[str, Mapping] | None = None, **overrides) -> dict:
    """``presets.resolve`` with a notebook's own values per preset in between.

    ``table``: ``{preset: {key: value}}`` for what the generic presets do not fit (e.g. fewer images for
    VGG16); ``overrides``: the parameters cell (``None`` = not set). A list for ``epochs`` (as papermill
    passes it) becomes a tuple.
    """
    name = preset_name(preset)
    values = dict((table or {}).get(name, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = resolve(name)
    cfg.update(values)  # unlike resolve(**values), a notebook's explicit None (e.g. all images) is kept
    if isinstance(cfg.get("epochs"), list):
        cfg["epochs"] = tuple(cfg["epochs"])
    return check_sizes(cfg)


def results_dir(preset: str, root: str | os.PathLike | None = None) -> Path:
    """Where a preset's runs are kept: ``results/<preset>`` at the repository root (or ``$COURSE_RESULTS``)."""
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


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(RESULTS_ROOT.parent))
    except ValueError:
        return str(path)


def trainable_per_epoch(model, schedule: Schedule) -> list[int]:
    """How many parameters each epoch of ``schedule`` trains on ``model``."""
    sizes = {g: sum(p.numel() for p in ps) for g, ps in layer_groups(model).items()}
    return [sum(sizes[g] for g in plan.trainable) for plan in schedule.plan_for(model)]


def run_cached(name: str, build_model: Callable[[], object], schedule: Schedule, loaders: Sequence,
               results_dir: str | os.PathLike, config: Mapping, *, retrain: bool = False, **fit_kwargs) -> History:
    """Train ``build_model()`` through ``schedule`` on ``loaders`` = (train, val), or reload the saved run.

    The model is built after ``seed_everything(config["seed"])`` (default 0), so runs with the same seed
    start from the same random numbers. ``config``: everything besides the schedule that changes the
    result (JSON-able). ``retrain=True`` trains even when a saved run exists (and replaces it).
    ``fit_kwargs`` go to :func:`~course_utils.train.fit`. The History's ``meta`` keeps ``name``,
    ``config``, ``total_params`` and ``trainable_params`` (per epoch).
    """
    path = run_path(name, schedule, results_dir, config)
    if path.exists() and not retrain:
        history = History.load(path)
        print(f"{name}: loaded {_shown(path)} (trained earlier; delete it or pass retrain=True to train again)")
        return history
    check_writable(path)  # before training, not after it
    seed_everything(int(config.get("seed", 0)))
    model = build_model()
    trainable = trainable_per_epoch(model, schedule)
    train_loader, val_loader = loaders
    history = fit(model, schedule, train_loader, val_loader, **fit_kwargs)
    history.meta.update(name=name, config=dict(config), trainable_params=trainable,
                        total_params=sum(p.numel() for p in model.parameters()))
    history.save(path)
    print(f"{name}: trained {len(history)} epochs in {sum(history['seconds']):.0f} s, saved {_shown(path)}")
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
        rows.append({"strategy": label, "epochs": len(h),
                     "final val acc": round(val[-1], 3) if val else None,
                     "best val acc": round(max(val), 3) if val else None,
                     "seconds": round(sum(h["seconds"]), 1), "trainable params": trainable})
    return rows


def format_table(rows: Sequence[Mapping], floatfmt: str | Mapping[str, str] = ".3f") -> str:
    """``rows`` (dicts with the same keys) as a plain-text table, numbers right-aligned.

    ``floatfmt``: the format of floats, or ``{column: format}`` (other columns: ``.3f``).
    """
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    formats = dict(floatfmt) if isinstance(floatfmt, Mapping) else {k: floatfmt for k in keys}

    def cell(v, key):
        if isinstance(v, float):
            return format(v, formats.get(key, ".3f"))
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(k), k) for k in keys] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows) for k in keys]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def print_table(rows: Sequence[Mapping], title: str | None = None, floatfmt: str | Mapping[str, str] = ".3f") -> None:
    """Print :func:`format_table` (with a title line): plain text, so nbval compares it exactly."""
    if title:
        print(title)
    print(format_table(rows, floatfmt))
