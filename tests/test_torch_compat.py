"""The code paths that depend on the torch / torchvision version (tested: 2.14.1 / 0.29.1; the GPU machine:
2.11.0 / 0.26.0; students: whatever they have).

What was compared (the 2.11.0 and 0.26.0 wheels' sources, read, not installed — the PyPI build of torch
2.11 is the CUDA one, 530 MB plus several GB of NVIDIA libraries, so it cannot run here): torchvision's
``datasets/cifar.py``, ``models/resnet.py`` and ``models/vgg.py`` are identical; ``torch/optim/adam.py``
differs only cosmetically (fused kernels on "cpu" and "cuda", ``found_inf`` honoured by the fused step);
``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` exist in both; ``torch.load``'s
``weights_only`` defaults to True in both. The tests below pin what ``course_utils`` relies on and check the
fallbacks where an attribute is private or may be missing in other versions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from course_utils import train
from course_utils.machinery import datafiles, precision
from course_utils.train import NonFiniteLossWatch

PACKAGE = Path(train.__file__).resolve().parent


@pytest.mark.parametrize("present", [(), ("_is_amx_tile_supported",), ("_is_avx512_bf16_supported",)])
def test_bf16_detection_falls_back_when_torch_cpu_lacks_the_private_checks(monkeypatch, present):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in present:
            monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    assert precision.native_bf16(torch.device("cpu")) is bool(present)
    assert train.default_amp(torch.device("cpu"), 32) is bool(present)
    assert precision.native_bf16(torch.device("cuda")) is True  # decided without touching torch.cuda


def test_found_inf_skips_the_fused_adamw_step_on_this_torch():
    """``NonFiniteLossWatch`` relies on it on CUDA; the CPU's fused kernel honours it the same way."""
    weight = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.sum().backward()
    opt.step()
    after_one = weight.detach().clone()
    opt.found_inf = torch.ones(())
    weight.grad = torch.full_like(weight, float("nan"))
    opt.step()
    assert torch.equal(weight.detach(), after_one) and float(opt.state[weight]["step"]) == 1.0
    opt.found_inf = torch.zeros(())
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert not torch.equal(weight.detach(), after_one) and float(opt.state[weight]["step"]) == 2.0


def test_an_optimizer_without_a_fused_default_is_checked_on_the_host(monkeypatch):
    """Older or other optimizers have no ``fused`` key in ``defaults``: the host checks each step."""
    monkeypatch.setattr(NonFiniteLossWatch, "DEFER_ON", ("cuda", "cpu"))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=True)
    monkeypatch.delitem(opt.defaults, "fused")
    watch = NonFiniteLossWatch(opt, torch.device("cpu"))
    assert not watch.defer and not hasattr(opt, "found_inf")


def torch_load_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                yield path.name, node


def test_every_torch_load_says_weights_only():
    """Its default changed (False before 2.6, True since): each call says what it wants."""
    calls = list(torch_load_calls())
    assert calls, "expected torch.load calls in course_utils"
    for name, call in calls:
        assert any(k.arg == "weights_only" for k in call.keywords), (
            f"{name}:{call.lineno}: torch.load without weights_only"
        )


def test_torchvision_cifar10_has_what_the_local_copy_reader_replaces():
    from torchvision.datasets import CIFAR10

    assert CIFAR10.base_folder == "cifar-10-batches-py"
    assert [name for name, _ in CIFAR10.train_list] == [f"data_batch_{k}" for k in range(1, 6)]
    assert [name for name, _ in CIFAR10.test_list] == ["test_batch"]
    assert CIFAR10.meta["filename"] == "batches.meta" and CIFAR10.meta["key"] == "label_names"
    assert datafiles.torchvision_cifar10(Path("/nonexistent")) is CIFAR10  # no manifest: torchvision's own


def test_torchvision_weight_enums_and_file_names():
    """The file names (with their sha256 prefix) the weights cache and mirrors look for."""
    from torchvision.models import ResNet18_Weights, VGG16_Weights

    assert ResNet18_Weights.IMAGENET1K_V1.url.endswith("/resnet18-f37072fd.pth")
    assert VGG16_Weights.IMAGENET1K_V1.url.endswith("/vgg16-397923af.pth")
