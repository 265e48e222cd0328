"""Channel attention modules.

``SqueezeExcite`` follows Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018, TPAMI 2019):

    s = mean over H x W of x                  (squeeze: one number per channel)
    w = gate(fc2(relu(fc1(s))))               (excitation: C -> C/r -> C)
    y = x * w                                 (scale: one weight per channel)

``LearnedWidthSE`` is the same block started wide (r = 4) with one learnable, non-negative gate per
hidden unit; an L1 penalty on the gates (``sparsity_loss``) closes the units the task does not need,
and ``prune_attention`` then removes them, leaving a plain ``SqueezeExcite`` with its own width.

``EfficientChannelAttention`` follows Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks" (CVPR 2020): no bottleneck, a 1-D convolution of kernel size k across
the pooled channels, k = the odd number nearest to log2(C) / 2 + 1 / 2.

Every module computes ``w`` in two steps, ``excitation(x) = excite(squeeze(x))``, and returns the
*scaled input* ``x * w``. Callers use ``out = se(out)``, never
``out * se(out)`` (which would apply the weights twice). Every module computes its weights ``w``
(``N x C x 1 x 1``) in a submodule named ``gate``, so a forward hook on ``gate`` reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("sigmoid", "hard_sigmoid")


def hidden_width(channels: int, reduction: float, min_channels: int = 1) -> int:
    """Width of the SE bottleneck: ``channels / reduction`` rounded, never below ``min_channels``."""
    return max(int(min_channels), int(round(channels / reduction)))


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Global average pool over any H x W: ``N x C x H x W -> N x C x 1 x 1``."""
    return x.mean(dim=(2, 3), keepdim=True)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to ``N x C`` vectors as the matrix product it is.

    The SE layers keep their 1x1-convolution parameters (``out x in x 1 x 1``, the layout of
    published SE checkpoints), but on a pooled ``1 x 1`` map a GEMM does the same arithmetic with
    less overhead than a convolution call: 2-3x faster forward + backward on this project's CPU
    for SE-ResNet-50's widest block. The modules' forward is therefore not called (hook ``gate``
    for the weights, as ``semodel inspect`` does).
    """
    return F.linear(x, conv.weight.view(conv.out_channels, -1), conv.bias)


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

    The fully connected layers hold 1x1-convolution parameters (``fc1.weight``: C/r x C x 1 x 1,
    as published SE checkpoints) and run as GEMMs on the pooled ``N x C`` vector (``pointwise``);
    the weights come back as ``N x C x 1 x 1``, which broadcasts over any H x W and memory format.
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        min_channels: int = 1,
        bias: bool = True,
        gate: str = "sigmoid",
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if reduction <= 0:
            raise ValueError(f"reduction must be > 0, got {reduction}")
        if hidden is None:  # an explicit width (a pruned learned-width block) wins over the ratio
            hidden = hidden_width(channels, reduction, min_channels)
        elif hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.channels = channels
        self.hidden = hidden
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)
        # A module (not a function) so that forward hooks can read the excitation weights.
        self.gate = make_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel weights ``N x C x 1 x 1`` in [0, 1]."""
        return self.excite(squeeze(x))

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        """The weights from the pooled input ``N x C x 1 x 1`` (the squeeze done by the caller)."""
        n = squeezed.shape[0]
        hidden = self.hidden_units(squeezed.reshape(n, -1))
        return self.gate(pointwise(self.fc2, hidden).view(n, -1, 1, 1))

    def hidden_units(self, squeezed: torch.Tensor) -> torch.Tensor:
        """The hidden layer ``relu(fc1(s))`` for the pooled ``N x C`` vectors."""
        return self.relu(pointwise(self.fc1, squeezed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"


class LearnedWidthSE(SqueezeExcite):
    """SE whose hidden width is learned: ``fc2(relu(fc1(s)) * max(g, 0))``, one gate ``g`` per unit.

    Args:
        channels: number of input (and output) channels C.
        start_reduction: the block starts with C / start_reduction hidden units (default 4, i.e.
            4x the paper's r = 16), every gate at 1 (open).
        min_channels, bias, gate: as in ``SqueezeExcite``.

    A unit whose gate has reached 0 contributes exactly nothing and receives no gradient from the
    task: it is closed. ``sparsity_loss`` pushes every gate towards 0 in proportion to the
    parameters its unit costs; ``pruned()`` returns the equivalent ``SqueezeExcite`` with only the
    open units (the gates folded into ``fc2``). Gates are 1-D, so they get no weight decay.
    """

    def __init__(
        self,
        channels: int,
        start_reduction: float = 4,
        min_channels: int = 1,
        bias: bool = True,
        gate: str = "sigmoid",
    ) -> None:
        super().__init__(channels, start_reduction, min_channels, bias, gate)
        self.unit_gate = nn.Parameter(torch.ones(self.hidden))

    @property
    def unit_cost(self) -> int:
        """Parameters one hidden unit costs: a row of fc1, a column of fc2, its bias and its gate."""
        return 2 * self.channels + (1 if self.fc1.bias is not None else 0) + 1

    def open_units(self) -> torch.Tensor:
        """Boolean mask of the hidden units whose gate is open (> 0)."""
        return self.unit_gate.detach() > 0

    @property
    def width(self) -> int:
        return int(self.open_units().sum())

    def hidden_units(self, squeezed: torch.Tensor) -> torch.Tensor:
        # relu, not clamp(min=0): a closed gate (exactly 0) gets no gradient on every torch version
        # (clamp's gradient at the boundary was 1 before torch 2.14).
        return super().hidden_units(squeezed) * torch.relu(self.unit_gate)

    @torch.no_grad()
    def pruned(self) -> SqueezeExcite:
        """The plain ``SqueezeExcite`` computing the same function with the open units only.

        If every gate is closed, one unit is kept with a zero gate (the block then outputs the
        constant ``gate(fc2.bias)``, as the gated block does).
        """
        keep = self.open_units().nonzero().flatten()
        if keep.numel() == 0:
            keep = self.unit_gate.detach().argmax().view(1)
        fc1, fc2 = self.fc1, self.fc2
        se = SqueezeExcite(self.channels, bias=fc1.bias is not None, hidden=int(keep.numel()))
        se.gate = self.gate
        se = se.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        scale = self.unit_gate.detach().clamp(min=0)[keep]
        se.fc1.weight.copy_(fc1.weight[keep])
        se.fc2.weight.copy_(fc2.weight[:, keep] * scale.view(1, -1, 1, 1))
        if fc1.bias is not None:
            se.fc1.bias.copy_(fc1.bias[keep])
            se.fc2.bias.copy_(fc2.bias)
        se.train(self.training)
        return se

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}, open={self.width}"


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's kernel size: the odd number nearest to log2(C) / gamma + b / gamma (ties go up).

    Wang et al. 2020, Eq. 12. For ResNet-50's stages (256, 512, 1024, 2048 channels): 5, 5, 5, 7.
    """
    t = math.log2(channels) / gamma + b / gamma
    return max(1, 2 * math.floor(t / 2) + 1)


class EfficientChannelAttention(nn.Module):
    """ECA: ``w = gate(conv1d_k(mean over H x W of x))`` across channels, no dimensionality reduction.

    Args:
        channels: number of input (and output) channels C.
        kernel_size: the 1-D kernel size k (default: ``eca_kernel_size(C)``), odd.
        gate: ``"sigmoid"`` (paper) or ``"hard_sigmoid"``.

    k parameters per block and no bias, as in the paper; channel i's weight depends on its k
    neighbours (zero-padded at the ends).
    """

    def __init__(self, channels: int, kernel_size: int | None = None, gate: str = "sigmoid") -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        k = eca_kernel_size(channels) if kernel_size is None else int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {k}")
        self.channels = channels
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.gate = make_gate(gate)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        return self.excite(squeeze(x))

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        n, c = squeezed.shape[:2]
        return self.gate(self.conv(squeezed.reshape(n, 1, c)).view(n, c, 1, 1))  # channels as a 1-D sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


ATTENTIONS = ("se", "eca", "none")
ATTENTION_TYPES = (SqueezeExcite, EfficientChannelAttention)

# What a block is given to make its attention: channels -> module.
AttentionFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class AttentionSpec:
    """The channel attention every block of a model gets, with all its options, as one object.

    Built once from the config and handed down to every block (as timm's ``attn_layer``);
    calling it with a channel count makes the module. The options are checked here, once, so a
    bad option fails before any layer is built.

    Args:
        kind: ``"se"`` or ``"eca"`` (``AttentionSpec.of("none")`` is None: no attention).
        reduction: SE ratio r, or ``"learned"`` for a ``LearnedWidthSE`` started at ``start_reduction``.
        min_channels, bias: SE hidden-width floor and FC biases (ECA has neither).
        gate: ``"sigmoid"`` or ``"hard_sigmoid"``.
    """

    kind: str = "se"
    reduction: float | str = 16
    min_channels: int = 1
    bias: bool = True
    gate: str = "sigmoid"
    start_reduction: float = 4

    def __post_init__(self) -> None:
        if self.kind not in ("se", "eca"):
            raise ValueError(f"unknown attention {self.kind!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if isinstance(self.reduction, str) and self.reduction != "learned":
            raise ValueError(f"reduction must be a number or 'learned', got {self.reduction!r}")
        if not isinstance(self.reduction, str) and self.reduction <= 0:
            raise ValueError(f"reduction must be > 0, got {self.reduction}")
        if self.start_reduction <= 0:
            raise ValueError(f"start_reduction must be > 0, got {self.start_reduction}")

    @classmethod
    def of(cls, kind: str, **options) -> AttentionSpec | None:
        """The spec for ``kind`` (``"se"``, ``"eca"``), or None for ``"none"``."""
        return None if kind == "none" else cls(kind, **options)

    def __call__(self, channels: int) -> nn.Module:
        if self.kind == "eca":
            return EfficientChannelAttention(channels, gate=self.gate)
        if self.reduction == "learned":
            return LearnedWidthSE(channels, self.start_reduction, self.min_channels, self.bias, self.gate)
        return SqueezeExcite(channels, self.reduction, self.min_channels, self.bias, self.gate)


def make_attention(kind: str, channels: int, **options) -> nn.Module | None:
    """One attention module: ``AttentionSpec.of(kind, **options)(channels)``, None for ``"none"``."""
    spec = AttentionSpec.of(kind, **options)
    return spec(channels) if spec is not None else None


# ----------------------------------------------------------------------------- learned widths


def learned_blocks(model: nn.Module) -> list[tuple[str, LearnedWidthSE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LearnedWidthSE)]


def sparsity_loss(model: nn.Module | list[LearnedWidthSE]) -> torch.Tensor | None:
    """Open fraction of the learned SE parameters: sum over units of ``max(g, 0) x unit cost``,
    divided by the cost of all units (1.0 at the start, 0 when every gate is closed).

    Multiplied by ``model.learned.penalty`` and added to the loss; None without learned blocks.
    ``model`` may also be the list of its blocks (saves the module walk in every step).
    """
    blocks = model if isinstance(model, list) else [m for _, m in learned_blocks(model)]
    if not blocks:
        return None
    total = sum(m.hidden * m.unit_cost for m in blocks)
    open_cost = sum(torch.relu(m.unit_gate).sum() * m.unit_cost for m in blocks)
    return open_cost / total


def learned_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{block name: {"channels", "start", "width"}}`` for every learned-width SE block."""
    return {
        name: {"channels": m.channels, "start": m.hidden, "width": m.width}
        for name, m in learned_blocks(model)
    }


def format_widths(widths: dict[str, dict[str, int]]) -> str:
    """``layer1.0 16/16, ..., layer4.1 1/128``: hidden units kept / started with, per block."""
    return ", ".join(f"{name.removesuffix('.se')} {w['width']}/{w['start']}" for name, w in widths.items())


def prune_attention(model: nn.Module) -> dict[str, dict[str, int]]:
    """Replace every ``LearnedWidthSE`` in ``model`` by its pruned ``SqueezeExcite`` (in place).

    Returns the widths as ``learned_widths`` does (empty when there was nothing to prune).
    """
    widths = learned_widths(model)
    for name in widths:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).pruned())
    return widths
