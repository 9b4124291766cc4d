"""fit (course_utils.train): frozen means frozen, learning rates in force, checkpoints, divergence, learning.

One short reference run (3 stages over 4 epochs, differential learning rates, a checkpoint) is trained
once per module and recorded — state after every epoch, the learning rates and BatchNorm modes at every
optimizer step — and several tests read it. The resume tests compare other runs with it bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import (
    HookedLoader,
    differing,
    expected_group,
    group_state,
    make_loaders,
    random_images,
    reference_loaders,
    reference_model,
    reference_schedule,
)

from course_utils import train
from course_utils.finetune import Schedule, Stage, make_optimizer, one_stage_schedule
from course_utils.machinery import presets
from course_utils.machinery.checkpoints import load_checkpoint
from course_utils.models import resnet18_cbam
from course_utils.train import COLUMNS, CheckpointError, History, TrainingDiverged, fit

TESTS = Path(__file__).resolve().parent
TIMING = ("seconds", "images_per_s")


def comparable(history: History) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history.rows]


def final_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, resnet18_state_file):
    """The reference run, recorded. Returns a dict (see the keys below)."""
    ckpt = tmp_path_factory.mktemp("reference") / "run.ckpt"
    model = reference_model(resnet18_state_file)
    schedule = reference_schedule()
    train, val = reference_loaders()
    snapshots = [group_state(model)]
    ckpt_epochs, steps, epoch_of_step = [], [], []

    def on_epoch_end(history):
        snapshots.append(group_state(model))
        ckpt_epochs.append(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
        epoch_of_step.extend([len(history)] * (len(steps) - len(epoch_of_step)))

    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs: dict[str, set] = {}
        for g in self.param_groups:
            lrs.setdefault(g["group"], set()).add(g["lr"])
        with_grad = {expected_group(n) for n, p in model.named_parameters() if p.grad is not None}
        requires = {expected_group(n) for n, p in model.named_parameters() if p.requires_grad}
        bn_training = {
            expected_group(n)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.BatchNorm2d) and m.training
        }
        steps.append(
            {"lr": lrs, "with_grad": with_grad, "requires_grad": requires, "bn_training": bn_training}
        )
        return original_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", recording_step)
        history = fit(
            model,
            schedule,
            train,
            val,
            checkpoint=ckpt,
            progress=False,
            device="cpu",
            on_epoch_end=on_epoch_end,
        )
    return {
        "model": model,
        "history": history,
        "schedule": schedule,
        "plans": schedule.plan_for(model),
        "snapshots": snapshots,
        "ckpt": ckpt,
        "ckpt_epochs": ckpt_epochs,
        "steps": steps,
        "epoch_of_step": epoch_of_step,
        "final": final_state(model),
        "bn_groups": {
            expected_group(n) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
        },
    }


# ------------------------------------------------------------------------------ frozen means frozen
def test_frozen_groups_are_bit_identical_during_each_stage(reference):
    plans, snaps = reference["plans"], reference["snapshots"]
    assert len(snaps) == len(plans) + 1 == 5
    groups = list(snaps[0])
    assert groups == ["stem", "layer1", "layer2", "layer3", "layer4", "cbam", "head"]
    for plan, before, after in zip(plans, snaps, snaps[1:]):
        for group in groups:
            changed = differing(before[group], after[group])
            if group in plan.trainable:
                params = [
                    n
                    for n in changed
                    if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
                ]
                assert params, f"epoch {plan.epoch}: trainable group {group} did not change"
                if group in reference["bn_groups"]:
                    assert any(n.endswith("running_mean") for n in changed), (
                        f"epoch {plan.epoch}: trainable {group}'s BatchNorm statistics did not update"
                    )
            else:
                assert changed == [], (
                    f"epoch {plan.epoch} ({plan.stage}): frozen group {group} changed: {changed[:5]}"
                )
    # the schedule really freezes something in stages 1 and 2 and then trains it
    assert differing(snaps[0]["layer1"], snaps[3]["layer1"]) == []
    assert differing(snaps[3]["layer1"], snaps[4]["layer1"]) != []


def test_frozen_groups_get_no_gradient_and_keep_batchnorm_in_eval(reference):
    steps, epoch_of_step, plans = reference["steps"], reference["epoch_of_step"], reference["plans"]
    assert len(steps) == 2 * len(plans) and epoch_of_step == [1, 1, 2, 2, 3, 3, 4, 4]
    for step, epoch in zip(steps, epoch_of_step):
        trainable = set(plans[epoch - 1].trainable)
        assert step["with_grad"] == trainable, (epoch, step["with_grad"])
        assert step["requires_grad"] == trainable, (epoch, step["requires_grad"])
        assert step["bn_training"] == trainable & reference["bn_groups"], (epoch, step["bn_training"])


def test_after_fit_everything_requires_grad_and_model_is_in_eval(reference):
    model = reference["model"]
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------ learning rates
EXPECTED_LR = [  # three_stage_schedule(differential=True): new = cbam+head, 10x the pretrained rate
    {"stem": 0, "layer1": 0, "layer2": 0, "layer3": 0, "layer4": 0, "cbam": 1e-3, "head": 1e-3},
    {"stem": 0, "layer1": 0, "layer2": 0, "layer3": 1e-4, "layer4": 1e-4, "cbam": 1e-3, "head": 1e-3},
    {"stem": 0, "layer1": 0, "layer2": 0, "layer3": 1e-4, "layer4": 1e-4, "cbam": 1e-3, "head": 1e-3},
    {
        "stem": 1e-5,
        "layer1": 1e-5,
        "layer2": 1e-5,
        "layer3": 1e-5,
        "layer4": 1e-5,
        "cbam": 1e-4,
        "head": 1e-4,
    },
]


def test_history_lr_is_the_plan_for_every_epoch(reference):
    history, plans = reference["history"], reference["plans"]
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["stage"] == [p.stage for p in plans]
    assert list(history["lr"]) == [p.lr for p in plans]  # exactly, frozen groups included (0.0)
    for got, want in zip(history["lr"], EXPECTED_LR):
        assert got == pytest.approx(want, rel=1e-12, abs=0)
        assert all(got[g] == 0.0 for g, v in want.items() if v == 0)


def test_learning_rates_in_force_at_every_step(reference):
    for step, epoch in zip(reference["steps"], reference["epoch_of_step"]):
        plan = reference["plans"][epoch - 1]
        assert all(len(v) == 1 for v in step["lr"].values()), "decay and no-decay groups disagree"
        assert {g: next(iter(v)) for g, v in step["lr"].items()} == plan.lr, f"epoch {epoch}"


def test_history_columns_are_filled(reference):
    for row in reference["history"].rows:
        assert list(row) == list(COLUMNS)
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1 and row["images_per_s"] > 0


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_every_epoch_loads_weights_only(reference):
    assert reference["ckpt_epochs"] == [1, 2, 3, 4]
    state = torch.load(reference["ckpt"], map_location="cpu", weights_only=True)
    assert state["epoch"] == 4
    assert differing(state["model"], reference["final"]) == []
    assert json.loads(state["history"])["rows"][-1]["epoch"] == 4
    assert Schedule.from_dict(json.loads(state["schedule"])) == reference["schedule"]
    assert not list(reference["ckpt"].parent.glob(".*tmp*")), "a temporary file was left behind"


def test_resume_after_interrupt_matches_uninterrupted_run(reference, resnet18_state_file, tmp_path):
    ckpt = tmp_path / "run.ckpt"

    def stop_after_first(history):
        if len(history) == 1:
            raise KeyboardInterrupt

    train, val = reference_loaders()
    interrupted = reference_model(resnet18_state_file)
    with pytest.raises(KeyboardInterrupt):
        fit(
            interrupted,
            reference_schedule(),
            train,
            val,
            checkpoint=ckpt,
            progress=False,
            device="cpu",
            on_epoch_end=stop_after_first,
        )
    assert load_checkpoint(ckpt)["epoch"] == 1
    # an interrupted fit leaves nothing frozen and no module half in train mode
    assert all(p.requires_grad for p in interrupted.parameters())
    assert not any(m.training for m in interrupted.modules())
    train, val = reference_loaders()
    model = reference_model(resnet18_state_file)
    history = fit(
        model, reference_schedule(), train, val, checkpoint=ckpt, resume=True, progress=False, device="cpu"
    )
    assert differing(final_state(model), reference["final"]) == [], (
        "resumed weights differ from the uninterrupted run"
    )
    assert comparable(history) == comparable(reference["history"])


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(reference, resnet18_state_file, tmp_path):
    ckpt, marker, log = tmp_path / "run.ckpt", tmp_path / "stalled", tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "_train_worker.py"),
                str(resnet18_state_file),
                str(ckpt),
                str(marker),
                "3",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"worker exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"worker too slow:\n{log.read_text()}"
            time.sleep(0.05)
        assert ckpt.exists(), "the checkpoint must exist once epoch 3 has started"
        os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 3, after its first optimizer step
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"].rows] == [1, 2]
    train, val = reference_loaders()
    model = reference_model(resnet18_state_file)
    history = fit(
        model, reference_schedule(), train, val, checkpoint=ckpt, resume=True, progress=False, device="cpu"
    )
    assert differing(final_state(model), reference["final"]) == [], (
        "resumed weights differ from the uninterrupted run"
    )
    assert comparable(history) == comparable(reference["history"])


def test_finished_checkpoint_resumes_without_training(reference, resnet18_state_file, tmp_path, monkeypatch):
    ckpt = tmp_path / "done.ckpt"
    shutil.copy(reference["ckpt"], ckpt)
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    model = reference_model(resnet18_state_file)
    history = fit(
        model,
        reference_schedule(),
        *reference_loaders(),
        checkpoint=ckpt,
        resume=True,
        progress=False,
        device="cpu",
    )
    assert steps == [] and len(history) == 4
    assert differing(final_state(model), reference["final"]) == []


def test_existing_checkpoint_is_never_overwritten(reference, resnet18_state_file, tmp_path, monkeypatch):
    ckpt = tmp_path / "taken.ckpt"
    shutil.copy(reference["ckpt"], ckpt)
    blob = ckpt.read_bytes()
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(CheckpointError, match="resume=True"):
        fit(
            reference_model(resnet18_state_file),
            reference_schedule(),
            *reference_loaders(),
            checkpoint=ckpt,
            progress=False,
            device="cpu",
        )
    assert ckpt.read_bytes() == blob and steps == []


def test_checkpoint_of_another_schedule_or_model_is_refused(reference, resnet18_state_file, tmp_path):
    ckpt = tmp_path / "other.ckpt"
    shutil.copy(reference["ckpt"], ckpt)
    with pytest.raises(CheckpointError, match="another schedule"):
        fit(
            reference_model(resnet18_state_file),
            one_stage_schedule(4, 1e-4),
            *reference_loaders(),
            checkpoint=ckpt,
            resume=True,
            progress=False,
            device="cpu",
        )
    with pytest.raises(CheckpointError, match="another model"):
        fit(
            resnet18_cbam(placement=None),
            reference_schedule(),
            *reference_loaders(),
            checkpoint=ckpt,
            resume=True,
            progress=False,
            device="cpu",
        )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_checkpoint_on_resume_names_the_file(reference, resnet18_state_file, tmp_path, damage):
    ckpt = tmp_path / f"{damage}.ckpt"
    blob = reference["ckpt"].read_bytes()
    ckpt.write_bytes(
        {"truncated": blob[: len(blob) // 2], "garbage": b"not a checkpoint" * 100, "empty": b""}[damage]
    )
    model = reference_model(resnet18_state_file)
    before = final_state(model)
    with pytest.raises(CheckpointError) as info:
        fit(
            model,
            reference_schedule(),
            *reference_loaders(),
            checkpoint=ckpt,
            resume=True,
            progress=False,
            device="cpu",
        )
    assert str(ckpt) in str(info.value)
    assert differing(before, final_state(model)) == []


def test_resume_needs_a_checkpoint_path(resnet18_state_file):
    with pytest.raises(ValueError, match="checkpoint"):
        fit(
            reference_model(resnet18_state_file),
            reference_schedule(),
            *reference_loaders(),
            resume=True,
            progress=False,
            device="cpu",
        )


# ------------------------------------------------------------------------------ divergence
def nan_from_epoch(epoch_bad):
    def hook(epoch, i, batch):
        if epoch >= epoch_bad and i != "end":
            images, labels = batch
            return torch.full_like(images, float("nan")), labels

    return hook


def test_nan_images_raise_and_keep_last_good_checkpoint(reference, resnet18_state_file, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    train, val = reference_loaders()
    with pytest.raises(TrainingDiverged, match=r"nan in epoch 2") as info:
        fit(
            reference_model(resnet18_state_file),
            reference_schedule(),
            HookedLoader(train, nan_from_epoch(2)),
            val,
            checkpoint=ckpt,
            progress=False,
            device="cpu",
        )
    assert str(ckpt) in str(info.value) and "epoch 1" in str(info.value)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1
    # the kept checkpoint is exactly the reference run after its first epoch
    after_first = {k: v for group in reference["snapshots"][1].values() for k, v in group.items()}
    assert differing({k: state["model"][k] for k in after_first}, after_first) == []


def test_nan_weights_after_the_last_step_are_not_checkpointed(resnet18_state_file, tmp_path):
    """The loss is checked before each step; a last step that breaks the weights must not be saved."""
    ckpt = tmp_path / "run.ckpt"
    model = reference_model(resnet18_state_file)

    def break_weights(epoch, i, batch):
        if epoch == 2 and i == "end":
            with torch.no_grad():
                model.fc.weight[0, 0] = float("nan")

    train, val = reference_loaders()
    with pytest.raises(TrainingDiverged, match="fc.weight") as info:
        fit(
            model,
            reference_schedule(),
            HookedLoader(train, break_weights),
            val,
            checkpoint=ckpt,
            progress=False,
            device="cpu",
        )
    assert "epoch 2" in str(info.value)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_huge_learning_rate_diverges_cleanly(resnet18_state_file, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    schedule = Schedule([Stage("ok", 1, "new", 1e-3), Stage("boom", 4, "all", 1e6)])
    with pytest.raises(TrainingDiverged) as info:
        fit(
            reference_model(resnet18_state_file),
            schedule,
            *reference_loaders(),
            checkpoint=ckpt,
            progress=False,
            device="cpu",
        )
    message = str(info.value)
    assert "boom" in message and "Lower the learning rate" in message
    state = load_checkpoint(ckpt)
    assert state["epoch"] >= 1 and f"(epoch {state['epoch']}) is kept" in message
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(math.isfinite(r["train_loss"]) for r in state["history"].rows)


# ------------------------------------------------------------------------------ it learns
@pytest.mark.slow
def test_short_fit_on_the_shipped_subset_beats_chance(cifar_subset):
    """500 real training images, 3 epochs from random weights: well above the 10 % of guessing.

    Measured over seeds 0-4: val accuracy 0.245-0.305 after 3 epochs (200 val images: chance is
    0.10 ± 0.02), train loss 1.83-1.92 (ln 10 = 2.30). About 30 s on one busy CPU core.
    """
    from course_utils.data import make_loaders

    torch.manual_seed(0)
    model = resnet18_cbam(placement="stage")
    train, val = make_loaders(cifar_subset, 32, device="cpu", seed=0)
    history = fit(
        model, one_stage_schedule(3, 1e-3), train, val, progress=False, device="cpu", channels_last=False
    )
    losses, accs = history["train_loss"], history["val_acc"]
    assert len(cifar_subset.val_labels) == 200
    assert losses[-1] < math.log(10) - 0.2 and losses[-1] < losses[0], losses
    assert accs[-1] > 0.2, accs


# ------------------------------------------------------------------------------ precision and optimizer
def stem_conv_dtypes(model) -> list[tuple[bool, torch.dtype]]:
    """Fills with ``(training, output dtype)`` of the stem's convolution at every forward pass."""
    dtypes = []
    stem_conv = next(m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d))
    stem_conv.register_forward_hook(
        lambda module, inputs, output: dtypes.append((module.training, output.dtype))
    )
    return dtypes


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)]
)
def test_bf16_by_default_only_on_cpus_that_have_it(monkeypatch, avx512_bf16, amx, expected):
    """Emulated bf16 (a laptop with AVX2 only) is slower than fp32, so fit's default stays fp32 there."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train.default_amp(torch.device("cpu")) is expected
    assert train.default_amp(torch.device("cuda")) is True


@pytest.mark.parametrize("amp", [True, False])
def test_amp_switches_the_convolutions_to_bf16_in_training_and_evaluation(amp):
    """What fit(amp=...) asks for is what the convolutions compute in; the loss is fp32 either way."""
    torch.manual_seed(0)
    model = resnet18_cbam(weights=None)
    images, labels = random_images(64)
    train_loader, val_loader = make_loaders(images, labels, batch_size=32)
    dtypes = stem_conv_dtypes(model)
    history = fit(
        model, one_stage_schedule(1, 1e-3), train_loader, val_loader, device="cpu", progress=False, amp=amp
    )
    want = torch.bfloat16 if amp else torch.float32
    assert {d for training, d in dtypes if training} == {want}, dtypes
    assert {d for training, d in dtypes if not training} == {want}, dtypes
    assert math.isfinite(history["train_loss"][0])


@pytest.mark.parametrize("size, expected", [(32, torch.bfloat16), (16, torch.float32)])
def test_default_precision_on_a_bf16_cpu_is_fp32_below_32_pixels(monkeypatch, size, expected):
    """oneDNN's bf16 weight gradient of a stride-2 3×3 conv on a 1×1 map (layer4 at 16×16) is sometimes
    NaN."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert train.default_amp("cpu", size) is (expected == torch.bfloat16)
    assert train.default_amp("cpu", (size, 64)) is (expected == torch.bfloat16)
    torch.manual_seed(0)
    model = resnet18_cbam(weights=None)
    train_loader, val_loader = make_loaders(*random_images(32, size=size), batch_size=16)
    dtypes = stem_conv_dtypes(model)
    fit(model, one_stage_schedule(1, 1e-3), train_loader, val_loader, device="cpu", progress=False)
    assert {d for _, d in dtypes} == {expected}, dtypes


def test_optimizer_is_fused_and_skips_frozen_parameters():
    model = resnet18_cbam(weights=None)
    opt = make_optimizer(model)
    assert opt.defaults["fused"] is True
    frozen = [p for g in opt.param_groups if g["group"] == "layer1" for p in g["params"]]
    before = [p.detach().clone() for p in frozen]
    for g in opt.param_groups:
        g["lr"] = 1e-2
    for p in frozen:
        p.requires_grad_(False)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, frozen)), "a frozen parameter moved (weight decay?)"
    assert not any(opt.state[p] for p in frozen), "the optimizer kept state for a frozen parameter"


# ------------------------------------------------------------------------------ presets
def test_presets_resolve(monkeypatch):
    monkeypatch.setenv("COURSE_PRESET", "smoke")
    cfg = presets.resolve(epochs=(2, 2, 2), batch_size=None)
    assert cfg["preset"] == "smoke" and cfg["epochs"] == (2, 2, 2) and cfg["batch_size"] == 64
    assert presets.resolve("full")["train_size"] is None
    monkeypatch.setenv("COURSE_PRESET", "huge")
    with pytest.raises(ValueError, match="huge"):
        presets.resolve()
    monkeypatch.delenv("COURSE_PRESET")
    assert presets.preset_name() == ("full" if torch.cuda.is_available() else "quick")
