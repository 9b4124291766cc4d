"""BatchNorm policies at stage boundaries (course_utils.finetune, train.fit): "train", "frozen",
"recalibrate".

The runs are the reference run of _helpers.py (3 stages over 4 epochs, weights with non-trivial BatchNorm
statistics) under each policy. What is checked: which statistics move and which stay bit-identical, that a
recalibration gives the statistics computed here by hand from the same batches and changes nothing else
(parameters, RNGs, the training order), that "train" is the old behaviour bit for bit, and that resuming
mid-schedule reproduces the uninterrupted run under every policy.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from _helpers import (
    differing,
    expected_group,
    group_state,
    random_images,
    reference_loaders,
    reference_model,
    reference_schedule,
)

from course_utils import batchnorm, experiments, finetune, plots, train
from course_utils.batchnorm import BN_POLICIES, recalibrate_bn, recalibration_groups
from course_utils.finetune import Schedule, Stage
from course_utils.models import layer_groups
from course_utils.train import CheckpointError, fit

STATS = ("running_mean", "running_var", "num_batches_tracked")
PRETRAINED = ("stem", "layer1", "layer2", "layer3", "layer4")


def is_stat(name: str) -> bool:
    return name.endswith(STATS)


def bn_affine(name: str, model) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.BatchNorm2d) and name.endswith(("weight", "bias"))


def comparable(history) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history.rows]


def recalibrations(history) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history.meta.get("bn_recalibrations", [])]


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(weights, bn_policy=None, schedule=None, record=None, **kwargs):
    """The reference run under ``bn_policy`` (None: fit's default); ``record``: a list that gets the
    per-group state before training and after each epoch."""
    model = reference_model(weights)
    train_loader, val_loader = reference_loaders()
    if record is not None:
        record.append(group_state(model))
        kwargs["on_epoch_end"] = lambda history: record.append(group_state(model))
    policy = {} if bn_policy is None else {"bn_policy": bn_policy}
    history = fit(
        model,
        schedule or reference_schedule(),
        train_loader,
        val_loader,
        progress=False,
        device="cpu",
        **policy,
        **kwargs,
    )
    return model, history


@pytest.fixture(scope="module")
def runs(resnet18_state_file):
    """One uninterrupted reference run per policy: ``{policy: (model, history, snapshots)}``."""
    out = {}
    for policy in BN_POLICIES:
        torch.manual_seed(0)
        snapshots = []
        model, history = run(resnet18_state_file, policy, record=snapshots)
        out[policy] = (model, history, snapshots)
    return out


# ---------------------------------------------------------------------------- the schedule carries the policy
def test_stage_bn_round_trips_and_is_part_of_equality():
    plain = reference_schedule()
    per_stage = Schedule(
        [Stage("a", 1, ["new"], 1e-3, bn="recalibrate"), Stage("b", 1, "all", 1e-4, bn="frozen")]
    )
    assert Schedule.from_dict(per_stage.to_dict()) == per_stage
    assert [s.bn for s in Schedule.from_dict(per_stage.to_dict()).stages] == ["recalibrate", "frozen"]
    assert "bn" not in plain.to_dict()[0], (
        "a stage without bn keeps the old dict (saved runs keep their hash)"
    )
    assert Schedule.from_dict(plain.to_dict()) == plain
    frozen_stage = Schedule([Stage(s.name, s.epochs, s.trainable, s.lr, bn="frozen") for s in plain.stages])
    assert frozen_stage != plain
    model = reference_model(None)
    assert [p.bn for p in per_stage.plan_for(model)] == ["recalibrate", "frozen"]
    assert per_stage.table()[0]["bn"] == "recalibrate"


@pytest.mark.parametrize("bad", ["eval", "Frozen", True, 1])
def test_unknown_policy_is_refused_with_the_choices(bad, loaders):
    with pytest.raises(ValueError, match="train.*frozen.*recalibrate"):
        Stage("s", 1, "all", 1e-3, bn=bad)
    with pytest.raises(ValueError, match="bn_policy must be one of"):
        fit(
            reference_model(None), reference_schedule(), *loaders, progress=False, device="cpu", bn_policy=bad
        )


def test_recalibration_groups_per_stage():
    model = reference_model(None)
    plans = reference_schedule().plan_for(model)  # epochs: 1 | 2 3 | 4
    assert [recalibration_groups(model, plans, e, "recalibrate") for e in (1, 2, 3, 4)] == [
        list(PRETRAINED),
        ["layer3", "layer4"],
        [],
        ["stem", "layer1", "layer2"],
    ]
    assert all(
        recalibration_groups(model, plans, e, p) == [] for e in (1, 2, 3, 4) for p in ("train", "frozen")
    )
    # per stage: only stage 3 recalibrates, whatever the run's policy
    mixed = Schedule([*reference_schedule().stages[:2], Stage("3 all", 1, "all", 1e-5, bn="recalibrate")])
    plans = mixed.plan_for(model)
    assert [recalibration_groups(model, plans, e, "train") for e in (1, 2, 3, 4)] == [
        [],
        [],
        [],
        ["stem", "layer1", "layer2"],
    ]


# ------------------------------------------------------------------------------ "train": today's behaviour
def legacy_apply_epoch(model, optimizer, plan, *args):
    """apply_epoch as it was before BatchNorm policies (copied from the earlier course_utils)."""
    for param_group in optimizer.param_groups:
        param_group["lr"] = plan.lr[param_group["group"]]
    for group, params in layer_groups(model).items():
        for p in params:
            p.requires_grad_(group in plan.trainable)
    for group, bns in finetune.group_modules(model).items():
        if group not in plan.trainable:
            for bn in bns:
                bn.eval()


def test_train_policy_is_the_old_fit_bit_for_bit(runs, resnet18_state_file, monkeypatch):
    model, history, _ = runs["train"]
    torch.manual_seed(0)
    default_model, default_history = run(resnet18_state_file)  # fit's default arguments
    assert differing(state_of(default_model), state_of(model)) == []
    assert comparable(default_history) == comparable(history)
    assert history.meta["bn_policy"] == "train" and "bn_recalibrations" not in history.meta
    with monkeypatch.context() as mp:
        mp.setattr(train, "apply_epoch", legacy_apply_epoch)
        torch.manual_seed(0)
        old_model, old_history = run(resnet18_state_file)
    assert differing(state_of(old_model), state_of(model)) == [], "bn_policy='train' differs from the old fit"
    assert comparable(old_history) == comparable(history)


# ------------------------------------------------------------------------------ "frozen"
def test_frozen_keeps_pretrained_statistics_while_their_affine_parameters_train(runs):
    model, history, snaps = runs["frozen"]
    start, end = snaps[0], snaps[-1]
    for group in PRETRAINED:
        stats = [n for n in start[group] if is_stat(n)]
        assert stats, group
        assert differing({n: start[group][n] for n in stats}, {n: end[group][n] for n in stats}) == [], (
            f"{group}'s running statistics moved under 'frozen'"
        )
    # the affine parameters changed in the stages that trained them: layer3/4 in stage 2, the rest in stage 3
    plans = reference_schedule().plan_for(model)
    for plan, before, after in zip(plans, snaps, snaps[1:]):
        for group in PRETRAINED:
            affine = [n for n in before[group] if bn_affine(n, model)]
            moved = differing({n: before[group][n] for n in affine}, {n: after[group][n] for n in affine})
            if group in plan.trainable:
                assert len(moved) == len(affine), (
                    f"epoch {plan.epoch}: {group}'s BN weight/bias did not all train"
                )
            else:
                assert moved == [], f"epoch {plan.epoch}: frozen {group}'s BN weight/bias moved"
    # the new groups' BatchNorm (CBAM's spatial gate) still trains and updates its statistics
    assert any(n.endswith("running_mean") for n in differing(start["cbam"], end["cbam"]))
    assert history.meta["bn_policy"] == "frozen"


def test_frozen_per_stage_only_in_the_last_stage(resnet18_state_file):
    stages = reference_schedule().stages
    schedule = Schedule(
        [*stages[:2], Stage(stages[2].name, stages[2].epochs, stages[2].trainable, stages[2].lr, bn="frozen")]
    )
    snaps = []
    run(resnet18_state_file, schedule=schedule, record=snaps)
    stats = lambda snap, g: {n: t for n, t in snap[g].items() if is_stat(n)}  # noqa: E731
    assert differing(stats(snaps[1], "layer3"), stats(snaps[3], "layer3")) != [], (
        "stage 2 ('train') updates layer3"
    )
    for group in PRETRAINED:  # stage 3 ('frozen'): no pretrained statistic moves
        assert differing(stats(snaps[3], group), stats(snaps[4], group)) == [], group


# ------------------------------------------------------------------------------ "recalibrate"
def hand_statistics(model, groups, batches):
    """Per BatchNorm of ``groups``: the mean over the batches of each batch's mean and unbiased variance of
    the layer's input, with those layers normalising by batch statistics and everything else in eval mode."""
    probe = copy.deepcopy(model).eval()
    names = [
        n
        for n, m in probe.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d) and expected_group(n) in groups
    ]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for name in names:
        bn = probe.get_submodule(name)
        bn.train()
        bn.momentum = 0.0  # batch statistics in the forward pass, running ones left alone
        hooks.append(
            bn.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
        )
    with torch.no_grad():
        for images, _ in batches:
            probe(images)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        means = torch.stack([x.double().mean(dim=(0, 2, 3)) for x in xs])
        variances = torch.stack([x.double().var(dim=(0, 2, 3), unbiased=True) for x in xs])
        out[name] = (means.mean(0), variances.mean(0))
    return out


def test_recalibrate_bn_gives_the_hand_computed_statistics_and_changes_nothing_else(resnet18_state_file):
    model = reference_model(resnet18_state_file)
    train_loader, _ = reference_loaders()
    images, labels = random_images(96, seed=3)
    from course_utils.data import TensorLoader

    loader = TensorLoader(images, labels, 16, train=True, device="cpu", seed=5)  # 6 batches per epoch
    loader.set_epoch(7)
    expected_batches = list(iter(loader))[:4]
    loader.set_epoch(2)
    groups = ["layer3", "layer4"]
    want = hand_statistics(model, groups, expected_batches)
    before = state_of(model)
    rng, py_rng = torch.get_rng_state(), random.getstate()
    info = recalibrate_bn(model, groups, loader, 4, epoch=7)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng, "an RNG was consumed"
    assert loader.epoch == 2, "the loader's epoch state changed"
    assert info["groups"] == groups and info["batches"] == 4 and info["images"] == 64 and info["layers"] == 10
    after = state_of(model)
    changed = set(differing(before, after))
    target = {n for n in before if expected_group(n) in groups and is_stat(n)}
    assert changed == target, f"changed outside the recalibrated statistics: {sorted(changed - target)[:5]}"
    assert len(want) == 10
    for name, (mean, var) in want.items():
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1, "momentum not restored"
    assert not any(m.training for m in model.modules())


def test_recalibration_leaves_a_shuffling_dataloader_order_unchanged(resnet18_state_file):
    images, labels = random_images(64, seed=1)
    dataset = torch.utils.data.TensorDataset(images.float() / 255, labels)

    model = reference_model(resnet18_state_file)

    def order(recalibrate: bool) -> list[int]:
        torch.manual_seed(11)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
        if recalibrate:
            recalibrate_bn(model, ["layer1"], loader, 2)
        return torch.cat([y for _, y in loader]).tolist()

    assert order(True) == order(False)


def test_recalibrate_in_fit_before_the_first_step(resnet18_state_file, monkeypatch):
    """Right after each recalibration fit does (before the stage's first step): parameters and every other
    buffer as at the stage's start, statistics those of the stage's first bn_batches batches computed by
    hand."""
    model = reference_model(resnet18_state_file)
    train_loader, val_loader = reference_loaders()
    starts, after_recalibration = {1: state_of(model)}, {}
    original = train.recalibrate_bn

    def recording(model, groups, loader, num_batches, *, epoch, **kwargs):
        assert differing(starts[epoch], state_of(model)) == []  # nothing ran in between
        info = original(model, groups, loader, num_batches, epoch=epoch, **kwargs)
        after_recalibration[epoch] = (list(groups), state_of(model))
        return info

    monkeypatch.setattr(train, "recalibrate_bn", recording)
    history = fit(
        model,
        reference_schedule(),
        train_loader,
        val_loader,
        progress=False,
        device="cpu",
        bn_policy="recalibrate",
        bn_batches=1,
        on_epoch_end=lambda history: starts.__setitem__(len(history) + 1, state_of(model)),
    )
    recs = history.meta["bn_recalibrations"]
    assert [(r["epoch"], r["groups"], r["batches"]) for r in recs] == [
        (1, list(PRETRAINED), 1),
        (2, ["layer3", "layer4"], 1),
        (4, ["stem", "layer1", "layer2"], 1),
    ]
    assert sorted(after_recalibration) == [1, 2, 4] and all(r["seconds"] > 0 for r in recs)
    for epoch, (groups, after) in after_recalibration.items():
        before = starts[epoch]
        target = {n for n in before if expected_group(n) in groups and is_stat(n)}
        changed = set(differing(before, after))
        assert changed <= target, (
            f"epoch {epoch}: changed beyond {groups}' statistics: {sorted(changed - target)[:5]}"
        )
        assert {n for n in target if n.endswith(("running_mean", "running_var"))} <= changed
        # by hand, from the model as it was at the stage's start and the loader's first batch of that epoch
        probe = reference_model(resnet18_state_file)
        probe.load_state_dict(before)
        loader, _ = reference_loaders()
        loader.set_epoch(epoch)
        want = hand_statistics(probe, groups, list(iter(loader))[:1])
        assert len(want) == {1: 20, 2: 10, 4: 10}[epoch]
        for name, (mean, var) in want.items():
            torch.testing.assert_close(after[name + ".running_mean"].double(), mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(after[name + ".running_var"].double(), var, rtol=1e-4, atol=1e-5)


def test_recalibration_does_not_change_the_training_order(runs, resnet18_state_file):
    """The batches every training forward pass sees are the same with and without recalibration."""

    def seen(policy):
        model = reference_model(resnet18_state_file)
        inputs = []
        model.register_forward_pre_hook(
            lambda m, args: inputs.append(args[0].detach().clone()) if torch.is_grad_enabled() else None
        )
        train_loader, val_loader = reference_loaders()
        fit(
            model,
            reference_schedule(),
            train_loader,
            val_loader,
            progress=False,
            device="cpu",
            bn_policy=policy,
        )
        return inputs

    plain, recal = seen("train"), seen("recalibrate")
    assert len(plain) == len(recal) == 8
    assert all(torch.equal(a, b) for a, b in zip(plain, recal))
    # and recalibration did change the run: its statistics and result differ
    assert differing(state_of(runs["train"][0]), state_of(runs["recalibrate"][0])) != []


# ------------------------------------------------------------------------------ resume under every policy
@pytest.mark.slow  # six interrupted and resumed runs
@pytest.mark.parametrize("policy", BN_POLICIES)
@pytest.mark.parametrize("stop_after", [1, 2])  # at the stage-2 boundary; in the middle of stage 2
def test_resume_mid_schedule_equals_uninterrupted(runs, resnet18_state_file, tmp_path, policy, stop_after):
    ckpt = tmp_path / "run.ckpt"

    def stop(history):
        if len(history) == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(resnet18_state_file, policy, checkpoint=ckpt, on_epoch_end=stop)
    torch.manual_seed(123)  # resume restores the RNG state from the checkpoint
    model, history = run(resnet18_state_file, policy, checkpoint=ckpt, resume=True)
    want_model, want_history, _ = runs[policy]
    assert differing(state_of(model), state_of(want_model)) == [], (
        "resumed run differs from the uninterrupted one"
    )
    assert comparable(history) == comparable(want_history)
    assert recalibrations(history) == recalibrations(want_history)
    assert history.meta["bn_policy"] == policy
    if policy == "recalibrate":
        assert [r["epoch"] for r in recalibrations(history)] == [1, 2, 4]


def test_resume_with_another_policy_is_refused(resnet18_state_file, tmp_path):
    ckpt = tmp_path / "run.ckpt"

    def stop(history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(resnet18_state_file, "frozen", checkpoint=ckpt, on_epoch_end=stop)
    with pytest.raises(CheckpointError, match="bn_policy='frozen'"):
        run(resnet18_state_file, "recalibrate", checkpoint=ckpt, resume=True)


# ------------------------------------------------------------------------------ records and plots
def test_plot_history_marks_each_recalibration(runs):
    history = runs["recalibrate"][1]
    fig = plots.plot_history(history)
    for ax in fig.axes:
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert sorted(line.get_xdata()[0] for line in dashed) == [0.5, 1.5, 3.5]
    assert not [
        line
        for ax in plots.plot_history(runs["train"][1]).axes
        for line in ax.lines
        if line.get_linestyle() == "--"
    ]
    fig = plots.plot_runs({p: runs[p][1] for p in BN_POLICIES})
    assert len(fig.axes) == 2 and len(fig.axes[0].get_legend().get_texts()) == 3


def test_run_cached_file_name_depends_on_the_policy(tmp_path):
    schedule, config = reference_schedule(), {"seed": 0}
    plain = experiments.run_path("d", schedule, tmp_path, experiments._with_fit_options(config, {}))
    assert plain == experiments.run_path("d", schedule, tmp_path, config), (
        "runs without a policy keep their file"
    )
    names = {
        experiments.run_path("d", schedule, tmp_path, experiments._with_fit_options(config, {"bn_policy": p}))
        for p in BN_POLICIES
    }
    assert len(names) == 3 and plain not in names


def test_boundary_jumps_read_the_history(runs):
    history = runs["train"][1]
    jumps = experiments.boundary_jumps(history)
    rows = history.rows
    assert [j["epoch"] for j in jumps] == [2, 4]
    assert jumps[0]["train_loss_jump"] == rows[1]["train_loss"] - rows[0]["train_loss"]
    assert jumps[1]["val_acc_jump"] == rows[3]["val_acc"] - rows[2]["val_acc"]


def test_with_bn_sets_every_stage():
    schedule = finetune.with_bn(reference_schedule(), "frozen")
    assert [s.bn for s in schedule.stages] == ["frozen"] * 3
    assert [(s.name, s.epochs, s.trainable, s.lr) for s in schedule.stages] == [
        (s.name, s.epochs, s.trainable, s.lr) for s in reference_schedule().stages
    ]
    with pytest.raises(ValueError, match="bn_policy must be one of"):
        finetune.with_bn(reference_schedule(), "off")


def test_bn_statistics_and_switch_effect_measure_without_changing_the_model(resnet18_state_file):
    model = reference_model(resnet18_state_file).train()
    images = random_images(32, seed=4)[0].float().div(255).sub(0.5)
    before = state_of(model)
    rows = batchnorm.bn_statistics(model, images, ["layer3"])
    assert [r["layer"] for r in rows] == [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n.startswith("layer3")
    ]
    assert model.training, "bn_statistics must leave the model's mode as it was"
    first = model.get_submodule(rows[0]["layer"])
    x = {}
    handle = first.register_forward_pre_hook(lambda m, args: x.setdefault("in", args[0]))
    model.eval()
    with torch.no_grad():
        model(images)
    handle.remove()
    model.train()
    assert rows[0]["stored var"] == pytest.approx(first.running_var.mean().item())
    assert rows[0]["batch var"] == pytest.approx(x["in"].var(dim=(0, 2, 3)).mean().item(), rel=1e-5)
    assert rows[0]["var ratio"] == pytest.approx(
        (x["in"].var(dim=(0, 2, 3)) / first.running_var).mean().item(), rel=1e-5
    )
    effect = batchnorm.bn_switch_effect(model, images)
    assert (
        effect > 0 and batchnorm.bn_switch_effect(model, images, groups=["head"]) == 0.0
    )  # the head has no BN
    assert differing(before, state_of(model)) == [] and model.training
