"""Helpers for the config and training tests: tiny configs, YAML files, TensorBoard and checkpoint reading.

Imported explicitly by the test modules (``from helpers_train import ...``), like ``helpers_ckpt``.
"""

from __future__ import annotations

import copy
import csv
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (a new dict; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(root: Path, out_dir: Path, name: str = "run", **sections: dict[str, Any]) -> dict[str, Any]:
    """A config that trains in about a second per epoch on 2 CPU cores: se_resnet18 (cifar stem), 16 px.

    ``sections`` (``train={"epochs": 3}``, ...) are merged into the defaults.
    """
    base = {
        "model": {"name": "se_resnet18", "stem": "cifar"},
        "data": {
            "root": str(root),
            "image_size": 16,
            "batch_size": 32,
            "num_workers": 0,
            "split": {"val": 0.25, "test": 0.0, "seed": 0},
            "augment": {"scale": [0.5, 1.0], "hflip": 0.5},
        },
        "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0005},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "train": {"epochs": 1, "device": "cpu", "seed": 0, "monitor": "val_acc"},
        "log": {"out_dir": str(out_dir), "name": name, "report": False},
    }
    return merge(base, sections)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_split(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_counts(rows: list[dict[str, str]], split: str, classes: list[str]) -> list[int]:
    c = Counter(r["class"] for r in rows if r["split"] == split)
    return [c.get(name, 0) for name in classes]


def events(run_dir: Path):
    """The run's TensorBoard events, read back with TensorBoard's own reader (every event kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_series(acc, tag: str) -> dict[int, float]:
    """step -> value; fails if a step was logged twice."""
    values = acc.Scalars(tag)
    steps = [v.step for v in values]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {v.step: v.value for v in values}


def as_logged(value: float) -> float:
    """A float as a TensorBoard scalar stores it (float32)."""
    return float(torch.tensor(value, dtype=torch.float32))


def load_ckpt(path: Path) -> dict[str, Any]:
    """``torch.load`` exactly as a stranger would: only tensors and plain data allowed."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def all_finite(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while a module's tests run, and torch's global switches restored after.

    Small models on 2 cores: when another process holds a core, torch's second OpenMP thread spins
    at every barrier and a step takes 30x longer; one thread costs little and no result depends on
    it. ``train.deterministic`` switches torch's deterministic mode on for the whole process.
    Autouse: a module that imports it gets it.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" config: each level a list of 9 references to the one below."""
    lines = ["anchors:", "  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join([*lines, "data:", f"  root: *l{levels}", ""])
