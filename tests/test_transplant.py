"""models.transplant: a trained plain ResNet18 moved into CBAM models keeps every backbone weight."""

from __future__ import annotations

import re

import pytest
import torch

from course_utils.models import resnet18_cbam, transplant


def _perturbed_plain():
    """A plain ResNet18 whose every parameter and BN statistic differs from a fresh model's."""
    torch.manual_seed(1)
    src = resnet18_cbam(placement=None)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for b in src.buffers():
            if b.is_floating_point():  # BN running mean and var (kept positive)
                b.add_(0.1 * torch.rand_like(b))
    return src.eval()


@pytest.mark.parametrize("placement", ["stage", "block", "high"])
def test_backbone_and_head_copied_only_cbam_left(placement):
    src = _perturbed_plain()
    torch.manual_seed(2)
    dst = resnet18_cbam(placement=placement, identity_init=True).eval()
    left = transplant(src, dst)
    assert left and all("cbam" in k.split(".") for k in left), left
    dst_state = dst.state_dict()
    for key, value in src.state_dict().items():
        twin = re.sub(r"^(layer\d\.\d)\.", r"\1.block.", key) if placement == "block" else key
        assert torch.equal(dst_state[twin], value), key
    # identity-initialised CBAM: the transplanted model computes what the plain one did
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dst(x), src(x), atol=1e-5)


def test_shape_mismatch_is_reported_not_copied():
    src = _perturbed_plain()
    assert transplant(src, resnet18_cbam(placement=None)) == []  # same architecture: everything copied
    dst = resnet18_cbam(num_classes=5, placement=None, stem="cifar")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    left = transplant(src, dst)
    assert set(left) == {"stem.conv1.weight", "fc.weight", "fc.bias"}
    assert all(torch.equal(dst.state_dict()[k], before[k]) for k in left)
    assert torch.equal(dst.state_dict()["layer4.1.conv2.weight"], src.state_dict()["layer4.1.conv2.weight"])
