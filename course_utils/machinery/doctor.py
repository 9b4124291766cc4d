"""``python -m course_utils doctor``: one screen about this machine, each line a finding and, where something
is wrong, the exact fix. Exit status 1 when something blocks the course, else 0.

It runs with a bare Python too: the module imports the standard library only, and each check imports what
it looks at (torch, matplotlib, ...) itself. Every probe of the outside world is a method of :class:`Probes`,
so that the tests can stand in for a machine with a GPU, without weights, offline, and so on.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import bootstrap

ROOT = bootstrap.ROOT
OK, NOTE, WARN, FAIL = "ok", "note", "warn", "FAIL"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
WEIGHTS = {"resnet18": "resnet18-f37072fd.pth", "vgg16": "vgg16-397923af.pth"}
# PyTorch's CUDA wheel indexes, oldest first: the fix for a CPU-only torch names the newest the driver runs.
CUDA_WHEELS = ("cu118", "cu121", "cu124", "cu126", "cu128", "cu129", "cu130")


@dataclass
class Finding:
    level: str  # OK, NOTE, WARN or FAIL (FAIL: blocks the course)
    topic: str
    text: str
    fix: str = ""


def tested_versions(root: Path = ROOT) -> dict[str, str]:
    """``{"torch": "2.14.1", ...}`` from constraints.txt (lines ``name==version``, markers ignored)."""
    versions = {}
    path = root / bootstrap.CONSTRAINTS
    for line in path.read_text().splitlines() if path.exists() else ():
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;]+)", line)
        if match:
            versions[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return versions


class Probes:
    """Everything doctor looks at outside itself; tests replace single methods."""

    def module(self, name: str):
        """The imported module, or ``None`` when it is not installed."""
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    def import_error(self, name: str) -> str | None:
        """Why ``import name`` fails, or ``None`` when it works."""
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 — a broken binary raises RuntimeError, OSError, ...
            return f"{type(err).__name__}: {err}"
        return None

    def version(self, distribution: str) -> str | None:
        return bootstrap.installed_version(distribution)

    def nvidia_smi(self) -> str | None:
        """``nvidia-smi``'s output, or ``None`` without it."""
        exe = shutil.which("nvidia-smi")
        if not exe:
            return None
        try:
            return subprocess.run([exe], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    def nvidia_proc(self) -> str | None:
        """Linux: the kernel driver's version line, even without nvidia-smi."""
        path = Path("/proc/driver/nvidia/version")
        return path.read_text(errors="replace") if path.exists() else None

    def reachable(self, url: str, timeout: float = 3.0) -> bool:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                return r.status < 400
        except Exception:  # noqa: BLE001 — any failure means "not downloadable from here"
            return False

    def path_exists(self, path: Path) -> bool:
        return Path(path).exists()

    def file_size(self, path: Path) -> int:
        return Path(path).stat().st_size

    def weights_path(self, arch: str) -> Path:
        """Where torchvision keeps ``arch``'s ImageNet weights (``weights.weights_cache_path`` where it
        exists)."""
        weights = self.module("course_utils.machinery.weights")
        if weights is not None and hasattr(weights, "weights_cache_path"):
            return Path(weights.weights_cache_path(arch))
        hub = self.module("torch.hub")
        if hub is not None:
            return Path(hub.get_dir()) / "checkpoints" / WEIGHTS[arch]
        home = (
            os.environ.get("TORCH_HOME")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
        )
        return Path(home) / "hub" / "checkpoints" / WEIGHTS[arch]

    def labextension_dirs(self) -> list[Path]:
        paths = self.module("jupyter_core.paths")
        if paths is not None:
            return [Path(p) for p in paths.jupyter_path("labextensions")]
        return [Path(sys.prefix) / "share" / "jupyter" / "labextensions"]

    def cjk_font(self) -> str | None | bool:
        """The font figures use for Chinese (``plots.cjk_font``); ``False`` without matplotlib/torch."""
        plots = self.module("course_utils.plots") if self.module("torch") is not None else None
        return False if plots is None else plots.cjk_font()

    def environ(self) -> dict:
        return dict(os.environ)


# ------------------------------------------------------------------------------ the checks
def check_python(p: Probes) -> list[Finding]:
    here = ".".join(map(str, sys.version_info[:3]))
    tested = "3.11"
    where = f"{sys.executable}" + (" (the project's .venv)" if bootstrap.in_venv(ROOT / ".venv") else "")
    if sys.version_info < (3, 10):  # noqa: UP036 — doctor runs under any Python, to say that this one is too old
        return [
            Finding(
                FAIL,
                "python",
                f"{here} at {where}: the course needs Python 3.10 or newer",
                "install Python 3.11 from python.org (Windows: the py launcher) and run the command with it",
            )
        ]
    findings = [
        Finding(
            OK if here.startswith(tested + ".") else NOTE, "python", f"{here} at {where} (tested: {tested})"
        )
    ]
    stamp = ROOT / ".venv" / bootstrap.READY_STAMP
    if (
        bootstrap.in_venv(ROOT / ".venv")
        and p.path_exists(stamp)
        and stamp.read_text().strip() != bootstrap.stamp_of()
    ):
        findings.append(
            Finding(
                WARN,
                "packages",
                ".venv was installed from an older pyproject.toml/constraints.txt",
                "python -m course_utils test (or course/lab) brings it up to date first",
            )
        )
    return findings


def setup_fix() -> str:
    return (
        "python -m course_utils lab  (creates .venv with the tested versions); "
        "or add --here to install into this Python, keeping its own torch"
    )


def check_torch(p: Probes) -> list[Finding]:
    tested = tested_versions()
    findings = []
    missing = [n for n in ("torch", "torchvision", "jupyterlab", "ipywidgets") if p.version(n) is None]
    if "torch" in missing:  # a bare Python: one finding, one fix
        return [Finding(FAIL, "packages", f"{', '.join(missing)} not installed in this Python", setup_fix())]
    for name in ("torch", "torchvision"):
        version = p.version(name)
        want = tested.get(name, "?")
        if version is None:
            findings.append(
                Finding(FAIL, name, f"not installed in this Python (tested: {want})", setup_fix())
            )
        elif name == "torch" and not bootstrap.torch_supported(version):
            findings.append(
                Finding(
                    FAIL,
                    name,
                    f"{version} is outside the supported range "
                    f">={'.'.join(map(str, bootstrap.TORCH_MIN))},<{bootstrap.TORCH_BELOW[0]}",
                    f"{sys.executable} -m pip install torch=={tested.get('torch')} "
                    f"torchvision=={tested.get('torchvision')}",
                )
            )
        elif name == "torchvision" and (broken := p.import_error("torchvision")):
            index = bootstrap.pytorch_index(p.version("torch"))
            findings.append(
                Finding(
                    FAIL,
                    name,
                    f"{version} does not load with torch {p.version('torch')} ({broken}): "
                    f"a build for another torch",
                    f"{sys.executable} -m pip install --force-reinstall --no-deps torchvision=={version}"
                    + (f" --index-url {index}" if index else ""),
                )
            )
        else:
            same = version.split("+")[0] == want
            findings.append(
                Finding(
                    OK if same else NOTE,
                    name,
                    f"{version} (tested: {want}" + ("" if same else "; within the supported range") + ")",
                )
            )
    return findings


def driver_cuda(smi: str | None) -> tuple[str | None, str | None]:
    """``(driver version, highest CUDA version it runs)`` from nvidia-smi's header."""
    if not smi:
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", smi)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", smi)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def cuda_wheel_for(cuda: str | None) -> str:
    """The newest of PyTorch's CUDA wheel indexes that a driver for CUDA ``cuda`` runs (default: cu126)."""
    if not cuda:
        return "cu126"
    have = bootstrap.version_tuple(cuda)
    fitting = [w for w in CUDA_WHEELS if (int(w[2:-1]), int(w[-1])) <= have[:2]]
    return fitting[-1] if fitting else CUDA_WHEELS[0]


def cuda_install_command(wheel: str) -> str:
    tested = tested_versions()
    return (
        f"{sys.executable} -m pip install --force-reinstall torch=={tested.get('torch')} "
        f"torchvision=={tested.get('torchvision')} --index-url https://download.pytorch.org/whl/{wheel}"
    )


def check_device(p: Probes) -> list[Finding]:
    torch = p.module("torch")
    smi = p.nvidia_smi()
    proc = p.nvidia_proc()
    driver, driver_cuda_version = driver_cuda(smi)
    gpu_visible = bool(smi and "NVIDIA" in smi) or bool(proc)
    findings = []
    if torch is None:
        if gpu_visible:
            findings.append(
                Finding(
                    NOTE,
                    "gpu",
                    f"an NVIDIA GPU is visible (driver {driver or '?'}, CUDA "
                    f"{driver_cuda_version or '?'}); torch is not installed yet",
                )
            )
        return findings
    devices = p.module("course_utils.machinery.devices")
    try:
        device, reason = devices.choose_device(p.environ())
    except ValueError as err:
        return [Finding(FAIL, "device", str(err), "unset COURSE_DEVICE or name a device that is there")]
    findings.append(Finding(OK, "device", f"{device}: {reason}"))
    if gpu_visible and device.type != "cuda":
        findings.append(_unused_gpu(torch, driver, driver_cuda_version))
    return findings


def _unused_gpu(torch, driver: str | None, driver_cuda_version: str | None) -> Finding:
    """Why torch does not use the NVIDIA GPU that is visible, and the fix: a CPU-only build, a build for a
    newer CUDA than the driver runs, or something else holding it."""
    build = torch.version.cuda
    if not build:
        return Finding(
            WARN,
            "gpu",
            f"an NVIDIA GPU is visible (driver {driver or '?'}, up to CUDA "
            f"{driver_cuda_version or '?'}) but torch {torch.__version__} is a "
            f"CPU-only build, so the course runs on the CPU",
            cuda_install_command(cuda_wheel_for(driver_cuda_version)),
        )
    if (
        driver_cuda_version
        and bootstrap.version_tuple(build)[:2] > bootstrap.version_tuple(driver_cuda_version)[:2]
    ):
        return Finding(
            WARN,
            "gpu",
            f"torch is built for CUDA {build}, newer than the driver "
            f"{driver or '?'} runs (up to CUDA {driver_cuda_version})",
            f"update the NVIDIA driver (nvidia.com/drivers), or install a build for "
            f"CUDA {driver_cuda_version}: {cuda_install_command(cuda_wheel_for(driver_cuda_version))}",
        )
    return Finding(
        WARN,
        "gpu",
        f"an NVIDIA GPU is visible and torch is a CUDA {build} build, but torch cannot use it",
        "check `nvidia-smi`, CUDA_VISIBLE_DEVICES, and that no other process holds the GPU",
    )


def check_cpu(p: Probes) -> list[Finding]:
    torch = p.module("torch")
    cores = os.cpu_count()
    if torch is None:
        return [Finding(NOTE, "cpu", f"{platform.processor() or platform.machine()}, {cores} logical cores")]
    precision = p.module("course_utils.machinery.precision")
    bf16 = precision.native_bf16(torch.device("cpu"))
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "?")()
    threads = torch.get_num_threads()
    text = (
        f"{capability}, "
        + (
            "native bf16 (AVX512-BF16/AMX): fit measures bf16 against fp32 at its first run "
            "and keeps the faster"
            if bf16
            else "no native bf16: fit uses fp32"
        )
        + f"; {threads} torch threads of {cores} logical cores"
    )
    fix = ""
    if cores and threads < cores // 2:
        fix = f"OMP_NUM_THREADS={threads} limits torch; unset it to use all {cores} cores"
    findings = [Finding(OK if not fix else NOTE, "cpu", text, fix)]
    devices = p.module("course_utils.machinery.devices")
    if devices is not None:
        try:
            findings.append(Finding(NOTE, "memory", devices.malloc_plan(p.environ())))
        except ValueError as err:  # fit refuses the setting
            findings.append(
                Finding(
                    WARN, "memory", f"{err}; fit refuses it", f"set {devices.MALLOC_ENV}=keep or unset it"
                )
            )
    # what precision.py measured and cached on this machine (bf16/fp32, channels_last), and its overrides
    precision = p.module("course_utils.machinery.precision")
    for line in precision.describe().splitlines()[1:] if precision is not None else []:
        findings.append(Finding(NOTE, "precision", line.strip()))
    return findings


def check_weights(p: Probes) -> list[Finding]:
    findings = []
    mirror = p.environ().get("COURSE_WEIGHTS_MIRROR")
    for arch, what in (("resnet18", "the lessons"), ("vgg16", "the homework")):
        path = p.weights_path(arch)
        if p.path_exists(path):
            findings.append(Finding(OK, "weights", f"{arch}: {path} ({p.file_size(path) / 1e6:.0f} MB)"))
            continue
        how = (
            f"COURSE_WEIGHTS_MIRROR={mirror} is set: they are fetched from there on first use"
            if mirror
            else f"online they download on first use; offline copy {path.name} into {path.parent} "
            f"(from a machine online: python -c "
            f"\"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"), "
            f"or set COURSE_WEIGHTS_MIRROR to a folder or URL that holds {path.name}"
        )
        findings.append(
            Finding(
                NOTE if mirror else WARN,
                "weights",
                f"{arch} ImageNet weights ({what}) not in the torchvision cache: {path}",
                how,
            )
        )
    return findings


def check_cifar(p: Probes) -> list[Finding]:
    env = p.environ()
    data_dir = Path(env.get("COURSE_DATA") or ROOT / "data")
    full = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if all(p.path_exists(full / n) for n in names):
        return [Finding(OK, "cifar-10", f"full local copy in {full}")]
    subset = data_dir / "cifar10_subset.tar.gz"
    if not p.path_exists(subset):
        return [
            Finding(
                FAIL,
                "cifar-10",
                f"neither the full data set nor the shipped subset {subset} is there",
                "git checkout -- data/cifar10_subset.tar.gz",
            )
        ]
    mirror = env.get("COURSE_CIFAR10_MIRROR")
    if mirror:
        return [
            Finding(
                OK, "cifar-10", f"fetched on first use from COURSE_CIFAR10_MIRROR={mirror} into {data_dir}"
            )
        ]
    fallback = (
        f"the notebooks use the shipped subset {subset.name} (5,000 train + 1,000 held-out images; "
        f"accuracies far below the full set's)"
    )
    get_it = (
        f"put cifar-10-python.tar.gz's cifar-10-batches-py/ into {data_dir}, or set COURSE_CIFAR10_MIRROR "
        f"to a folder or URL that holds cifar-10-python.tar.gz"
    )
    if env.get("COURSE_OFFLINE", "").lower() in ("1", "true"):
        return [
            Finding(NOTE, "cifar-10", f"COURSE_OFFLINE is set: not checking the download; {fallback}", get_it)
        ]
    if p.reachable(CIFAR10_URL):
        return [
            Finding(OK, "cifar-10", f"downloadable from {CIFAR10_URL} (170 MB, into {data_dir} on first use)")
        ]
    return [Finding(WARN, "cifar-10", f"not downloadable from here ({CIFAR10_URL}): {fallback}", get_it)]


def check_preset(p: Probes) -> list[Finding]:
    if p.module("torch") is None:
        return []
    presets = p.module("course_utils.machinery.presets")
    env = p.environ()
    try:
        name = presets.preset_name(env.get("COURSE_PRESET") or None)
    except ValueError as err:
        return [Finding(FAIL, "preset", str(err), "export COURSE_PRESET=smoke|quick|full, or unset it")]
    why = "COURSE_PRESET" if env.get("COURSE_PRESET") else "default: full on a CUDA GPU, quick otherwise"
    return [Finding(OK, "preset", f"the notebooks will use '{name}' ({why})")]


def check_jupyter(p: Probes) -> list[Finding]:
    findings = []
    lab, widgets = p.version("jupyterlab"), p.version("ipywidgets")
    for name, version in (("jupyterlab", lab), ("ipywidgets", widgets)):
        if version is None and p.version("torch") is None:
            continue  # reported with torch
        if version is None:
            findings.append(
                Finding(
                    FAIL, name, "not installed: the notebooks and the instructor's panel need it", setup_fix()
                )
            )
        else:
            findings.append(Finding(OK, name, f"{version} (tested: {tested_versions().get(name, '?')})"))
    if lab and widgets:
        manager = [d / "@jupyter-widgets" / "jupyterlab-manager" for d in p.labextension_dirs()]
        if any(p.path_exists(m / "package.json") for m in manager):
            findings.append(
                Finding(OK, "widgets", "JupyterLab's widget front end (jupyterlab_widgets) is installed")
            )
        else:
            findings.append(
                Finding(
                    FAIL,
                    "widgets",
                    "JupyterLab has no widget front end: the instructor's sliders "
                    "would show as the text ScheduleDesigner(children=...)",
                    f"{sys.executable} -m pip install jupyterlab_widgets=="
                    f"{tested_versions().get('jupyterlab-widgets', '3.0.17')}, then restart JupyterLab",
                )
            )
    return findings


def check_fonts(p: Probes) -> list[Finding]:
    font = p.cjk_font()
    if font is False:
        return []
    if font:
        return [Finding(OK, "fonts", f"Chinese text in figures: {font}")]
    fix = {
        "linux": "sudo apt-get install fonts-noto-cjk (Debian/Ubuntu), then delete matplotlib's font cache "
        '(the fontlist-*.json in python -c "import matplotlib; print(matplotlib.get_cachedir())")',
        "darwin": "macOS ships PingFang SC: delete matplotlib's font cache "
        "(fontlist-*.json in its cache dir)",
        "win32": "Windows ships Microsoft YaHei: delete matplotlib's font cache "
        "(fontlist-*.json in its cache dir)",
    }
    return [
        Finding(
            WARN,
            "fonts",
            "no font that draws Chinese: Chinese labels in figures show as boxes",
            fix.get(sys.platform, fix["linux"]),
        )
    ]


CHECKS = (
    check_python,
    check_torch,
    check_device,
    check_cpu,
    check_weights,
    check_cifar,
    check_preset,
    check_jupyter,
    check_fonts,
)


def run_checks(p: Probes | None = None) -> list[Finding]:
    p = p or Probes()
    findings = []
    for check in CHECKS:
        try:
            findings += check(p)
        except Exception as err:  # noqa: BLE001 — one broken probe must not hide the other findings
            findings.append(Finding(WARN, check.__name__.removeprefix("check_"), f"could not check: {err!r}"))
    return findings


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.level:>4}  {f.topic:<11} {f.text}")
        if f.fix:
            lines.append(f"      {'':<11} fix: {f.fix}")
    blocking = [f for f in findings if f.level == FAIL]
    lines.append("")
    lines.append(
        f"{len(blocking)} problem(s) block the course."
        if blocking
        else "Nothing blocks the course."
        + (" Warnings above change what you will see." if any(f.level == WARN for f in findings) else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m course_utils doctor", description=__doc__.splitlines()[0]
    )
    parser.parse_args(argv)
    findings = run_checks()
    print(format_findings(findings))
    return 1 if any(f.level == FAIL for f in findings) else 0
