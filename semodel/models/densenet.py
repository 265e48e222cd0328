"""SE-DenseNet-121/169/201 (DenseNet-BC: growth 32, bottleneck 4 x growth, compression 0.5).

Module names mirror torchvision's DenseNet (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), so with ``attention="none"`` the
state_dict is exactly torchvision's and its ImageNet weights load into every SE variant.

Where SE goes is a choice (``placement``), because a dense block has no residual branch:

- ``"layer"``: on each dense layer's new ``growth_rate`` feature maps, before they are concatenated
  (``denselayerK.se``). Many small SE modules (hidden width 32 / r).
- ``"block"`` (default): on the whole concatenated output of every dense block, before its
  transition (``denseblockK.se``). Here the block's features from all its layers compete, and the
  transition's 1x1 convolution, which halves the channels, sees the recalibrated stack. Four SE
  modules, +0.3 M parameters and almost no extra time for DenseNet-121.
- ``"final"``: one SE on the last dense block's output only (``denseblock4.se``).
- ``"none"``: plain DenseNet.

A list combines placements, e.g. ``["layer", "block"]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from semodel.models.attention import AttentionFactory, AttentionSpec
from semodel.models.resnet import init_backbone

PLACEMENTS = ("layer", "block", "final", "none")


class DenseLayer(nn.Module):
    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool,
        attention: AttentionFactory | None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.se = attention(growth_rate) if attention else None
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def _bottleneck_once(self) -> Callable[..., torch.Tensor]:
        """The bottleneck for checkpointing: the recomputation in backward leaves BN stats alone.

        Without this, ``norm1`` would update its running statistics a second time per step.
        """
        calls = 0

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self.bottleneck(*inputs)
            norm, momentum = self.norm1, self.norm1.momentum
            tracked = norm.num_batches_tracked.clone() if norm.num_batches_tracked is not None else None
            norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            try:
                return self.bottleneck(*inputs)
            finally:
                norm.momentum = momentum
                if tracked is not None:
                    norm.num_batches_tracked.copy_(tracked)

        return run

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            # Recompute the concatenation + BN + 1x1 conv in backward instead of storing it.
            # The tensors go in one by one: the caller's list grows after this call returns.
            bottleneck = cp.checkpoint(self._bottleneck_once(), *inputs, use_reentrant=False)
        else:
            bottleneck = self.bottleneck(*inputs)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.se is not None:
            new_features = self.se(new_features)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.Module):
    """Dense layers ``denselayer1..N`` (each sees all earlier outputs), then an optional SE."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool,
        layer_attention: AttentionFactory | None,
        block_attention: AttentionFactory | None,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate,
                bn_size,
                drop_rate,
                memory_efficient,
                layer_attention,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.num_layers = num_layers
        out_channels = num_input_features + num_layers * growth_rate
        self.se = block_attention(out_channels) if block_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, self.num_layers + 1):
            features.append(getattr(self, f"denselayer{i}")(features))
        out = torch.cat(features, 1)
        return self.se(out) if self.se is not None else out


class Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def normalize_placement(placement: str | Iterable[str]) -> frozenset[str]:
    names = [placement] if isinstance(placement, str) else list(placement)
    unknown = [p for p in names if p not in PLACEMENTS]
    if unknown:
        raise ValueError(f"unknown SE placement {unknown[0]!r}; choose from {', '.join(PLACEMENTS)}")
    return frozenset(p for p in names if p != "none")


class SEDenseNet(nn.Module):
    """DenseNet-BC with channel attention at the chosen placement(s)."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        num_classes: int = 1000,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        attention: AttentionFactory | None = None,
        placement: str | Iterable[str] = "block",
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        places = normalize_placement(placement) if attention else frozenset()
        if stem == "imagenet":
            stem_layers = [
                ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        elif stem == "cifar":
            stem_layers = [
                ("conv0", nn.Conv2d(3, num_init_features, 3, stride=1, padding=1, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
            ]
        else:
            raise ValueError(f"unknown stem {stem!r}; choose one of imagenet, cifar")
        self.features = nn.Sequential(OrderedDict(stem_layers))

        channels = num_init_features
        last = len(block_config) - 1
        for i, num_layers in enumerate(block_config):
            on_block = "block" in places or ("final" in places and i == last)
            block = DenseBlock(
                num_layers,
                channels,
                bn_size,
                growth_rate,
                drop_rate,
                memory_efficient,
                layer_attention=attention if "layer" in places else None,
                block_attention=attention if on_block else None,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != last:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.placement = sorted(places)

        init_backbone(self)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional stage's output after its BN + ReLU (used by Grad-CAM)."""
        return F.relu(self.features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes)


DEPTHS = {
    121: (6, 12, 24, 16),
    169: (6, 12, 32, 32),
    201: (6, 12, 48, 32),
}


def se_densenet(
    depth: int,
    num_classes: int = 1000,
    attention: AttentionSpec | None = AttentionSpec(),
    placement: str | Iterable[str] = "block",
    stem: str = "imagenet",
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> SEDenseNet:
    """SE-DenseNet of the given depth (121, 169, 201); ``attention=None`` is the plain DenseNet."""
    if depth not in DEPTHS:
        raise ValueError(f"no SE-DenseNet of depth {depth}; choose one of {sorted(DEPTHS)}")
    normalize_placement(placement)  # a bad placement fails even where attention is None
    return SEDenseNet(
        DEPTHS[depth],
        num_classes=num_classes,
        drop_rate=drop_rate,
        memory_efficient=memory_efficient,
        attention=attention,
        placement=placement,
        stem=stem,
    )
