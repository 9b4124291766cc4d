"""Device choice (CUDA > MPS > CPU, COURSE_DEVICE), MPS fallbacks, DataLoader workers on spawn platforms."""

from __future__ import annotations

import multiprocessing
import sys
import types

import pytest
import torch

from course_utils import data, finetune, train
from course_utils.machinery import devices, runtime
from course_utils.models import resnet18_cbam

HAS_MPS = devices._mps_available()


@pytest.fixture
def machine(monkeypatch):
    """Pretend this torch sees a CUDA GPU and/or an Apple GPU."""

    def set_up(cuda=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU 9000")
        monkeypatch.setattr(devices, "_mps_available", lambda: mps)

    return set_up


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    device, reason = devices.choose_device({})
    assert device.type == expected
    assert {"cuda": "Fake GPU 9000", "mps": "Apple GPU (MPS)", "cpu": "没有 CUDA GPU，也没有 Apple MPS"}[
        expected
    ] in reason
    assert train.default_device().type == expected


def test_env_override_wins_and_is_named(machine):
    machine(cuda=True, mps=False)
    device, reason = devices.choose_device({"COURSE_DEVICE": "cpu"})
    assert device.type == "cpu" and "COURSE_DEVICE=cpu" in reason


@pytest.mark.parametrize(
    "wanted, message",
    [
        ("mps", "MPS is not available"),
        ("cuda", "sees no CUDA GPU"),
        ("gpu", "is not a device"),
        ("meta", "supports cpu, cuda and mps"),
    ],
)
def test_an_override_that_cannot_work_is_refused(machine, wanted, message):
    machine(cuda=False, mps=False)
    with pytest.raises(ValueError, match=message):
        devices.choose_device({"COURSE_DEVICE": wanted})


def test_train_default_device_reads_the_env(machine, monkeypatch):
    machine(cuda=False, mps=False)
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert train.default_device() == torch.device("cpu")
    assert "COURSE_DEVICE=cpu" in devices.describe_device()


def test_tensor_loader_defaults_to_the_chosen_device(machine, monkeypatch):
    machine(cuda=False, mps=True)
    monkeypatch.setattr(
        data, "default_device", lambda: torch.device("cpu")
    )  # we cannot allocate on a fake MPS
    loader = data.TensorLoader(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    assert loader.device.type == "cpu"


def test_mps_trains_in_fp32_without_channels_last():
    mps = torch.device("mps")
    assert train.default_amp(mps, 32) is False
    assert runtime.default_channels_last(resnet18_cbam(), mps) is False
    assert runtime.default_channels_last(resnet18_cbam(), torch.device("cpu")) is True


def test_fused_adamw_only_where_torch_has_the_kernel(monkeypatch):
    import torch.optim.optimizer as opt

    model = resnet18_cbam()
    assert devices.fused_adamw_supported("cpu") and devices.fused_adamw_supported("mps")
    assert finetune.make_optimizer(model).defaults["fused"] is True
    monkeypatch.setattr(opt, "_get_fused_kernels_supported_devices", lambda: ["cuda"])  # an older torch
    assert not devices.fused_adamw_supported("cpu")
    assert not finetune.make_optimizer(model).defaults["fused"]


class OnADeviceWithoutTheKernel:
    """Stands for an MPS tensor: interpolate fails on it, ``.cpu()`` gives the real data."""

    device = torch.device("meta")

    def __init__(self, real):
        self.real = real

    def cpu(self):
        return self.real


def test_resize_falls_back_to_the_cpu_where_the_device_lacks_the_kernel(monkeypatch):
    images = torch.rand(2, 3, 32, 32)
    real = torch.nn.functional.interpolate
    seen = []

    def interpolate(x, **kw):
        seen.append(type(x).__name__)
        if isinstance(x, OnADeviceWithoutTheKernel):
            raise NotImplementedError(
                "aten::_upsample_bilinear2d_aa.out is not implemented for the MPS device"
            )
        return real(x, **kw)

    monkeypatch.setattr(data.F, "interpolate", interpolate)
    out = data.resize(OnADeviceWithoutTheKernel(images), 16, antialias=True)
    assert seen == ["OnADeviceWithoutTheKernel", "Tensor"]
    assert out.device.type == "meta" and out.shape == (2, 3, 16, 16), "moved back to the tensor's device"


def test_resize_on_the_cpu_does_not_hide_errors(monkeypatch):
    def interpolate(x, **kw):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(data.F, "interpolate", interpolate)
    with pytest.raises(NotImplementedError):
        data.resize(torch.rand(1, 3, 8, 8), 4, antialias=True)


@pytest.mark.skipif(not HAS_MPS, reason="needs Apple's MPS (an Apple-silicon Mac with an arm64 torch)")
def test_the_course_path_runs_on_mps():
    mps = torch.device("mps")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    loader = data.TensorLoader(images, labels, 8, train=True, image_size=24, device=mps)
    batch, _ = next(iter(loader))
    assert batch.device.type == "mps" and batch.shape == (8, 3, 24, 24)
    model = resnet18_cbam().to(mps)
    optimizer = finetune.make_optimizer(model)
    loss = torch.nn.functional.cross_entropy(model(batch), labels[:8].to(mps))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------ DataLoader workers
@pytest.mark.parametrize(
    "method, notebook, expected",
    [("spawn", True, 0), ("spawn", False, 2), ("fork", True, 2), ("forkserver", True, 2)],
)
def test_no_worker_processes_from_a_notebook_where_processes_are_spawned(
    monkeypatch, method, notebook, expected
):
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: method)
    monkeypatch.setattr(data, "in_notebook", lambda: notebook)
    assert data.default_num_workers() == expected
    loader = data.plain_loader(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    assert loader.num_workers == expected


def test_the_platforms_default_start_method_counts(monkeypatch):
    """macOS and Windows spawn by default; nothing set explicitly."""
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: None)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn", "forkserver", "fork"])
    monkeypatch.setattr(data, "in_notebook", lambda: True)
    assert data.default_num_workers() == 0


def test_in_notebook_sees_ipykernel_and_scripts(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__="script.py"))
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not data.in_notebook()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert data.in_notebook()


def test_every_notebook_prints_its_device_right_after_its_imports():
    import json
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        first_import = next(
            i for i, c in enumerate(code) if "from course_utils import" in "".join(c["source"])
        )
        device_cell = code[first_import + 1]
        assert "print(devices.describe_device())" in "".join(device_cell["source"]), path.name
        assert "nbval-ignore-output" in device_cell["metadata"].get("tags", []), (
            f"{path.name}: differs per machine"
        )
