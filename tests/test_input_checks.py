"""Every mistake a student makes is refused before any work starts, and nothing is lost (issue 10):
fit/evaluate iterate each loader once; the first batch is checked against the model before anything changes;
a checkpoint folder that cannot be written fails before the first epoch; sizes and counts are refused where
they are given."""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import differing, random_images, reference_loaders, reference_model

from course_utils import data as cdata
from course_utils import experiments, finetune
from course_utils.finetune import one_stage_schedule, three_stage_schedule
from course_utils.machinery import checkpoints, presets
from course_utils.machinery.batches import check_batch
from course_utils.models import resnet18_cbam, stage_table, vgg16_cbam
from course_utils.train import BatchError, CheckpointError, evaluate, fit

TIMING = ("seconds", "images_per_s")


def comparable(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history.rows]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class CountingLoader:
    """A re-iterable loader over fixed batches that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches, self.passes = list(batches), 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def normalised_batches(n_batches=2, batch_size=8, seed=0):
    images, labels = random_images(n_batches * batch_size, seed=seed)
    loader = cdata.TensorLoader(images, labels, batch_size, device="cpu")
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------------------ each loader once per epoch
@pytest.mark.parametrize("progress", [True, False])
def test_fit_and_evaluate_iterate_each_loader_once_per_epoch(progress):
    torch.manual_seed(0)
    model = resnet18_cbam(placement=None)
    train_loader, val_loader = (
        CountingLoader(normalised_batches(2)),
        CountingLoader(normalised_batches(1, seed=1)),
    )
    fit(model, one_stage_schedule(2, 1e-3), train_loader, val_loader, device="cpu", progress=progress)
    assert train_loader.passes == 2, f"train_loader was iterated {train_loader.passes} times in 2 epochs"
    assert val_loader.passes == 2, f"val_loader was iterated {val_loader.passes} times in 2 epochs"
    evaluate(model, val_loader)
    assert val_loader.passes == 3


def test_progress_bar_does_not_change_training(resnet18_state_file):
    runs = []
    for progress in (True, False):
        model = reference_model(resnet18_state_file)
        history = fit(
            model,
            three_stage_schedule(epochs=(1, 1, 1)),
            *reference_loaders(),
            device="cpu",
            progress=progress,
        )
        runs.append((comparable(history), state(model)))
    (h_on, w_on), (h_off, w_off) = runs
    assert h_on == h_off
    assert differing(w_on, w_off) == []


def test_a_one_shot_generator_trains_on_every_batch():
    batches = normalised_batches(3)
    results = []
    for make in (lambda: list(batches), lambda: (b for b in batches)):
        torch.manual_seed(0)
        model = resnet18_cbam(placement=None)
        history = fit(model, one_stage_schedule(1, 1e-3), make(), device="cpu", progress=True)
        results.append((comparable(history), state(model)))
    assert results[0][0] == results[1][0]
    assert differing(results[0][1], results[1][1]) == []
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="generator"):  # a second epoch has nothing left: said, not silent
        fit(
            resnet18_cbam(placement=None),
            one_stage_schedule(2, 1e-3),
            (b for b in batches),
            device="cpu",
            progress=False,
        )


# ------------------------------------------------------------------------------ the first batch vs the model
def good_batch():
    return normalised_batches(1)[0]


def bad_batches():
    images, labels = good_batch()
    u8, _ = random_images(8)
    return {
        "uint8 images": ((u8, labels), ["torch.uint8", "TensorLoader.normalize", "ToTensor", "提示"]),
        "channels last": ((images.permute(0, 2, 3, 1).contiguous(), labels), ["3", "permute(0, 3, 1, 2)"]),
        "one channel": ((images[:, :1], labels), ["1 channel,", "expects 3"]),
        "labels too large": ((images, labels + 5), ["num_classes=10", "0..9"]),
        "negative labels": ((images, labels - 1), ["-1", "num_classes=10"]),
        "length mismatch": ((images, labels[:4]), ["8 images but 4 labels"]),
        "float labels": ((images, labels.float()), ["torch.float32", "labels.long()"]),
        "int32 labels": ((images, labels.int()), ["torch.int32", "labels.long()"]),
        "one-hot labels": ((images, torch.nn.functional.one_hot(labels, 10)), ["shape (8, 10)", "argmax"]),
        "single image": ((images[0], labels[:1]), ["(N, C, H, W)", "unsqueeze(0)"]),
        "nan images": ((torch.full_like(images, float("nan")), labels), ["NaN"]),
        "not tensors": ((images.tolist(), labels), ["tensors", "list"]),
    }


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return resnet18_cbam(placement="stage")


def prepare(model):
    """An unusual but legal state the checks must leave exactly as it is."""
    model.train()
    model.layer1.eval()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    return (
        state(model),
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def assert_untouched(model, before):
    weights, requires, modes = before
    assert differing(weights, state(model)) == [], "the model's weights or BatchNorm statistics changed"
    assert [p.requires_grad for p in model.parameters()] == requires, "requires_grad changed"
    assert [m.training for m in model.modules()] == modes, "train/eval mode changed"


@pytest.mark.parametrize("case", list(bad_batches()))
def test_fit_refuses_a_bad_first_batch_before_anything_changes(case, small_model, monkeypatch):
    batch, expected = bad_batches()[case]
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    before = prepare(small_model)
    with pytest.raises(ValueError) as info:
        fit(
            small_model,
            three_stage_schedule(epochs=(1, 1, 1)),
            [batch, good_batch()],
            device="cpu",
            progress=False,
        )
    message = str(info.value)
    assert "train_loader" in message and "Fix:" in message, message
    for text in expected:
        assert text in message, (text, message)
    assert steps == []
    assert_untouched(small_model, before)


@pytest.mark.parametrize("case", ["uint8 images", "labels too large", "channels last"])
def test_a_bad_val_loader_is_refused_before_training(case, small_model, monkeypatch):
    batch, expected = bad_batches()[case]
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    before = prepare(small_model)
    with pytest.raises(BatchError, match="val_loader") as info:
        fit(small_model, one_stage_schedule(1), [good_batch()], [batch], device="cpu", progress=False)
    assert all(text in str(info.value) for text in expected)
    assert steps == []
    assert_untouched(small_model, before)


@pytest.mark.parametrize("case", ["uint8 images", "labels too large", "length mismatch"])
def test_evaluate_refuses_a_bad_batch_and_keeps_the_mode(case, small_model):
    batch, expected = bad_batches()[case]
    before = prepare(small_model)
    with pytest.raises(BatchError) as info:
        evaluate(small_model, [batch])
    assert all(text in str(info.value) for text in expected)
    assert_untouched(small_model, before)


def test_labels_are_checked_against_the_models_own_head():
    images, labels = good_batch()
    torch.manual_seed(0)
    five = resnet18_cbam(num_classes=5, placement=None)
    with pytest.raises(BatchError, match="num_classes=5"):
        check_batch(five, images, labels)
    check_batch(five, images, labels % 5)  # in range: accepted
    check_batch(five, images, labels, num_classes=10)  # an explicit num_classes wins


def test_unnormalised_float_images_warn_loudly(small_model):
    images, labels = random_images(8)
    with pytest.warns(UserWarning, match="0–255 pixel values"):
        check_batch(small_model, images.float(), labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_batch(small_model, *good_batch())  # normalised: no warning


def test_an_empty_loader_is_refused_before_training(small_model):
    before = prepare(small_model)
    with pytest.raises(BatchError, match="gave no batches"):
        fit(small_model, one_stage_schedule(1), [], device="cpu", progress=False)
    assert_untouched(small_model, before)


# ------------------------------------------------------------------------------ checkpoints
def counting_loaders():
    return CountingLoader(normalised_batches(1)), None


def test_checkpoint_folder_that_cannot_be_created_fails_before_the_first_epoch(tmp_path, small_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ckpt = blocker / "runs" / "run.ckpt"  # under a regular file: fails for root too (chmod would not)
    loader, _ = counting_loaders()
    before = prepare(small_model)
    with pytest.raises(CheckpointError) as info:
        fit(small_model, one_stage_schedule(1), loader, checkpoint=ckpt, device="cpu", progress=False)
    assert str(ckpt.parent) in str(info.value) and "cannot be created or written" in str(info.value)
    assert loader.passes == 0, "fit started an epoch before finding out the checkpoint cannot be written"
    assert_untouched(small_model, before)
    assert blocker.read_text() == "not a folder"


def test_checkpoint_path_that_is_a_folder_is_refused(tmp_path, small_model):
    loader, _ = counting_loaders()
    with pytest.raises(CheckpointError, match="is a folder"):
        fit(small_model, one_stage_schedule(1), loader, checkpoint=tmp_path, device="cpu", progress=False)
    assert loader.passes == 0


def test_checkpoint_probe_leaves_nothing_behind(tmp_path):
    torch.manual_seed(0)
    model = resnet18_cbam(placement=None)
    ckpt = tmp_path / "new" / "run.ckpt"
    fit(
        model,
        one_stage_schedule(1, 1e-3),
        normalised_batches(1),
        checkpoint=ckpt,
        device="cpu",
        progress=False,
    )
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["run.ckpt"]
    assert checkpoints.load_checkpoint(ckpt)["epoch"] == 1


@pytest.mark.parametrize("resume", [False, True])
def test_a_file_that_is_not_fits_checkpoint_is_never_overwritten(tmp_path, small_model, resume):
    ckpt = tmp_path / "notes.ckpt"
    ckpt.write_bytes(b"my own notes, not a checkpoint")
    loader, _ = counting_loaders()
    with pytest.raises(
        CheckpointError, match="resume=True" if not resume else "not a readable course checkpoint"
    ):
        fit(
            small_model,
            one_stage_schedule(1),
            loader,
            checkpoint=ckpt,
            resume=resume,
            device="cpu",
            progress=False,
        )
    assert ckpt.read_bytes() == b"my own notes, not a checkpoint"
    assert loader.passes == 0


def test_run_cached_checks_its_results_folder_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    built = []
    with pytest.raises(CheckpointError, match="cannot be created or written"):
        experiments.run_cached(
            "run",
            lambda: built.append(1),
            one_stage_schedule(1),
            (None, None),
            blocker / "results",
            {"seed": 0},
        )
    assert built == [], (
        "the model was built (and would have been trained) before the results folder was checked"
    )


# ------------------------------------------------------------------------------ sizes and counts
BAD_COUNTS = [0, -5, True, 2.5, "100"]


@pytest.mark.parametrize("value", BAD_COUNTS)
@pytest.mark.parametrize("name", ["train_size", "val_size"])
def test_load_cifar10_refuses_sizes_that_mean_nothing(name, value, tmp_path):
    with pytest.raises(ValueError, match=name):
        cdata.load_cifar10(root=tmp_path, download=False, verbose=False, **{name: value})


def test_load_cifar10_asked_for_more_than_there_is_says_so(cifar_subset):
    with pytest.warns(UserWarning, match="train_size=6000 but .* holds only 5000"):
        data = cdata.load_cifar10(train_size=6000, val_size=10, download=False, verbose=False)
    assert len(data.train_labels) == 5000 and len(data.val_labels) == 10


@pytest.mark.parametrize("value", BAD_COUNTS)
def test_loaders_refuse_batch_sizes_that_mean_nothing(value):
    images, labels = random_images(16)
    with pytest.raises(ValueError, match="batch_size"):
        cdata.TensorLoader(images, labels, value, device="cpu")
    data = cdata.CifarData(images, labels, images, labels, "test", False)
    with pytest.raises(ValueError, match="batch_size"):
        cdata.make_loaders(data, value, device="cpu")


@pytest.mark.parametrize("value", [0, -32, 1.5, True])
def test_loaders_refuse_image_sizes_that_mean_nothing(value):
    images, labels = random_images(16)
    with pytest.raises(ValueError, match="image_size"):
        cdata.TensorLoader(images, labels, 8, image_size=value, device="cpu")
    with pytest.raises(ValueError, match="image_size"):
        stage_table(resnet18_cbam(placement=None), value)


def test_training_loader_that_gives_no_batch_is_refused_before_training(small_model):
    images, labels = random_images(8)
    loader = cdata.TensorLoader(
        images, labels, 32, train=True, device="cpu"
    )  # made (its val sibling may be used)
    before = prepare(small_model)
    with pytest.raises(BatchError, match="batch_size=32 is more than its images.*drop_last=False"):
        fit(small_model, one_stage_schedule(1), loader, device="cpu", progress=False)
    assert_untouched(small_model, before)
    assert len(cdata.TensorLoader(images, labels, 32, train=True, drop_last=False, device="cpu")) == 1
    with pytest.raises(ValueError, match="no images"):
        cdata.TensorLoader(images[:0], labels[:0], 8, device="cpu")


@pytest.mark.parametrize("value", [0, 1, -3, 2.5, True])
@pytest.mark.parametrize("build", [resnet18_cbam, vgg16_cbam])
def test_models_refuse_class_counts_that_mean_nothing(build, value):
    with pytest.raises(ValueError, match="num_classes"):
        build(num_classes=value)


@pytest.mark.parametrize("epochs", [(5, 15), (5, 0, 30), 10, (5, 15, 30.0), "5,15,30", (5, -1, 3)])
def test_three_stage_schedule_refuses_bad_stage_lengths(epochs):
    with pytest.raises(ValueError, match="epochs"):
        three_stage_schedule(epochs=epochs)


def test_three_stage_schedule_refuses_bad_rates():
    with pytest.raises(ValueError, match="lrs"):
        three_stage_schedule(lrs=(1e-3, 1e-4))
    with pytest.raises(ValueError, match="ratio"):
        three_stage_schedule(differential=True, ratio=0)


@pytest.mark.parametrize("epochs", [0, -1, 2.5, True, (1, 1, 1)])
def test_one_stage_schedule_refuses_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        one_stage_schedule(epochs)


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(train_size=-5), "train_size"),
        (dict(val_size=0), "val_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(epochs=(1, 0, 1)), "epochs"),
    ],
)
def test_presets_refuse_bad_sizes_where_the_notebook_sets_them(override, name):
    with pytest.raises(ValueError, match=name):
        presets.resolve("smoke", **override)
    with pytest.raises(ValueError, match=name):
        presets.resolve("smoke", {"smoke": {}}, **override)


def test_numpy_integers_are_accepted_as_sizes():
    np = pytest.importorskip("numpy")
    images, labels = random_images(16)
    loader = cdata.TensorLoader(images, labels, np.int64(8), device="cpu")
    assert len(loader) == 2
    assert three_stage_schedule(epochs=(np.int64(1), 2, 3)).epochs == 6
    stage = finetune.Stage("s", np.int64(3), "all", 1e-3)
    assert stage.epochs == 3 and type(stage.epochs) is int  # JSON-able in checkpoints and saved runs


# ------------------------------------------------------------------------------ the "high" alias
def test_high_is_the_last_two_stages_of_each_model():
    torch.manual_seed(0)
    resnet, vgg = resnet18_cbam(placement="stage"), vgg16_cbam(placement="stage")
    stage2 = lambda model: three_stage_schedule().plan_for(model)[5].trainable  # noqa: E731 (epoch 6)
    assert stage2(resnet) == {"layer3", "layer4", "cbam", "head"}
    assert stage2(vgg) == {"block4", "block5", "cbam", "head"}
    assert stage2(resnet18_cbam(placement=None, stem="cifar")) == {"stem", "layer3", "layer4", "head"}
    assert [r["trainable"] for r in three_stage_schedule().table(vgg)][1] == "block4, block5, cbam, head"
    # without a model, "high" means the last two groups that are neither new nor cbam/head
    plans = three_stage_schedule(epochs=(1, 1, 1)).plan(["block1", "block2", "block3", "cbam", "head"])
    assert plans[1].trainable == {"block2", "block3", "cbam", "head"}
    # an lr entry for "high" sets the high stages; a group's own entry still wins
    schedule = finetune.Schedule([finetune.Stage("s", 1, "all", {"all": 1e-5, "high": 1e-4, "layer4": 1e-3})])
    lr = schedule.plan_for(resnet)[0].lr
    assert (lr["layer2"], lr["layer3"], lr["layer4"]) == (1e-5, 1e-4, 1e-3)


@pytest.mark.slow
def test_three_stage_schedule_trains_vgg16_high_blocks_in_stage_2():
    torch.manual_seed(0)
    vgg = vgg16_cbam(placement="stage")
    snapshots = []
    groups = lambda: {g: [p.detach().clone() for p in ps] for g, ps in finetune.layer_groups(vgg).items()}  # noqa
    snapshots.append(groups())
    fit(
        vgg,
        three_stage_schedule(epochs=(1, 1, 1)),
        normalised_batches(1, batch_size=4),
        device="cpu",
        progress=False,
        on_epoch_end=lambda h: snapshots.append(groups()),
    )

    def moved(a, b):
        return {g for g in a if any(not torch.equal(x, y) for x, y in zip(a[g], b[g]))}

    assert moved(snapshots[0], snapshots[1]) == {"cbam", "head"}
    assert moved(snapshots[1], snapshots[2]) == {"block4", "block5", "cbam", "head"}
    assert moved(snapshots[2], snapshots[3]) == {
        "block1",
        "block2",
        "block3",
        "block4",
        "block5",
        "cbam",
        "head",
    }


# ------------------------------------------------------------------------------ other arguments of fit
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(schedule=[finetune.Stage("a", 1, "all", 1e-3)]), TypeError, r"finetune.Schedule\(\[...\]\)"),
        (dict(schedule="three_stage"), TypeError, "three_stage_schedule"),
        (dict(model="resnet18"), TypeError, "nn.Module"),
        (dict(label_smoothing=2), ValueError, "label_smoothing"),
        (dict(on_epoch_end=5), TypeError, "on_epoch_end"),
    ],
)
def test_fit_refuses_arguments_torch_would_reject_mid_epoch(kwargs, error, message, small_model):
    loader = CountingLoader(normalised_batches(1))
    args = {"model": small_model, "schedule": one_stage_schedule(1), **kwargs}
    before = prepare(small_model)
    with pytest.raises(error, match=message):
        fit(args.pop("model"), args.pop("schedule"), loader, device="cpu", progress=False, **args)
    assert loader.passes == 0
    assert_untouched(small_model, before)


def test_a_schedule_that_does_not_fit_the_model_leaves_it_untouched(small_model):
    before = prepare(small_model)
    with pytest.raises(ValueError, match="unknown layer group 'block4'"):
        fit(
            small_model,
            finetune.Schedule([finetune.Stage("s", 1, ["block4"], 1e-3)]),
            [good_batch()],
            device="cpu",
            progress=False,
        )
    assert_untouched(small_model, before)


@pytest.mark.slow
def test_vgg16_refuses_images_too_small_for_its_max_pools():
    torch.manual_seed(0)
    vgg = vgg16_cbam(placement=None)
    images, labels = random_images(2, size=16)
    with pytest.raises(BatchError, match="at least 32×32.*image_size=32"):
        check_batch(vgg, images.float() / 255, labels)


def test_make_loaders_wants_load_cifar10s_data():
    images, labels = random_images(8)
    with pytest.raises(TypeError, match="TensorLoader"):
        cdata.make_loaders((images, labels))


@pytest.mark.slow
def test_the_panel_opens_on_vgg16_and_its_templates_work():
    from course_utils import widgets

    torch.manual_seed(0)
    vgg = vgg16_cbam(placement="stage")
    panel = widgets.schedule_designer(vgg, epochs=(1, 1, 1))
    assert panel.error == "" and panel.schedule == three_stage_schedule(epochs=(1, 1, 1))
    assert "block4, block5, cbam, head" in panel.preview.w_table.value
    assert [t.value for t in panel.controls.w_train[1].values()] == [
        g in ("block4", "block5", "cbam", "head") for g in panel.groups
    ]
    for name, make in widgets.TEMPLATES.items():
        panel.controls.w_template.value = name
        assert panel.error == "", (name, panel.error)
        assert panel.schedule == make((1, 1, 1)), name
    groups, new = list(finetune.layer_groups(vgg)), vgg.new_groups
    assert (
        widgets.schedule_from_values(widgets.DEFAULT_VALUES, groups, new, vgg.high_groups)
        == three_stage_schedule()
    )


def test_the_data_instead_of_a_loader_is_refused_with_the_fix(small_model):
    images, labels = random_images(8)
    data = cdata.CifarData(images, labels, images, labels, "test", False)
    before = prepare(small_model)
    with pytest.raises(BatchError, match=r"train_loader must be an iterable.*data.make_loaders\(data\)"):
        fit(small_model, one_stage_schedule(1), data, device="cpu", progress=False)
    assert_untouched(small_model, before)
