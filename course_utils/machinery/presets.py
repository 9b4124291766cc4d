"""How big a run is: ``COURSE_PRESET`` = ``smoke`` | ``quick`` | ``full``, and loud banners.

* ``smoke`` — every notebook in under a minute on 2 CPU cores (CI): tiny subsets, one epoch per stage.
* ``quick`` — every notebook in a few minutes on a laptop CPU, still showing the effect it teaches.
* ``full`` — the lesson's 50 epochs on all 50,000 images (default on a GPU).

Without ``COURSE_PRESET`` the hardware decides: ``full`` with CUDA, ``quick`` otherwise. Each notebook's
``parameters`` cell leaves its values at ``None``; ``resolve`` fills what papermill's ``-p`` did not set, from
the notebook's own table of sizes per preset where it has one, else from :data:`PRESETS`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping

import torch

from .checks import optional_whole_number, stage_lengths, whole_number

PRESETS: dict[str, dict] = {
    "smoke": {"train_size": 500, "val_size": 200, "epochs": (1, 1, 1), "batch_size": 64},
    "quick": {"train_size": 5000, "val_size": 1000, "epochs": (2, 3, 3), "batch_size": 128},
    "full": {"train_size": None, "val_size": None, "epochs": (5, 15, 30), "batch_size": 128},
}


def preset_name(name: str | None = None) -> str:
    """``name``, else ``$COURSE_PRESET``, else ``full`` on a GPU and ``quick`` on a CPU."""
    name = name or os.environ.get("COURSE_PRESET") or ("full" if torch.cuda.is_available() else "quick")
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
            f"(set COURSE_PRESET or the PRESET parameter)"
        )
    return name


def resolve(preset: str | None = None, table: Mapping[str, Mapping] | None = None, **overrides) -> dict:
    """A notebook's sizes: the preset's values, then the notebook's own values for that preset, then its
    ``parameters`` cell.

    ``table``: ``{preset: {key: value}}`` for what the generic presets do not fit (e.g. fewer images for
    VGG16); a ``None`` there is kept (e.g. all images). ``overrides``: the parameters cell, where ``None``
    means not set (papermill ``-p`` sets it). A list for ``epochs`` (as papermill passes it) becomes a tuple.
    """
    name = preset_name(preset)
    values = dict(PRESETS[name], preset=name)
    values.update(_notebook_values(table, name))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("epochs"), list):
        values["epochs"] = tuple(values["epochs"])
    return check_sizes(values)


def _notebook_values(table: Mapping[str, Mapping] | None, name: str) -> dict:
    """``table[name]``, once ``table`` is known to name only presets (a misspelt one would be ignored)."""
    if table is None:
        return {}
    if not isinstance(table, Mapping) or not all(isinstance(v, Mapping) for v in table.values()):
        raise ValueError(
            "table must be {preset: {key: value}}, e.g. {'smoke': {'train_size': 256}}; "
            f"got {table!r}"
        )
    unknown = sorted(set(table) - set(PRESETS))
    if unknown:
        raise ValueError(f"table names unknown presets {unknown}: choose from {', '.join(PRESETS)}")
    return dict(table.get(name, {}))


def check_sizes(values: dict) -> dict:
    """Refuse sizes that cannot mean anything (``ValueError`` naming the parameter) where a notebook sets
    them:
    ``train_size`` / ``val_size`` (None = all), ``batch_size``, ``epochs`` (three stage lengths)."""
    for key in ("train_size", "val_size"):
        if key in values:
            optional_whole_number(
                values[key], key, example="5000" if key == "train_size" else "1000", none_means="all images"
            )
    if "batch_size" in values:
        whole_number(values["batch_size"], "batch_size", example="128")
    if isinstance(values.get("epochs"), (list, tuple)) and len(values["epochs"]) == 3:
        stage_lengths(values["epochs"])
    return values


def banner(title: str, text: str = "") -> None:
    """A warning that cannot be missed: in a notebook one red box (its plain text kept beside it, for a
    viewer that shows no HTML), elsewhere printed. ``title`` and ``text`` speak to students: Chinese,
    English technical terms in brackets."""
    plain = f"⚠ {title}\n  {text}" if text else f"⚠ {title}"
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(plain)
        return
    box = (
        f'<div style="border:2px solid #c00;background:#fee;padding:8px;margin:4px 0">'
        f"<b>⚠ {html.escape(title)}</b><br>{html.escape(text)}</div>"
    )
    display({"text/html": box, "text/plain": plain}, raw=True)
