"""fit on a Linux CPU keeps each step's memory for the next (devices.keep_freed_memory), and bench's plain
path runs in a process of its own, untouched by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from course_utils import train
from course_utils.finetune import Schedule, Stage
from course_utils.machinery import bench, devices
from course_utils.models import resnet18_cbam

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


class FakeLibc:
    def __init__(self, accept=True):
        self.calls, self.accept = [], accept

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return int(self.accept)

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fresh(monkeypatch):
    """This process's allocator state as if nothing had trained yet, with a fake C library."""

    def set_up(libc=None):
        monkeypatch.setitem(devices._malloc, "state", None)
        monkeypatch.setitem(devices._malloc, "libc", libc if libc is not None else False)
        return libc

    return set_up


def test_keep_sets_no_mmap_and_no_trim_once_and_release_trims(fresh):
    libc = fresh(FakeLibc())
    state = devices.keep_freed_memory("cpu", env={})
    assert state.startswith("kept")
    assert libc.calls == [
        ("mallopt", devices._M_MMAP_MAX, 0),
        ("mallopt", devices._M_TRIM_THRESHOLD, 2**31 - 1),
    ]
    assert devices.keep_freed_memory("cpu", env={}) == state and len(libc.calls) == 2  # once per process
    assert devices.release_freed_memory() is True and libc.calls[-1] == ("malloc_trim", 0)
    assert devices.malloc_state() == state


def test_default_other_devices_and_other_c_libraries_leave_malloc_alone(fresh):
    libc = fresh(FakeLibc())
    assert (
        devices.keep_freed_memory("cpu", env={"COURSE_MALLOC": "default"})
        == "glibc defaults (COURSE_MALLOC=default)"
    )
    assert devices.keep_freed_memory("cuda", env={}).startswith("glibc defaults")
    assert devices.release_freed_memory() is False
    assert libc.calls == []
    fresh(None)  # macOS, Windows, musl: no glibc
    assert devices.keep_freed_memory("cpu", env={}).startswith("left alone: not glibc")
    assert devices.release_freed_memory() is False
    fresh(FakeLibc(accept=False))
    assert devices.keep_freed_memory("cpu", env={}) == "left alone: glibc refused mallopt"


def test_a_wrong_setting_is_refused_with_the_choices(fresh):
    fresh(FakeLibc())
    with pytest.raises(ValueError, match=r"COURSE_MALLOC='jemalloc'.*keep.*default"):
        devices.keep_freed_memory("cpu", env={"COURSE_MALLOC": "jemalloc"})


def test_fit_keeps_while_it_trains_and_releases_when_it_ends(fresh, monkeypatch):
    libc = fresh(FakeLibc())
    monkeypatch.delenv("COURSE_MALLOC", raising=False)
    seen = []
    model = resnet18_cbam(num_classes=10, weights=None)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))] * 2
    train.fit(
        model,
        Schedule([Stage("all", 2, "all", 1e-3)]),
        batches,
        device="cpu",
        progress=False,
        on_epoch_end=lambda h: seen.append(list(libc.calls)),
    )
    kept = [c for c in libc.calls if c[0] == "mallopt"]
    assert len(kept) == 2 and all(
        c[0] == "mallopt" for c in seen[0]
    )  # set before the first step, not trimmed
    assert libc.calls[-1] == ("malloc_trim", 0)  # returned when fit ended
    with pytest.raises(ValueError):  # refused before any step: still released
        train.fit(
            model,
            Schedule([Stage("all", 1, "all", 1e-3)]),
            [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 99]))],
            device="cpu",
            progress=False,
        )
    assert libc.calls[-1] == ("malloc_trim", 0) and libc.calls.count(("malloc_trim", 0)) == 2


FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    import torch.nn.functional as F
    from course_utils.machinery import devices
    state = devices.keep_freed_memory("cpu")
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"state": state, "faults": faults}))
""")


@pytest.mark.slow  # a subprocess trains twice (about 10 s)
@pytest.mark.skipif(not GLIBC, reason="glibc (Linux) only: other C libraries are left alone")
def test_steps_no_longer_fault_their_memory_in_from_the_kernel():
    """Each step of a small conv net allocates ~100 MB of activations and gradients: glibc's defaults return
    them to the kernel and fault fresh pages in every step; kept, the next step reuses them."""

    def faults(setting):
        env = {
            **os.environ,
            "COURSE_MALLOC": setting,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        out = subprocess.run(
            [sys.executable, "-c", FAULTS], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out.splitlines()[-1])

    default, kept = faults("default"), faults("keep")
    assert default["state"].startswith("glibc defaults") and kept["state"].startswith("kept")
    assert default["faults"] > 5000  # ~100 MB of fresh 4 KiB pages per step
    assert kept["faults"] < default["faults"] / 10


@pytest.mark.slow  # spawns a process that imports torch and trains
def test_the_plain_path_runs_in_a_process_of_its_own_without_the_course_setting():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    spec = {
        "device": "cpu",
        "model": "resnet18_cbam",
        "seed": 0,
        "size": None,
        "batch_size": 16,
        "workers": 0,
        "threads": 1,
        "rows": {"plain": False},
        "images": x.numpy(),
        "labels": (torch.arange(32) % 10).numpy(),
    }
    with bench.PlainProcess(spec) as plain:
        assert plain.process.pid != os.getpid() and plain.process.is_alive()
        rows = plain.train_pass()
        assert set(rows) == {"plain"} and rows["plain"][0] == 32 and rows["plain"][1] > 0
        seen, seconds, (peak, step) = plain.eval_pass()
        assert seen == 32 and seconds > 0 and peak > 0
    assert not plain.process.is_alive()
    with (
        pytest.raises(RuntimeError, match=r"plain path failed in its process:(.|\n)*KeyError: 'nonexistent'"),
        bench.PlainProcess({**spec, "model": "nonexistent"}),
    ):
        pass


def test_fit_refuses_a_wrong_setting_before_anything_changes(fresh, monkeypatch):
    libc = fresh(FakeLibc())
    monkeypatch.setenv("COURSE_MALLOC", "jemalloc")
    model = resnet18_cbam(num_classes=10, weights=None)
    for p in model.layer1.parameters():
        p.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="COURSE_MALLOC='jemalloc'"):
        train.fit(
            model,
            Schedule([Stage("all", 1, "all", 1e-3)]),
            [(torch.randn(4, 3, 32, 32), torch.arange(4))],
            device="cpu",
            progress=False,
        )
    assert model.training and not any(p.requires_grad for p in model.layer1.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert libc.calls == []
