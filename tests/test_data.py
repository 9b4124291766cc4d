"""CIFAR-10 sources and the tensor loaders (course_utils.data)."""

from __future__ import annotations

import io
import tarfile
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import random_images

from course_utils import data as cdata
from course_utils.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorLoader,
    balanced_subset,
    crop_flip,
    load_cifar10,
)
from course_utils.machinery import datafiles
from course_utils.machinery.datafiles import DataUnavailableError

SHIPPED = Path(cdata.__file__).resolve().parents[1] / "data" / datafiles.SHIPPED_SUBSET


@pytest.fixture
def shipped_root(tmp_path):
    """A data folder holding only (a link to) the shipped subset."""
    root = tmp_path / "data"
    root.mkdir()
    (root / datafiles.SHIPPED_SUBSET).symlink_to(SHIPPED)
    return root


def write_image_tar(path, splits=(("train", 3), ("val", 2))):
    """A small subset tarball in the shipped layout: ``split/<class>/NNNN.jpg``, n images per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in splits:
            for cls in cdata.CLASSES:
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                        buf, format="JPEG"
                    )
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


@pytest.fixture
def small_root(tmp_path):
    """A data folder whose subset tarball holds 3 train and 2 val images per class (quick to read)."""
    root = tmp_path / "small"
    root.mkdir()
    write_image_tar(root / datafiles.SHIPPED_SUBSET)
    return root


def class_counts(labels):
    return Counter(labels.tolist())


# ------------------------------------------------------------------------------ sources
def test_offline_falls_back_to_the_shipped_subset_loudly(shipped_root, no_network, monkeypatch, capsys):
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    data = load_cifar10(shipped_root, train_size=100, val_size=50)
    out = capsys.readouterr().out
    assert data.source.startswith("shipped subset") and not data.full
    assert "shipped subset" in out and "正在使用随课程附带的 CIFAR-10 小子集" in out
    assert "downloading CIFAR-10 failed" in out, "the reason for the fallback must be printed"
    assert data.train_images.shape == (100, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.val_images.shape == (50, 3, 32, 32)
    assert class_counts(data.train_labels) == dict.fromkeys(range(10), 10)
    assert class_counts(data.val_labels) == dict.fromkeys(range(10), 5)
    assert not (shipped_root / "cifar-10-batches-py").exists()


def test_whole_shipped_subset_is_balanced_and_real(shipped_root, monkeypatch):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    data = load_cifar10(shipped_root, verbose=False)
    assert len(data.train_labels) == 5000 and len(data.val_labels) == 1000
    assert class_counts(data.train_labels) == dict.fromkeys(range(10), 500)
    assert class_counts(data.val_labels) == dict.fromkeys(range(10), 100)
    # real photos, not noise: neighbouring pixels are strongly correlated
    x = data.train_images[:200].float()
    corr = np.corrcoef(x[..., :-1].flatten().numpy(), x[..., 1:].flatten().numpy())[0, 1]
    assert corr > 0.8
    # validation images are held out: none of them is also a training image
    train_keys = {bytes(img.numpy()) for img in data.train_images}
    assert not any(bytes(img.numpy()) in train_keys for img in data.val_images)


def test_course_offline_skips_the_download(small_root, monkeypatch, capsys):
    calls = []
    real = datafiles.from_torchvision

    def spy(root, download):
        calls.append(download)
        if download:
            raise urllib.error.URLError("no network (test)")
        return real(root, download)

    monkeypatch.setattr(datafiles, "from_torchvision", spy)
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    data = load_cifar10(small_root, train_size=20, val_size=10)
    assert calls == [] and data.source.startswith("shipped subset")
    assert "COURSE_OFFLINE" in capsys.readouterr().out
    monkeypatch.delenv("COURSE_OFFLINE")
    load_cifar10(small_root, train_size=20, val_size=10)
    assert calls == [True], "without COURSE_OFFLINE the download is tried"


def test_no_source_at_all_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert (
        "cifar-10-python.tar.gz" in message
        and str(tmp_path) in message
        and datafiles.SHIPPED_SUBSET in message
    )


def test_truncated_shipped_subset_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    blob = SHIPPED.read_bytes()
    (tmp_path / datafiles.SHIPPED_SUBSET).write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DataUnavailableError) as info:
        load_cifar10(tmp_path)
    assert str(tmp_path / datafiles.SHIPPED_SUBSET) in str(info.value)


def test_subset_without_val_split_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    write_image_tar(tmp_path / datafiles.SHIPPED_SUBSET, splits=(("train", 1),))
    with pytest.raises(DataUnavailableError, match="val"):
        load_cifar10(tmp_path)


def test_corrupted_local_copy_falls_back(small_root, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    (small_root / "cifar-10-batches-py").mkdir()
    (small_root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"broken")
    data = load_cifar10(small_root, train_size=10, val_size=10)
    assert data.source.startswith("shipped subset")
    assert "incomplete or corrupted" in capsys.readouterr().out


def test_balanced_subset():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(5))]
    idx = balanced_subset(labels, 230, seed=1)
    assert len(idx) == len(set(idx.tolist())) == 230
    counts = class_counts(labels[idx])
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 10
    assert torch.equal(idx, balanced_subset(labels, 230, seed=1))
    assert not torch.equal(idx, balanced_subset(labels, 230, seed=2))
    assert sorted(balanced_subset(labels, None).tolist()) == list(range(1000))


# ------------------------------------------------------------------------------ augmentation
def normalized(images_u8, mean=CIFAR_MEAN, std=CIFAR_STD):
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images_u8.float() / 255 - m) / s


def manual_crop_flip(images, dy, dx, flip, pad):
    padded = F.pad(images, (pad, pad, pad, pad))
    h, w = images.shape[-2:]
    out = torch.stack(
        [padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))]
    )
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)


def test_crop_flip_identity_and_mirror():
    images, _ = random_images(8)
    pad = 4
    center = torch.full((8,), pad)
    assert torch.equal(crop_flip(images, center, center, torch.zeros(8, dtype=torch.bool), pad), images)
    assert torch.equal(
        crop_flip(images, center, center, torch.ones(8, dtype=torch.bool), pad), images.flip(-1)
    )
    zero = torch.zeros(8, dtype=torch.long)
    assert torch.equal(crop_flip(images, zero, zero, torch.zeros(8, dtype=torch.bool), 0), images)


def test_crop_flip_matches_pad_and_slice():
    images, _ = random_images(16)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    got = crop_flip(images, dy, dx, flip, 4)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, manual_crop_flip(images, dy, dx, flip, 4))
    shifted = crop_flip(
        images, torch.full((16,), 0), torch.full((16,), 4), torch.zeros(16, dtype=torch.bool), 4
    )
    assert (shifted[:, :, :4] == 0).all(), "the crop pads with zeros"


def epoch_batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def test_train_batches_are_augmented_normalized_crops():
    images, labels = random_images(96)
    loader = TensorLoader(images, labels, 32, train=True, device="cpu", seed=4)
    batches = epoch_batches(loader, 3)
    assert len(batches) == len(loader) == 3
    order, dy, dx, flip = loader.epoch_randomness(3)
    expected = normalized(manual_crop_flip(images[order], dy[order], dx[order], flip[order], 4))
    got = torch.cat([b[0] for b in batches])
    assert got.dtype == torch.float32 and got.shape == (96, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels[order])
    assert sorted(order.tolist()) == list(range(96)), "each image once per epoch"
    assert flip.any() and not flip.all() and (dy != 4).any() and (dx != 4).any()


def test_randomness_depends_only_on_seed_and_epoch():
    images, labels = random_images(64)
    a = TensorLoader(images, labels, 32, train=True, device="cpu", seed=1)
    b = TensorLoader(images, labels, 32, train=True, device="cpu", seed=1)
    other_seed = TensorLoader(images, labels, 32, train=True, device="cpu", seed=2)
    a2, b2 = epoch_batches(a, 2), epoch_batches(b, 2)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a2, b2))
    a3 = epoch_batches(a, 3)
    assert not torch.equal(a2[0][0], a3[0][0]), "crops, flips and order must change between epochs"
    assert not torch.equal(a2[0][0], epoch_batches(other_seed, 2)[0][0])
    # the same epoch again (e.g. after a resume) gives the same batches
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a2, epoch_batches(a, 2)))


def test_passes_without_set_epoch_advance_the_epoch():
    images, labels = random_images(64)
    loader = TensorLoader(images, labels, 64, train=True, device="cpu", seed=0)
    reference = TensorLoader(images, labels, 64, train=True, device="cpu", seed=0)
    first, second = epoch_batches(loader), epoch_batches(loader)
    assert not torch.equal(first[0][0], second[0][0])
    assert torch.equal(first[0][0], epoch_batches(reference, 0)[0][0])
    assert torch.equal(second[0][0], epoch_batches(reference, 1)[0][0])
    # after set_epoch(5) a plain pass continues with epoch 6, it does not repeat epoch 5
    loader.set_epoch(5)
    fifth, sixth = epoch_batches(loader), epoch_batches(loader)
    assert torch.equal(fifth[0][0], epoch_batches(reference, 5)[0][0])
    assert torch.equal(sixth[0][0], epoch_batches(reference, 6)[0][0])


def test_eval_loader_returns_every_image_once_in_order_unaugmented():
    images, labels = random_images(70)
    loader = TensorLoader(images, labels, 32, train=False, device="cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for _ in range(2):  # and the same on every pass
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [32, 32, 6] and len(loader) == 3
        torch.testing.assert_close(
            torch.cat([b[0] for b in batches]),
            normalized(images, IMAGENET_MEAN, IMAGENET_STD),
            rtol=0,
            atol=1e-5,
        )
        assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_resize_and_validation():
    images, labels = random_images(8)
    x, _ = next(iter(TensorLoader(images, labels, 8, device="cpu", image_size=64)))
    assert x.shape == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(images.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        TensorLoader(images, labels[:5])
    assert len(TensorLoader(images, labels, 3, train=True, device="cpu")) == 2  # drop_last when training


def test_make_loaders_and_plain_pipeline_agree(cifar_subset):
    train, val = cdata.make_loaders(cifar_subset, 50, pretrained=True, device="cpu")
    assert train.train and not val.train and val.batch_size == 256
    fast = torch.cat([b[0] for b in val])
    plain = cdata.plain_loader(
        cifar_subset.val_images,
        cifar_subset.val_labels,
        256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_workers=0,
    )
    torch.testing.assert_close(fast, torch.cat([b[0] for b in plain]), rtol=0, atol=1e-5)
    assert cdata.normalization(True) == (IMAGENET_MEAN, IMAGENET_STD)
    assert cdata.normalization(False) == (CIFAR_MEAN, CIFAR_STD)
