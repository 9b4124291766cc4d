"""The fast path's augmentation, and ``python -m course_utils bench`` end to end on tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from course_utils.data import CIFAR_MEAN, CIFAR_STD, TensorLoader
from course_utils.machinery import cli

N, PAD = 48, 4


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Random uint8 images: every crop offset and flip of one gives a different picture."""
    return torch.randint(
        0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )


def loader(images, seed=0, **kw) -> TensorLoader:
    # labels = image ids, so every output can be traced back to its source image
    return TensorLoader(images, torch.arange(len(images)), 16, train=True, device="cpu", seed=seed, **kw)


def one_epoch(ld: TensorLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ld.set_epoch(epoch)
    xs, ids = zip(*ld)
    return torch.cat(xs), torch.cat(ids)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to 0..255 pixel values (floats)."""
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def crop_params(source: torch.Tensor, out: torch.Tensor) -> tuple[int, int, bool]:
    """The ``(dy, dx, flip)`` that turns ``source`` (3, 32, 32) into ``out``, searched over all of them."""
    padded = torch.nn.functional.pad(source, (PAD,) * 4)
    found = [
        (dy, dx, flip)
        for dy in range(2 * PAD + 1)
        for dx in range(2 * PAD + 1)
        for flip in (False, True)
        if torch.equal(
            padded[:, dy : dy + 32, dx : dx + 32].flip(-1) if flip else padded[:, dy : dy + 32, dx : dx + 32],
            out,
        )
    ]
    assert len(found) == 1, f"output is not one crop+flip of its source image: {found}"
    return found[0]


def test_batches_have_the_right_shape_dtype_and_normalised_range(images):
    ld = loader(images)
    batches = list(ld)
    assert len(batches) == len(ld) == N // 16
    for x, y in batches:
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
    x = torch.cat([b[0] for b in batches])
    pixels = to_uint8(x)
    # normalised with CIFAR-10's mean/std: undone, every value is a whole pixel value in 0..255 ...
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert torch.allclose(pixels, pixels.round(), atol=2e-3)
    # ... and zero padding shows up as exactly (0 - mean) / std
    lowest = torch.tensor([-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)])
    assert torch.allclose(x.amin(dim=(0, 2, 3)), lowest, atol=1e-5)
    # resizing on the device: other input sizes for the same images
    x64, _ = next(iter(loader(images, image_size=64)))
    assert x64.shape == (16, 3, 64, 64)
    x_cl, _ = next(iter(loader(images, channels_last=True)))
    assert x_cl.is_contiguous(memory_format=torch.channels_last)


def test_every_output_is_a_padded_crop_and_flip_that_changes_between_epochs(images):
    ld = loader(images)
    params = {}
    for epoch in (0, 1):
        x, ids = one_epoch(ld, epoch)
        assert sorted(ids.tolist()) == list(range(N - N % 16))  # each image at most once per epoch
        pixels = to_uint8(x).round().to(torch.uint8)
        params[epoch] = {i: crop_params(images[i], out) for i, out in zip(ids.tolist(), pixels)}
    common = sorted(set(params[0]) & set(params[1]))
    changed = [i for i in common if params[0][i] != params[1][i]]
    assert len(changed) >= 0.8 * len(common), "crops/flips hardly change between epochs"
    for epoch, p in params.items():
        offsets = {(dy, dx) for dy, dx, _ in p.values()}
        flips = [flip for _, _, flip in p.values()]
        assert len(offsets) >= 10, f"epoch {epoch}: only {len(offsets)} different crop offsets"
        assert 0.2 < sum(flips) / len(flips) < 0.8, f"epoch {epoch}: flipped {sum(flips)} of {len(flips)}"
    # and the order is new every epoch
    assert not torch.equal(one_epoch(ld, 0)[1], one_epoch(ld, 1)[1])


def test_the_same_seed_and_epoch_give_identical_batches(images):
    a, b, other = loader(images, seed=3), loader(images, seed=3), loader(images, seed=4)
    for epoch in (0, 5):
        xa, ya = one_epoch(a, epoch)
        xb, yb = one_epoch(b, epoch)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, one_epoch(other, epoch)[0])
    # passes without set_epoch advance the epoch: the second pass is epoch 1
    fresh = loader(images, seed=3)
    list(fresh)
    second = torch.cat([x for x, _ in fresh])
    assert torch.equal(second, one_epoch(a, 1)[0])


@pytest.mark.slow  # the whole bench command, both paths
def test_bench_command_end_to_end(tmp_path, capsys):
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
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "train img/s" in printed and "eval img/s" in printed and "course / plain" in printed
    result = json.loads(out.read_text())
    assert set(result["train"]) == {"plain", "lesson", "course"}
    assert set(result["eval"]) == {"plain", "course"}
    for section in ("train", "eval"):
        for row in result[section].values():
            assert row["images_per_s"] > 0 and row["peak_mb"] > 0 and row["images"] == 32
            assert len(row["runs_images_per_s"]) == 1
    assert result["ratio"]["train"] == pytest.approx(
        result["train"]["course"]["images_per_s"] / result["train"]["plain"]["images_per_s"]
    )
    assert result["ratio"]["eval"] == pytest.approx(
        result["eval"]["course"]["images_per_s"] / result["eval"]["plain"]["images_per_s"]
    )
    assert result["ratio"]["train_vs_lesson"] == pytest.approx(
        result["train"]["course"]["images_per_s"] / result["train"]["lesson"]["images_per_s"]
    )
    assert result["config"]["device"] == "cpu" and result["config"]["data"] == "synthetic uint8 images"
    assert result["memory_method"]
    # a busy machine at the start is flagged; the benchmark's own load at the end is not
    from course_utils.machinery.bench import format_table

    cores = result["machine"]["cpu_count"]
    result["machine"].update(load_avg_start=0.1, load_avg_end=cores * 2.0)
    assert "WARNING" not in format_table(result)
    result["machine"].update(load_avg_start=cores * 1.0)
    assert "WARNING: the machine was busy" in format_table(result)


def test_bench_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--model", "--image-size", "--images", "--repeats", "--json", "--compile"):
        assert option in text


@pytest.mark.slow  # trains both paths
def test_accuracy_mode_trains_both_paths_on_the_same_split(tmp_path):
    """``bench --accuracy``: both paths on the same real split, one accuracy per seed, summary consistent."""
    from course_utils.machinery import bench

    result = bench.run_accuracy(
        device="cpu",
        epochs=1,
        seeds=2,
        train_size=200,
        val_size=100,
        batch_size=50,
        workers=0,
        progress=False,
    )
    assert result["config"]["train"] == 200 and result["config"]["val"] == 100
    for row in result["accuracy"].values():
        assert len(row["val_acc"]) == 2
        assert all(0 <= a <= 1 and round(a * 100) == pytest.approx(a * 100) for a in row["val_acc"]), row
        assert row["mean"] == pytest.approx(sum(row["val_acc"]) / 2)
    acc = result["accuracy"]
    assert result["difference"] == pytest.approx(acc["course"]["mean"] - acc["plain"]["mean"])
    text = bench.format_accuracy(result)
    assert "course - plain" in text and f"{acc['plain']['mean']:.3f}" in text
