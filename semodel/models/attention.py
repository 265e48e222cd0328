"""Channel attention modules.

``SqueezeExcite`` follows Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018, TPAMI 2019):

    s = mean over H x W of x                  (squeeze: one number per channel)
    w = gate(fc2(relu(fc1(s))))               (excitation: C -> C/r -> C)
    y = x * w                                 (scale: one weight per channel)

The module returns the *scaled input* ``x * w``. Callers use ``out = se(out)``, never
``out * se(out)`` (which would apply the weights twice).
"""

from __future__ import annotations

import torch
from torch import nn

GATES = ("sigmoid", "hard_sigmoid")


def hidden_width(channels: int, reduction: float, min_channels: int = 1) -> int:
    """Width of the SE bottleneck: ``channels / reduction`` rounded, never below ``min_channels``."""
    return max(int(min_channels), int(round(channels / reduction)))


def make_gate(gate: str) -> nn.Module:
    if gate == "sigmoid":
        return nn.Sigmoid()
    if gate == "hard_sigmoid":
        # MobileNetV3 (Howard et al. 2019): relu6(x + 3) / 6, cheap and piecewise linear.
        return nn.Hardsigmoid()
    raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation block.

    Args:
        channels: number of input (and output) channels C.
        reduction: ratio r; the hidden layer has C / r units (16 in the paper).
        min_channels: floor on the hidden width, so narrow inputs keep a usable bottleneck.
        bias: whether the two fully connected layers have biases (the paper's do).
        gate: ``"sigmoid"`` (paper) or ``"hard_sigmoid"`` (MobileNetV3 style, usually with r = 4).

    The fully connected layers are 1x1 convolutions on the pooled ``N x C x 1 x 1`` tensor, so
    the module needs no reshapes and keeps the memory format (channels_last works as is).
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        min_channels: int = 1,
        bias: bool = True,
        gate: str = "sigmoid",
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if reduction <= 0:
            raise ValueError(f"reduction must be > 0, got {reduction}")
        hidden = hidden_width(channels, reduction, min_channels)
        self.channels = channels
        self.hidden = hidden
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)
        # A module (not a function) so that forward hooks can read the excitation weights.
        self.gate = make_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel weights ``N x C x 1 x 1`` in [0, 1]."""
        squeezed = x.mean(dim=(2, 3), keepdim=True)  # global average pool over any H x W
        return self.gate(self.fc2(self.relu(self.fc1(squeezed))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"


ATTENTIONS = ("se", "none")


def make_attention(
    kind: str,
    channels: int,
    reduction: float = 16,
    min_channels: int = 1,
    bias: bool = True,
    gate: str = "sigmoid",
) -> nn.Module | None:
    """Build the attention module named ``kind`` for ``channels`` channels (None for ``"none"``)."""
    if kind == "none":
        return None
    if kind == "se":
        return SqueezeExcite(channels, reduction, min_channels, bias, gate)
    raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTIONS)}")
