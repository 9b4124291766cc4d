"""Widgets as static HTML, from a notebook's saved widget state (for the book, :mod:`.book`).

A book page has no kernel, and an offline copy cannot load the widgets' JavaScript from a CDN. Without it a
widget output would show its text repr (``ScheduleDesigner(children=(HBox(…``) or a progress bar frozen at
``0%|``. The executed notebook keeps each widget's last state (``metadata.widgets``, written by nbclient),
so :func:`render` draws it as plain HTML: the instructor's panel with its sliders where they were left, its
schedule plot and table; a progress bar as it ended. Controls are drawn disabled: a picture of the widget.
"""

from __future__ import annotations

import html
import math

STATE_KEY = "application/vnd.jupyter.widget-state+json"
VIEW_KEY = "application/vnd.jupyter.widget-view+json"
BOXES = {"HBoxModel": "row", "VBoxModel": "column", "BoxModel": "row", "GridBoxModel": "row"}
SLIDERS = {"IntSliderModel", "FloatSliderModel", "FloatLogSliderModel", "IntRangeSliderModel"}
CHOICES = {"DropdownModel", "ToggleButtonsModel", "RadioButtonsModel", "SelectModel"}
SELF_LABELLED = {"ButtonModel", "CheckboxModel", "ToggleButtonModel"}  # their description is on the control


def saved_state(nb) -> dict:
    """``model_id → model`` of the notebook's saved widget state (empty if it has none)."""
    return nb.get("metadata", {}).get("widgets", {}).get(STATE_KEY, {}).get("state", {})


def render(model_id: str, state: dict) -> str:
    """The widget ``model_id`` and its children as static HTML; ``""`` if it is hidden or not in ``state``."""
    model = state.get(model_id)
    if model is None or _hidden(model, state):
        return ""
    name, values = model.get("model_name", ""), model.get("state", {})
    if name in BOXES:
        children = "".join(render(ref_id(child), state) for child in values.get("children", []))
        return (
            f'<div class="book-widget" style="display:flex;flex-direction:{BOXES[name]};gap:4px 12px;'
            f'flex-wrap:wrap;align-items:flex-start">{children}</div>'
        )
    if name == "OutputModel":
        return "".join(_output(o, state) for o in values.get("outputs", []))
    label = "" if name in SELF_LABELLED else values.get("description", "")
    return _labelled(label, _control(name, values, model))


def ref_id(ref: str) -> str:
    """``"IPY_MODEL_<id>"`` (how a widget refers to another) → ``<id>``."""
    return ref.removeprefix("IPY_MODEL_")


def _hidden(model: dict, state: dict) -> bool:
    layout = state.get(ref_id(model.get("state", {}).get("layout") or ""), {}).get("state", {})
    return layout.get("display") == "none" or layout.get("visibility") == "hidden"


def _labelled(description: str, control: str) -> str:
    if not control:
        return ""
    label = f"<span>{html.escape(description)}</span> " if description else ""
    return f'<div class="book-widget">{label}{control}</div>'


def _control(name: str, values: dict, model: dict) -> str:
    """One leaf widget (a slider, a menu, a button, an image, …) as HTML."""
    value = values.get("value")
    if name in ("HTMLModel", "HTMLMathModel"):
        return value or ""
    if name in ("LabelModel", "TextModel", "TextareaModel"):
        return html.escape(str(value or ""))
    if name in ("FloatProgressModel", "IntProgressModel"):
        return f'<progress value="{value}" max="{values.get("max", 100)}"></progress>'
    if name in SLIDERS:
        low, high, at, shown = values.get("min", 0), values.get("max", 100), value, value
        if name == "FloatLogSliderModel":  # min and max are exponents of base
            at, shown = math.log(value, values.get("base", 10)) if value > 0 else low, f"{value:.3g}"
        slider = f'<input type="range" disabled min="{low}" max="{high}" step="any" value="{at}">'
        return f"{slider} <b>{html.escape(str(shown))}</b>"
    if name in CHOICES:
        labels, index = values.get("_options_labels", []), values.get("index")
        chosen = labels[index] if isinstance(index, int) and index < len(labels) else ""
        return f"<b>{html.escape(str(chosen))}</b>"
    if name in ("CheckboxModel", "ToggleButtonModel"):
        return f"{'☑' if value else '☐'} {html.escape(values.get('description', ''))}"
    if name == "ButtonModel":
        return f"<button disabled>{html.escape(values.get('description', ''))}</button>"
    if name == "ImageModel":
        data = next((b["data"] for b in model.get("buffers", []) if b.get("path") == ["value"]), "")
        fmt = values.get("format", "png")
        alt = html.escape(values.get("description") or "图 (figure)")
        style = 'class="book-widget" style="max-width:640px"'
        return f'<img alt="{alt}" {style} src="data:image/{fmt};base64,{data}">' if data else ""
    return ""


def _output(output: dict, state: dict) -> str:
    """One output of an ``Output`` widget: a nested widget, HTML, a figure, or text."""
    if output.get("output_type") == "stream":
        return f"<pre>{html.escape(output.get('text', ''))}</pre>"
    data = output.get("data", {})
    if VIEW_KEY in data:
        return render(data[VIEW_KEY].get("model_id", ""), state)
    if "text/html" in data:
        return "".join(data["text/html"])
    if "image/png" in data:
        png = "".join(data["image/png"]).strip()
        return f'<img alt="图 (figure)" class="book-widget" src="data:image/png;base64,{png}">'
    return f"<pre>{html.escape(''.join(data.get('text/plain', '')))}</pre>"
