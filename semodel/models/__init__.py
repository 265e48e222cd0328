"""Model registry: ``build_model(name, num_classes=..., **options)`` and ``MODEL_NAMES``."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from semodel.errors import SemodelError
from semodel.models.attention import (
    ATTENTIONS,
    AttentionSpec,
    EfficientChannelAttention,
    LearnedWidthSE,
    SqueezeExcite,
    learned_widths,
    prune_attention,
    sparsity_loss,
)
from semodel.models.densenet import PLACEMENTS, SEDenseNet, se_densenet
from semodel.models.pretrained import MODELS, load_pretrained, pretrained_model_options, torchvision_name
from semodel.models.resnet import STEMS, SEResNet, se_resnet

__all__ = [
    "ATTENTIONS",
    "AttentionSpec",
    "EfficientChannelAttention",
    "LearnedWidthSE",
    "MODEL_NAMES",
    "ModelOptions",
    "PLACEMENTS",
    "STEMS",
    "SEDenseNet",
    "SEResNet",
    "SqueezeExcite",
    "build_model",
    "learned_widths",
    "load_pretrained",
    "pretrained_model_options",
    "prune_attention",
    "sparsity_loss",
    "torchvision_name",
]

MODEL_NAMES = tuple(MODELS)


@dataclass(frozen=True)
class ModelOptions:
    """What ``build_model`` accepts besides the name and the class count (the config's ``model``
    section, less ``name``, ``num_classes`` and ``pretrained``'s file handling)."""

    attention: str = "se"
    reduction: float | str = 16
    learned: dict[str, Any] | None = None
    min_channels: int = 1
    bias: bool = True
    gate: str = "sigmoid"
    stem: str = "imagenet"
    placement: str | list[str] = "block"
    drop_rate: float = 0.0
    memory_efficient: bool = False
    pretrained: str | None = None

    def attention_spec(self) -> AttentionSpec | None:
        start = float((self.learned or {}).get("start_reduction", 4))
        return AttentionSpec.of(
            self.attention,
            reduction=self.reduction,
            min_channels=self.min_channels,
            bias=self.bias,
            gate=self.gate,
            start_reduction=start,
        )


OPTION_NAMES = tuple(f.name for f in fields(ModelOptions))


def build_model(name: str, num_classes: int = 1000, **options: Any) -> nn.Module:
    """Build a registered model.

    Options (``ModelOptions``): ``attention`` is ``"se"``, ``"eca"`` or ``"none"``; with ``"se"``,
    ``reduction`` is a ratio or ``"learned"`` (then ``learned["start_reduction"]``, default 4, sets
    the starting width); ``min_channels``, ``bias`` and ``gate`` shape the SE block.
    ``placement`` and ``memory_efficient`` apply to SE-DenseNet only. ``pretrained`` is
    ``"imagenet"`` (torchvision's weights for the matching backbone), ``"timm:<name>[.<tag>]"``
    (timm's trained SE-ResNet weights) or a path to a weights file; matching tensors are copied,
    the rest (torchvision: the SE layers) and a classifier of another size start fresh (call
    ``load_pretrained`` yourself for its report of what was copied). With ``pretrained``, the
    options the weights need override the given ones (``pretrained_model_options``: timm's
    SE-ResNet-18/34 need ``min_channels=8``); pass them too when you rebuild the model.
    """
    if name not in MODELS:
        raise SemodelError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"build_model() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(OPTION_NAMES)}"
        )
    opts = ModelOptions(**options)
    if opts.pretrained:
        opts = replace(opts, **pretrained_model_options(name, opts.pretrained, options))
    family, depth = MODELS[name]
    try:
        attention = opts.attention_spec()
        if family == "resnet":
            model: nn.Module = se_resnet(depth, num_classes, attention, opts.stem, opts.drop_rate)
        else:
            model = se_densenet(
                depth,
                num_classes,
                attention,
                opts.placement,
                opts.stem,
                opts.drop_rate,
                opts.memory_efficient,
            )
    except ValueError as e:
        raise SemodelError(f"model {name}: {e}") from None
    if opts.pretrained:
        load_pretrained(model, name, opts.pretrained)
    return model
