"""What the course prints for a student in a notebook: one red box per warning (not the box and its text
again), in Chinese with English technical terms in brackets."""

import re

import IPython
import IPython.display

from course_utils.machinery import presets


def test_a_banner_in_a_notebook_is_one_box_with_its_text_beside_it(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())  # as inside a kernel
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    presets.banner("没有 ImageNet 预训练权重 (no ImageNet weights)", "离线 <运行>")
    assert capsys.readouterr().out == ""  # not printed a second time
    [(bundle, raw)] = shown
    assert raw and set(bundle) == {"text/html", "text/plain"}
    assert "border:2px solid #c00" in bundle["text/html"] and "&lt;运行&gt;" in bundle["text/html"]
    assert bundle["text/plain"] == "⚠ 没有 ImageNet 预训练权重 (no ImageNet weights)\n  离线 <运行>"


def test_outside_a_notebook_a_banner_is_printed(capsys):
    presets.banner("标题 (title)")
    assert capsys.readouterr().out == "⚠ 标题 (title)\n"


def test_panel_messages_are_chinese_with_english_terms():
    from course_utils.widgets import DEFAULT_VALUES, schedule_from_values

    groups = ["stem", "layer1", "layer2", "layer3", "layer4", "cbam", "head"]
    try:
        schedule_from_values({**DEFAULT_VALUES, "end1": 30}, groups, ("cbam", "head"))
    except ValueError as err:
        message = str(err)
    assert re.search(r"[\u4e00-\u9fff]", message) and "(ends before the previous stage)" in message
