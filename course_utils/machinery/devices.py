"""Which device the course computes on, and why: CUDA, else Apple's MPS, else the CPU.

``COURSE_DEVICE=cpu|cuda|cuda:1|mps`` overrides the choice (a device that is not there is refused with the
reason). Every notebook prints :func:`describe_device` in its setup cell.

What differs per device (the defaults :func:`~course_utils.train.fit` takes from here and from ``train``):

* precision — bf16 autocast on CUDA; on a CPU with native bf16 whichever of bf16/fp32 measured faster for
  the model and input size at hand (:mod:`course_utils.machinery.precision`, cached per machine); fp32 on
  other CPUs; **fp32 on MPS** (bf16 there is not measured faster and older macOS versions lack it);
* ``channels_last`` — CUDA, and ResNets on the CPU unless the measurement says otherwise
  (``train.default_channels_last``); not on MPS, whose convolutions take NCHW natively;
* fused AdamW — CPU, CUDA, and MPS where torch has the fused kernel (:func:`fused_adamw_supported`);
* data on the device — ``TensorLoader`` draws its random crops with a CPU ``torch.Generator`` and resizes
  with ``F.interpolate(antialias=True)`` only when shrinking, both of which work on MPS
  (tests/test_devices.py runs them there);
* memory on a Linux CPU — :func:`keep_freed_memory`: glibc's ``malloc`` hands every training step's large
  tensors back to the kernel and faults fresh zeroed pages in for the next step (measured on a 2-core Xeon,
  batch 128 at 32×32: ResNet18+CBAM 15,000 page faults per step, ~10 % of the step; VGG16+CBAM 250,000,
  ~25 %); ``fit`` keeps that memory in the process while it trains and returns it at the end.
  ``COURSE_MALLOC=default`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

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
            raise ValueError(
                f"{ENV}={wanted!r}, but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                f"run `python -m course_utils doctor` for the fix, or unset {ENV}"
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{ENV}={wanted!r}, but there are only {torch.cuda.device_count()} CUDA devices")
        if device.type == "mps" and not _mps_available():
            raise ValueError(
                f"{ENV}={wanted!r}, but MPS is not available here (it needs an Apple-silicon Mac, "
                f"macOS 12.3+ and an arm64 Python); unset {ENV}"
            )
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{ENV}={wanted!r}: the course supports cpu, cuda and mps")
        return device, f"由 {ENV}={wanted} 指定 (set by {ENV})"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"找到 CUDA GPU：{torch.cuda.get_device_name(0)}"
    if _mps_available():
        return torch.device("mps"), "没有 CUDA GPU；找到 Apple GPU (MPS)"
    cuda_build = torch.version.cuda
    why = "这个 torch 支持 CUDA，但看不到 GPU" if cuda_build else "这个 torch 不支持 CUDA (CPU-only build)"
    threads = torch.get_num_threads()
    return torch.device(
        "cpu"
    ), f"没有 CUDA GPU，也没有 Apple MPS（{why}）；使用 {threads} 个 CPU 线程 (threads)"


def default_device() -> torch.device:
    """CUDA, else MPS, else the CPU (``$COURSE_DEVICE`` overrides)."""
    return choose_device()[0]


def describe_device(device: torch.device | str | None = None) -> str:
    """One line for a notebook: the device ``fit`` will use and why."""
    if device is None:
        device, reason = choose_device()
    else:
        device, reason = torch.device(device), "由调用者指定 (chosen by the caller)"
    return f"设备 (device)：{device} — {reason}"


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device`` with this torch (CPU: torch 2.4+;
    MPS: torch 2.4+ as well; CUDA: always within the supported range)."""
    device_type = torch.device(device).type
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return device_type in ("cpu", "cuda")
    return device_type in _get_fused_kernels_supported_devices()


# ------------------------------------------------------------------------------ CPU memory (glibc malloc)
MALLOC_ENV = "COURSE_MALLOC"  # "keep" (default): keep_freed_memory tunes glibc; "default": leave it alone
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1  # largest value mallopt's int takes: free memory stays in the process
_malloc = {"state": None, "libc": None}  # what keep_freed_memory did (state) and the C library it used
_KEPT = "kept: glibc malloc serves large tensors from the heap and keeps freed memory while fit trains"


def _glibc():
    """glibc's C library through ctypes, or None (macOS, Windows, musl, no ctypes)."""
    if _malloc["libc"] is None:
        libc = False
        try:
            if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes, libc.malloc_trim.argtypes = (
                    (ctypes.c_int, ctypes.c_int),
                    (ctypes.c_size_t,),
                )
        except (AttributeError, OSError, ValueError):
            libc = False
        _malloc["libc"] = libc
    return _malloc["libc"] or None


def malloc_setting(env: dict | None = None) -> str:
    """``$COURSE_MALLOC``: ``"keep"`` (also when unset) or ``"default"``; anything else is refused (``fit``
    checks it with its other arguments, before anything changes)."""
    env = os.environ if env is None else env
    wanted = env.get(MALLOC_ENV, "keep").strip().lower() or "keep"
    if wanted not in ("keep", "default"):
        raise ValueError(
            f"{MALLOC_ENV}={env.get(MALLOC_ENV)!r}: use keep (the default) or default "
            f"(leave glibc's malloc as it is)"
        )
    return wanted


def keep_freed_memory(device="cpu", env: dict | None = None) -> str:
    """Before training on the CPU with glibc (Linux): serve large tensors from the heap instead of fresh
    ``mmap``s (``M_MMAP_MAX=0``) and do not give freed memory back to the kernel while training
    (``M_TRIM_THRESHOLD``), so each step reuses the pages of the last one instead of page-faulting ~1 GB
    of zeroed pages in (the reason Intel's tuning guides preload jemalloc or tcmalloc). Process-wide and
    kept once set; :func:`release_freed_memory` (called at the end of ``fit``) returns the free memory.
    The peak is unchanged. Returns what was done, in words (also :func:`malloc_state`); does nothing on
    other devices, on other C libraries, or with ``COURSE_MALLOC=default``."""
    if torch.device(device).type != "cpu":
        return malloc_state()
    wanted = malloc_setting(env)
    if _malloc["state"] == _KEPT:
        return _KEPT
    libc = _glibc()
    if wanted == "default":
        _malloc["state"] = f"glibc defaults ({MALLOC_ENV}=default)"
    elif libc is None:
        _malloc["state"] = f"left alone: not glibc ({sys.platform})"
    elif libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD):
        _malloc["state"] = _KEPT
    else:
        _malloc["state"] = "left alone: glibc refused mallopt"
    return _malloc["state"]


def release_freed_memory() -> bool:
    """Give the memory ``fit`` freed back to the kernel (``malloc_trim``), where :func:`keep_freed_memory`
    kept it. Returns whether anything was returned."""
    libc = _glibc()
    if libc is None or _malloc["state"] != _KEPT:
        return False
    return bool(libc.malloc_trim(0))


def malloc_state() -> str:
    """What :func:`keep_freed_memory` did in this process, in words."""
    return _malloc["state"] or "glibc defaults (nothing has trained on the CPU in this process yet)"


def malloc_plan(env: dict | None = None) -> str:
    """What ``fit`` on the CPU will do with glibc's malloc here (for ``doctor``), without doing it; a wrong
    ``$COURSE_MALLOC`` raises the ``ValueError`` that ``fit`` would."""
    if malloc_setting(env) == "default":
        return f"fit leaves glibc's malloc as it is ({MALLOC_ENV}=default)"
    if _glibc() is None:
        return f"fit leaves the C library's malloc alone here (not glibc: {sys.platform})"
    return (
        f"fit keeps each training step's memory for the next (glibc mallopt; no page faults per step) and "
        f"returns it when it ends; {MALLOC_ENV}=default switches that off"
    )
