"""Start a model from published weights: torchvision's ImageNet weights or a local state_dict file.

Module names mirror torchvision's, so a tensor is copied wherever the model has the same key with
the same shape; the attention modules are new (they keep their init) and a classifier of another
size is skipped. Nothing is printed: ``load_pretrained`` returns a one-line report for the caller.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from semodel.errors import SemodelError, first_line
from semodel.files import read_weights_only

# name -> (family, depth)
MODELS = {
    "se_resnet18": ("resnet", 18),
    "se_resnet34": ("resnet", 34),
    "se_resnet50": ("resnet", 50),
    "se_resnet101": ("resnet", 101),
    "se_resnet152": ("resnet", 152),
    "se_densenet121": ("densenet", 121),
    "se_densenet169": ("densenet", 169),
    "se_densenet201": ("densenet", 201),
}

# Old torchvision DenseNet files name the layers "norm.1" instead of "norm1".
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def torchvision_name(name: str) -> str:
    """The torchvision backbone a semodel model mirrors: ``se_resnet50`` -> ``resnet50``."""
    family, depth = MODELS[name]
    return f"{family}{depth}"


def fetch_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    tv_name = torchvision_name(name)
    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # no network (URLError), SSL, a file with the wrong hash
        raise SemodelError(
            f"could not download torchvision's ImageNet weights for {tv_name} "
            f"({type(e).__name__}: {first_line(e)}); "
            f"without network access, save them on a connected machine with "
            f"torch.save(torchvision.models.{tv_name}(weights='DEFAULT').state_dict(), '{tv_name}.pth') "
            f"and set model.pretrained to that file"
        ) from None


def read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a plain one, a semodel checkpoint's, or under ``state_dict``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SemodelError(f"pretrained weights file not found: {file}")
    obj = read_weights_only(file, "PyTorch weights file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a semodel checkpoint
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SemodelError(f"{file} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_pretrained(model: nn.Module, name: str, source: str) -> str:
    """Copy matching tensors from ``source`` (``"imagenet"`` or a file) into ``model``; a one-line report.

    A tensor is copied when the model has the same key with the same shape. Keys of the
    attention modules are new (they keep their init); the classifier is skipped when its shape
    differs (another number of classes).
    """
    state = fetch_imagenet_state_dict(name) if source == "imagenet" else read_state_dict_file(source)
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
