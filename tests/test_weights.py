"""Pretrained weights by torchvision's names and enums, files checked against the sha256 prefix in their
name, and the mirrors for weights and CIFAR-10 (issues 9 and 10) — all offline: local folders and file://
URLs.

A generated state_dict cannot match torchvision's real hash (f37072fd), so the tests either name the file
after its own hash (fixture ``self_hashed_imagenet``, which points torchvision's URL at that name) or
check that a file under the real name is refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torchvision import models as tvm
from torchvision.datasets import CIFAR10

from course_utils import data as cdata
from course_utils.machinery import datafiles
from course_utils.machinery.downloads import mirror_url, sha256_prefix_in_name
from course_utils.machinery.weights import WEIGHTS_MIRROR_ENV, WeightsError, weights_cache_path
from course_utils.models import resnet18_cbam, vgg16_cbam

REAL_FILE = "resnet18-f37072fd.pth"


def loaded_from(model, state_file) -> bool:
    state = torch.load(state_file, weights_only=True)
    return torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def sha8(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


# ------------------------------------------------------------------------------ names and enums
@pytest.mark.parametrize(
    "weights",
    [
        tvm.ResNet18_Weights.IMAGENET1K_V1,
        tvm.ResNet18_Weights.DEFAULT,
        "IMAGENET1K_V1",
        "DEFAULT",
        "default",
        "imagenet",
        "ResNet18_Weights.IMAGENET1K_V1",
    ],
)
def test_torchvision_weight_names_and_enums_are_accepted(
    weights, self_hashed_imagenet, no_network, resnet18_state_file
):
    assert loaded_from(resnet18_cbam(weights=weights, placement=None), resnet18_state_file)


@pytest.mark.parametrize("weights", [tvm.VGG16_Weights.IMAGENET1K_V1, "VGG16_Weights.IMAGENET1K_V1"])
def test_weights_of_another_architecture_are_refused(weights):
    with pytest.raises(ValueError, match="VGG16's weights, not resnet18's.*ResNet18_Weights"):
        resnet18_cbam(weights=weights)


def test_resnet_enum_is_refused_by_vgg():
    with pytest.raises(ValueError, match="ResNet18's weights, not vgg16's"):
        vgg16_cbam(weights=tvm.ResNet18_Weights.IMAGENET1K_V1)


@pytest.mark.parametrize("weights", ["ResNet18_Weights.IMAGENET1K_V9", 3, 1.0])
def test_unknown_weights_say_what_is_accepted(weights):
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resnet18_cbam(weights=weights)


def test_weights_cache_path_is_torchvisions(torch_home):
    assert weights_cache_path("resnet18") == torch_home / "hub" / "checkpoints" / REAL_FILE
    assert weights_cache_path("vgg16").name == "vgg16-397923af.pth"
    assert weights_cache_path("resnet18", tvm.ResNet18_Weights.DEFAULT).name == REAL_FILE
    with pytest.raises(ValueError, match="arch"):
        weights_cache_path("resnet50")


# ------------------------------------------------------------------------------ partial files
def test_a_partial_file_in_the_cache_is_reported_not_loaded(
    torch_home, no_network, resnet18_state_file, monkeypatch
):
    cache = torch_home / "hub" / "checkpoints" / REAL_FILE
    cache.parent.mkdir(parents=True)
    blob = resnet18_state_file.read_bytes()
    cache.write_bytes(blob[: len(blob) // 3])  # an interrupted download under torchvision's name
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights="imagenet")
    message = str(info.value)
    assert str(cache) in message and "incomplete" in message and "Delete it" in message, message
    assert loads == [], "the partial file was loaded"
    assert cache.exists(), "the user's file is reported, not deleted behind their back"


def test_a_complete_file_under_the_real_name_but_other_content_is_refused(
    torch_home, no_network, resnet18_state_file
):
    cache = torch_home / "hub" / "checkpoints" / REAL_FILE
    cache.parent.mkdir(parents=True)
    shutil.copy(resnet18_state_file, cache)  # loadable, but not torchvision's file: its sha256 says so
    with pytest.raises(WeightsError, match="its name says f37072fd"):
        resnet18_cbam(weights="imagenet")


def test_a_cached_file_that_matches_its_name_loads(self_hashed_imagenet, no_network, resnet18_state_file):
    assert sha256_prefix_in_name(self_hashed_imagenet) == sha8(self_hashed_imagenet)
    assert loaded_from(resnet18_cbam(weights="DEFAULT", placement=None), resnet18_state_file)
    blob = self_hashed_imagenet.read_bytes()
    self_hashed_imagenet.write_bytes(blob[:-1000])  # the same name, truncated: checked again, refused
    with pytest.raises(WeightsError, match="incomplete"):
        resnet18_cbam(weights="DEFAULT")


def test_a_path_whose_name_carries_a_hash_is_checked(tmp_path, resnet18_state_file):
    named = tmp_path / f"resnet18-{sha8(resnet18_state_file)}.pth"
    shutil.copy(resnet18_state_file, named)
    assert loaded_from(resnet18_cbam(weights=named, placement=None), resnet18_state_file)
    truncated = tmp_path / "copy" / named.name
    truncated.parent.mkdir()
    truncated.write_bytes(named.read_bytes()[:-5000])
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights=truncated)
    assert str(truncated) in str(info.value) and "incomplete" in str(info.value)
    plain = tmp_path / "my_weights.pth"  # no hash in the name: loaded as before
    shutil.copy(resnet18_state_file, plain)
    assert loaded_from(resnet18_cbam(weights=str(plain), placement=None), resnet18_state_file)


# ------------------------------------------------------------------------------ weights mirror
def self_hashed_mirror(tmp_path, resnet18_state_file, monkeypatch):
    """A mirror folder holding the random weights under their own hash, torchvision's URL pointing there."""
    prefix = sha8(resnet18_state_file)
    monkeypatch.setattr(
        tvm.ResNet18_Weights.IMAGENET1K_V1.value,
        "url",
        f"https://download.pytorch.org/models/resnet18-{prefix}.pth",
    )
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(resnet18_state_file, mirror / f"resnet18-{prefix}.pth")
    return mirror, f"resnet18-{prefix}.pth"


@pytest.mark.parametrize("kind", ["folder", "file-url"])
def test_weights_come_from_the_mirror_offline(
    kind, torch_home, no_network, tmp_path, resnet18_state_file, monkeypatch, capsys
):
    mirror, name = self_hashed_mirror(tmp_path, resnet18_state_file, monkeypatch)
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, str(mirror) if kind == "folder" else mirror.as_uri())
    model = resnet18_cbam(weights="imagenet", placement=None)
    assert loaded_from(model, resnet18_state_file)
    cached = torch_home / "hub" / "checkpoints" / name
    assert cached.read_bytes() == (mirror / name).read_bytes()
    assert str(cached) in capsys.readouterr().out


def test_a_wrong_file_at_the_mirror_is_refused_and_not_kept(
    torch_home, no_network, tmp_path, resnet18_state_file, monkeypatch
):
    mirror, name = self_hashed_mirror(tmp_path, resnet18_state_file, monkeypatch)
    blob = (mirror / name).read_bytes()
    (mirror / name).write_bytes(blob[: len(blob) // 2])  # truncated at the mirror
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, str(mirror))
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights="imagenet")
    assert name in str(info.value) and "wrong or truncated" in str(info.value), str(info.value)
    assert list((torch_home / "hub" / "checkpoints").iterdir()) == [], "a bad download was left in the cache"


def test_a_mirror_without_the_file_names_it(torch_home, no_network, tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_MIRROR_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match=REAL_FILE):
        resnet18_cbam(weights="imagenet")


def test_mirror_url_appends_the_file_name(tmp_path):
    assert mirror_url("https://example.org/models/", "a.pth") == "https://example.org/models/a.pth"
    assert mirror_url("file:///srv/m", "a.pth") == "file:///srv/m/a.pth"
    assert mirror_url(tmp_path, "a.pth") == (tmp_path / "a.pth").as_uri()


# ------------------------------------------------------------------------------ CIFAR-10 mirror
@pytest.fixture
def fake_cifar_archive(tmp_path, monkeypatch):
    """A small archive in torchvision's CIFAR-10 layout (5 train batches of 10 images, a test batch of 10),
    with torchvision's md5s patched to this archive's (a generated archive cannot match the real ones).
    Returns ``(folder holding cifar-10-python.tar.gz, train labels, test labels)``."""
    rng = np.random.default_rng(0)
    members, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch_labels = [int(x) for x in rng.integers(0, 10, 10)]
        blob = pickle.dumps(
            {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": batch_labels}
        )
        members[name], labels[name] = blob, batch_labels
    members["batches.meta"] = pickle.dumps({"label_names": list(cdata.CLASSES)})
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    folder = tmp_path / "cifar_mirror"
    folder.mkdir()
    archive = folder / CIFAR10.filename
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    train_labels = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    return folder, train_labels, labels["test_batch"]


@pytest.mark.parametrize("how", ["argument folder", "argument file-url", "environment"])
def test_cifar10_comes_from_the_mirror_offline(how, fake_cifar_archive, tmp_path, no_network, monkeypatch):
    folder, train_labels, test_labels = fake_cifar_archive
    root = tmp_path / "data"
    kwargs = {}
    if how == "environment":
        monkeypatch.setenv(datafiles.CIFAR10_MIRROR_ENV, str(folder))
    else:
        kwargs["mirror"] = folder if how == "argument folder" else folder.as_uri()
    data = cdata.load_cifar10(root=root, download=False, verbose=False, **kwargs)
    assert data.full and "archive" in data.source
    assert sorted(data.train_labels.tolist()) == sorted(train_labels)
    assert data.val_labels.tolist() == test_labels  # the validation split keeps its order
    assert (root / CIFAR10.filename).read_bytes() == (folder / CIFAR10.filename).read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "other file"])
def test_a_wrong_cifar10_archive_at_the_mirror_is_refused_by_name(
    damage, fake_cifar_archive, tmp_path, no_network
):
    folder, _, _ = fake_cifar_archive
    archive = folder / CIFAR10.filename
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"x" * len(blob))
    root = tmp_path / "data"  # no shipped subset there: the error says everything that was tried
    with pytest.raises(datafiles.DataUnavailableError) as info:
        cdata.load_cifar10(root=root, mirror=folder, download=False, verbose=False)
    message = str(info.value)
    assert CIFAR10.filename in message and "md5" in message and "wrong or truncated" in message, message
    assert not (root / CIFAR10.filename).exists(), "the bad archive was kept where it would be used"


def test_a_partial_cifar10_archive_in_the_data_folder_is_named(fake_cifar_archive, tmp_path, no_network):
    folder, _, _ = fake_cifar_archive
    root = tmp_path / "data"
    root.mkdir()
    blob = (folder / CIFAR10.filename).read_bytes()
    (root / CIFAR10.filename).write_bytes(blob[:100])
    with pytest.raises(datafiles.DataUnavailableError) as info:
        cdata.load_cifar10(root=root, verbose=False)
    assert str(root / CIFAR10.filename) in str(info.value) and "delete it" in str(info.value)


def test_a_good_cifar10_archive_in_the_data_folder_is_used_offline(
    fake_cifar_archive, tmp_path, no_network, monkeypatch
):
    folder, train_labels, _ = fake_cifar_archive
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(folder / CIFAR10.filename, root)
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    data = cdata.load_cifar10(root=root, verbose=False)
    assert data.full and len(data.train_labels) == len(train_labels)
