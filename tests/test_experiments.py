"""course_utils.experiments: runs saved once and reloaded, comparison tables (and their text:
plots.format_table); machinery.presets.resolve: a notebook's sizes."""

from __future__ import annotations

import json

import pytest

from course_utils import experiments, finetune, models, plots
from course_utils.machinery import presets
from course_utils.train import History


def build():
    return models.resnet18_cbam(weights=None, placement="stage")


SCHEDULE = finetune.three_stage_schedule(epochs=(1, 1, 1))
CONFIG = {"preset": "smoke", "train_size": 64, "seed": 0, "model": "resnet18+cbam"}


@pytest.fixture
def counted_fit(monkeypatch):
    """The real fit, counting its calls."""
    calls = []
    real_fit = experiments.fit

    def fit(*args, **kwargs):
        calls.append(args[1])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(experiments, "fit", fit)
    return calls


@pytest.fixture
def fake_fit(monkeypatch):
    """A stand-in for fit that trains nothing: one row per epoch of the schedule; counts its calls."""
    calls = []

    def fit(model, schedule, *args, **kwargs):
        calls.append(schedule)
        h = History()
        for plan in schedule.plan_for(model):
            h.append({"epoch": plan.epoch, "stage": plan.stage, "val_acc": 0.1, "seconds": 0.0})
        return h

    monkeypatch.setattr(experiments, "fit", fit)
    return calls


def forbid_fit(monkeypatch):
    def fit(*args, **kwargs):
        raise AssertionError("fit was called although a saved run should have been reloaded")

    monkeypatch.setattr(experiments, "fit", fit)


def test_second_call_reloads_without_training(tmp_path, loaders, counted_fit, monkeypatch, capsys):
    one = finetune.one_stage_schedule(1, 1e-3)
    first = experiments.run_cached("b: cbam one lr", build, one, loaders, tmp_path, CONFIG, progress=False)
    assert len(counted_fit) == 1 and len(first) == 1
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("b_cbam_one_lr-")
    saved = json.loads(files[0].read_text())
    assert saved["meta"]["config"] == CONFIG and saved["meta"]["name"] == "b: cbam one lr"
    assert "训练了 1 轮" in capsys.readouterr().out

    forbid_fit(monkeypatch)
    again = experiments.run_cached(
        "b: cbam one lr", build, one, loaders, tmp_path, dict(CONFIG), progress=False
    )
    assert "读取了之前训练的结果" in capsys.readouterr().out
    assert again.rows == first.rows and again.meta == json.loads(json.dumps(first.meta))


def test_changed_config_or_schedule_retrains(tmp_path, loaders, fake_fit):
    one = finetune.one_stage_schedule(1, 1e-3)
    experiments.run_cached("run", build, one, loaders, tmp_path, CONFIG, progress=False)
    experiments.run_cached("run", build, one, loaders, tmp_path, {**CONFIG, "seed": 1}, progress=False)
    experiments.run_cached(
        "run", build, finetune.one_stage_schedule(1, 1e-4), loaders, tmp_path, CONFIG, progress=False
    )
    assert len(fake_fit) == 3
    assert len(list(tmp_path.glob("run-*.json"))) == 3
    experiments.run_cached("run", build, one, loaders, tmp_path, CONFIG, progress=False)  # reloaded
    assert len(fake_fit) == 3
    experiments.run_cached("run", build, one, loaders, tmp_path, CONFIG, retrain=True, progress=False)
    assert len(fake_fit) == 4 and len(list(tmp_path.glob("run-*.json"))) == 3


def test_same_seed_same_start(tmp_path, loaders):
    """Two runs differing only by name start from the same weights and see the same batches: same result."""
    one = finetune.one_stage_schedule(1, 1e-3)
    a = experiments.run_cached("a", build, one, loaders, tmp_path, CONFIG, progress=False)
    b = experiments.run_cached("b", build, one, loaders, tmp_path, CONFIG, progress=False)
    assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]


def test_trainable_per_epoch_follows_the_schedule():
    model = build()
    counts = models.count_parameters(model)
    per_epoch = experiments.trainable_per_epoch(model, SCHEDULE)
    assert per_epoch == [
        counts["cbam"] + counts["head"],
        counts["cbam"] + counts["head"] + counts["layer3"] + counts["layer4"],
        counts["total"],
    ]


def test_comparison_table_and_text():
    def history(accs, trainable):
        h = History(meta={"trainable_params": trainable})
        for i, acc in enumerate(accs, start=1):
            h.append({"epoch": i, "stage": "s", "val_acc": acc, "seconds": 1.25})
        return h

    rows = experiments.comparison_table(
        {"x": history([0.2, 0.5, 0.4], [10, 10, 1000]), "y": history([0.3], [7])}
    )
    assert rows[0] == {
        "strategy": "x",
        "epochs": 3,
        "final val acc": 0.4,
        "best val acc": 0.5,
        "seconds": 3.8,
        "trainable params": "10 → 1,000",
    }
    assert rows[1]["trainable params"] == "7"
    text = plots.format_table(rows).splitlines()
    assert text[0].startswith("strategy") and set(text[1]) <= {"-", " "}
    assert len(text) == 4 and "0.400" in text[2] and "1,000" in text[2]


def test_print_table_titles_the_text(capsys):
    plots.print_table([{"run": "a", "acc": 0.5}], title="runs", floatfmt={"acc": ".1%"})
    assert capsys.readouterr().out.splitlines() == ["runs", "run    acc", "---  -----", "a    50.0%"]


def test_resolve_precedence_with_a_notebook_table():
    table = {"smoke": {"train_size": 64, "batch_size": 32}, "full": {"train_size": None}}
    cfg = presets.resolve("smoke", table, train_size=None, batch_size=16, epochs=[1, 2, 1], seed=0)
    assert cfg == {
        **presets.PRESETS["smoke"],
        "preset": "smoke",
        "train_size": 64,
        "batch_size": 16,
        "epochs": (1, 2, 1),
        "seed": 0,
    }
    assert presets.resolve("full", table)["train_size"] is None
    assert presets.resolve("quick", table) == presets.resolve("quick")


@pytest.mark.parametrize(
    "table, match",
    [
        ({"smok": {"train_size": 64}}, "unknown presets"),
        ({"smoke": 64}, "table must be"),
        ([1], "table must"),
    ],
)
def test_resolve_refuses_a_table_that_is_not_per_preset(table, match):
    with pytest.raises(ValueError, match=match):
        presets.resolve("quick", table)


def test_compare_bn_policies_calls_the_hook_for_every_policy(monkeypatch, loaders):
    """The caller's ``on_epoch_end`` runs after every epoch of every policy (not only the first policy's),
    next to the BatchNorm statistics recorded per epoch."""

    def fit(model, schedule, *args, on_epoch_end=None, **kwargs):
        h = History()
        for plan in schedule.plan_for(model):
            h.append({"epoch": plan.epoch, "stage": plan.stage, "val_acc": 0.1, "seconds": 0.0})
            on_epoch_end(h)
        return h

    monkeypatch.setattr(experiments, "fit", fit)
    seen = []
    probe = next(iter(loaders[0]))[0]
    histories, stats = experiments.compare_bn_policies(
        build,
        SCHEDULE,
        *loaders,
        probe=probe,
        layer="layer3.0.bn1",
        on_epoch_end=lambda h: seen.append(len(h)),
    )
    assert list(histories) == list(experiments.BN_POLICIES)
    assert seen == [1, 2, 3] * len(experiments.BN_POLICIES)
    assert all([r["epoch"] for r in rows] == [0, 1, 2, 3] for rows in stats.values())
    with pytest.raises(TypeError, match="on_epoch_end"):
        experiments.compare_bn_policies(build, SCHEDULE, *loaders, on_epoch_end="plot")


def test_run_path_is_stable_and_safe(tmp_path):
    p1 = experiments.run_path("c: CBAM / diff LR", SCHEDULE, tmp_path, {"a": 1, "b": 2})
    p2 = experiments.run_path("c: CBAM / diff LR", SCHEDULE, tmp_path, {"b": 2, "a": 1})
    assert p1 == p2 and p1.parent == tmp_path and "/" not in p1.name[:-5] and " " not in p1.name
    assert experiments.results_dir("quick", tmp_path) == tmp_path / "quick"
