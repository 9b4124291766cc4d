"""Shared fixtures: tiny seeded data, an isolated TORCH_HOME, a random torchvision ResNet18 state_dict file.

Everything is seeded; the models are the course's ResNet18 with the ImageNet stem at 32×32 (the cheapest
configuration on a CPU) and the data a few dozen images, so the suite runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import errno
import os
import random
import socket

import pytest
import torch

# One intra-op thread: bit-for-bit reproducible runs (the SIGKILL test compares a subprocess with this
# process) and no collapse when the 2 cores are shared (OpenMP's spinning threads made a forward pass
# 60× slower under load). COURSE_TEST_THREADS overrides it; tests/_train_worker.py reads it too.
TEST_THREADS = int(os.environ.get("COURSE_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
# No bf16/fp32 measurement in tests (nor in the notebooks they run: kernels inherit the environment):
# fit's defaults follow the fixed rule, so runs are deterministic and never pay for timing candidates.
# tests/test_precision.py tests the measurement itself.
os.environ.setdefault("COURSE_PRECISION", "rule")

from _helpers import make_loaders, random_images  # noqa: E402 - after the environment above

from course_utils import data as cdata  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)  # again: a test elsewhere (a benchmark) may have changed it
    yield


@pytest.fixture(scope="session")
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """96 random uint8 32×32 images with labels (seeded)."""
    return random_images(96)


@pytest.fixture
def loaders(tiny_data):
    """Fresh loaders over 64 tiny images: 2 training batches of 32 per epoch."""
    images, labels = tiny_data
    return make_loaders(images, labels, batch_size=32, n_train=64)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision/torch.hub cache: ``$TORCH_HOME`` points to a fresh temporary folder."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called torch.hub.set_dir
    return home


@pytest.fixture(scope="session")
def resnet18_state_file(tmp_path_factory):
    """A seeded random torchvision ResNet18 state_dict saved with torch.save: stands in for ImageNet
    weights."""
    from torchvision.models import resnet18

    torch.manual_seed(1234)
    net = resnet18(weights=None)
    # Make BatchNorm non-trivial so a wrong or missing load cannot go unnoticed.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cifar_subset():
    """The shipped real CIFAR-10 subset (no download attempted): 500 train / 200 val, class-balanced."""
    return cdata.load_cifar10(train_size=500, val_size=200, download=False, verbose=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails at once, as on an offline machine."""

    def refuse(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable (simulated by the test)")

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (simulated by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def self_hashed_imagenet(torch_home, resnet18_state_file, monkeypatch):
    """The random ResNet18 state_dict in the empty torchvision cache as ``resnet18-<its own sha256[:8]>.pth``,
    with torchvision's ImageNet URL pointing to that name (a generated file cannot match f37072fd), so the
    course's hash check passes for it as it does for the real download. Returns the cached file."""
    import hashlib
    import shutil

    from torchvision.models import ResNet18_Weights

    prefix = hashlib.sha256(resnet18_state_file.read_bytes()).hexdigest()[:8]
    weights = ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/resnet18-{prefix}.pth")
    cache = torch_home / "hub" / "checkpoints" / f"resnet18-{prefix}.pth"
    cache.parent.mkdir(parents=True)
    shutil.copy(resnet18_state_file, cache)
    return cache


@pytest.fixture(scope="session")
def smoke_notebooks(tmp_path_factory):
    """``run(path) -> executed copy``: each notebook executed by papermill at smoke at most once per session,
    into one temporary folder (tests/test_notebooks.py checks each run, tests/test_book.py renders them all).
    A failed run raises again for every test that asks for it."""
    from test_notebooks import execute_smoke

    out_dir = tmp_path_factory.mktemp("smoke_run")
    done: dict = {}

    def run(path):
        if path.name not in done:
            try:
                done[path.name] = execute_smoke(path, out_dir)
            except Exception as err:  # noqa: BLE001 - re-raised below, for this and every later caller
                done[path.name] = err
        if isinstance(done[path.name], Exception):
            raise done[path.name]
        return done[path.name]

    return run
