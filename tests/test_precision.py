"""bf16/fp32 and channels_last on the CPU: measured once per machine, cached, overridable
(course_utils.machinery.precision).

The measurement's own timings are replaced by a fake clock (an injected timer that a model advances by
what each candidate "costs"), so the tests know which candidate must win and run in milliseconds.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch
from _helpers import make_loaders, random_images
from torch import nn

from course_utils import train
from course_utils.finetune import Schedule, Stage
from course_utils.machinery import precision
from course_utils.models import resnet18_cbam

FP32_FASTEST = {
    "fp32 NCHW": 300.0,
    "fp32 channels_last": 400.0,
    "bf16 NCHW": 200.0,
    "bf16 channels_last": 350.0,
}
BF16_FASTEST = {
    "fp32 NCHW": 300.0,
    "fp32 channels_last": 320.0,
    "bf16 NCHW": 380.0,
    "bf16 channels_last": 500.0,
}


class FakeMeasure:
    """Stands in for precision.measure: returns fixed figures and records each call."""

    def __init__(self, figures):
        self.figures, self.calls = dict(figures), []

    def __call__(self, model, image_size, batch_size):
        self.calls.append((type(model).__name__, tuple(image_size), batch_size))
        return dict(self.figures)


@pytest.fixture
def bf16_cpu(tmp_path, monkeypatch):
    """A CPU with native bf16, measuring switched on, no overrides, an empty cache file in tmp."""
    path = tmp_path / "cache" / "course_utils" / "precision.json"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cache_path", lambda: path)
    monkeypatch.setattr(precision, "_MEMO", {})
    monkeypatch.setenv("COURSE_PRECISION", "measure")
    for name in ("COURSE_AMP", "COURSE_CHANNELS_LAST"):
        monkeypatch.delenv(name, raising=False)
    return path


def small_model(stem="cifar"):
    return resnet18_cbam(weights=None, stem=stem)


def test_measures_once_then_reads_the_cache_also_in_a_new_process(bf16_cpu, monkeypatch):
    model = small_model()
    fake = FakeMeasure(FP32_FASTEST)
    first = precision.choose("cpu", model, 32, 64, measure_fn=fake)
    assert (first.amp, first.channels_last) == (False, True)
    assert first.source == {"amp": "measured", "channels_last": "measured"}
    assert fake.calls == [("ResNetCBAM", (32, 32), 64)]
    assert first.images_per_s == FP32_FASTEST
    stored = json.loads(bf16_cpu.read_text())["entries"]
    assert list(stored) == [first.key] and stored[first.key]["images_per_s"] == FP32_FASTEST

    again = precision.choose("cpu", model, (32, 32), 64, measure_fn=fake)
    assert len(fake.calls) == 1 and again.source["amp"] == "cached"
    monkeypatch.setattr(precision, "_MEMO", {})  # a new process: only the file remains
    fresh = precision.choose("cpu", model, 32, 64, measure_fn=fake)
    assert (
        len(fake.calls) == 1
        and (fresh.amp, fresh.channels_last) == (False, True)
        and fresh.source["amp"] == "cached"
    )


def test_cache_key_holds_cpu_torch_model_kind_size_and_threads(bf16_cpu, monkeypatch):
    fake = FakeMeasure(BF16_FASTEST)
    cifar, imagenet = small_model("cifar"), small_model("imagenet")
    base = precision.cache_key(cifar, 32)
    assert precision.cache_key(cifar, (32, 32)) == base
    others = {
        precision.cache_key(imagenet, 32),
        precision.cache_key(cifar, 64),
        precision.cache_key(cifar, 32, threads=torch.get_num_threads() + 1),
    }
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    others.add(precision.cache_key(cifar, 32))
    monkeypatch.setattr(precision, "cpu_name", lambda: "AMD EPYC 9B14")
    others.add(precision.cache_key(cifar, 32))
    assert len(others) == 5 and base not in others
    monkeypatch.undo()  # back to this machine, but keep the fixture's cache and switches
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cache_path", lambda: bf16_cpu)
    monkeypatch.setattr(precision, "_MEMO", {})
    monkeypatch.setenv("COURSE_PRECISION", "measure")
    precision.choose("cpu", cifar, 32, 64, measure_fn=fake)
    precision.choose("cpu", imagenet, 32, 64, measure_fn=fake)  # another model kind: a miss
    precision.choose("cpu", cifar, 64, 64, measure_fn=fake)  # another size: a miss
    precision.choose("cpu", cifar, 32, 16, measure_fn=fake)  # another batch size: the same entry
    assert [c[1] for c in fake.calls] == [(32, 32), (32, 32), (64, 64)]
    assert len(json.loads(bf16_cpu.read_text())["entries"]) == 3


def test_argument_beats_environment_beats_measurement(bf16_cpu, monkeypatch):
    model = small_model()
    fake = FakeMeasure(BF16_FASTEST)  # measured: bf16 channels_last
    monkeypatch.setenv("COURSE_AMP", "off")
    choice = precision.choose("cpu", model, 32, 64, measure_fn=fake)
    # amp from the environment; channels_last the fastest *among fp32* candidates (fp32 channels_last)
    assert (choice.amp, choice.channels_last) == (False, True)
    assert choice.source == {"amp": "env", "channels_last": "measured"}
    choice = precision.choose("cpu", model, 32, 64, amp=True, channels_last=False, measure_fn=fake)
    assert (choice.amp, choice.channels_last) == (True, False)
    assert choice.source == {"amp": "argument", "channels_last": "argument"}
    monkeypatch.setenv("COURSE_CHANNELS_LAST", "0")
    choice = precision.choose("cpu", model, 32, 64, measure_fn=fake)
    assert (choice.amp, choice.channels_last) == (False, False) and choice.source["channels_last"] == "env"
    monkeypatch.setenv("COURSE_AMP", "auto")
    choice = precision.choose("cpu", model, 32, 64, measure_fn=fake)
    assert choice.amp is True and choice.source["amp"] == "cached"  # bf16 NCHW 380 > fp32 NCHW 300
    assert len(fake.calls) == 1
    monkeypatch.setenv("COURSE_AMP", "sometimes")
    with pytest.raises(ValueError, match="COURSE_AMP='sometimes'.*on, off or auto"):
        precision.choose("cpu", model, 32, 64, measure_fn=fake)
    monkeypatch.setenv("COURSE_AMP", "auto")
    monkeypatch.setenv("COURSE_PRECISION", "fast")
    with pytest.raises(ValueError, match="COURSE_PRECISION='fast'"):
        precision.choose("cpu", model, 32, 64, measure_fn=fake)


@pytest.mark.parametrize("size", [16, (16, 64), (31, 32)])
def test_no_bf16_and_no_measurement_below_32_pixels(bf16_cpu, size):
    fake = FakeMeasure(BF16_FASTEST)
    choice = precision.choose("cpu", small_model(), size, 64, measure_fn=fake)
    assert choice.amp is False and choice.source["amp"] == "rule" and fake.calls == []
    assert train.default_amp("cpu", size, small_model()) is False


def test_no_measurement_where_bf16_is_emulated_or_measuring_is_off(bf16_cpu, monkeypatch):
    fake = FakeMeasure(BF16_FASTEST)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=fake)
    assert (choice.amp, choice.channels_last) == (
        False,
        True,
    ) and fake.calls == []  # fp32; ResNet: channels_last
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("COURSE_PRECISION", "rule")
    choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=fake)
    assert (choice.amp, choice.channels_last) == (True, True) and fake.calls == []
    assert choice.source == {"amp": "rule", "channels_last": "rule"}
    assert not bf16_cpu.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"version": 1, "entries": {"k": {"images_per_s": {"x": 1}}}}',
        '{"version": 1, "entries": 7}',
        "\udcff",
    ],
)
def test_corrupted_cache_is_ignored_and_rewritten(bf16_cpu, content):
    bf16_cpu.parent.mkdir(parents=True)
    bf16_cpu.write_text(content, encoding="utf-8", errors="surrogateescape")
    fake = FakeMeasure(FP32_FASTEST)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=fake)
    assert (choice.amp, choice.channels_last) == (False, True) and len(fake.calls) == 1
    stored = json.loads(bf16_cpu.read_text())
    assert stored["version"] == precision.CACHE_VERSION and choice.key in stored["entries"]


def test_unwritable_cache_warns_and_still_chooses(bf16_cpu, monkeypatch):
    bf16_cpu.parent.parent.write_text("a file where the cache folder should be")
    fake = FakeMeasure(FP32_FASTEST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=fake)
    messages = [str(w.message) for w in caught]
    assert any("cannot read the precision cache" in m for m in messages), messages
    assert any("cannot write the precision cache" in m for m in messages), messages
    assert (choice.amp, choice.channels_last) == (False, True)


class Clocked(nn.Module):
    """A small conv net whose forward advances a fake clock by what its candidate costs (class attributes:
    the measurement times a deep copy, which shares them)."""

    now = [0.0]
    cost = {}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        Clocked.now[0] += Clocked.cost[(y.dtype == torch.bfloat16, channels_last)]
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(
    "cost, winner",
    [
        (
            {(False, False): 4.0, (False, True): 3.0, (True, False): 2.0, (True, True): 1.0},
            "bf16 channels_last",
        ),
        (
            {(False, False): 2.0, (False, True): 1.0, (True, False): 4.0, (True, True): 3.0},
            "fp32 channels_last",
        ),
        ({(False, False): 1.0, (False, True): 2.0, (True, False): 2.0, (True, True): 2.0}, "fp32 NCHW"),
    ],
)
def test_measurement_picks_the_faster_of_fake_timings(bf16_cpu, cost, winner):
    Clocked.cost = cost
    model = Clocked()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    rng = torch.get_rng_state()
    figures = precision.measure(model, 32, batch_size=8, timer=lambda: Clocked.now[0])
    expected = {name: 8 / cost[flags] for name, flags in precision.CANDIDATES.items()}
    assert figures == pytest.approx(expected)
    assert max(figures, key=figures.get) == winner
    assert torch.equal(torch.get_rng_state(), rng), "the measurement moved the caller's random stream"
    assert calls == [], "the user's forward hook saw the probe's passes"
    assert all(
        not p.is_contiguous(memory_format=torch.channels_last) or p.ndim < 4 or p.is_contiguous()
        for p in model.parameters()
    ), "the measurement changed the caller's model layout"
    choice = precision.choose(
        "cpu",
        model,
        32,
        8,
        measure_fn=lambda m, s, b: precision.measure(m, s, b, timer=lambda: Clocked.now[0]),
    )
    assert (choice.amp, choice.channels_last) == precision.CANDIDATES[winner]


def test_fit_follows_the_measured_choice_and_measures_once(bf16_cpu, monkeypatch):
    """On a native-bf16 CPU where fp32 measured faster, fit's default trains in fp32; a second fit reads the
    cache."""
    fake = FakeMeasure(FP32_FASTEST)
    monkeypatch.setattr(precision, "measure", fake)
    model = resnet18_cbam(weights=None)
    dtypes = []
    stem_conv = next(m for m in model.stem.modules() if isinstance(m, nn.Conv2d))
    stem_conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    train_loader, val_loader = make_loaders(*random_images(32), batch_size=16)
    schedule = Schedule([Stage("all", 1, "all", 1e-3)])
    history = train.fit(model, schedule, train_loader, val_loader, device="cpu", progress=False)
    assert set(dtypes) == {torch.float32} and math.isfinite(history["train_loss"][0])
    assert fake.calls == [("ResNetCBAM", (32, 32), 16)]
    fake.figures = BF16_FASTEST  # would now choose bf16 — but the cached figures hold
    dtypes.clear()
    train.fit(model, schedule, train_loader, val_loader, device="cpu", progress=False)
    assert set(dtypes) == {torch.float32} and len(fake.calls) == 1
    monkeypatch.setenv("COURSE_AMP", "on")
    dtypes.clear()
    train.fit(model, schedule, train_loader, val_loader, device="cpu", progress=False)
    assert set(dtypes) == {torch.bfloat16}


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG cache folder is Linux's")
def test_cache_folder_respects_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_path() == tmp_path / "course_utils" / "precision.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert precision.cache_path().parent.parent.name == ".cache"


def test_describe_names_the_cached_choice(bf16_cpu):
    precision.choose("cpu", small_model(), 32, 64, measure_fn=FakeMeasure(FP32_FASTEST))
    text = precision.describe()
    assert "native bf16: yes" in text and str(bf16_cpu) in text
    assert "fp32 channels_last — " in text and "32x32" in text and "ResNetCBAM/" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "amp_flag, want_amp, want_source", [("auto", False, "measured"), ("on", True, "argument")]
)
def test_bench_reports_the_choice_and_its_figures(
    bf16_cpu, monkeypatch, tmp_path, capsys, amp_flag, want_amp, want_source
):
    from course_utils.machinery import cli

    fake = FakeMeasure(FP32_FASTEST)
    monkeypatch.setattr(precision, "measure", fake)
    out = tmp_path / "bench.json"
    cli.main(
        [
            "bench",
            "--device",
            "cpu",
            "--images",
            "32",
            "--batch-size",
            "16",
            "--repeats",
            "1",
            "--workers",
            "0",
            "--synthetic",
            "--no-lesson",
            "--no-progress",
            "--amp",
            amp_flag,
            "--json",
            str(out),
        ]
    )
    config = json.loads(out.read_text())["config"]
    assert config["course_amp"] is want_amp and config["course_channels_last"] is True
    assert config["precision"]["source"] == {"amp": want_source, "channels_last": "measured"}
    assert config["precision"]["images_per_s"] == FP32_FASTEST and len(fake.calls) == 1
    printed = capsys.readouterr().out
    want_precision = "bf16 autocast" if want_amp else "fp32"
    assert (
        f"precision choice: {want_precision} ({want_source}), channels_last (measured)" in printed
        and "fp32 channels_last 400" in printed
    )


def test_bf16_only_where_it_pays(bf16_cpu):
    """Within 3% of fp32 (noise), fp32 — the exact one — is kept."""
    close = {"fp32 NCHW": 300.0, "fp32 channels_last": 400.0, "bf16 NCHW": 200.0, "bf16 channels_last": 410.0}
    choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=FakeMeasure(close))
    assert (choice.amp, choice.channels_last) == (False, True)
    clear = dict(close, **{"bf16 channels_last": 420.0})
    choice = precision.choose("cpu", small_model(), 64, 64, measure_fn=FakeMeasure(clear))
    assert (choice.amp, choice.channels_last) == (True, True)


def test_a_model_that_cannot_be_measured_falls_back_to_the_rule_once(bf16_cpu):
    calls = []

    def broken(model, size, batch):
        calls.append(1)
        raise RuntimeError("no bf16 kernel for this op")

    with pytest.warns(UserWarning, match="could not measure.*no bf16 kernel"):
        choice = precision.choose("cpu", small_model(), 32, 64, measure_fn=broken)
    assert (choice.amp, choice.channels_last) == (True, True) and choice.source["amp"] == "rule"
    again = precision.choose("cpu", small_model(), 32, 64, measure_fn=broken)
    assert (again.amp, again.channels_last) == (True, True) and calls == [1]
