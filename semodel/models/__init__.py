"""Model registry: ``build_model(name, num_classes=..., **options)`` and ``MODEL_NAMES``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semodel.errors import SemodelError
from semodel.models.attention import (
    ATTENTIONS,
    EfficientChannelAttention,
    LearnedWidthSE,
    SqueezeExcite,
    learned_widths,
    prune_attention,
    sparsity_loss,
)
from semodel.models.densenet import PLACEMENTS, SEDenseNet, se_densenet
from semodel.models.resnet import STEMS, SEResNet, se_resnet

__all__ = [
    "ATTENTIONS",
    "EfficientChannelAttention",
    "LearnedWidthSE",
    "MODEL_NAMES",
    "PLACEMENTS",
    "STEMS",
    "SEDenseNet",
    "SEResNet",
    "SqueezeExcite",
    "build_model",
    "learned_widths",
    "load_pretrained",
    "prune_attention",
    "sparsity_loss",
    "torchvision_name",
]

# name -> (family, depth)
_MODELS = {
    "se_resnet18": ("resnet", 18),
    "se_resnet34": ("resnet", 34),
    "se_resnet50": ("resnet", 50),
    "se_resnet101": ("resnet", 101),
    "se_resnet152": ("resnet", 152),
    "se_densenet121": ("densenet", 121),
    "se_densenet169": ("densenet", 169),
    "se_densenet201": ("densenet", 201),
}
MODEL_NAMES = tuple(_MODELS)


def torchvision_name(name: str) -> str:
    """The torchvision backbone a semodel model mirrors: ``se_resnet50`` -> ``resnet50``."""
    family, depth = _MODELS[name]
    return f"{family}{depth}"


def build_model(
    name: str,
    num_classes: int = 1000,
    *,
    attention: str = "se",
    reduction: float | str = 16,
    learned: dict[str, Any] | None = None,
    min_channels: int = 1,
    bias: bool = True,
    gate: str = "sigmoid",
    stem: str = "imagenet",
    placement: str | list[str] = "block",
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
    pretrained: str | None = None,
) -> nn.Module:
    """Build a registered model.

    ``attention`` is ``"se"``, ``"eca"`` or ``"none"``; with ``"se"``, ``reduction`` is a ratio or
    ``"learned"`` (then ``learned["start_reduction"]``, default 4, sets the starting width).
    ``placement`` and ``memory_efficient`` apply to SE-DenseNet only. ``pretrained`` is
    ``"imagenet"`` (torchvision's weights for the matching backbone) or a path to a local
    state_dict; SE layers and the classifier start fresh, everything else is copied.
    """
    if name not in _MODELS:
        raise SemodelError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    family, depth = _MODELS[name]
    common = dict(
        num_classes=num_classes,
        attention=attention,
        reduction=reduction,
        min_channels=min_channels,
        bias=bias,
        gate=gate,
        stem=stem,
        drop_rate=drop_rate,
        start_reduction=float((learned or {}).get("start_reduction", 4)),
    )
    try:
        if family == "resnet":
            model = se_resnet(depth, **common)
        else:
            model = se_densenet(depth, placement=placement, memory_efficient=memory_efficient, **common)
    except ValueError as e:
        raise SemodelError(f"model {name}: {e}") from None
    if pretrained:
        report = load_pretrained(model, name, pretrained)
        print(f"pretrained ({pretrained}): {report}")
    return model


# Old torchvision DenseNet files name the layers "norm.1" instead of "norm1".
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _fetch_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    tv_name = torchvision_name(name)
    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, SSL errors, hash mismatch...
        raise SemodelError(
            f"could not download torchvision's ImageNet weights for {tv_name} ({type(e).__name__}: {e}); "
            f"without network access, save them on a connected machine with "
            f"torch.save(torchvision.models.{tv_name}(weights='DEFAULT').state_dict(), '{tv_name}.pth') "
            f"and set model.pretrained to that file"
        ) from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SemodelError(f"pretrained weights file not found: {file}")
    from semodel.checkpoint import refusal_reason, torch_load_weights

    try:
        obj = torch_load_weights(file)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise SemodelError(f"{file}: refused to load: {refusal_reason(e)}") from None
        raise SemodelError(f"{file} is not a readable PyTorch weights file ({_first_line(e)})") from None
    except Exception as e:
        raise SemodelError(f"{file} is not a readable PyTorch weights file ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a semodel checkpoint
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SemodelError(f"{file} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_pretrained(model: nn.Module, name: str, source: str) -> str:
    """Copy matching tensors from ``source`` into ``model``; returns a one-line report.

    A tensor is copied when the model has the same key with the same shape. Keys of the
    attention modules are new (they keep their init); the classifier is skipped when its shape
    differs (another number of classes).
    """
    state = _fetch_imagenet_state_dict(name) if source == "imagenet" else _read_state_dict_file(source)
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        else:
            skipped.append(key)
    if not loaded:
        raise SemodelError(
            f"{source}: no tensor matches {name}; is it a {torchvision_name(name)} state_dict?"
        )
    new = [k for k in own if k not in loaded]
    model.load_state_dict(loaded, strict=False)
    return f"{len(loaded)} tensors loaded, {len(new)} new, {len(skipped)} skipped" + (
        f" ({', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})" if skipped else ""
    )


def describe(name: str, **options: Any) -> str:
    return f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"
