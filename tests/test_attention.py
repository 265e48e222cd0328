"""The Squeeze-and-Excitation block, alone (semodel/models/attention.py).

Every expected value is computed by hand from the module's own weights, in float64, with no call
into the module's forward: global mean over H x W -> W1 s + b1 -> ReLU -> W2 h + b2 -> gate -> scale.
"""

from __future__ import annotations

import pytest
import torch
from helpers_train import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn

from semodel.models.attention import SqueezeExcite, hidden_width, make_attention


def hand_excitation(x: torch.Tensor, se: SqueezeExcite, gate: str = "sigmoid") -> torch.Tensor:
    """The per-channel weights (N x C) from the paper's equations with the module's weights."""
    xd = x.detach().to(torch.float64)
    n, c, h, w = xd.shape
    s = xd.sum(dim=(2, 3)) / (h * w)  # squeeze: global average over every position
    w1 = se.fc1.weight.detach().to(torch.float64)[:, :, 0, 0]
    w2 = se.fc2.weight.detach().to(torch.float64)[:, :, 0, 0]
    b1 = se.fc1.bias.detach().to(torch.float64) if se.fc1.bias is not None else 0.0
    b2 = se.fc2.bias.detach().to(torch.float64) if se.fc2.bias is not None else 0.0
    hidden = torch.clamp(s @ w1.T + b1, min=0.0)
    z = hidden @ w2.T + b2
    if gate == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-z))
    return torch.clamp(z + 3.0, 0.0, 6.0) / 6.0  # MobileNetV3 hard sigmoid: relu6(z + 3) / 6


def hand_se(x: torch.Tensor, se: SqueezeExcite, gate: str = "sigmoid") -> torch.Tensor:
    """The SE output: the input scaled by one hand-computed weight per channel (float64)."""
    return x.detach().to(torch.float64) * hand_excitation(x, se, gate)[:, :, None, None]


def randomize_(se: SqueezeExcite, seed: int = 0, scale: float = 1.0) -> SqueezeExcite:
    """Weights large enough that the gates are spread, not all near 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in se.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return se


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("hw", [(7, 5), (1, 1), (13, 17), (9, 9)])
def test_output_equals_hand_computation(gate, hw):
    torch.manual_seed(1)
    se = randomize_(SqueezeExcite(32, reduction=4, gate=gate), seed=2)
    x = torch.randn(3, 32, *hw) + 0.5
    out = se(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), hand_se(x, se, gate), rtol=1e-5, atol=1e-5)


def test_hard_sigmoid_gate_saturates_and_is_linear_between():
    se = randomize_(SqueezeExcite(16, reduction=4, gate="hard_sigmoid"), seed=3)
    with torch.no_grad():
        se.fc2.bias.copy_(torch.linspace(-8, 8, 16))  # some gates 0, some 1, some in between
    x = torch.randn(2, 16, 5, 7)
    weights = se.excitation(x)[:, :, 0, 0].double()
    expected = hand_excitation(x, se, "hard_sigmoid")
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert (weights == 0).any() and (weights == 1).any()
    assert ((weights > 0.01) & (weights < 0.99)).any()
    assert (weights >= 0).all() and (weights <= 1).all()


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
def test_channels_last_input(gate):
    torch.manual_seed(4)
    se = randomize_(SqueezeExcite(32, reduction=8, gate=gate), seed=5)
    x = torch.randn(2, 32, 13, 17)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()  # the test really feeds a channels_last layout
    out_cl = se(x_cl)
    torch.testing.assert_close(out_cl, se(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_cl.double(), hand_se(x, se, gate), rtol=1e-5, atol=1e-5)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bias", [True, False])
def test_gradient_reaches_both_fc_layers(bias):
    torch.manual_seed(6)
    se = SqueezeExcite(32, reduction=4, bias=bias)
    x = torch.randn(4, 32, 6, 6, requires_grad=True)
    (se(x) * torch.randn(4, 32, 6, 6)).sum().backward()
    layers = [se.fc1.weight, se.fc2.weight] + ([se.fc1.bias, se.fc2.bias] if bias else [])
    for p in layers:
        assert p.grad is not None
        assert p.grad.abs().sum() > 0
        assert torch.isfinite(p.grad).all()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradient_is_correct_numerically():
    torch.manual_seed(7)
    se = SqueezeExcite(8, reduction=2).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(se, (x,))


@pytest.mark.parametrize("channels,reduction", [(64, 16), (256, 16), (32, 4), (2048, 16), (96, 8)])
def test_parameter_count(channels, reduction):
    hidden = channels // reduction
    with_bias = SqueezeExcite(channels, reduction, bias=True)
    without = SqueezeExcite(channels, reduction, bias=False)
    assert with_bias.hidden == hidden
    assert sum(p.numel() for p in with_bias.parameters()) == 2 * channels * hidden + hidden + channels
    assert sum(p.numel() for p in without.parameters()) == 2 * channels * hidden
    assert without.fc1.bias is None and without.fc2.bias is None


def test_parameter_count_published_examples():
    # C = 256, r = 16: 2 * 256 * 16 + 16 + 256 = 8464
    assert sum(p.numel() for p in SqueezeExcite(256).parameters()) == 8464
    assert sum(p.numel() for p in SqueezeExcite(256, bias=False).parameters()) == 8192


def test_min_channels_floor():
    se = SqueezeExcite(32, reduction=16, min_channels=8)
    assert se.hidden == 8
    assert se.fc1.weight.shape == (8, 32, 1, 1)
    assert se.fc2.weight.shape == (32, 8, 1, 1)
    assert sum(p.numel() for p in se.parameters()) == 2 * 32 * 8 + 8 + 32
    assert SqueezeExcite(32, reduction=16, min_channels=1).hidden == 2  # the floor is what raised it
    assert SqueezeExcite(512, reduction=16, min_channels=8).hidden == 32  # floor below C/r: no effect


@pytest.mark.parametrize(
    "channels,reduction,floor,expected",
    [(64, 16, 1, 4), (64, 4, 1, 16), (64, 16, 8, 8), (8, 16, 1, 1), (2048, 16, 1, 128), (64, 1, 1, 64)],
)
def test_hidden_width(channels, reduction, floor, expected):
    assert hidden_width(channels, reduction, floor) == expected


def test_reduction_really_changes_the_bottleneck():
    """The tutorial's 'adaptive reduction' int(1/theta) changed nothing; here r sets the width."""
    widths = {r: SqueezeExcite(64, reduction=r).hidden for r in (1, 2, 4, 8, 16, 32)}
    assert widths == {1: 64, 2: 32, 4: 16, 8: 8, 16: 4, 32: 2}


def test_excitation_uses_the_global_mean():
    """Spatially rearranging the input keeps the weights; changing its mean changes them."""
    torch.manual_seed(8)
    se = randomize_(SqueezeExcite(16, reduction=4), seed=9)
    x = torch.randn(2, 16, 9, 9)
    w = se.excitation(x)
    assert w.shape == (2, 16, 1, 1)  # one weight per channel, not per position
    torch.testing.assert_close(w[:, :, 0, 0].double(), hand_excitation(x, se), rtol=1e-5, atol=1e-6)

    shuffled = x.flatten(2)[:, :, torch.randperm(81)].reshape(2, 16, 9, 9)
    torch.testing.assert_close(se.excitation(shuffled), w, rtol=1e-5, atol=1e-6)

    # Same top-left pixel (all an AvgPool2d(1) "global" pool would look at), different mean.
    moved = x.clone()
    moved[:, :, 4:, 4:] += 3.0
    assert not torch.allclose(se.excitation(moved), w, atol=1e-3)

    # A pixel-dependent gate would scale positions of one channel differently: here the ratio
    # output / input is the same at every position of a channel.
    ratio = se(x) / x
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-5)


def test_module_has_no_pooling_layers():
    se = SqueezeExcite(64)
    pools = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    assert not any(isinstance(m, pools) for m in se.modules())


def test_make_attention():
    se = make_attention("se", 64, reduction=8, min_channels=1, bias=False, gate="hard_sigmoid")
    assert isinstance(se, SqueezeExcite)
    assert se.hidden == 8 and se.fc1.bias is None
    assert isinstance(se.gate, nn.Hardsigmoid)
    assert isinstance(make_attention("se", 64).gate, nn.Sigmoid)
    assert make_attention("none", 64) is None
    assert type(make_attention("eca", 64)).__name__ == "EfficientChannelAttention"
    with pytest.raises(ValueError, match="se, eca, none"):
        make_attention("cbam", 64)
    with pytest.raises(ValueError, match="relu"):
        make_attention("se", 64, gate="relu")


@pytest.mark.parametrize("kwargs", [{"channels": 0}, {"channels": 16, "reduction": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SqueezeExcite(**kwargs)
