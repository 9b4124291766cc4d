"""CBAM (course_utils.cbam): shapes, the two gates, the paper and the identity initialisation."""

from __future__ import annotations

import pytest
import torch

from course_utils.cbam import CBAM, ChannelAttention, SpatialAttention


@pytest.mark.parametrize("identity_init", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 8, 5, 7), (2, 512, 1, 1)])
def test_output_has_input_shape(shape, identity_init):
    cbam = CBAM(shape[1], identity_init=identity_init)
    x = torch.randn(shape)
    for mode in (True, False):
        cbam.train(mode)
        assert cbam(x).shape == x.shape


def test_channel_gate_is_shared_mlp_of_avg_plus_max():
    gate = ChannelAttention(32, reduction=4)
    with torch.no_grad():  # make the MLP clearly non-trivial
        for p in gate.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, 32, 6, 6)
    expected = torch.sigmoid(gate.mlp(x.mean((2, 3), keepdim=True)) + gate.mlp(x.amax((2, 3), keepdim=True)))
    avg_only = torch.sigmoid(2 * gate.mlp(x.mean((2, 3), keepdim=True)))
    got = gate(x)
    assert got.shape == (3, 32, 1, 1)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, avg_only, atol=1e-3), "the max-pooled descriptor is not used"
    assert ((got > 0) & (got < 1)).all(), "paper channel gate must lie in (0, 1)"


def test_channel_gate_sees_the_max_descriptor():
    """Two inputs with the same per-channel mean but different maxima get different gates."""
    gate = ChannelAttention(16, reduction=4)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.5)
    flat = torch.ones(1, 16, 4, 4)
    peaked = torch.zeros(1, 16, 4, 4)
    peaked[..., 0, 0] = 16.0  # mean 1 like `flat`, max 16 instead of 1
    torch.testing.assert_close(flat.mean((2, 3)), peaked.mean((2, 3)))
    assert not torch.allclose(gate(flat), gate(peaked), atol=1e-4)


def test_spatial_gate_uses_mean_and_max_over_channels():
    gate = SpatialAttention(kernel_size=3)
    with torch.no_grad():
        gate.conv.weight.normal_()
        gate.bn.weight.fill_(1.0)
    gate.eval()
    x = torch.randn(2, 8, 5, 5)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    expected = torch.sigmoid(gate.bn(gate.conv(pooled)))
    torch.testing.assert_close(gate(x), expected)
    assert gate(x).shape == (2, 1, 5, 5)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(kernel_size=4)


@pytest.mark.parametrize("train_mode", [True, False])
def test_identity_init_returns_input_exactly(train_mode):
    cbam = CBAM(64, identity_init=True).train(train_mode)
    x = torch.randn(4, 64, 8, 8) * 3
    assert torch.equal(cbam(x), x)
    assert torch.equal(cbam.channel(x), torch.ones(4, 64, 1, 1))
    assert torch.equal(cbam.spatial(x), torch.ones(4, 1, 8, 8))


def test_identity_init_still_learns():
    cbam = CBAM(64, identity_init=True).train()
    x = torch.randn(4, 64, 8, 8)
    target = torch.randn(4, 64, 8, 8)
    loss = ((cbam(x) - target) ** 2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in cbam.named_parameters()}
    assert all(g is not None for g in grads.values()), "every CBAM parameter must be in the graph"
    nonzero = [n for n, g in grads.items() if g.abs().sum() > 0]
    assert "channel.mlp.2.weight" in nonzero and "spatial.bn.weight" in nonzero, nonzero
    torch.optim.AdamW(cbam.parameters(), lr=1e-2).step()
    for mode in (True, False):
        cbam.train(mode)
        assert not torch.equal(cbam(x), x), "after one step the module must no longer be the identity"


@pytest.mark.parametrize("train_mode", [True, False])
def test_paper_init_spatial_gate_is_one_half(train_mode):
    cbam = CBAM(32).train(train_mode)
    x = torch.randn(2, 32, 6, 6)
    assert torch.equal(cbam.spatial(cbam.channel(x) * x), torch.full((2, 1, 6, 6), 0.5))
    y = cbam(x)
    assert not torch.allclose(y, x), "the paper init scales features down at the start"
    # output = x · channel gate · 0.5, so |y| < |x|/2 everywhere the input is non-zero
    assert (y.abs() <= x.abs() / 2 + 1e-7).all()


def test_last_attention_kept_in_eval_only():
    cbam = CBAM(16, kernel_size=3)
    x = torch.randn(3, 16, 7, 5)
    cbam.train()
    cbam(x)
    assert cbam.last_attention is None, "training passes must not keep maps"
    cbam.eval()
    with torch.no_grad():
        cbam(x)
    att = cbam.last_attention
    assert att is not None and att.shape == (3, 1, 7, 5)
    assert not att.requires_grad
    assert torch.equal(att, torch.full_like(att, 0.5))  # paper init: sigmoid(0)
    cbam(x[:1])
    assert cbam.last_attention.shape == (1, 1, 7, 5), "last_attention must follow the latest eval pass"
