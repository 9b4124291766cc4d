"""The schedule as data (course_utils.finetune): resolution, validation raised by fit, the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import expected_group
from torch import nn

from course_utils.finetune import Schedule, Stage, make_optimizer, one_stage_schedule, three_stage_schedule
from course_utils.models import resnet18_cbam
from course_utils.train import fit

PRETRAINED = ("stem", "layer1", "layer2", "layer3", "layer4")


def stage_plans(schedule, model):
    """``[(trainable set, {group: lr}, epochs)]`` per stage, read off the per-epoch plan."""
    plans = schedule.plan_for(model)
    out = []
    for name, first, last in schedule.boundaries():
        sel = plans[first - 1 : last]
        assert all(p.stage == name for p in sel)
        assert all(p.lr == sel[0].lr and p.trainable == sel[0].trainable for p in sel)
        out.append((set(sel[0].trainable), sel[0].lr, len(sel)))
    return out


def test_three_stage_schedule_on_the_course_model():
    model = resnet18_cbam(placement="stage")
    schedule = three_stage_schedule()
    assert schedule.epochs == 50
    (t1, lr1, e1), (t2, lr2, e2), (t3, lr3, e3) = stage_plans(schedule, model)
    assert (e1, e2, e3) == (5, 15, 30)
    assert t1 == {"cbam", "head"}
    assert t2 == {"cbam", "head", "layer3", "layer4"}
    assert t3 == {"stem", "layer1", "layer2", "layer3", "layer4", "cbam", "head"}
    assert lr1 == {
        "stem": 0.0,
        "layer1": 0.0,
        "layer2": 0.0,
        "layer3": 0.0,
        "layer4": 0.0,
        "cbam": 1e-3,
        "head": 1e-3,
    }
    assert lr2 == {
        "stem": 0.0,
        "layer1": 0.0,
        "layer2": 0.0,
        "layer3": 1e-4,
        "layer4": 1e-4,
        "cbam": 1e-4,
        "head": 1e-4,
    }
    assert lr3 == dict.fromkeys(t3, 1e-5)
    assert [b[1:] for b in schedule.boundaries()] == [(1, 5), (6, 20), (21, 50)]


def test_three_stage_schedule_with_cifar_stem_and_without_cbam():
    t1, _, _ = stage_plans(three_stage_schedule(), resnet18_cbam(stem="cifar"))[0]
    assert t1 == {"stem", "cbam", "head"}, "a new stem starts random, so it trains from stage 1"
    t1, lr1, _ = stage_plans(three_stage_schedule(), resnet18_cbam(placement=None))[0]
    assert t1 == {"head"} and "cbam" not in lr1


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_differential_keeps_new_modules_faster(stem):
    model = resnet18_cbam(stem=stem)
    new = set(model.new_groups)
    stages = stage_plans(three_stage_schedule(differential=True), model)
    for trainable, lr, _ in stages:
        new_lrs = [lr[g] for g in trainable if g in new]
        old_lrs = [lr[g] for g in trainable if g not in new]
        assert new_lrs and all(v > 0 for v in new_lrs + old_lrs)
        if old_lrs:
            assert min(new_lrs) > max(old_lrs), lr
    (_, lr2, _), (_, lr3, _) = stages[1:]
    assert (
        lr2["head"] == pytest.approx(1e-3) and lr2["layer3"] == pytest.approx(1e-4) and lr2["layer1"] == 0.0
    )
    assert lr3["cbam"] == pytest.approx(1e-4) and lr3["layer1"] == pytest.approx(1e-5)


def test_lr_dict_group_entry_beats_alias():
    model = resnet18_cbam()
    schedule = Schedule([Stage("s", 1, "all", {"all": 1e-5, "new": 1e-4, "head": 1e-2})])
    ((_, lr, _),) = stage_plans(schedule, model)
    assert lr["head"] == 1e-2 and lr["cbam"] == 1e-4 and lr["layer2"] == 1e-5


def test_schedule_round_trips_through_dict():
    schedule = three_stage_schedule(differential=True, epochs=(1, 2, 3))
    again = Schedule.from_dict(schedule.to_dict())
    assert again == schedule and again.epochs == 6
    assert again != three_stage_schedule(epochs=(1, 2, 3))


# ------------------------------------------------------------------------------ invalid schedules
def assert_fit_refuses(model, loaders, make_schedule, match, monkeypatch):
    """Building the schedule or calling fit raises ValueError(match) before any optimizer step or write."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(ValueError, match=match):
        fit(model, make_schedule(), *loaders, progress=False, device="cpu")
    assert steps == [], "an optimizer step ran before the error"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model changed before the error"


@pytest.mark.parametrize(
    "make_schedule, match",
    [
        (lambda: Schedule([Stage("a", 1, ["head", "layer9"], 1e-3)]), "unknown layer group 'layer9'"),
        (
            lambda: Schedule([Stage("a", 1, "head", {"head": 1e-3, "neck": 1e-3})]),
            "unknown layer group 'neck'",
        ),
        (lambda: Schedule([Stage("a", 0, "head", 1e-3)]), "epochs must be a positive"),
        (lambda: Schedule([Stage("a", -2, "head", 1e-3)]), "epochs must be a positive"),
        (lambda: Schedule([Stage("a", 1.5, "head", 1e-3)]), "epochs must be a positive"),
        (lambda: Schedule([Stage("a", 1, "head", 0.0)]), "learning rate"),
        (lambda: Schedule([Stage("a", 1, "head", -1e-3)]), "learning rate"),
        (lambda: Schedule([Stage("a", 1, "head", math.nan)]), "learning rate"),
        (lambda: Schedule([Stage("a", 1, "head", math.inf)]), "learning rate"),
        (lambda: Schedule([Stage("a", 1, "head", {"head": 1e-3, "cbam": 0})]), "learning rate cbam=0"),
        (lambda: Schedule([Stage("a", 1, [], 1e-3)]), "trains no group"),
        (lambda: Schedule([Stage("a", 1, ["new", "layer4"], {"new": 1e-3})]), "no learning rate for layer4"),
        (
            lambda: Schedule([Stage("ok", 1, "new", 1e-3), Stage("b", 1, "all", {"pretrained": 1e-4})]),
            "stage 'b': no learning rate for cbam, head",
        ),
        (lambda: Schedule([]), "at least one stage"),
        (lambda: Schedule([Stage("a", 1, "head", 1e-3), Stage("a", 1, "all", 1e-4)]), "unique"),
    ],
)
def test_invalid_schedules_fail_before_training(make_schedule, match, loaders, monkeypatch):
    model = resnet18_cbam(placement="stage")
    assert_fit_refuses(model, loaders, make_schedule, match, monkeypatch)


def test_stage_with_no_group_of_this_model_fails_before_training(loaders, monkeypatch):
    model = resnet18_cbam(placement=None)  # no CBAM: "cbam" is not a group of this model
    assert_fit_refuses(
        model,
        loaders,
        lambda: Schedule([Stage("a", 1, "cbam", 1e-3)]),
        "unknown layer group 'cbam'",
        monkeypatch,
    )


# ------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("placement, stem", [("stage", "imagenet"), ("block", "cifar")])
def test_optimizer_holds_every_parameter_with_the_right_decay(kind, placement, stem):
    model = resnet18_cbam(placement=placement, stem=stem)
    opt = make_optimizer(model, weight_decay=0.05, optimizer=kind)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}), "a parameter is in two param groups"
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}, (
        "not every parameter is in the optimizer"
    )
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    group_of = {id(p): g["group"] for g in opt.param_groups for p in g["params"]}
    assert all(g["lr"] == 0.0 for g in opt.param_groups), "learning rates are set per epoch, 0 until then"
    seen = {"bn": 0, "bias": 0, "weight": 0}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            assert group_of[id(p)] == expected_group(full), full
            if isinstance(module, nn.BatchNorm2d):
                assert decay_of[id(p)] == 0.0, full
                seen["bn"] += 1
            elif pname == "bias":
                assert decay_of[id(p)] == 0.0, full
                seen["bias"] += 1
            else:
                assert isinstance(module, (nn.Conv2d, nn.Linear)), full
                assert decay_of[id(p)] == 0.05, full
                seen["weight"] += 1
    assert all(seen.values()), seen  # all three kinds were checked


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(resnet18_cbam(), optimizer="lbfgs")


def test_one_stage_schedule_trains_everything():
    ((trainable, lr, epochs),) = stage_plans(one_stage_schedule(3, 2e-4), resnet18_cbam())
    assert epochs == 3 and trainable == set(PRETRAINED) | {"cbam", "head"} and set(lr.values()) == {2e-4}
