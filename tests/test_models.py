"""ResNet18/VGG16 with CBAM (course_utils.models): layer groups, identity insertion, shapes, weights
loading."""

from __future__ import annotations

import os
import pickle
import time
from collections import Counter

import pytest
import torch
from _helpers import RESNET_GROUPS, VGG_GROUPS, expected_group
from torchvision import models as tvm

from course_utils import models as cm
from course_utils.cbam import CBAM
from course_utils.models import WeightsError, layer_groups, resnet18_cbam, stage_table, vgg16_cbam

IMAGENET_FILE = "resnet18-f37072fd.pth"


def check_groups(model, expected_order):
    groups = layer_groups(model)
    ids = Counter(id(p) for params in groups.values() for p in params)
    all_params = dict(model.named_parameters())
    assert set(ids) == {id(p) for p in all_params.values()}, "some parameter is in no group"
    assert max(ids.values()) == 1, "some parameter is in two groups"
    assert sum(len(v) for v in groups.values()) == len(all_params)
    # every parameter sits in the group its name says (worked out independently)
    names = {id(p): n for n, p in all_params.items()}
    for group, params in groups.items():
        for p in params:
            assert expected_group(names[id(p)]) == group, (names[id(p)], group)
    present = [g for g in expected_order if any(expected_group(n) == g for n in all_params)]
    assert list(groups) == present, f"groups must be ordered input → output: {list(groups)}"
    return groups


# ------------------------------------------------------------------------------ groups
@pytest.mark.parametrize("placement", ["stage", "block", "high", None])
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet_layer_groups_cover_every_parameter_once(placement, stem):
    model = resnet18_cbam(placement=placement, stem=stem)
    groups = check_groups(model, RESNET_GROUPS)
    expected = (
        ["stem", "layer1", "layer2", "layer3", "layer4"] + ["cbam"] * (placement is not None) + ["head"]
    )
    assert list(groups) == expected
    assert model.new_groups == ("stem",) * (stem == "cifar") + ("cbam",) * (placement is not None) + ("head",)
    n_cbam = sum(isinstance(m, CBAM) for m in model.modules())
    assert n_cbam == {"stage": 4, "block": 8, "high": 2, None: 0}[placement]
    counts = cm.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def vgg_pair():
    """A plain VGG16 and one with identity-initialised CBAM, same seed → same backbone and head."""
    torch.manual_seed(7)
    plain = vgg16_cbam(placement=None).eval()
    torch.manual_seed(7)
    with_cbam = vgg16_cbam(placement="stage", identity_init=True).eval()
    return plain, with_cbam


@pytest.mark.slow
def test_vgg_layer_groups_and_identity_insertion(vgg_pair):
    plain, with_cbam = vgg_pair
    groups = check_groups(with_cbam, VGG_GROUPS)
    assert list(groups) == ["block1", "block2", "block3", "block4", "block5", "cbam", "head"]
    assert list(check_groups(plain, VGG_GROUPS)) == ["block1", "block2", "block3", "block4", "block5", "head"]
    assert with_cbam.new_groups == ("cbam", "head")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), with_cbam(x))
    assert [r["shape"] for r in stage_table(with_cbam)] == [
        (64, 16, 16),
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
        (512, 1, 1),
    ]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="placement"):
        resnet18_cbam(placement="everywhere")
    with pytest.raises(ValueError, match="stem"):
        resnet18_cbam(stem="tiny")
    with pytest.raises(ValueError, match="placement"):
        vgg16_cbam(placement="block")


# ------------------------------------------------------------------------------ identity insertion
@pytest.mark.parametrize("placement", ["stage", "block", "high"])
def test_identity_cbam_leaves_logits_unchanged(placement, resnet18_state_file):
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    plain = resnet18_cbam(weights=resnet18_state_file, placement=None).eval()
    torch.manual_seed(3)
    ident = resnet18_cbam(weights=resnet18_state_file, placement=placement, identity_init=True).eval()
    torch.manual_seed(3)
    paper = resnet18_cbam(weights=resnet18_state_file, placement=placement, identity_init=False).eval()
    # same seed → same new head whatever the placement, so the models differ only by their CBAMs
    assert torch.equal(plain.fc.weight, ident.fc.weight) and torch.equal(plain.fc.weight, paper.fc.weight)
    with torch.no_grad():
        base, same, changed = plain(x), ident(x), paper(x)
        feats_plain, feats_ident = plain.features(x), ident.features(x)
    assert torch.equal(base, same), f"identity CBAM ({placement}) changed the logits"
    for name in feats_plain:
        assert torch.equal(feats_plain[name], feats_ident[name]), name
    rel = ((changed - base).norm() / base.norm()).item()
    print(f"paper-init CBAM ({placement}): relative change of the logits {rel:.3f}")
    assert not torch.allclose(changed, base, rtol=1e-3, atol=1e-3)
    assert rel > 0.05


def test_identity_cbam_in_train_mode_too(resnet18_state_file):
    """In train mode BatchNorm uses batch statistics; the identity CBAM still changes nothing."""
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    plain = resnet18_cbam(weights=resnet18_state_file, placement=None).train()
    torch.manual_seed(3)
    ident = resnet18_cbam(weights=resnet18_state_file, placement="block", identity_init=True).train()
    assert torch.equal(plain(x), ident(x))


# ------------------------------------------------------------------------------ stems and shapes
def test_cifar_stem_keeps_32x32_and_is_new(resnet18_state_file):
    model = resnet18_cbam(weights=resnet18_state_file, stem="cifar")
    assert "stem" in model.new_groups
    feats = model.eval().features(torch.randn(2, 3, 32, 32))
    assert feats["stem"].shape == (2, 64, 32, 32)
    assert feats["layer4"].shape == (2, 512, 4, 4)
    assert model.stem.conv1.weight.shape == (64, 3, 3, 3)
    # the rest of the backbone still comes from the weights file
    state = torch.load(resnet18_state_file, weights_only=True)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_stage_table_imagenet_stem_at_32px():
    model = resnet18_cbam(placement="stage").train()
    rows = stage_table(model, image_size=32)
    assert [r["stage"] for r in rows] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [r["shape"] for r in rows] == [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    for row in rows:
        own = sum(p.numel() for n, p in model.named_parameters() if expected_group(n) == row["stage"])
        assert row["params"] == own
    assert model.training, "stage_table must restore training mode"
    assert [r["shape"] for r in stage_table(resnet18_cbam(stem="cifar"))][-1] == (512, 4, 4)


# ------------------------------------------------------------------------------ weights
def test_imagenet_offline_with_empty_cache_says_what_to_do(torch_home, no_network):
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights="imagenet")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    cache = torch_home / "hub" / "checkpoints" / IMAGENET_FILE
    assert IMAGENET_FILE in message
    assert str(cache) in message, message
    assert not cache.exists()


def test_pretrained_or_random_falls_back_loudly(torch_home, no_network, capsys):
    model, pretrained = cm.pretrained_or_random(resnet18_cbam, placement="stage")
    assert pretrained is False and isinstance(model, cm.ResNetCBAM)
    assert "RANDOM" in capsys.readouterr().out


def test_imagenet_from_cache_loads_without_network(
    self_hashed_imagenet, no_network, resnet18_state_file, capsys
):
    cache = self_hashed_imagenet
    model = resnet18_cbam(weights="imagenet", placement="block")
    assert cache.name in capsys.readouterr().out  # the file it loaded (the path would vary by machine)
    state = torch.load(resnet18_state_file, weights_only=True)
    got = model.state_dict()
    checked = 0
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.split(".")[0] in ("conv1", "bn1"):
            ours = "stem." + key
        else:  # layer2.1.conv1.weight → layer2.1.block.conv1.weight (blocks are wrapped with their CBAM)
            layer, idx, rest = key.split(".", 2)
            ours = f"{layer}.{idx}.block.{rest}"
        assert torch.equal(got[ours], value), key
        checked += 1
    assert checked == len([k for k in state if not k.startswith("fc.")])


def test_other_models_weights_are_refused(tmp_path):
    vgg_like = tmp_path / "vgg16_features.pth"
    vgg16_features = tvm.vgg.make_layers(
        tvm.vgg.cfgs["D"]
    )  # VGG16's conv layers, without its huge classifier
    torch.save(vgg16_features.state_dict(prefix="features."), vgg_like)
    with pytest.raises(WeightsError, match="not a torchvision resnet18 state_dict"):
        resnet18_cbam(weights=vgg_like)
    reshaped = tvm.resnet18(weights=None).state_dict()
    reshaped["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(reshaped, wrong_shape)
    with pytest.raises(WeightsError, match="wrong shape.*conv1.weight"):
        resnet18_cbam(weights=wrong_shape)


@pytest.mark.slow
def test_resnet_weights_are_refused_by_vgg(resnet18_state_file):
    with pytest.raises(WeightsError, match="not a torchvision vgg16 state_dict"):
        vgg16_cbam(weights=resnet18_state_file)


def test_missing_and_truncated_weights_name_the_file(tmp_path, resnet18_state_file):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="nowhere.pth"):
        resnet18_cbam(weights=missing)
    blob = resnet18_state_file.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights=truncated)
    assert str(truncated) in str(info.value)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"conv1.weight": [1, 2, 3]}, not_tensors)
    with pytest.raises(WeightsError, match="state_dict"):
        resnet18_cbam(weights=not_tensors)


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Custom:
    """A harmless custom class: still not something a weights file may hold."""

    def __init__(self):
        self.weight = torch.ones(2)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "custom class"])
def test_code_in_a_weights_file_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"conv1.weight": torch.ones(1), "evil": RunsCode(marker)}, path)
    elif how == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump({"evil": RunsCode(marker)}, f, protocol=2)
    else:
        torch.save({"conv1.weight": Custom()}, path)
    with pytest.raises(WeightsError) as info:
        resnet18_cbam(weights=path)
    assert str(path) in str(info.value)
    assert "refused" in str(info.value) or "code" in str(info.value), str(info.value)
    assert not marker.exists(), "loading the weights ran code from the file"
    # sanity: the file really would have run code under a plain pickle load
    if how != "custom class":
        with open(path, "rb") as f:
            if how == "pickle.dump":
                pickle.load(f)
            else:
                torch.load(f, weights_only=False)
        assert marker.exists()
