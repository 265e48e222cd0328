"""Self-describing checkpoints: atomic save, safe load, and the model rebuilt from the file alone.

A checkpoint is a dict of plain tensors, dicts, lists, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads it and a file from a stranger cannot run code::

    semodel        {"format_version": 1, "version": "0.1.0"}
    config         the resolved experiment config (plain dict)
    classes        class names, index order
    preprocess     {"image_size", "resize", "mean", "std", "interpolation"}
    model          state_dict (always the plain module: no DDP / compile prefixes)
    ema            EMA state_dict or None
    epoch          epochs completed
    best           {"metric", "value", "epoch"}
    metrics        the validation metrics of this epoch
    optimizer, scheduler, scaler, rng, run_dir  (for resume; present in last.pt and best.pt)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semodel import __version__
from semodel.errors import SemodelError

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    A crash or a full disk while saving leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"semodel": {"format_version": FORMAT_VERSION, "version": __version__}, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SemodelError(f"could not write checkpoint {path}: {e.strerror or e}; "
                               f"the previous file (if any) is unchanged") from None
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a semodel checkpoint with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise SemodelError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise SemodelError(f"{path} is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise SemodelError(
                f"{path}: refused to load: it holds Python objects, not only tensors and plain data "
                f"(loading it could run code). {first[:200]}"
            ) from None
        raise SemodelError(f"{path}: not a readable checkpoint (corrupt or truncated: {first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SemodelError(f"{path}: not a readable checkpoint (corrupt or truncated: {first[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("semodel"), dict):
        raise SemodelError(f"{path}: not a semodel checkpoint (no 'semodel' header; made by another program?)")
    version = state["semodel"].get("format_version")
    if version != FORMAT_VERSION:
        raise SemodelError(f"{path}: checkpoint format {version} is not supported (this semodel reads {FORMAT_VERSION})")
    missing = [k for k in ("config", "classes", "preprocess", "model") if k not in state]
    if missing:
        raise SemodelError(f"{path}: incomplete semodel checkpoint (missing {', '.join(missing)})")
    return state


def model_options(config: dict[str, Any]) -> dict[str, Any]:
    """The ``build_model`` keyword arguments stored in a config's ``model`` section."""
    options = dict(config["model"])
    options.pop("num_classes", None)
    options.pop("pretrained", None)  # the checkpoint carries the weights
    return options


def build_from_checkpoint(state: dict[str, Any], use_ema: bool = False, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model of a loaded checkpoint, with its (or its EMA) weights, in eval mode."""
    from semodel.models import build_model

    options = model_options(state["config"])
    name = options.pop("name")
    model = build_model(name, num_classes=len(state["classes"]), **options)
    weights = state["model"]
    if use_ema:
        if not state.get("ema"):
            raise SemodelError(f"{source}: has no EMA weights (train with train.ema: true)")
        weights = state["ema"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise SemodelError(f"{source}: weights do not fit {name}: {str(e).splitlines()[0]}") from None
    return model.eval()
