"""A NaN/inf loss stops ``fit`` at the batch where it happened, with or without a host sync per step.

``train.NonFiniteLossWatch`` checks on the host each step on the CPU and on the device on CUDA (fused
AdamW's ``found_inf`` skips the steps from the bad batch on). The CPU's fused AdamW honours ``found_inf``
too, so both ways run here: ``DEFER_ON`` patched to include "cpu" takes the CUDA way.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import HookedLoader, random_images, reference_model

from course_utils import data as cdata
from course_utils.finetune import Schedule, Stage
from course_utils.train import NonFiniteLossWatch, TrainingDiverged, fit

BATCHES = 6


def loaders():
    images, labels = random_images(BATCHES * 8 + 16, seed=1)
    return (
        cdata.TensorLoader(images[: BATCHES * 8], labels[: BATCHES * 8], 8, train=True, device="cpu", seed=0),
        cdata.TensorLoader(images[BATCHES * 8 :], labels[BATCHES * 8 :], 16, train=False, device="cpu"),
    )


def nan_at(epoch_bad, batch_bad, handed_out):
    def hook(epoch, i, batch):
        if i != "end":
            handed_out.append((epoch, i))
        if epoch == epoch_bad and i == batch_bad:
            images, labels = batch
            return torch.full_like(images, float("nan")), labels

    return hook


def run_until_nan(batch_bad, where, monkeypatch):
    if where == "device":
        monkeypatch.setattr(NonFiniteLossWatch, "DEFER_ON", ("cuda", "cpu"))
    hooked_opts = []
    original_init = NonFiniteLossWatch.__init__

    def spy_init(self, optimizer, *args, **kwargs):
        original_init(self, optimizer, *args, **kwargs)
        hooked_opts.append((optimizer, self.defer))

    monkeypatch.setattr(NonFiniteLossWatch, "__init__", spy_init)
    torch.manual_seed(0)
    model = reference_model(None)
    handed_out = []
    train_loader, val_loader = loaders()
    schedule = Schedule([Stage("head", 1, "new", 1e-3), Stage("all", 2, "all", 1e-4)])
    with pytest.raises(TrainingDiverged) as info:
        fit(
            model,
            schedule,
            HookedLoader(train_loader, nan_at(2, batch_bad, handed_out)),
            val_loader,
            progress=False,
            device="cpu",
        )
    optimizer, deferred = hooked_opts[-1]
    assert deferred == (where == "device")
    assert not hasattr(optimizer, "found_inf"), "the optimizer must be unhooked after the epoch"
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return str(info.value), params, state, handed_out


def same_optimizer_state(on_host, on_device):
    """Equal per parameter; a parameter the device way saw first in the skipped step has a fresh state
    (step 0, zero moments), which AdamW treats exactly like no state at all."""
    for name in on_host.keys() | on_device.keys():
        if name not in on_host:
            assert float(on_device[name]["step"]) == 0 and not on_device[name]["exp_avg"].any(), name
        else:
            assert on_host[name].keys() == on_device[name].keys(), name
            assert all(torch.equal(on_host[name][k], on_device[name][k]) for k in on_host[name]), name
    return True


@pytest.mark.parametrize("batch_bad", [0, 4])
def test_nan_at_batch_k_is_reported_as_batch_k_and_the_weights_are_the_same_both_ways(batch_bad, monkeypatch):
    on_host = run_until_nan(batch_bad, "host", monkeypatch)
    on_device = run_until_nan(batch_bad, "device", monkeypatch)
    for message, *_ in (on_host, on_device):
        assert f"loss became nan in epoch 2 (all), batch {batch_bad};" in message
        assert "no checkpoint was asked for" in message and "Lower the learning rate" in message
    # The host stops at the bad batch; the device way runs the epoch out (sync_every > BATCHES) ...
    assert on_host[3][-1] == (2, batch_bad) and on_device[3][-1] == (2, BATCHES - 1)
    # ... but skips every step from the bad batch on: the same weights and optimizer step counts, bit for bit.
    assert [n for n in on_host[1] if not torch.equal(on_host[1][n], on_device[1][n])] == []
    assert same_optimizer_state(on_host[2], on_device[2])
    assert max(float(s["step"]) for s in on_host[2].values()) == BATCHES + batch_bad


def fused_adamw_and_watch(monkeypatch, sync_every=4):
    monkeypatch.setattr(NonFiniteLossWatch, "DEFER_ON", ("cuda", "cpu"))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    return weight, optimizer, NonFiniteLossWatch(optimizer, torch.device("cpu"), sync_every=sync_every)


def test_the_device_check_needs_no_host_sync_per_step(monkeypatch):
    weight, optimizer, watch = fused_adamw_and_watch(monkeypatch, sync_every=1000)
    losses = [(weight * k).sum() for k in range(5)]

    def no_sync(*args):
        raise AssertionError("the host read a device value")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "tolist", "cpu"):
            m.setattr(torch.Tensor, name, no_sync)
        assert [watch.check(loss, i) for i, loss in enumerate(losses)] == [None] * 5
    assert watch.first_bad() is None


def test_first_bad_batch_and_its_loss_every_sync_every_batches(monkeypatch):
    weight, optimizer, watch = fused_adamw_and_watch(monkeypatch, sync_every=4)
    values = [1.0, 2.0, float("inf"), float("nan"), 3.0]
    results = []
    for i, v in enumerate(values):
        loss = (weight * 0).sum() + v
        results.append(watch.check(loss, i))
        if results[-1] is None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert results[:3] == [None, None, None] and results[3] == (2, float("inf"))
    assert optimizer.found_inf.item() == 1.0
    # the steps of batches 0 and 1 happened; batch 2's was skipped on the device
    assert float(optimizer.state[weight]["step"]) == 2.0
    watch.close()
    assert not hasattr(optimizer, "found_inf")


def test_without_a_fused_optimizer_the_host_checks_each_step(monkeypatch):
    monkeypatch.setattr(NonFiniteLossWatch, "DEFER_ON", ("cuda", "cpu"))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    watch = NonFiniteLossWatch(optimizer, torch.device("cpu"))
    assert not watch.defer and not hasattr(optimizer, "found_inf")
    assert watch.check((weight * 0).sum() + 1.0, 0) is None
    assert watch.check((weight * 0).sum() + float("nan"), 1)[0] == 1
