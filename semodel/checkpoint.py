"""The checkpoint format: built from a training run, restored into one, loaded and checked, and the
model rebuilt from the file alone.

A checkpoint is a dict of plain tensors, dicts, lists, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads it and a file from a stranger cannot run code::

    semodel        {"format_version": 1, "version": "0.1.0"}
    config         the resolved experiment config (plain dict)
    classes        class names, index order
    preprocess     {"image_size", "resize", "mean", "std", "interpolation"} (semodel.preprocess)
    model          state_dict (always the plain module: no DDP / compile prefixes); in best.pt the
                   weights the run selected (the EMA's with train.ema)
    ema            EMA state_dict, or None without train.ema; in best.pt the same tensors as
                   ``model`` (stored once) when the run selected the EMA weights
    selected       best.pt only: "ema" or "model", which weights ``model`` holds there (best.pt
                   keeps one set of weights; the raw ones of an EMA run are only in last.pt)
    epoch          epochs completed
    progress       {"epoch", "step_in_epoch", "global_step", "best_value", "best_epoch",
                   "stale_epochs"}: where the run stands (``Progress``)
    best           {"metric", "value", "epoch"}: the monitored metric's best so far
    metrics        the validation metrics of this epoch ({} when saved mid-epoch)
    history        one {"epoch", "train", "val"} per finished epoch
    optimizer      optimizer.state_dict()
    scheduler      the LambdaLR's state_dict()
    scaler         GradScaler state_dict (fp16), or None
    rng            rank 0's random streams (semodel.runtime.rng_state)
    rng_ranks      every rank's streams under DDP, else []
    world_size     processes that trained it
    run_dir        the run folder as training saw it (eval uses it to find a relative data root)
    data_root      the data root as an absolute path at training time (where eval looks first)
    calibration    best.pt only, written at the end of training: the temperature fitted on the
                   validation split, ECE before and after, and for two classes the operating
                   threshold and its rule (semodel.analysis.fit_calibration)

``last.pt`` holds every key but ``selected`` and ``calibration``: all that resume needs
(``TRAINING_KEYS`` are checked).
``best.pt`` (``best_state``) holds what eval, predict, export, inspect, cv and ``model.pretrained``
read: every key but the training state of ``RESUME_KEYS``, and one set of weights; about a quarter
of last.pt for an AdamW run with EMA (weights, EMA and two Adam moments). A best.pt written
before it became slim holds last.pt's keys (raw and EMA weights): it loads everywhere as before.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from semodel._version import __version__
from semodel.errors import SemodelError, short_repr
from semodel.files import is_zip_archive, read_weights_only, save_atomic
from semodel.runtime import set_rng_state

FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "classes", "preprocess", "model")
TRAINING_KEYS = ("optimizer", "scheduler", "progress", "rng")
# In last.pt only: what resume needs besides the weights (best.pt leaves them out).
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "progress", "rng", "rng_ranks", "world_size")


@dataclass
class Progress:
    """Where a training run stands; saved as the checkpoint's ``progress``."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained (after an interrupt)
    global_step: int = 0  # optimizer steps
    best_value: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0


class TrainingRun(Protocol):
    """What ``training_state`` reads from, and ``restore_training`` writes into (``semodel.train.Run``)."""

    config: dict[str, Any]
    classes: list[str]
    preprocess: dict[str, Any]
    model: nn.Module
    ema: Any  # torch.optim.swa_utils.AveragedModel or None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LambdaLR
    scaler: Any  # torch.amp.GradScaler
    progress: Progress
    history: list[dict[str, Any]]
    monitor: str
    run_dir: Path
    data: Any  # semodel.data.Dataset: its root


# ----------------------------------------------------------------------------- build and restore


def training_state(
    run: TrainingRun, metrics: dict[str, Any] | None, rngs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The checkpoint of ``run`` now; ``rngs``: every rank's random streams, in rank order."""
    p = run.progress
    return {
        "config": run.config,
        "classes": list(run.classes),
        "preprocess": run.preprocess,
        "model": run.model.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": p.epoch,
        "progress": asdict(p),
        "best": {"metric": run.monitor, "value": p.best_value, "epoch": p.best_epoch},
        "metrics": metrics or {},
        "history": list(run.history),
        "rng": rngs[0],
        "rng_ranks": rngs if len(rngs) > 1 else [],
        "world_size": len(rngs),
        "run_dir": str(run.run_dir),
        "data_root": str(Path(run.data.root).expanduser().absolute()),
    }


def best_state(state: dict[str, Any]) -> dict[str, Any]:
    """best.pt from a ``training_state``: no training state, and only the weights the run selected
    (the EMA's with train.ema, kept under ``model`` and ``ema`` as the same tensors: stored once).
    Keys added to ``training_state`` later come along unless they are in ``RESUME_KEYS``."""
    best = {key: value for key, value in state.items() if key not in RESUME_KEYS}
    if state["ema"] is not None:
        best["model"], best["selected"] = dict(state["ema"]), "ema"
    else:
        best["selected"] = "model"
    return best


def cpu_copy(obj: Any) -> Any:
    """A copy of a state whose tensors are new CPU tensors (the training goes on changing the
    originals in place while a background thread writes the copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(value) for value in obj)
    return obj  # numbers, strings, None, numpy RNG arrays (fresh copies already)


def restore_training(run: TrainingRun, saved: dict[str, Any], rank: int, world_size: int) -> None:
    """Put a resumed checkpoint's weights, optimizer, schedule, scaler, EMA, progress, history and
    random streams into ``run``, whose optimizer and schedule were built from the current config."""
    run.model.load_state_dict(saved["model"])
    # Keep the optimizer's state (momentum, Adam moments) but this config's hyperparameters,
    # so that `--set optim.lr=...` on resume takes effect; a stored value would override it.
    optimizer, scheduler = run.optimizer, run.scheduler
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    scheduler.base_lrs = [settings["initial_lr"] for settings in configured]
    # The stored lr follows the stored schedule; with `--set train.epochs=...` (or another
    # schedule) the next step must use this run's schedule at the restored step.
    schedule = zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    for group, base_lr, factor in schedule:
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    if run.ema is not None and saved.get("ema"):
        run.ema.module.load_state_dict(saved["ema"])
        run.ema.n_averaged.fill_(max(1, saved["progress"]["global_step"]))
    run.progress = Progress(**saved["progress"])
    run.history = list(saved.get("history", []))
    streams = saved.get("rng_ranks") or [saved["rng"]]
    set_rng_state(streams[rank] if len(streams) == world_size else streams[0])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with the format header, atomically (a failure leaves the old file as it was)."""
    return save_atomic({"semodel": {"format_version": FORMAT_VERSION, "version": __version__}, **state}, path)


# ----------------------------------------------------------------------------- load


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a semodel checkpoint with ``weights_only=True``; one clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise SemodelError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise SemodelError(f"{path} is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    if not is_zip_archive(path):
        reason = "not a PyTorch zip archive: another kind of file, or truncated"
        raise SemodelError(f"{path}: not a readable checkpoint ({reason})")
    state = read_weights_only(path, "checkpoint", map_location)
    if not isinstance(state, dict) or not isinstance(state.get("semodel"), dict):
        raise SemodelError(
            f"{path}: not a semodel checkpoint (no 'semodel' header; made by another program?)"
        )
    version = state["semodel"].get("format_version")
    if version != FORMAT_VERSION:
        raise SemodelError(
            f"{path}: checkpoint format {version} is not supported (this semodel reads {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise SemodelError(f"{path}: incomplete semodel checkpoint (missing {', '.join(missing)})")
    check_contents(state, path)
    return state


def check_contents(state: dict[str, Any], path: Path) -> None:
    """The stored config, classes, preprocessing and weights, checked before anything is built
    from them: an edited or foreign file is one clear error, not a traceback or an 11 GB tensor.

    The config goes through the schema ``semodel train`` uses (and comes back with its defaults
    filled in); the preprocessing must be the one that config implies.
    """
    from semodel.config import config_from_dict
    from semodel.preprocess import preprocess_of

    if not isinstance(state["config"], dict):
        raise SemodelError(f"{path}: the stored config is a {type(state['config']).__name__}, not a mapping")
    cfg = config_from_dict(state["config"], f"{path} (stored config)")
    state["config"] = cfg.to_dict()
    classes = state["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise SemodelError(
            f"{path}: the stored classes are not a list of two or more distinct names: {short_repr(classes)}"
        )
    expected = preprocess_of(cfg)
    if state["preprocess"] != expected:
        raise SemodelError(
            f"{path}: the stored preprocessing {short_repr(state['preprocess'])} is not the one its config "
            f"implies ({short_repr(expected)}); the file was edited or is damaged"
        )
    for key in ("model", "ema"):
        weights = state.get(key)
        if key == "ema" and weights is None:
            continue
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise SemodelError(f"{path}: '{key}' is not a state_dict (a mapping of names to tensors)")


def load_resumable(path: str | Path) -> dict[str, Any]:
    """``load_checkpoint`` for ``train --resume``: the run's last.pt, holding the training state.

    Another file beside a last.pt (best.pt) would rewind the run to an earlier epoch and then
    replace the newer last.pt, so it is refused.
    """
    path = Path(path)
    last = path.parent / "last.pt"
    if path.name != "last.pt" and path.is_file() and last.is_file() and not os.path.samefile(path, last):
        raise SemodelError(
            f"--resume {path}: continue the run from {last}, where it stopped; {path.name} holds an earlier "
            f"epoch's weights, and resuming from it would rewind the run and replace the newer last.pt "
            f"(to train on from those weights, start a new run with model.pretrained: {path})"
        )
    state = load_checkpoint(path)
    if any(key not in state for key in TRAINING_KEYS):
        raise SemodelError(
            f"--resume {path}: holds no training state (optimizer, schedule, progress): only a run's "
            f"last.pt can be resumed (to train on from these weights, start a new run with "
            f"model.pretrained: {path})"
        )
    return state


# ----------------------------------------------------------------------------- the model


def model_options(config: dict[str, Any]) -> dict[str, Any]:
    """The ``build_model`` keyword arguments stored in a config's ``model`` section."""
    options = dict(config["model"])
    options.pop("num_classes", None)
    options.pop("pretrained", None)  # the checkpoint carries the weights
    return options


def weight_mismatch(own: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], shown: int = 3) -> str:
    """Which tensors differ between a model's state_dict and stored weights ("" if none)."""
    missing = [k for k in own if k not in stored]
    unexpected = [k for k in stored if k not in own]

    def size(t: torch.Tensor) -> str:
        return "x".join(map(str, t.shape))

    shapes = [
        f"{k} {size(stored[k])} in the file, {size(own[k])} in the model"
        for k in own
        if k in stored and stored[k].shape != own[k].shape
    ]

    def listed(what: str, keys: list[str]) -> str:
        more = f", +{len(keys) - shown} more" if len(keys) > shown else ""
        return f"{len(keys)} {what} ({', '.join(keys[:shown])}{more})"

    parts = [
        listed(w, k)
        for w, k in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if k
    ]
    return "; ".join(parts)


def uses_ema(state: dict[str, Any], use_ema: bool | None) -> bool:
    """Whether to use the EMA weights: as asked, or (None) the weights the run selected.

    A run with ``train.ema`` validates, selects (best.pt) and tests the EMA weights, so eval,
    predict, export and inspect use them too unless told otherwise (``--no-ema``).
    """
    if use_ema is None:
        return bool(state.get("ema")) and bool(state["config"]["train"].get("ema"))
    return use_ema


def weights_label(state: dict[str, Any], use_ema: bool | None) -> str:
    """Which weights ``use_ema`` picks, for a report line."""
    selected = uses_ema(state, None)
    if uses_ema(state, use_ema):
        return f"ema (the weights the run selected; {raw_weights_note(state)})" if use_ema is None else "ema"
    return "model (raw weights; the run selected its EMA weights)" if selected else "model"


def raw_weights_note(state: dict[str, Any]) -> str:
    """Where the raw weights of a run that selected its EMA weights are."""
    if state.get("selected") == "ema":  # a slim best.pt: one set of weights
        return "the raw weights are in the run's last.pt"
    return "--no-ema for the raw weights"


def build_from_checkpoint(
    state: dict[str, Any], use_ema: bool | None = None, source: str = "checkpoint"
) -> nn.Module:
    """Rebuild the model of a loaded checkpoint in eval mode, with the weights ``uses_ema`` picks."""
    from semodel.models import build_model, prune_attention

    options = model_options(state["config"])
    name = options.pop("name")
    model = build_model(name, num_classes=len(state["classes"]), **options)
    weights = state["model"]
    if uses_ema(state, use_ema):
        if not state.get("ema"):
            raise SemodelError(f"{source}: has no EMA weights (train with train.ema: true)")
        weights = state["ema"]
    elif state.get("selected") == "ema":
        raise SemodelError(
            f"{source}: holds only the EMA weights the run selected; the raw weights are in the run's "
            "last.pt (leave out --no-ema, or pass last.pt)"
        )
    problems = weight_mismatch(model.state_dict(), weights)
    if problems:
        raise SemodelError(f"{source}: weights do not fit {name} as configured: {problems}")
    model.load_state_dict(weights)
    prune_attention(model)  # learned SE widths: drop the closed units (same outputs, fewer parameters)
    return model.eval()


def load_models(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The checkpoint(s) a command runs: ``path`` itself, or every fold's best.pt of a
    cross-validation folder (``semodel cv``), whose probabilities are then averaged."""
    path = Path(path)
    if not path.is_dir() or not (path / "folds.csv").is_file():
        return [(path, load_checkpoint(path))]
    from semodel.config import read_yaml

    folds = int(read_yaml(path / "config.yaml").get("cv", {}).get("folds", 5))
    missing = [k for k in range(1, folds + 1) if not (path / f"fold-{k}" / "best.pt").is_file()]
    if missing:
        raise SemodelError(
            f"{path}: fold(s) {', '.join(map(str, missing))} of {folds} have no best.pt (an unfinished "
            f"cross-validation: continue it with semodel cv --resume {path})"
        )
    states = [
        (path / f"fold-{k}" / "best.pt", load_checkpoint(path / f"fold-{k}" / "best.pt"))
        for k in range(1, folds + 1)
    ]
    first = states[0][1]
    for file, state in states[1:]:
        if state["classes"] != first["classes"] or state["preprocess"] != first["preprocess"]:
            raise SemodelError(
                f"{file}: its classes or preprocessing differ from fold 1's; not one cross-validation"
            )
    return states
