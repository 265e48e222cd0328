"""Start a model from published weights: torchvision's ImageNet weights, timm's trained SE-ResNet
weights (``timm:<name>[.<tag>]``), or a local weights file.

Module names mirror torchvision's, and timm's SE-ResNets use the same names (their SE layers are
``layerN.M.se.fc1/fc2``, as semodel's), so a tensor is copied wherever the model has the same key
with the same shape. Tensors the source lacks keep their init (the SE layers, with torchvision's
weights); a classifier of another size is skipped. Two checks keep a wrong file from passing for
a right one: at least ``FIT`` of the model's backbone tensors must load, and at least ``FIT`` of the
source's must be used (a deeper ResNet's file covers all of a shallower model's tensors).

Some sources need options that change the shapes (timm's SE widths for SE-ResNet-18/34): those
must be set before the model is built, with ``pretrained_model_options``. Nothing is printed:
``load_pretrained`` returns a one-line report for the caller.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semodel.errors import SemodelError, first_line
from semodel.files import read_weights_only
from semodel.models.attention import EfficientChannelAttention, hidden_width
from semodel.models.densenet import DEPTHS as DENSENET_DEPTHS
from semodel.models.resnet import DEPTHS as RESNET_DEPTHS
from semodel.models.resnet import Bottleneck

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

TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'semodel[timm]'"
# timm's architectures that are semodel's models, tensor for tensor (timm has no SE-DenseNet).
TIMM_ARCHITECTURES = {f"seresnet{depth}": f"se_resnet{depth}" for depth in (18, 34, 50, 101, 152)}
FIT = 0.9  # the share of backbone tensors that must fit, both ways

# Old torchvision DenseNet files name the layers "norm.1" instead of "norm1".
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_CLASSIFIERS = ("fc.", "classifier.")


def torchvision_name(name: str) -> str:
    """The torchvision backbone a semodel model mirrors: ``se_resnet50`` -> ``resnet50``."""
    family, depth = MODELS[name]
    return f"{family}{depth}"


# ----------------------------------------------------------------------------- what the source is


def is_timm_source(source: str) -> bool:
    return source.startswith(TIMM_PREFIX)


def timm_se_width(channels: int) -> int:
    """timm's SE hidden width (r = 16): ``make_divisible(C / 16, 8, round_limit=0)``, the multiple of 8
    nearest to C / 16 (halves round up), at least 8.

    semodel's is ``max(min_channels, round(C / 16))``. For SE-ResNet's 64..2048 channels the two
    agree with ``min_channels: 8``; with the default 1 they differ where C = 64 (timm 8, semodel 4),
    i.e. in layer1 of SE-ResNet-18/34.
    """
    return max(8, int(channels / 16 + 4) // 8 * 8)


def timm_save_command(weights: str) -> str:
    """The one line that saves timm's weights to a file, to run where timm and the network are."""
    return (
        f"python -c \"import timm, torch; torch.save(timm.create_model('{weights}', pretrained=True)"
        f".state_dict(), '{weights}.pth')\""
    )


def import_timm(source: str, weights: str):
    try:
        import timm
    except ImportError:
        raise SemodelError(
            f"model.pretrained {source} needs timm, which is not installed: {TIMM_INSTALL}; or, on a "
            f"machine with timm and network access, run {timm_save_command(weights)} and set "
            f"model.pretrained to that file"
        ) from None
    return timm


def timm_trained(timm) -> list[str]:
    """timm's trained weights (``arch.tag``) that load into a semodel model."""
    return [w for w in timm.list_pretrained("seresnet*") if w.partition(".")[0] in TIMM_ARCHITECTURES]


def check_timm_source(name: str, source: str) -> tuple[Any, str]:
    """timm and the weights' name (``seresnet50.a1_in1k``) of a ``timm:`` source meant for ``name``.

    Refused before anything is downloaded: a DenseNet (timm has none with SE), a name timm does not
    know (with its close matches), another architecture, another depth, weights timm does not have.
    """
    weights = source.removeprefix(TIMM_PREFIX).strip()
    family, depth = MODELS[name]
    if family != "resnet":
        raise SemodelError(
            f"model.pretrained {source}: timm has no SE-DenseNet, so it has no SE weights for {name}; "
            f"use model.pretrained: imagenet (torchvision's densenet{depth}, the SE layers start new) "
            f"or a DenseNet weights file"
        )
    timm = import_timm(source, weights or "seresnet50.a1_in1k")
    arch = weights.partition(".")[0]
    trained = timm_trained(timm)
    loadable = (
        f"semodel loads timm's {', '.join(TIMM_ARCHITECTURES)}, of which timm {timm.__version__} has "
        f"trained weights for {', '.join(trained) or 'none'}"
    )
    if not arch or not timm.is_model(arch):
        known = sorted(set(timm.list_models("*seresnet*")) | set(timm.list_pretrained("*seresnet*")))
        close = difflib.get_close_matches(weights, known, n=5, cutoff=0.6)
        matches = f"close matches among timm's SE-ResNets: {', '.join(close)}; " if close else ""
        raise SemodelError(
            f"model.pretrained {source}: timm {timm.__version__} has no model {arch!r}; {matches}{loadable}"
        )
    if arch not in TIMM_ARCHITECTURES:
        raise SemodelError(
            f"model.pretrained {source}: timm's {arch} is another architecture than semodel's "
            f"SE-ResNets (its layers have other names or shapes); {loadable}"
        )
    if TIMM_ARCHITECTURES[arch] != name:
        raise SemodelError(
            f"model.pretrained {source}: these are weights for {TIMM_ARCHITECTURES[arch]}, the model is "
            f"{name}; set model.name: {TIMM_ARCHITECTURES[arch]}"
        )
    if not any(w == weights or w.startswith(f"{weights}.") for w in trained):
        raise SemodelError(
            f"model.pretrained {source}: timm {timm.__version__} has no trained weights for {weights}; "
            f"{loadable}; a file of {arch} weights you trained with timm loads too (model.pretrained: <file>)"
        )
    return timm, weights


def fetch_timm_state_dict(name: str, source: str) -> dict[str, torch.Tensor]:
    """timm's trained weights, through timm's own hub machinery (downloaded once, then cached)."""
    timm, weights = check_timm_source(name, source)
    try:
        return timm.create_model(weights, pretrained=True).state_dict()
    except (OSError, RuntimeError) as e:  # no network (URLError, the hub's errors), no huggingface_hub
        raise SemodelError(
            f"could not download timm's {weights} weights ({type(e).__name__}: {first_line(e)}); "
            f"without network access, run {timm_save_command(weights)} on a connected machine and "
            f"set model.pretrained to that file"
        ) from None


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


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise SemodelError(
            f"{file}: reading a .safetensors file needs the safetensors package: pip install safetensors "
            f"(it comes with {TIMM_INSTALL})"
        ) from None
    try:
        return load_file(str(file), device="cpu")
    except (OSError, SafetensorError) as e:
        raise SemodelError(f"{file}: not a readable safetensors file ({first_line(e)})") from None


def read_torch_file(file: Path) -> Any:
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is None:
        return read_weights_only(file, "PyTorch weights file")
    with safe_globals([argparse.Namespace]):  # timm's training checkpoints keep their arguments so
        return read_weights_only(file, "PyTorch weights file")


def read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a plain one, a ``.safetensors`` file, a semodel checkpoint's,
    one under ``state_dict``, or a timm training checkpoint's (its EMA weights where it has them, as
    timm's ``load_checkpoint`` takes them)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SemodelError(f"pretrained weights file not found: {file}")
    obj = read_safetensors(file) if file.suffix == ".safetensors" else read_torch_file(file)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a semodel checkpoint
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict_ema"), dict):  # timm, trained with EMA
        obj = obj["state_dict_ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SemodelError(f"{file} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def canonical_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the models name them: old DenseNet ``norm.1`` -> ``norm1``; DDP / compile prefixes off."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPERS):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        out[_OLD_DENSENET_KEY.sub(r"\1\2", key)] = value
    return out


def source_state_dict(name: str, source: str) -> dict[str, torch.Tensor]:
    if source == "imagenet":
        state = fetch_imagenet_state_dict(name)
    elif is_timm_source(source):
        state = fetch_timm_state_dict(name, source)
    else:
        state = read_state_dict_file(source)
    return canonical_keys(state)


# ----------------------------------------------------------------------------- options before the build


def se_channels(name: str) -> list[int]:
    """The channel count of every SE module of an SE-ResNet (one per block, in order)."""
    family, depth = MODELS[name]
    if family != "resnet":
        return []
    block, layers = RESNET_DEPTHS[depth]
    return [
        planes * block.expansion
        for planes, n in zip((64, 128, 256, 512), layers, strict=True)
        for _ in range(n)
    ]


def se_widths(state: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """``(channels, hidden width)`` of every SE module in a state_dict."""
    return [
        (int(v.shape[1]), int(v.shape[0]))
        for k, v in state.items()
        if k.endswith(".se.fc1.weight") and v.dim() >= 2
    ]


def matching_min_channels(widths: list[tuple[int, int]], reduction: float, current: int) -> int | None:
    """The SE width floor with which ``max(floor, round(C / r))`` gives every ``(C, width)``:
    ``current`` if it does, None if no floor does (then the source's SE layers do not load).

    A width above ``round(C / r)`` fixes the floor; one equal to it caps the floor at that width;
    one below it cannot be had with this ``r``.
    """
    if not widths:
        return None
    pairs = [(hidden_width(c, reduction), w) for c, w in widths]
    if any(w < natural for natural, w in pairs):
        return None
    forced = {w for natural, w in pairs if w > natural}
    cap = min((w for natural, w in pairs if w == natural), default=None)
    if len(forced) > 1:
        return None
    if forced:
        floor = forced.pop()
        return floor if cap is None or floor <= cap else None
    return current if current <= cap else cap


def pretrained_model_options(
    name: str, source: str | None, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The model options that ``source``'s weights need, to set before the model is built.

    ``options`` are the model's (the config's ``model`` section, or ``build_model``'s keywords);
    only those that must change come back: today ``min_channels``, when the source's SE layers
    have widths this floor gives (timm's SE-ResNet-18/34: ``{"min_channels": 8}``). Empty for
    torchvision's weights (no SE layers), for a model with ECA, learned-width SE or no attention,
    and for widths no floor gives with the configured ``reduction`` (those SE layers stay new and
    the report of ``load_pretrained`` says why). The trainer applies the result to its config
    before building, so the checkpoint's config rebuilds the same shapes. A ``timm:`` source is
    checked here (and fails here), before the model is built and nothing is downloaded.
    """
    options = dict(options or {})
    if not source or source == "imagenet":
        return {}
    timm = is_timm_source(source)
    if timm:
        check_timm_source(name, source)
    if options.get("attention", "se") != "se" or options.get("reduction", 16) == "learned":
        return {}
    if timm:
        widths = [(c, timm_se_width(c)) for c in se_channels(name)]
    else:
        widths = se_widths(canonical_keys(read_state_dict_file(source)))
    current = int(options.get("min_channels", 1))
    floor = matching_min_channels(widths, float(options.get("reduction", 16)), current)
    return {} if floor is None or floor == current else {"min_channels": floor}


# ----------------------------------------------------------------------------- loading


def is_attention_key(key: str) -> bool:
    return ".se." in f".{key}"


def backbone_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors that define the architecture: not attention, classifier or BN step counters."""
    return [
        k
        for k in state
        if not is_attention_key(k)
        and not k.startswith(_CLASSIFIERS)
        and not k.endswith("num_batches_tracked")
    ]


def _block_counts(state: Mapping[str, torch.Tensor], pattern: str, first: int) -> tuple[int, ...]:
    counts: dict[int, int] = {}
    for key in state:
        match = re.match(pattern, key)
        if match:
            stage, index = int(match[1]), int(match[2])
            counts[stage] = max(counts.get(stage, 0), index + 1 - first)
    return tuple(counts.get(stage, 0) for stage in range(1, 5))


def guess_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """The semodel model whose backbone a state_dict has, from its blocks per stage (None if none)."""
    layers = _block_counts(state, r"layer([1-4])\.(\d+)\.", 0)
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, (block, counts) in RESNET_DEPTHS.items():
        if tuple(counts) == layers and (block is Bottleneck) == bottleneck:
            return f"se_resnet{depth}"
    dense = _block_counts(state, r"features\.denseblock([1-4])\.denselayer(\d+)\.", 1)
    for depth, counts in DENSENET_DEPTHS.items():
        if tuple(counts) == dense:
            return f"se_densenet{depth}"
    return None


def what_it_holds(name: str, state: Mapping[str, torch.Tensor]) -> str:
    """``; it holds se_resnet50 weights (...)``, or "" where the guess is no help."""
    guess = guess_architecture(state)
    if guess is None or guess == name:
        return ""
    has_se = any(is_attention_key(k) for k in state)
    note = f"; it holds {guess} weights{' with SE layers' if has_se else ''}"
    if MODELS[guess][0] == "resnet" and MODELS[name][0] == "densenet" and has_se:
        return note + " (timm's SE-ResNet layout; timm has no SE-DenseNet)"
    return note + f" (set model.name: {guess})"


def check_fit(
    name: str,
    source: str,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
) -> None:
    """Refuse weights of another architecture: fewer than ``FIT`` of either side's backbone fits."""
    holds = what_it_holds(name, state)
    if not loaded:
        question = f"; is it a {torchvision_name(name)} state_dict?"
        raise SemodelError(f"{source}: no tensor matches {name}{holds or question}")
    mine, theirs = backbone_keys(own), backbone_keys(state)
    fit_mine = sum(k in loaded for k in mine)
    fit_theirs = sum(k in loaded for k in theirs)
    if fit_mine < FIT * len(mine) or fit_theirs < FIT * len(theirs):
        raise SemodelError(
            f"{source}: not weights for {name}: {fit_mine} of the model's {len(mine)} backbone tensors "
            f"and {fit_theirs} of the source's {len(theirs)} fit (at least {FIT:.0%} of each must){holds}"
        )


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def attention_report(
    model: nn.Module,
    source: str,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
) -> str:
    """``SE layers: trained (32 of 32 tensors)``, ``SE layers: new (random init; ...)``, ..."""
    mine = [k for k in own if is_attention_key(k)]
    if not mine:
        return "SE layers: none (attention: none)"
    eca = any(isinstance(m, EfficientChannelAttention) for m in model.modules())
    label = "ECA layers" if eca else "SE layers"
    n = sum(k in loaded for k in mine)
    if n == len(mine):
        return f"{label}: trained ({n} of {n} tensors)"
    theirs = [k for k in state if is_attention_key(k)]
    unfit = [k for k in theirs if k in own and k not in loaded]
    if source == "imagenet":
        why = "torchvision's ImageNet weights have none"
    elif not theirs:
        why = "the source has none"
    elif unfit:
        k = unfit[0]
        why = (
            f"{len(unfit)} of the source's {len(theirs)} attention tensors have other shapes, e.g. "
            f"{k} {_shape(state[k])} there, {_shape(own[k])} here: "
            f"set model.reduction / min_channels to match"
        )
    else:
        why = f"the source's {len(theirs)} attention tensors have other names"
    status = "new (random init" if n == 0 else f"partly trained ({n} of {len(mine)} tensors"
    return f"{label}: {status}; {why})"


def load_pretrained(model: nn.Module, name: str, source: str) -> str:
    """Copy matching tensors from ``source`` into ``model``; a one-line report.

    ``source`` is ``"imagenet"`` (torchvision), ``"timm:<name>[.<tag>]"`` (timm's trained weights)
    or a file (``.pth``/``.pt``, a checkpoint, ``.safetensors``). A tensor is copied when the model
    has the same key with the same shape; the others keep their init, and the classifier is
    skipped when its shape differs (another number of classes). Refused: weights of another
    architecture (``check_fit``). The model's SE widths must already fit the source's
    (``pretrained_model_options``, applied before the build); the report says whether they did.
    """
    state = source_state_dict(name, source)
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        else:
            skipped.append(key)
    check_fit(name, source, state, own, loaded)
    new = [k for k in own if k not in loaded]
    model.load_state_dict(loaded, strict=False)
    listed = f" ({', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})" if skipped else ""
    counts = f"{len(loaded)} tensors loaded, {len(new)} new, {len(skipped)} skipped{listed}"
    return f"{counts}; {attention_report(model, source, state, own, loaded)}"
