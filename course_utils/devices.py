"""Which device the course computes on, and why: CUDA, else Apple's MPS, else the CPU.

``COURSE_DEVICE=cpu|cuda|cuda:1|mps`` overrides the choice (a device that is not there is refused with the
reason). Every notebook prints :func:`describe_device` in its setup cell.

What differs per device (the defaults :func:`~course_utils.train.fit` takes from here and from ``train``):

* precision — bf16 autocast on CUDA; on a CPU with native bf16 whichever of bf16/fp32 measured faster for
  the model and input size at hand (:mod:`course_utils.precision`, cached per machine); fp32 on other CPUs;
  **fp32 on MPS** (bf16 there is not measured faster and older macOS versions lack it);
* ``channels_last`` — CUDA, and ResNets on the CPU unless the measurement says otherwise
  (``train.default_channels_last``); not on MPS, whose convolutions take NCHW natively;
* fused AdamW — CPU, CUDA, and MPS where torch has the fused kernel (:func:`fused_adamw_supported`);
* data on the device — ``TensorLoader`` draws its random crops with a CPU ``torch.Generator`` and resizes
  with ``F.interpolate(antialias=True)`` only when shrinking, both of which work on MPS
  (tests/test_devices.py runs them there).
"""
from __future__ import annotations

import os

import torch

ENV = "COURSE_DEVICE"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def choose_device(env: dict | None = None) -> tuple[torch.device, str]:
    """``(device, reason)``: ``$COURSE_DEVICE`` if set, else CUDA, else MPS, else the CPU."""
    env = os.environ if env is None else env
    wanted = env.get(ENV, "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as err:
            raise ValueError(f"{ENV}={wanted!r} is not a device: use cpu, cuda, cuda:N or mps") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{ENV}={wanted!r}, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             f"run `python -m course_utils doctor` for the fix, or unset {ENV}")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{ENV}={wanted!r}, but there are only {torch.cuda.device_count()} CUDA devices")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"{ENV}={wanted!r}, but MPS is not available here (it needs an Apple-silicon Mac, "
                             f"macOS 12.3+ and an arm64 Python); unset {ENV}")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{ENV}={wanted!r}: the course supports cpu, cuda and mps")
        return device, f"set by {ENV}={wanted}"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    if _mps_available():
        return torch.device("mps"), "no CUDA GPU; Apple GPU (MPS) found"
    cuda_build = torch.version.cuda
    why = ("this torch is a CUDA build but sees no GPU" if cuda_build else "this torch has no CUDA support")
    return torch.device("cpu"), f"no CUDA GPU and no Apple MPS ({why}); {torch.get_num_threads()} CPU threads"


def default_device() -> torch.device:
    """CUDA, else MPS, else the CPU (``$COURSE_DEVICE`` overrides)."""
    return choose_device()[0]


def describe_device(device: torch.device | str | None = None) -> str:
    """One line for a notebook: the device ``fit`` will use and why."""
    if device is None:
        device, reason = choose_device()
    else:
        device, reason = torch.device(device), "chosen by the caller"
    return f"device: {device} — {reason}"


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device`` with this torch (CPU: torch 2.4+;
    MPS: torch 2.4+ as well; CUDA: always within the supported range)."""
    device_type = torch.device(device).type
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return device_type in ("cpu", "cuda")
    return device_type in _get_fused_kernels_supported_devices()
