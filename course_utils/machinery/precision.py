"""bf16 or fp32, channels_last or not: on the CPU chosen by a short measurement, cached per machine.

CPU flags do not predict which is faster: on an Intel Xeon with AVX512-BF16 and AMX the course's bf16
training step measured *slower* than fp32, on an AMD EPYC faster. So on a CPU with native bf16 the first
``fit`` for a (model kind, input size) times a few training steps of each candidate — fp32 / bf16 autocast,
NCHW / channels_last — on a copy of the model at the batch size at hand (a warm-up step each, not counted;
the candidates take turns so a change of machine load hits them alike; a few seconds in all) and keeps the
fastest. The result is cached per machine in ``precision.json`` in the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on
Windows; under ``course_utils/``), keyed by CPU model, torch version, model kind, input size and thread
count, so later runs pay nothing.

What decides, first match wins, for ``amp`` and ``channels_last`` separately:

1. ``fit``'s explicit ``amp=`` / ``channels_last=`` arguments;
2. the environment: ``COURSE_AMP`` / ``COURSE_CHANNELS_LAST`` = ``on`` | ``off`` | ``auto``
   (auto: as if unset);
3. on a CPU with native bf16, inputs of at least 32×32 and a known input size: the cached or new measurement
   (bf16 only if at least 3% faster than fp32: within the noise fp32, the exact one;
   ``COURSE_PRECISION=rule`` switches measuring off — the test suite and CI do that, so their runs are
   deterministic and never pay for a measurement);
4. the rule: bf16 where the hardware has it natively (CUDA; a CPU with AVX512-BF16 or AMX) — but on the CPU
   never for inputs smaller than 32×32 (see :func:`rule_amp`); channels_last on CUDA and for ResNets on the
   CPU.

Where bf16 is emulated (most laptops: AVX2 only) nothing is measured: fp32 there, always.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .devices import keep_freed_memory

CACHE_VERSION = 2  # 2: timed under the allocator setting fit trains with (devices.keep_freed_memory)
ENV_AMP, ENV_CHANNELS_LAST, ENV_MODE = "COURSE_AMP", "COURSE_CHANNELS_LAST", "COURSE_PRECISION"
MIN_BF16_SIDE = 32
STEPS, WARMUP = 3, 1
BF16_MARGIN = 0.03  # bf16 is chosen only if it measured at least 3% faster than fp32 (fp32 is the exact one)
_ON, _OFF, _AUTO = ("on", "1", "true", "yes"), ("off", "0", "false", "no"), ("auto", "")


@dataclass
class Choice:
    """What the course path computes in, and why (``source``: per setting, ``argument`` | ``env`` |
    ``measured`` | ``cached`` | ``rule``). ``images_per_s``: the measured candidates, when measured."""

    amp: bool
    channels_last: bool
    source: dict = field(default_factory=dict)
    images_per_s: dict = field(default_factory=dict)
    key: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        text = (
            f"{'bf16 autocast' if self.amp else 'fp32'} ({self.source.get('amp', '?')}), "
            f"{'channels_last' if self.channels_last else 'NCHW'} ({self.source.get('channels_last', '?')})"
        )
        if self.images_per_s:
            text += "; measured train img/s: " + ", ".join(
                f"{k} {v:.0f}" for k, v in self.images_per_s.items()
            )
        return text


# ------------------------------------------------------------------------------ hardware and the rule
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX.

    On other CPUs (most laptops: AVX2 only) bf16 is emulated and slower than fp32, so it stays off there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(
        getattr(torch.cpu, check, lambda: False)()
        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def _sides(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    return sides[-2:]


def rule_amp(device: torch.device, image_size=None) -> bool:
    """bf16 wherever the hardware has it natively; fp32 elsewhere.

    On the CPU, not for inputs smaller than 32×32 (``image_size``: an int or ``(H, W)``): there a stride-2
    3×3 convolution meets a 1×1 map (ResNet's layer4 at 16×16 input), and oneDNN's bf16 kernel for its
    weight gradient returns NaN or infinity now and then (measured with torch 2.14.1: 16-51 of 100 steps).
    """
    device = torch.device(device)
    if not native_bf16(device):
        return False
    sides = _sides(image_size)
    return not (device.type == "cpu" and sides is not None and min(sides) < MIN_BF16_SIDE)


def rule_channels_last(model: nn.Module | None, device: torch.device) -> bool:
    """On CUDA always; on the CPU for ResNets (measured faster), not for VGG (measured slower)."""
    device_type = torch.device(device).type  # not on MPS, whose convolutions work in NCHW
    return device_type == "cuda" or (
        device_type == "cpu" and model is not None and type(model).__name__.startswith("ResNet")
    )


def cpu_name() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s ``model name`` on Linux)."""
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if names:
            return names[0].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or platform.machine()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def loader_image_size(loader) -> tuple[int, int] | None:
    """The input size a loader will hand over, where it says so without being iterated (TensorLoader)."""
    size = getattr(loader, "image_size", None)
    if size:
        return _sides(size)
    images = getattr(loader, "images", None)
    return tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) and images.ndim == 4 else None


# ------------------------------------------------------------------------------ environment
def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in _AUTO:
        return None
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"{name}={os.environ[name]!r} is not understood: set it to on, off or auto (or unset it)"
    )


def _measuring() -> bool:
    mode = os.environ.get(ENV_MODE, "measure").strip().lower() or "measure"
    if mode not in ("measure", "rule"):
        raise ValueError(
            f"{ENV_MODE}={os.environ[ENV_MODE]!r} is not understood: set it to measure "
            f"(the default: time the candidates once per machine) or rule (no measurement)"
        )
    return mode == "measure"


# ------------------------------------------------------------------------------ the cache
def cache_path() -> Path:
    """``course_utils/precision.json`` in the user's cache folder (see the module docstring)."""
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "course_utils" / "precision.json"


def model_kind(model: nn.Module) -> str:
    """Class name and parameter count: tells ResNet18 from ResNet18+CBAM, the CIFAR stem from ImageNet's."""
    return f"{type(model).__name__}/{sum(p.numel() for p in model.parameters())}"


def cache_key(model: nn.Module, image_size, threads: int | None = None) -> str:
    h, w = _sides(image_size)
    threads = threads or torch.get_num_threads()
    return f"{cpu_name()} | torch {torch.__version__} | {model_kind(model)} | {h}x{w} | {threads} threads"


def read_cache(path: Path | None = None) -> dict:
    """``{key: entry}``; a missing, unreadable or corrupted file reads as empty (a corrupted one with a
    warning)."""
    path = path or cache_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        warnings.warn(f"cannot read the precision cache {path} ({err}); measuring afresh", stacklevel=2)
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
        entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
        if not isinstance(entries, dict):
            raise TypeError("entries is not a mapping")
        return {k: v for k, v in entries.items() if _valid_entry(v)}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        warnings.warn(
            f"the precision cache {path} is corrupted ({err}); it is ignored and rewritten", stacklevel=2
        )
        return {}


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("images_per_s"), dict)
        and entry["images_per_s"]
        and all(
            k in CANDIDATES and isinstance(v, (int, float)) and v > 0
            for k, v in entry["images_per_s"].items()
        )
    )


def write_cache(entries: dict, path: Path | None = None) -> bool:
    """Atomically (temporary file, rename); ``False`` with a warning where the folder is not writable."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError as err:
        warnings.warn(
            f"cannot write the precision cache {path} ({err}); the choice holds for this process only",
            stacklevel=2,
        )
        return False


_MEMO: dict[tuple[str, str], dict] = {}  # (cache file, key) -> entry: no file read per fit/evaluate call


# ------------------------------------------------------------------------------ the measurement
CANDIDATES = {
    "fp32 NCHW": (False, False),
    "fp32 channels_last": (False, True),
    "bf16 NCHW": (True, False),
    "bf16 channels_last": (True, True),
}


def measure(
    model: nn.Module,
    image_size,
    batch_size: int = 128,
    candidates=tuple(CANDIDATES),
    *,
    steps: int = STEPS,
    warmup: int = WARMUP,
    timer=time.perf_counter,
) -> dict[str, float]:
    """Train images/s of each candidate (names of :data:`CANDIDATES`): forward, cross-entropy and backward
    of a copy of ``model`` (all parameters trainable) on random images of ``image_size`` at ``batch_size``,
    on the CPU. The candidates take turns, ``warmup`` rounds are not counted, the median of ``steps`` is."""
    h, w = _sides(image_size)
    keep_freed_memory("cpu")  # time the candidates as fit will run them
    probe = copy.deepcopy(model).cpu().train()
    for m in probe.modules():  # the user's hooks (live plots, tests) must not see the probe's passes
        m._forward_hooks.clear(), m._forward_pre_hooks.clear(), m._backward_hooks.clear()
    for p in probe.parameters():
        p.requires_grad_(True)
    with torch.random.fork_rng(
        devices=[]
    ):  # dropout in the probe leaves the caller's random stream as it was
        return _time_candidates(probe, h, w, batch_size, candidates, steps, warmup, timer)


def _time_candidates(probe, h, w, batch_size, candidates, steps, warmup, timer) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, h, w, generator=g)
    with torch.no_grad():
        classes = probe.eval()(images[:2]).shape[-1]
    probe.train()
    labels = torch.randint(0, classes, (batch_size,), generator=g)
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + steps):
        for name in candidates:
            amp, channels_last = CANDIDATES[name]
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            probe.to(memory_format=fmt)
            x = images.contiguous(memory_format=fmt)
            probe.zero_grad(set_to_none=True)
            start = timer()
            with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
                logits = probe(x)
                loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            elapsed = timer() - start
            if round_ >= warmup:
                seconds[name].append(elapsed)
    return {name: batch_size / max(statistics.median(s), 1e-9) for name, s in seconds.items()}


# ------------------------------------------------------------------------------ the choice
def choose(
    device,
    model: nn.Module | None = None,
    image_size=None,
    batch_size: int | None = None,
    *,
    amp: bool | None = None,
    channels_last: bool | None = None,
    measure_fn=None,
    cache_file: Path | None = None,
) -> Choice:
    """``amp`` and ``channels_last`` for training ``model`` at ``image_size`` on ``device`` (module docstring:
    argument > ``COURSE_AMP``/``COURSE_CHANNELS_LAST`` > measurement on a native-bf16 CPU > rule)."""
    device = torch.device(device)
    amp, channels_last, source = _arguments_and_env(amp, channels_last)
    if amp is not None and channels_last is not None:
        return Choice(bool(amp), bool(channels_last), source)
    sides = _sides(image_size)
    if not _can_measure(device, model, sides):
        return _by_rule(device, model, sides, amp, channels_last, source)
    found = _measurement(model, sides, batch_size, measure_fn, cache_file)
    if found is None:  # the measurement failed (now or earlier in this process): the rule
        return _by_rule(device, model, sides, amp, channels_last, source)
    entry, how, key = found
    figures = entry["images_per_s"]
    best = _fastest(figures, amp, channels_last)
    if best is None:  # an entry without the candidate a fixed setting needs: the rule for the other one
        best, how = (rule_amp(device, sides), rule_channels_last(model, device)), "rule"
    if amp is None:
        amp, source["amp"] = best[0], how
    if channels_last is None:
        channels_last, source["channels_last"] = best[1], how
    return Choice(bool(amp), bool(channels_last), source, dict(figures), key)


def _arguments_and_env(amp, channels_last) -> tuple[bool | None, bool | None, dict]:
    """Steps 1 and 2 of the module docstring: ``(amp, channels_last, source)``, ``None`` where still open."""
    source = {}
    env_amp, env_cl = _env_switch(ENV_AMP), _env_switch(ENV_CHANNELS_LAST)
    if amp is not None:
        source["amp"] = "argument"
    elif env_amp is not None:
        amp, source["amp"] = env_amp, "env"
    if channels_last is not None:
        source["channels_last"] = "argument"
    elif env_cl is not None:
        channels_last, source["channels_last"] = env_cl, "env"
    return amp, channels_last, source


def _can_measure(device: torch.device, model, sides) -> bool:
    """A CPU with native bf16, a model, a known input size of at least 32×32, and measuring switched on."""
    return (
        device.type == "cpu"
        and model is not None
        and sides is not None
        and native_bf16(device)
        and min(sides) >= MIN_BF16_SIDE
        and _measuring()
    )


def _measurement(model, sides, batch_size, measure_fn, cache_file) -> tuple[dict, str, str] | None:
    """``(entry, "cached" | "measured", key)`` for ``model`` at ``sides`` from this process's memo, the cache
    file or a new measurement (then written to the cache); ``None`` where measuring failed (with a
    warning)."""
    path = Path(cache_file) if cache_file else cache_path()
    key = cache_key(model, sides)
    entry = _MEMO.get((str(path), key))
    if entry == {}:  # the measurement failed earlier in this process: the rule, without trying again
        return None
    if entry is not None:
        return entry, "cached", key
    entries = read_cache(path)
    entry, how = entries.get(key), "cached"
    if entry is None:
        try:
            figures = (measure_fn or measure)(model, sides, batch_size or 128)
        except Exception as err:  # a model the probe cannot copy or run: the rule, and say so
            warnings.warn(
                f"could not measure bf16/fp32 for {type(model).__name__} ({err!r}); using the rule",
                stacklevel=3,
            )
            _MEMO[(str(path), key)] = {}
            return None
        entry, how = _new_entry(figures, batch_size), "measured"
        entries[key] = entry
        write_cache(entries, path)
    _MEMO[(str(path), key)] = entry
    return entry, how, key


def _new_entry(figures: dict[str, float], batch_size: int | None) -> dict:
    return {
        "images_per_s": {k: round(float(v), 1) for k, v in figures.items()},
        "batch_size": batch_size or 128,
        "steps": STEPS,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fastest(figures: dict[str, float], amp, channels_last) -> tuple[bool, bool] | None:
    """``(amp, channels_last)`` of the fastest measured candidate that fits the fixed settings (bf16 only
    where it beats fp32 by :data:`BF16_MARGIN`); ``None`` if no measured candidate fits them."""
    fits = {
        name: v
        for name, v in figures.items()
        if (amp is None or CANDIDATES[name][0] == amp)
        and (channels_last is None or CANDIDATES[name][1] == channels_last)
    }
    if not fits:
        return None
    best = max(fits, key=fits.get)
    fp32 = [name for name in fits if not CANDIDATES[name][0]]
    if CANDIDATES[best][0] and fp32:  # bf16 only where it pays: within BF16_MARGIN of fp32, fp32
        best_fp32 = max(fp32, key=fits.get)
        if fits[best] < fits[best_fp32] * (1 + BF16_MARGIN):
            best = best_fp32
    return CANDIDATES[best]


def _by_rule(device, model, sides, amp, channels_last, source) -> Choice:
    if amp is None:
        amp, source["amp"] = rule_amp(device, sides), "rule"
    if channels_last is None:
        channels_last, source["channels_last"] = rule_channels_last(model, device), "rule"
    return Choice(bool(amp), bool(channels_last), source)


def describe(device="cpu") -> str:
    """A few lines for ``python -m course_utils doctor``: native bf16, the overrides, the cached choices."""
    device = torch.device(device)
    lines = [
        f"CPU: {cpu_name()}; native bf16: {'yes' if native_bf16(device) else 'no (fp32 always)'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    ]
    env = {name: os.environ.get(name) for name in (ENV_AMP, ENV_CHANNELS_LAST, ENV_MODE)}
    set_ = ", ".join(f"{k}={v}" for k, v in env.items() if v)
    lines.append(
        f"precision overrides: {set_ or 'none'} (COURSE_AMP / COURSE_CHANNELS_LAST = on|off|auto; "
        f"COURSE_PRECISION=rule: no measurement)"
    )
    path = cache_path()
    entries = read_cache(path)
    mine = {k: v for k, v in entries.items() if k.startswith(cpu_name() + " |")}
    if not mine:
        lines.append(
            f"precision cache {path}: nothing measured on this machine yet"
            + (" (measured at the first fit on the CPU)" if native_bf16(device) else "")
        )
    for key, entry in mine.items():
        figures = entry["images_per_s"]
        best = max(figures, key=figures.get)
        lines.append(
            f"  {key.split(' | ', 1)[1]}: {best} — "
            + ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
            + " train img/s"
        )
    if mine:
        lines.insert(2, f"precision cache {path}:")
    return "\n".join(lines)
