"""``python -m course_utils doctor``: each finding from stand-in probes, and the exit status."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from course_utils.machinery import doctor

SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.14              Driver Version: 550.54.14      CUDA Version: 12.4     |
|   0  NVIDIA GeForce RTX 3060        Off |   00000000:01:00.0  On |                  N/A |
"""


class FakeProbes(doctor.Probes):
    def __init__(self, tmp_path: Path, **overrides):
        self.tmp = tmp_path
        self.env = {"COURSE_OFFLINE": "1"}
        self.versions = {}
        self.smi = None
        self.proc = None
        self.existing: set[Path] = set()
        self.online = False
        self.font = "Noto Sans CJK SC"
        self.hidden_modules: set[str] = set()
        self.__dict__.update(overrides)

    def module(self, name):
        return (
            None
            if name.split(".")[0] in self.hidden_modules or name in self.hidden_modules
            else super().module(name)
        )

    def version(self, distribution):
        if distribution in self.versions:
            return self.versions[distribution]
        return None if distribution in self.hidden_modules else super().version(distribution)

    def import_error(self, name):
        return self.__dict__.get("broken", {}).get(name)

    def nvidia_smi(self):
        return self.smi

    def nvidia_proc(self):
        return self.proc

    def reachable(self, url, timeout=3.0):
        return self.online

    def path_exists(self, path):
        return Path(path) in self.existing or (
            Path(path).name == "cifar10_subset.tar.gz" and "no-subset" not in self.env
        )

    def file_size(self, path):
        return 46_830_571

    def weights_path(self, arch):
        return self.tmp / "hub" / "checkpoints" / doctor.WEIGHTS[arch]

    def labextension_dirs(self):
        return [self.tmp / "labextensions"]

    def cjk_font(self):
        return self.font

    def environ(self):
        return dict(self.env)


def by_topic(findings, topic):
    return [f for f in findings if f.topic == topic]


def test_a_bare_python_gets_one_setup_finding_and_exit_1(tmp_path, monkeypatch, capsys):
    probes = FakeProbes(
        tmp_path,
        hidden_modules={"torch", "torchvision", "jupyterlab", "ipywidgets", "course_utils"},
        font=False,
    )
    findings = doctor.run_checks(probes)
    (packages,) = by_topic(findings, "packages")
    assert packages.level == doctor.FAIL and "torch, torchvision, jupyterlab, ipywidgets" in packages.text
    assert "python -m course_utils lab" in packages.fix and "--here" in packages.fix
    assert not by_topic(findings, "jupyterlab") and not by_topic(findings, "fonts")
    monkeypatch.setattr(doctor, "Probes", lambda: probes)
    assert doctor.main([]) == 1
    assert "block the course" in capsys.readouterr().out


def test_a_suitable_machine_is_all_ok(tmp_path, monkeypatch, capsys):
    manager = tmp_path / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager" / "package.json"
    weights = {tmp_path / "hub" / "checkpoints" / n for n in doctor.WEIGHTS.values()}
    probes = FakeProbes(tmp_path, existing={manager, *weights}, env={}, online=True)
    findings = doctor.run_checks(probes)
    assert [f for f in findings if f.level in (doctor.FAIL, doctor.WARN)] == []
    assert "downloadable" in by_topic(findings, "cifar-10")[0].text
    assert "47 MB" in by_topic(findings, "weights")[0].text
    monkeypatch.setattr(doctor, "Probes", lambda: probes)
    assert doctor.main([]) == 0


def test_cpu_only_torch_with_an_nvidia_gpu_gets_the_cuda_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (gpu,) = by_topic(doctor.check_device(FakeProbes(tmp_path, smi=SMI)), "gpu")
    assert gpu.level == doctor.WARN and "CPU-only build" in gpu.text and "550.54.14" in gpu.text
    assert gpu.fix.endswith(
        "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu124"
    )
    assert "-m pip install --force-reinstall" in gpu.fix


def test_a_cuda_build_newer_than_the_driver_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (gpu,) = by_topic(doctor.check_device(FakeProbes(tmp_path, smi=SMI)), "gpu")
    assert (
        "newer than the driver" in gpu.text and "update the NVIDIA driver" in gpu.fix and "cu124" in gpu.fix
    )


def test_no_gpu_no_gpu_finding(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    findings = doctor.check_device(FakeProbes(tmp_path))
    assert [f.topic for f in findings] == ["device"] and findings[0].text.startswith("cpu")


def test_a_wrong_course_device_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (device,) = doctor.check_device(FakeProbes(tmp_path, env={"COURSE_DEVICE": "cuda"}))
    assert device.level == doctor.FAIL and "COURSE_DEVICE" in device.fix


@pytest.mark.parametrize(
    "cuda, wheel",
    [("12.4", "cu124"), ("12.9", "cu129"), ("13.2", "cu130"), ("11.0", "cu118"), (None, "cu126")],
)
def test_cuda_wheel_for_the_driver(cuda, wheel):
    assert doctor.cuda_wheel_for(cuda) == wheel


def test_old_torch_blocks_with_the_tested_pins(tmp_path):
    findings = doctor.check_torch(FakeProbes(tmp_path, versions={"torch": "2.2.0", "torchvision": "0.17.0"}))
    (torch_finding,) = by_topic(findings, "torch")
    assert torch_finding.level == doctor.FAIL and "outside the supported range" in torch_finding.text
    assert "pip install torch==2.14.1 torchvision==0.29.1" in torch_finding.fix


def test_an_older_supported_torch_is_a_note(tmp_path):
    findings = doctor.check_torch(
        FakeProbes(tmp_path, versions={"torch": "2.11.0+cu126", "torchvision": "0.26.0"})
    )
    assert {f.level for f in findings} == {doctor.NOTE}
    assert "tested: 2.14.1; within the supported range" in findings[0].text


def test_missing_weights_say_where_and_how(tmp_path):
    findings = doctor.check_weights(FakeProbes(tmp_path))
    assert [f.level for f in findings] == [doctor.WARN, doctor.WARN]
    assert (
        str(tmp_path / "hub" / "checkpoints") in findings[0].fix
        and "COURSE_WEIGHTS_MIRROR" in findings[0].fix
    )
    mirrored = doctor.check_weights(FakeProbes(tmp_path, env={"COURSE_WEIGHTS_MIRROR": "/mnt/usb"}))
    assert mirrored[0].level == doctor.NOTE and "/mnt/usb" in mirrored[0].fix


def test_cifar_full_copy_download_subset_and_nothing(tmp_path):
    full = doctor.ROOT / "data" / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert (
        "full local copy"
        in doctor.check_cifar(FakeProbes(tmp_path, existing={full / n for n in names}))[0].text
    )
    offline = doctor.check_cifar(FakeProbes(tmp_path))[0]
    assert (
        offline.level == doctor.NOTE
        and "COURSE_OFFLINE" in offline.text
        and "COURSE_CIFAR10_MIRROR" in offline.fix
    )
    blocked = doctor.check_cifar(FakeProbes(tmp_path, env={}, online=False))[0]
    assert blocked.level == doctor.WARN and "shipped subset" in blocked.text
    assert doctor.check_cifar(FakeProbes(tmp_path, env={}, online=True))[0].level == doctor.OK
    gone = doctor.check_cifar(FakeProbes(tmp_path, env={"no-subset": "1"}))[0]
    assert gone.level == doctor.FAIL and "git checkout" in gone.fix


def test_preset_and_a_wrong_preset(tmp_path):
    assert "'smoke'" in doctor.check_preset(FakeProbes(tmp_path, env={"COURSE_PRESET": "smoke"}))[0].text
    wrong = doctor.check_preset(FakeProbes(tmp_path, env={"COURSE_PRESET": "huge"}))[0]
    assert wrong.level == doctor.FAIL and "huge" in wrong.text


def test_no_widget_front_end_blocks(tmp_path):
    findings = doctor.check_jupyter(FakeProbes(tmp_path))
    (widgets,) = by_topic(findings, "widgets")
    assert widgets.level == doctor.FAIL and "ScheduleDesigner(children=...)" in widgets.text
    assert "pip install jupyterlab_widgets==3.0.17" in widgets.fix


def test_no_cjk_font_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.sys, "platform", "linux")
    (fonts,) = doctor.check_fonts(FakeProbes(tmp_path, font=None))
    assert fonts.level == doctor.WARN and "fonts-noto-cjk" in fonts.fix


def test_a_broken_probe_does_not_hide_the_rest(tmp_path):
    class Broken(FakeProbes):
        def weights_path(self, arch):
            raise PermissionError("cache not readable")

    findings = doctor.run_checks(Broken(tmp_path))
    (weights,) = by_topic(findings, "weights")
    assert "could not check" in weights.text and "cache not readable" in weights.text
    assert by_topic(findings, "cifar-10") and by_topic(findings, "fonts")


def test_tested_versions_come_from_the_constraints_file():
    tested = doctor.tested_versions()
    assert tested["torch"] == "2.14.1" and tested["torchvision"] == "0.29.1" and "jupyterlab" in tested


def test_a_torchvision_built_for_another_torch_blocks_with_the_matching_index(tmp_path):
    probes = FakeProbes(
        tmp_path,
        versions={"torch": "2.13.0+cpu", "torchvision": "0.28.0"},
        broken={"torchvision": "RuntimeError: operator torchvision::nms does not exist"},
    )
    (vision,) = by_topic(doctor.check_torch(probes), "torchvision")
    assert vision.level == doctor.FAIL and "torchvision::nms" in vision.text
    assert vision.fix.endswith("torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu")


def test_doctor_says_what_fit_does_with_the_cpu_memory(tmp_path, monkeypatch):
    from course_utils.machinery import devices

    monkeypatch.setitem(devices._malloc, "libc", object())  # as on glibc
    (kept,) = by_topic(doctor.check_cpu(FakeProbes(tmp_path, env={})), "memory")
    assert (
        kept.level == doctor.NOTE
        and "keeps each training step's memory" in kept.text
        and "COURSE_MALLOC=default" in kept.text
    )
    (off,) = by_topic(doctor.check_cpu(FakeProbes(tmp_path, env={"COURSE_MALLOC": "default"})), "memory")
    assert "leaves glibc's malloc as it is" in off.text
    (wrong,) = by_topic(doctor.check_cpu(FakeProbes(tmp_path, env={"COURSE_MALLOC": "tcmalloc"})), "memory")
    assert wrong.level == doctor.WARN and "fit refuses it" in wrong.text and "COURSE_MALLOC=keep" in wrong.fix
    monkeypatch.setitem(devices._malloc, "libc", False)  # macOS, Windows
    (other,) = by_topic(doctor.check_cpu(FakeProbes(tmp_path, env={})), "memory")
    assert "not glibc" in other.text
