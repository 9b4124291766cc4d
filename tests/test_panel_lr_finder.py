"""The schedule panel's "find LR" buttons without a browser: the finder runs on a copy, the curve is shown,
the stage's sliders move to the suggestion (ratio kept in differential mode), and failures stay in the panel."""
import pytest
import torch

from course_utils import finetune, models, widgets
from course_utils.data import TensorLoader

FINDER = {"num_steps": 10, "start_lr": 1e-6, "end_lr": 1e-1, "progress": False}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return models.resnet18_cbam(placement="stage")


def tiny_loader(n=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorLoader(images, labels, 16, train=True, device="cpu")


def panel_for(model, loader=None):
    return widgets.schedule_designer(model, tiny_loader() if loader is None else loader, None, epochs=(2, 3, 3),
                                     fit_kwargs={"device": "cpu"}, finder_kwargs=FINDER)


def test_find_lr_in_differential_mode_sets_both_sliders_with_the_ratio_kept(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = panel_for(model)
    panel.w_differential.value = True
    others = [(panel.w_lr[i].value, panel.w_lr_new[i].value) for i in (0, 2)]
    assert panel.w_lr_curve.layout.display == "none"
    panel._on_find_lr_clicked(2)  # what the stage-2 button's click does
    result = panel.finder_results[2]
    assert "suggestion" in panel.w_lr_status.value, panel.w_lr_status.value
    assert bytes(panel.w_lr_curve.value).startswith(b"\x89PNG") and panel.w_lr_curve.layout.display is None
    top = result.suggestion()
    assert panel.w_lr_new[1].value == pytest.approx(top) and panel.w_lr[1].value == pytest.approx(top / 10)
    stage = panel.schedule.stages[1]
    assert stage.lr == {"new": pytest.approx(top), "pretrained": pytest.approx(top / 10)}  # the schedule follows
    assert [(panel.w_lr[i].value, panel.w_lr_new[i].value) for i in (0, 2)] == others  # other stages untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the panel's model: never trained
    assert all(torch.equal(before[k], v) for k, v in panel._template.state_dict().items())
    assert not panel.w_button.disabled


def test_find_lr_for_stage_1_sets_its_slider(model):
    panel = panel_for(model)
    result = panel.find_lr(1)
    assert result.shares == {"cbam": 1.0, "head": 1.0}
    assert panel.w_lr[0].value == pytest.approx(result.suggestion())
    assert panel.schedule.stages[0].lr == pytest.approx(result.suggestion())
    assert panel.schedule.stages[1:] == finetune.three_stage_schedule(epochs=(2, 3, 3)).stages[1:]


def test_find_lr_uses_the_buttons_css_classes(model):
    panel = panel_for(model)
    assert [b._dom_classes for b in panel.w_find_lr] == [("schedule-find-lr-1",), ("schedule-find-lr-2",),
                                                        ("schedule-find-lr-3",)]
    assert "schedule-lr-curve" in panel.w_lr_curve._dom_classes


def test_find_lr_failure_is_shown_in_the_panel_not_raised(model):
    images = torch.zeros((8, 3, 16, 16), dtype=torch.uint8)
    empty = TensorLoader(images, torch.zeros(8, dtype=torch.long), 32, train=True, device="cpu")  # no full batch
    panel = panel_for(model, empty)
    values = panel.values
    panel._on_find_lr_clicked(1)
    assert "LR finder failed" in panel.w_lr_status.value and "no batches" in panel.w_lr_status.value
    assert panel.values == values and not panel.w_button.disabled
    panel.w_end1.value = 9  # an invalid choice: the finder refuses it, in the panel too
    panel._on_find_lr_clicked(1)
    assert "invalid" in panel.w_lr_status.value
