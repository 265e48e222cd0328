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
import warnings
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
            out = _WriteErrors(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None  # the OSError (disk full, ...) behind torch's bare RuntimeError
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SemodelError(
                f"could not write checkpoint {path}: {e.strerror or e}; "
                f"the previous file (if any) is unchanged"
            ) from None
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file beside it, then rename): a crash or a full disk
    never leaves half a file, and the previous one stays until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SemodelError(
            f"could not write {path}: {e.strerror or e}; the previous file (if any) is unchanged"
        ) from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteErrors:
    """The file for ``torch.save``, remembering the OSError of a failed write.

    torch's zip writer turns an exception of ``write`` into a RuntimeError that only says
    "unexpected pos 704 vs 598"; the OSError says what happened (no space left, file too large).
    """

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temp files of checkpoint writes that a crash or SIGKILL cut short; their number.

    Only ``save_checkpoint``'s own names (``.last.pt.<random>.tmp``); call it when no other
    process writes checkpoints into ``folder``.
    """
    removed = 0
    for name in ("last.pt", "best.pt"):
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


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


def torch_load_weights(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` without torch's warnings (several lines on stderr,
    e.g. about the pickle protocol of a file that it then refuses anyway)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def refusal_reason(error: Exception) -> str:
    """One line for a file that ``weights_only`` refused, naming what it wanted to load.

    torch's message is a paragraph about its defaults; the line that matters names the global,
    e.g. ``Trying to load unsupported GLOBAL posix.system whose module posix is blocked.``
    """
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    detail = next((line for line in lines if "GLOBAL" in line), None)
    detail = detail or next((line for line in lines if line.startswith("Unsupported")), None)
    detail = (detail or (lines[0] if lines else type(error).__name__)).split(" Please use ")[0]
    return (
        f"it holds Python objects, not only tensors and plain data (loading it could run code): "
        f"{detail[:200]}"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a semodel checkpoint with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise SemodelError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise SemodelError(f"{path} is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    if not zipfile.is_zipfile(path):  # every torch.save since PyTorch 1.6; a plain pickle is not read
        reason = "not a PyTorch zip archive: another kind of file, or truncated"
        raise SemodelError(f"{path}: not a readable checkpoint ({reason})")
    try:
        state = torch_load_weights(path, map_location)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise SemodelError(f"{path}: refused to load: {refusal_reason(e)}") from None
        raise SemodelError(
            f"{path}: not a readable checkpoint (corrupt or truncated: {first[:200]})"
        ) from None
    except Exception as e:  # any other failure to read the file is about the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SemodelError(
            f"{path}: not a readable checkpoint (corrupt or truncated: {first[:200]})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("semodel"), dict):
        raise SemodelError(
            f"{path}: not a semodel checkpoint (no 'semodel' header; made by another program?)"
        )
    version = state["semodel"].get("format_version")
    if version != FORMAT_VERSION:
        raise SemodelError(
            f"{path}: checkpoint format {version} is not supported (this semodel reads {FORMAT_VERSION})"
        )
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


def build_from_checkpoint(
    state: dict[str, Any], use_ema: bool = False, source: str = "checkpoint"
) -> nn.Module:
    """Rebuild the model of a loaded checkpoint, with its (or its EMA) weights, in eval mode."""
    from semodel.models import build_model, prune_attention

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
    prune_attention(model)  # learned SE widths: drop the closed units (same outputs, fewer parameters)
    return model.eval()
