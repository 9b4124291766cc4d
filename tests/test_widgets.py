"""The schedule designer without a browser: the values → Schedule mapping, the panel's reactions to
changes (preview, invalid choices, templates), the Train button's and the "find LR" buttons' callbacks
on tiny loaders."""

import pytest
import torch

from course_utils import finetune, models, widgets
from course_utils.data import TensorLoader
from course_utils.widgets import DEFAULT_VALUES, schedule_from_values, values_from_schedule

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "cbam", "head"]
NEW = ("cbam", "head")


def values(**changes):
    return {**DEFAULT_VALUES, **changes}


# ------------------------------------------------------------------------------ the mapping
def test_default_values_are_the_course_schedule():
    assert schedule_from_values(DEFAULT_VALUES, GROUPS, NEW) == finetune.three_stage_schedule()


def test_differential_values_are_the_course_differential_schedule():
    assert schedule_from_values(values(differential=True), GROUPS, NEW) == finetune.three_stage_schedule(
        differential=True
    )


@pytest.mark.parametrize("name", list(widgets.TEMPLATES))
def test_every_template_round_trips(name):
    schedule = widgets.TEMPLATES[name]((2, 3, 4))
    v = values_from_schedule(schedule, GROUPS, NEW)
    assert schedule_from_values(v, GROUPS, NEW) == schedule
    assert schedule.epochs == 9  # every template keeps the same total, so runs compare fairly


def test_boundaries_become_stage_lengths():
    schedule = schedule_from_values(values(end1=7, end2=12, total=40), GROUPS, NEW)
    assert [(first, last) for _, first, last in schedule.boundaries()] == [(1, 7), (8, 12), (13, 40)]
    assert [row["epochs"] for row in schedule.table(groups=GROUPS, new_groups=NEW, by_rate=True)] == [
        "1-7",
        "8-12",
        "13-40",
    ]


def test_fewer_stages_ignore_unused_boundaries():
    two = schedule_from_values(values(stages=2, end1=3, end2=1, total=10), GROUPS, NEW)
    assert [s.epochs for s in two.stages] == [3, 7]
    one = schedule_from_values(
        values(stages=1, end1=99, end2=1, total=10, trainable=(("all",),) * 3), GROUPS, NEW
    )
    assert one == finetune.one_stage_schedule(10, 1e-3)


def test_trainable_groups_and_aliases():
    v = values(trainable=(("head",), ("cbam", "head", "layer4"), ("pretrained", "new")))
    stages = schedule_from_values(v, GROUPS, NEW).stages
    assert stages[0].trainable == ("head",)
    assert stages[1].trainable == ("new", "layer4")  # the new groups are written as the alias
    assert stages[2].trainable == ("all",)
    assert [s.name for s in stages] == ["1 head", "2 +cbam+layer4", "3 all"]


def test_differential_rates_per_stage():
    v = values(
        differential=True,
        lr=(1e-5, 2e-5, 3e-5),
        lr_new=(1e-3, 2e-3, 3e-3),
        trainable=(("new",), ("layer3",), ("all",)),
    )
    s1, s2, s3 = schedule_from_values(v, GROUPS, NEW).stages
    assert s1.lr == 1e-3  # new modules only: their rate
    assert s2.lr == 2e-5  # pretrained only: theirs
    assert s3.lr == {"new": 3e-3, "pretrained": 3e-5}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(end1=25), "阶段 2 会在阶段 1 之前结束"),
        (dict(end1=20), "阶段 2 是空的"),
        (dict(total=15), "阶段 3 会在阶段 2 之前结束 \\(ends before the previous stage\\)：总轮数是 15"),
        (dict(total=20), "阶段 3 是空的"),
        (dict(stages=2, end1=50), "阶段 2 是空的"),
        (dict(end1=0), "阶段 1 是空的"),
        (dict(trainable=(("new",), (), ("all",))), "阶段 2 什么都不训练"),
        (dict(trainable=(("new",), ("layer9",), ("all",))), "unknown layer group 'layer9'"),
        (dict(lr=(1e-3, 0.0, 1e-5)), "learning rate of stage 2 must be a positive \\(finite\\) number"),
        (dict(stages=4), "1、2 或 3"),
    ],
)
def test_invalid_choices_raise_a_clear_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_values(values(**change), GROUPS, NEW)


def test_values_from_schedule_refuses_what_the_panel_cannot_show():
    four = finetune.Schedule([finetune.Stage(f"s{i}", 1, "all", 1e-3) for i in range(4)])
    with pytest.raises(ValueError, match="at most 3 stages"):
        values_from_schedule(four, GROUPS, NEW)
    layerwise = finetune.Schedule([finetune.Stage("s", 1, "all", {"all": 1e-4, "layer1": 1e-5})])
    with pytest.raises(ValueError, match="more than one learning rate"):
        values_from_schedule(layerwise, GROUPS, NEW)


# ------------------------------------------------------------------------------ the panel
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.resnet18_cbam(placement="stage")


def tiny_loaders(n=32):
    """Random 16×16 images: a few batches, so a 3-epoch run of ResNet18 takes about a second."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return (
        TensorLoader(images, labels, 16, train=True, device="cpu"),
        TensorLoader(images[:16], labels[:16], 16, device="cpu"),
    )


def test_panel_starts_with_the_course_schedule(model):
    panel = widgets.schedule_designer(model, epochs=(2, 3, 3))
    assert panel.schedule == finetune.three_stage_schedule(epochs=(2, 3, 3))
    assert panel.error == "" and panel.preview.w_error.value == ""
    assert (
        "1-2" in panel.preview.w_table.value
        and "3-5" in panel.preview.w_table.value
        and "6-8" in panel.preview.w_table.value
    )
    assert bytes(panel.preview.w_plot.value).startswith(b"\x89PNG")


def test_moving_a_slider_redraws_the_preview_in_place(model):
    panel = widgets.schedule_designer(model, epochs=(2, 3, 3))
    children, plot, table = list(panel.children), panel.preview.w_plot.value, panel.preview.w_table.value
    panel.controls.w_end1.value = 3  # what the browser does: a trait change from the front end
    assert panel.schedule.boundaries()[0] == ("1 head+cbam", 1, 3)
    assert (
        "1-3" in panel.preview.w_table.value
        and "4-5" in panel.preview.w_table.value
        and panel.preview.w_table.value != table
    )
    assert (
        bytes(panel.preview.w_plot.value) != bytes(plot) and list(panel.children) == children
    )  # one image, replaced, not stacked
    assert panel.controls.w_template.value == widgets.CUSTOM


def test_invalid_move_shows_a_message_and_keeps_the_last_valid_schedule(model):
    panel = widgets.schedule_designer(model, epochs=(2, 3, 3))
    panel.controls.w_end1.value = 3
    valid, table = panel.schedule, panel.preview.w_table.value
    panel.controls.w_end1.value = 9  # past the end of stage 2: must not raise
    assert "阶段 2 会在阶段 1 之前结束" in panel.error
    assert (
        "invalid choice" in panel.preview.w_error.value
        and "阶段 2 会在阶段 1 之前结束" in panel.preview.w_error.value
    )
    assert panel.schedule is valid and panel.preview.w_table.value == table
    assert panel.output.w_button.disabled
    with pytest.raises(ValueError, match="invalid"):
        panel.train()
    panel.controls.w_train[0]["cbam"].value = False
    panel.controls.w_train[0]["head"].value = False  # and nothing trainable in stage 1 on top
    assert panel.schedule is valid
    panel.values = {"end1": 4, "trainable": (("head",), ("all",), ("all",))}
    assert panel.error == "" and not panel.output.w_button.disabled
    assert panel.schedule.boundaries()[0] == ("1 head", 1, 4)


def test_templates_set_the_controls(model):
    panel = widgets.schedule_designer(model, epochs=(2, 3, 3))
    names = list(widgets.TEMPLATES)
    panel.controls.w_template.value = names[2]  # fastai-style
    assert panel.values["stages"] == 2 and panel.values["differential"]
    assert panel.schedule == finetune.fastai_schedule((2, 3, 3))
    assert panel.controls.w_end2.disabled and panel.controls.columns[2].layout.display == "none"
    assert panel.controls.w_lr_new[1].layout.display is None
    panel.controls.w_template.value = names[3]  # one stage
    assert panel.schedule == finetune.one_stage_schedule(8, 1e-4) and panel.controls.w_end1.disabled
    panel.controls.w_template.value = names[0]
    assert panel.schedule == finetune.three_stage_schedule(epochs=(2, 3, 3))
    assert panel.controls.w_template.value == names[0]


def test_train_button_runs_the_schedule_and_adds_rows(model):
    train_loader, val_loader = tiny_loaders()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = widgets.schedule_designer(
        model, train_loader, val_loader, epochs=(1, 1, 1), fit_kwargs={"device": "cpu"}
    )
    panel.output.w_button.click()
    assert panel.output.w_status.value.startswith("完成"), panel.output.w_status.value
    assert len(panel.runs) == 1 and len(panel.runs[0]["history"]) == 3
    assert (
        bytes(panel.output.w_curves.value).startswith(b"\x89PNG")
        and panel.output.w_curves.layout.display is None
    )
    assert "schedule-runs" in panel.output.w_runs.value and "1-1 head+cbam" in panel.output.w_runs.value
    panel.controls.w_template.value = list(widgets.TEMPLATES)[3]
    panel.output.w_button.click()
    rows = panel.output.comparison()
    assert [r["run"] for r in rows] == [1, 2] and rows[1]["schedule"].startswith("1-3 all")
    assert all(0 <= float(r["final val acc"]) <= 1 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # runs train copies
    assert not panel.output.w_button.disabled


def test_train_failure_is_shown_in_the_panel_not_raised(model):
    empty = []  # a loader that gives no batches (a TensorLoader with too few images is refused when made)
    panel = widgets.schedule_designer(model, empty, None, epochs=(1, 1, 1), fit_kwargs={"device": "cpu"})
    panel.output.w_button.click()
    assert "training failed" in panel.output.w_status.value and "no batches" in panel.output.w_status.value
    assert panel.runs == [] and not panel.output.w_button.disabled


def test_train_from_a_cell_uses_model_fn(model):
    train_loader, val_loader = tiny_loaders()
    built = []

    def model_fn():
        built.append(models.resnet18_cbam(placement="stage"))
        return built[-1]

    panel = widgets.schedule_designer(
        model,
        train_loader,
        val_loader,
        model_fn=model_fn,
        epochs=(1, 1, 1),
        fit_kwargs={"device": "cpu", "progress": False},
    )
    seen = []
    history = panel.train(on_epoch_end=lambda h: seen.append(len(h)))
    assert len(built) == 1 and seen == [1, 2, 3] and len(panel.runs) == 1
    assert [s for s, _, _ in history.stages()] == ["1 head+cbam", "2 +high", "3 all"]


def test_ticking_differential_gives_the_course_differential_schedule(model):
    panel = widgets.schedule_designer(model, epochs=(2, 3, 3))
    panel.controls.w_differential.value = True
    assert panel.schedule == finetune.three_stage_schedule(differential=True, epochs=(2, 3, 3))
    assert (
        panel.controls.w_lr[0].disabled and not panel.controls.w_lr_new[0].disabled
    )  # stage 1 trains new modules only
    assert "1.0e-04 (pretrained) · 1.0e-03 (new)" in panel.preview.w_table.value  # stage 2: two rates
    panel.controls.w_differential.value = False
    assert panel.schedule == finetune.three_stage_schedule(epochs=(2, 3, 3))


# ------------------------------------------------------------------------------ the "find LR" buttons
FINDER = {"num_steps": 10, "start_lr": 1e-6, "end_lr": 1e-1, "progress": False}


def panel_for(model, loader=None):
    return widgets.schedule_designer(
        model,
        tiny_loaders()[0] if loader is None else loader,
        None,
        epochs=(2, 3, 3),
        fit_kwargs={"device": "cpu"},
        finder_kwargs=FINDER,
    )


def test_find_lr_in_differential_mode_sets_both_sliders_with_the_ratio_kept(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = panel_for(model)
    panel.controls.w_differential.value = True
    others = [(panel.controls.w_lr[i].value, panel.controls.w_lr_new[i].value) for i in (0, 2)]
    assert panel.output.w_lr_curve.layout.display == "none"
    panel.controls.w_find_lr[1].click()  # the stage-2 button
    result = panel.finder_results[2]
    assert "suggestion" in panel.output.w_lr_status.value, panel.output.w_lr_status.value
    assert (
        bytes(panel.output.w_lr_curve.value).startswith(b"\x89PNG")
        and panel.output.w_lr_curve.layout.display is None
    )
    top = result.suggestion()
    assert panel.controls.w_lr_new[1].value == pytest.approx(top) and panel.controls.w_lr[
        1
    ].value == pytest.approx(top / 10)
    stage = panel.schedule.stages[1]
    assert stage.lr == {
        "new": pytest.approx(top),
        "pretrained": pytest.approx(top / 10),
    }  # the schedule follows
    assert [
        (panel.controls.w_lr[i].value, panel.controls.w_lr_new[i].value) for i in (0, 2)
    ] == others  # other stages untouched
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # the panel's model: never trained
    assert all(torch.equal(before[k], v) for k, v in panel.base_model.state_dict().items())
    assert not panel.output.w_button.disabled


def test_find_lr_for_stage_1_sets_its_slider(model):
    panel = panel_for(model)
    result = panel.find_lr(1)
    assert result.shares == {"cbam": 1.0, "head": 1.0}
    assert panel.controls.w_lr[0].value == pytest.approx(result.suggestion())
    assert panel.schedule.stages[0].lr == pytest.approx(result.suggestion())
    assert panel.schedule.stages[1:] == finetune.three_stage_schedule(epochs=(2, 3, 3)).stages[1:]


def test_find_lr_uses_the_buttons_css_classes(model):
    panel = panel_for(model)
    assert [b._dom_classes for b in panel.controls.w_find_lr] == [
        ("schedule-find-lr-1",),
        ("schedule-find-lr-2",),
        ("schedule-find-lr-3",),
    ]
    assert "schedule-lr-curve" in panel.output.w_lr_curve._dom_classes


def test_find_lr_failure_is_shown_in_the_panel_not_raised(model):
    images = torch.zeros((8, 3, 16, 16), dtype=torch.uint8)
    empty = TensorLoader(
        images, torch.zeros(8, dtype=torch.long), 32, train=True, device="cpu"
    )  # no full batch
    panel = panel_for(model, empty)
    values = panel.values
    panel.controls.w_find_lr[0].click()
    assert (
        "LR finder failed" in panel.output.w_lr_status.value
        and "no batches" in panel.output.w_lr_status.value
    )
    assert panel.values == values and not panel.output.w_button.disabled
    panel.controls.w_end1.value = 9  # an invalid choice: the finder refuses it, in the panel too
    panel.controls.w_find_lr[0].click()
    assert "invalid" in panel.output.w_lr_status.value


def test_bn_policy_choice_is_a_value_and_goes_to_fit(model, monkeypatch):
    train_loader, val_loader = tiny_loaders()
    panel = widgets.schedule_designer(
        model, train_loader, val_loader, epochs=(1, 1, 1), fit_kwargs={"device": "cpu"}
    )
    assert panel.controls.w_bn.value == "train" and "schedule-bn-policy" in panel.controls.w_bn._dom_classes
    assert (
        list(panel.controls.w_bn.options) == ["train", "frozen", "recalibrate"]
        and panel.controls.w_bn in panel.children
    )
    assert panel.values["bn_policy"] == "train"
    panel.controls.w_bn.value = "frozen"
    assert panel.values["bn_policy"] == "frozen"
    panel.controls.w_template.value = list(widgets.TEMPLATES)[
        3
    ]  # a template sets the schedule, not the policy
    assert panel.values["bn_policy"] == "frozen"
    panel.values = {"bn_policy": "recalibrate"}
    assert panel.controls.w_bn.value == "recalibrate"
    with pytest.raises(ValueError, match="bn_policy must be one of"):
        panel.values = {"bn_policy": "eval"}
    seen = []

    def recording_fit(model, schedule, *args, **kwargs):
        seen.append(kwargs.get("bn_policy"))
        return original_fit(model, schedule, *args, **kwargs)

    from course_utils import train as ctrain

    original_fit = ctrain.fit
    monkeypatch.setattr(ctrain, "fit", recording_fit)
    panel.controls.w_bn.value = "recalibrate"
    panel.controls.w_template.value = list(widgets.TEMPLATES)[0]
    panel.output.w_button.click()
    assert panel.output.w_status.value.startswith("完成"), panel.output.w_status.value
    assert seen == ["recalibrate"]
    history = panel.runs[-1]["history"]
    assert history.meta["bn_policy"] == "recalibrate" and [
        r["epoch"] for r in history.meta["bn_recalibrations"]
    ] == [1, 2, 3]
    assert panel.output.comparison()[-1]["BN"] == "recalibrate" and "recalibrate" in panel.output.w_runs.value
