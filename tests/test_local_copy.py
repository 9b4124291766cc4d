"""``machinery.datafiles.build_local_copy``: CIFAR-10 in torchvision's on-disk layout from a JPEG tar,
held-out images kept out."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch

from course_utils import data as cdata
from course_utils.machinery import datafiles


def jpeg(rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, members, shuffle_seed=None):
    members = list(members)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(members)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def tars(tmp_path):
    """A 'training split' tar (4 images per class) and a subset tar holding 1 of each class under val/."""
    rng = np.random.default_rng(0)
    train = [(f"train/{cls}/{i:04d}.jpg", jpeg(rng)) for cls in cdata.CLASSES for i in range(4)]
    val = [(f"val/{name.split('/')[1]}/{name.split('/')[2]}", blob) for name, blob in train[::4]]
    return {
        "members": train,
        "held_out": val,
        "source": write_tar(tmp_path / "train.tar.gz", train),
        "subset": write_tar(tmp_path / "subset.tar.gz", train[1::4] + val),
    }


def decoded(blob):
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1)


def image_set(images):
    return sorted(bytes(x.flatten().numpy()) for x in images)


def test_layout_loads_as_the_local_copy_with_the_held_out_images_as_validation(tars, tmp_path, capsys):
    root = tmp_path / "data"
    target = datafiles.build_local_copy(tars["source"], root, held_out_tar=tars["subset"])
    assert target == root / "cifar-10-batches-py"
    assert sorted(p.name for p in target.iterdir()) == [
        "batches.meta",
        "course_local_copy.json",
        *(f"data_batch_{k}" for k in range(1, 6)),
        "test_batch",
    ]
    with open(target / "data_batch_1", "rb") as f:  # the official release's format
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape[1] == 3072 and len(batch["labels"]) == 6
    data = cdata.load_cifar10(root, download=False)
    assert data.source.startswith("local copy") and "来自 local copy" in capsys.readouterr().out
    assert (len(data.train_labels), len(data.val_labels)) == (30, 10)
    held_out = [decoded(blob) for _, blob in tars["held_out"]]
    assert image_set(data.val_images) == image_set(held_out)
    assert not set(image_set(data.train_images)) & set(image_set(held_out)), (
        "a validation image is in training"
    )
    # labels follow the class folders
    for image, label in zip(data.val_images, data.val_labels):
        name = next(n for n, b in tars["held_out"] if torch.equal(decoded(b), image))
        assert cdata.CLASSES[label] == name.split("/")[1]
    manifest = json.loads((target / datafiles.LOCAL_COPY_MANIFEST).read_text())
    assert (manifest["train"], manifest["test"]) == (30, 10)
    assert manifest["md5"]["test_batch"] == hashlib.md5((target / "test_batch").read_bytes()).hexdigest()


def test_torchvision_checks_the_manifest_md5s_and_a_damaged_batch_is_reported(tars, tmp_path, capsys):
    from torchvision.datasets import CIFAR10

    root = tmp_path / "data"
    target = datafiles.build_local_copy(tars["source"], root, held_out_tar=tars["subset"])
    with pytest.raises(RuntimeError):  # torchvision's own md5s are those of the official files
        CIFAR10(str(root), train=True, download=False)
    reader = datafiles.torchvision_cifar10(root)
    assert issubclass(reader, CIFAR10) and len(reader(str(root), train=False)) == 10
    (target / "data_batch_3").write_bytes((target / "data_batch_3").read_bytes()[:-10])
    (root / datafiles.SHIPPED_SUBSET).write_bytes(tars["subset"].read_bytes())
    data = cdata.load_cifar10(root, download=False)
    assert data.source.startswith("shipped subset")
    assert "incomplete or corrupted" in capsys.readouterr().out


def test_same_files_whatever_the_tar_order(tars, tmp_path):
    shuffled = write_tar(tmp_path / "shuffled.tar.gz", tars["members"], shuffle_seed=1)
    a = datafiles.build_local_copy(tars["source"], tmp_path / "a", held_out_tar=tars["subset"])
    b = datafiles.build_local_copy(shuffled, tmp_path / "b", held_out_tar=tars["subset"])
    md5 = lambda t: json.loads((t / datafiles.LOCAL_COPY_MANIFEST).read_text())["md5"]  # noqa: E731
    assert md5(a) == md5(b)


def test_held_out_images_missing_from_the_source_are_refused(tars, tmp_path):
    other = write_tar(tmp_path / "other.tar.gz", [("val/cat/9999.jpg", jpeg(np.random.default_rng(7)))])
    with pytest.raises(ValueError, match=r"1 of the 1 held-out images .* are not in"):
        datafiles.build_local_copy(tars["source"], tmp_path / "data", held_out_tar=other)
    assert not (tmp_path / "data").exists(), "checked before anything is written"


def test_an_existing_copy_is_never_replaced(tars, tmp_path):
    target = tmp_path / "data" / "cifar-10-batches-py"
    target.mkdir(parents=True)
    (target / "data_batch_1").write_bytes(b"torchvision's download")
    with pytest.raises(ValueError, match="exists already"):
        datafiles.build_local_copy(tars["source"], tmp_path / "data", held_out_tar=tars["subset"])
    assert (target / "data_batch_1").read_bytes() == b"torchvision's download"


def test_built_from_the_shipped_subset_its_val_images_are_the_validation_split(tmp_path):
    """What ``.ci/gpu_course.sh --tiny`` does; on the GPU the source is the full training split as JPEG."""
    shipped = datafiles.DATA_DIR / datafiles.SHIPPED_SUBSET
    datafiles.build_local_copy(shipped, tmp_path, held_out_tar=shipped)
    data = cdata.load_cifar10(tmp_path, download=False, verbose=False)
    subset = datafiles.read_image_tar(shipped)
    assert image_set(data.val_images) == image_set(subset["val"][0])
    assert image_set(data.train_images) == image_set(subset["train"][0])
