"""SE-ResNet-18/34/50/101/152.

Module names mirror torchvision's ResNet (``conv1, bn1, layer1.0.conv1, ..., fc``), so with
``attention="none"`` the state_dict keys, shapes and parameter count are exactly torchvision's,
and torchvision weights load into the SE variants with only the ``se.*`` tensors new.

SE placement follows Hu et al. (Fig. 3): on the residual branch, after its last BN and before the
identity addition; the shortcut is never scaled; the ReLU follows the addition.
"""

from __future__ import annotations

import torch
from torch import nn

from semodel.models.attention import AttentionFactory, AttentionSpec
from semodel.models.fused import se_residual_tail


def init_backbone(model: nn.Module) -> None:
    """He (fan-out) init for backbone convolutions and unit BN, as torchvision does.

    The attention modules keep PyTorch's default init: they are small fully connected layers,
    and a fan-out init on a 1x1 "FC" with few outputs makes the first gates saturate.
    """
    for name, m in model.named_modules():
        if ".se." in f".{name}.":
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a forward (pre-)hook, its own or a global one."""
    from torch.nn.modules import module as _m

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(_m, "_global_forward_hooks", None)
        or getattr(_m, "_global_forward_pre_hooks", None)
    )


def residual_tail(block: nn.Module, out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``relu(se(out) + identity)``: attention on the residual branch only, then the add and ReLU.

    With ``block.fused_tail`` (the default) pooling, excitation, scale, add and ReLU run as one
    autograd node (``semodel.models.fused``); a hooked attention module is called as a module
    instead, so that its hooks see its input and output. Both paths compute the same function.
    """
    se = block.se
    if se is None:
        return block.relu(out + identity)
    if block.fused_tail and not _hooked(se):
        return se_residual_tail(out, identity, se)
    return block.relu(se(out) + identity)


class BasicBlock(nn.Module):
    expansion = 1
    fused_tail = True  # see residual_tail; semodel.models.fused.set_fused switches it

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.se = attention(planes) if attention else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return residual_tail(self, out, identity)


class Bottleneck(nn.Module):
    expansion = 4
    fused_tail = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # stride on the 3x3, as torchvision (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.se = attention(planes * self.expansion) if attention else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return residual_tail(self, out, identity)


STEMS = ("imagenet", "cifar")


class SEResNet(nn.Module):
    """ResNet with optional channel attention in every residual block.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage, e.g. ``[3, 4, 6, 3]`` for depth 50.
        num_classes: size of the classifier.
        attention: factory ``channels -> module`` (or None for a plain ResNet).
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"`` (3x3/1 conv, no pool),
            the latter for small images (32-64 px) that the ImageNet stem would shrink to nothing.
        drop_rate: dropout before the classifier.
        zero_init_residual: start each block's last BN at zero so blocks begin as identities.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        attention: AttentionFactory | None = None,
        stem: str = "imagenet",
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attention)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attention)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attention)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attention)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion

        init_backbone(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes, blocks, stride, attention) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, attention)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, attention=attention) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional stage's output ``N x C x h x w`` (used by Grad-CAM)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(features), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def se_resnet(
    depth: int,
    num_classes: int = 1000,
    attention: AttentionSpec | None = AttentionSpec(),
    stem: str = "imagenet",
    drop_rate: float = 0.0,
    zero_init_residual: bool = False,
) -> SEResNet:
    """SE-ResNet of the given depth (18, 34, 50, 101, 152); ``attention=None`` is the plain ResNet."""
    if depth not in DEPTHS:
        raise ValueError(f"no SE-ResNet of depth {depth}; choose one of {sorted(DEPTHS)}")
    block, layers = DEPTHS[depth]
    return SEResNet(block, layers, num_classes, attention, stem, drop_rate, zero_init_residual)
