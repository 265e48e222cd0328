"""Helpers for the eval / predict / export tests: tiny ImageFolders, checkpoints, CLI runs.

Imported explicitly by the test modules (``from helpers_ckpt import ...``): pytest puts ``tests/``
on ``sys.path`` for test modules outside a package.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import semodel.cli
from semodel.checkpoint import save_checkpoint
from semodel.config import validate
from semodel.data import eval_transform, load_rgb
from semodel.models import build_model
from semodel.preprocess import preprocess_of

CLASSES = ["cat", "dog", "fox"]
# A colour per class, so that images of one class resemble each other.
TINTS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200), "bee": (200, 200, 60)}


def make_image(path: Path, tint: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 36)) -> Path:
    """A noisy, tinted JPEG with a bright square at a seed-dependent place (not square, so resize matters)."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.normal(tint, 40, size=(h, w, 3))
    x, y = rng.integers(0, w - 12), rng.integers(0, h - 12)
    pixels[y : y + 12, x : x + 12] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def make_folder(root: Path, classes: list[str] = CLASSES, per_class: int = 4, seed: int = 0) -> Path:
    """``root/<class>/<class>_<i>.jpg``."""
    for ci, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i}.jpg", TINTS[name], seed * 1000 + ci * 100 + i)
    return root


def write_split(run_dir: Path, root: Path, splits: dict[str, str]) -> Path:
    """``split.csv`` for the images under ``root``: ``splits`` maps a file name to its split
    (default train)."""
    rows = []
    for path in sorted(root.rglob("*.jpg")):
        rel = path.relative_to(root).as_posix()
        rows.append([splits.get(path.name, "train"), path.parent.name, rel, rel])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "class", "group", "path"])
        w.writerows(rows)
    return run_dir / "split.csv"


def fit_head(model: torch.nn.Module, images: dict[Path, int], preprocess: dict[str, Any]) -> None:
    """Set the classifier so that each image in ``images`` gets its given class (by a logit
    margin of at least 2).

    A least-squares fit of the linear head on the pooled features: with more features (512) than
    images the fit is exact, so the tests know every prediction in advance, wrong ones included.
    """
    transform = eval_transform(preprocess)
    x = torch.stack([transform(load_rgb(p)) for p in images])
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x).mean(dim=(2, 3)).double()
    feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    # Other classes get spread-out logits in [0, 2) (no ties, so ROC-AUC is well defined).
    g = torch.Generator().manual_seed(len(images))
    targets = torch.rand(len(images), model.fc.out_features, generator=g, dtype=torch.float64) * 2
    targets[torch.arange(len(images)), torch.tensor(list(images.values()))] += 4.0
    solution = torch.linalg.pinv(feats) @ targets  # (features + 1) x classes, minimum norm
    with torch.no_grad():
        model.fc.weight.copy_(solution[:-1].T.float())
        model.fc.bias.copy_(solution[-1].float())


def make_model(classes: list[str], seed: int, fit: dict[Path, int] | None, preprocess: dict[str, Any]):
    torch.manual_seed(seed)
    model = build_model("se_resnet18", len(classes), stem="cifar")
    randomize_batchnorm(model, seed)
    if fit:
        fit_head(model, fit, preprocess)
    return model.eval()


def make_checkpoint(
    path: Path,
    data_root: Path | str,
    classes: list[str] = CLASSES,
    seed: int = 0,
    fit: dict[Path, int] | None = None,
    ema_fit: dict[Path, int] | None = None,
    image_size: int = 16,
    run_dir: str | None = None,
) -> dict[str, Any]:
    """A semodel checkpoint of an se_resnet18 (cifar stem) for ``classes``.

    ``fit`` (image path -> class index) sets the head so those images get those classes;
    ``ema_fit`` adds EMA weights fitted the same way (to other labels, so the two differ).
    """
    cfg = validate(
        {
            "data": {"root": str(data_root), "image_size": image_size},
            "model": {"name": "se_resnet18", "stem": "cifar"},
        },
        "test",
    )
    preprocess = preprocess_of(cfg)
    model = make_model(classes, seed, fit, preprocess)
    ema = make_model(classes, seed + 1, ema_fit, preprocess).state_dict() if ema_fit is not None else None
    state = {
        "config": cfg.to_dict(),
        "classes": list(classes),
        "preprocess": preprocess,
        "model": model.state_dict(),
        "ema": ema,
        "epoch": 1,
        "best": {"metric": "val_acc", "value": 0.5, "epoch": 1},
        "metrics": {},
        "run_dir": run_dir if run_dir is not None else str(Path(path).parent),
    }
    save_checkpoint(state, path)
    return state


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Give BN layers non-trivial statistics, so that a fresh model's outputs vary with the image
    (with the init statistics every image lands on almost the same logits)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``semodel ARGS`` in-process through ``main()`` (which turns SemodelError into exit 2)."""
    argv = sys.argv
    sys.argv = ["semodel", *map(str, args)]
    code = 0
    try:
        semodel.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(
    args: list[str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``python -m semodel ARGS`` for real (exit code and stderr as a user sees them)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "semodel", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class Unrelated:
    """An object of a custom class: pickling it makes a file that ``weights_only`` refuses."""

    def __init__(self) -> None:
        self.value = 1


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    """Files that must each be refused with one line: missing, text, unrelated program, truncated, code."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    unrelated = folder / "unrelated.pt"
    torch.save({"foo": 1}, unrelated)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code = folder / "code.pt"
    torch.save({"semodel": {"format_version": 1}, "obj": Unrelated()}, code)
    return {
        "missing": folder / "missing.pt",
        "text": text,
        "unrelated": unrelated,
        "truncated": truncated,
        "code": code,
    }


# The one line each bad checkpoint must produce (a fragment of it).
BAD_CHECKPOINT_MESSAGES = {
    "missing": "checkpoint not found",
    "text": "not a readable checkpoint",
    "unrelated": "not a semodel checkpoint",
    "truncated": "not a readable checkpoint",
    "code": "refused to load",
}


def assert_one_line_error(code: int, err: str, fragment: str, path: Path | str | None = None) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    assert fragment in error_lines[0], err
    if path is not None:
        assert str(path) in error_lines[0], err
