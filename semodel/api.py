"""The Python API, for notebooks and scripts: the CLI's jobs as functions that return data.

    import semodel

    run_dir = semodel.fit("configs/demo.yaml", ["train.epochs=3"])
    report = semodel.evaluate_model(run_dir / "best.pt")
    rows = semodel.predict_files(["photo.jpg"], run_dir / "best.pt")

The names differ from the commands' (``evaluate_model``, not ``evaluate``) because
``semodel.evaluate`` and ``semodel.predict`` are the commands' modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from semodel.config import Config, config_from_dict, load_config
from semodel.models import build_model

__all__ = ["build_model", "evaluate_model", "fit", "load_config", "predict_files"]


def fit(
    config: str | Path | dict[str, Any] | Config,
    overrides: Sequence[str] = (),
    *,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a model as ``semodel train --config CONFIG --set ...`` does; returns the run folder.

    ``config``: a YAML file, a dict of sections (validated like a file), or a ``Config``.
    ``quiet`` hides progress bars; ``log`` receives the lines the CLI prints (default: stdout).
    """
    from semodel.config import apply_overrides
    from semodel.report import report_after_training
    from semodel.train import fit as train_fit

    if isinstance(config, (str, Path)):
        run_dir = train_fit(load_config(config, list(overrides)), Path(config), quiet=quiet, log=log)
    else:
        raw = config.to_dict() if isinstance(config, Config) else dict(config)
        cfg = config_from_dict(apply_overrides(raw, list(overrides)), "the config given to semodel.fit")
        run_dir = train_fit(cfg, quiet=quiet, log=log)
    report_after_training(run_dir, log=log or (lambda _: None))
    return run_dir


def evaluate_model(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "auto",
    device: str = "auto",
    ema: bool | None = None,
    tta: bool = False,
    batch_size: int = 64,
) -> dict[str, Any]:
    """``semodel eval``'s report as a dict (``report["metrics"]["acc"]``, per class, confusion matrix)."""
    from semodel.evaluate import EvalOptions, evaluate_checkpoint

    options = EvalOptions(split=split, device=device, batch_size=batch_size, use_ema=ema, tta=tta, workers=0)
    data_path = Path(data) if data is not None else None
    return evaluate_checkpoint(Path(checkpoint), data_path, options, log=lambda _: None).report


def predict_files(
    images: str | Path | Sequence[str | Path],
    checkpoint: str | Path,
    *,
    topk: int | None = None,
    device: str = "auto",
    ema: bool | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Top-k classes per image, as ``semodel predict`` finds them (files, folders, glob patterns).

    One dict per image: ``{"path", "predictions": [{"class", "prob"}, ...]}``, or ``{"path", "error"}``
    for a file that could not be read.
    """
    from semodel.errors import SemodelError
    from semodel.predict import Classifier, collect_inputs, predict_images

    items = [images] if isinstance(images, (str, Path)) else list(images)
    paths, problems = collect_inputs([str(i) for i in items])
    if problems:
        item, reason = problems[0]
        raise SemodelError(f"{item}: {reason}")
    classifier = Classifier.load(Path(checkpoint), device, ema)
    k = min(3, len(classifier.classes)) if topk is None else topk
    rows = []
    for p in predict_images(classifier, paths, k, batch_size):
        if p.error is not None:
            rows.append({"path": str(p.path), "error": p.error})
        else:
            rows.append({"path": str(p.path), "predictions": [{"class": c, "prob": v} for c, v in p.top]})
    return rows
