"""Which images a checkpoint is evaluated on: its run's own split, or another ImageFolder.

By default the images are the run's own test split (else val), read from ``split.csv`` beside
the checkpoint, under the data root stored in the checkpoint's config. ``--data DIR`` evaluates
another ImageFolder instead; its class names must be the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semodel.data import Sample, read_split_csv, report_bad_files, scan_dataset
from semodel.errors import SemodelError
from semodel.runlog import say

SPLIT_CHOICES = ("auto", "train", "val", "test", "all")


@dataclass
class EvalSet:
    """The images to evaluate: paths relative to ``root``, labels in the checkpoint's class order."""

    root: Path
    samples: list[Sample]
    split: str  # test, val, train or all
    source: str  # where the list came from, for the report


def pick_split(samples: list[Sample], split: str, where: str) -> tuple[list[Sample], str]:
    """``auto``: test if there is one, else val; ``all``: every sample."""
    if split not in SPLIT_CHOICES:
        raise SemodelError(f"--split {split!r}: use one of {', '.join(SPLIT_CHOICES)}")
    if split == "all":
        return list(samples), "all"
    name = split
    if split == "auto":
        name = "test" if any(s.split == "test" for s in samples) else "val"
    chosen = [s for s in samples if s.split == name]
    if not chosen:
        raise SemodelError(f"{where}: has no {name} images")
    return chosen, name


def locate_data_root(state: dict[str, Any], checkpoint: Path) -> Path | None:
    """The folder the run trained on, in this order:

    1. ``data_root``: the data root as an absolute path, stored by training;
    2. the config's ``data.root`` relative to the folder training ran in (recovered from the
       stored ``run_dir`` and where the checkpoint is now: a run folder copied with its data);
    3. ``data.root`` as written, relative to the current folder (old checkpoints only).

    The current folder comes last: another ``data/`` there must not be taken for the run's.
    """
    stored = Path(str(state["config"]["data"]["root"])).expanduser()
    candidates = [Path(state["data_root"])] if state.get("data_root") else []
    run_dir = state.get("run_dir")
    if stored.is_absolute():
        candidates.append(stored)
    elif run_dir and not Path(run_dir).is_absolute():
        here = checkpoint.resolve().parent.parts
        run_parts = Path(run_dir).parts
        if len(here) > len(run_parts) and here[-len(run_parts) :] == run_parts:
            candidates.append(Path(*here[: -len(run_parts)]) / stored)
    if not state.get("data_root"):
        candidates.append(stored)
    return next((c for c in candidates if c.is_dir()), None)


def run_eval_set(state: dict[str, Any], checkpoint: Path, split: str) -> EvalSet:
    """The run's own split, from ``split.csv`` beside the checkpoint and the stored data root."""
    classes = list(state["classes"])
    hint = f"pass --data DIR (an ImageFolder with the classes {', '.join(classes)})"
    split_file = checkpoint.parent / "split.csv"
    if not split_file.is_file():
        raise SemodelError(
            f"{split_file} not found (eval reads the run's split beside the checkpoint); {hint}"
        )
    root = locate_data_root(state, checkpoint)
    if root is None:
        where = state.get("data_root") or state["config"]["data"]["root"]
        raise SemodelError(f"the run's data folder {where} (from the checkpoint) is not found; {hint}")
    samples, name = pick_split(read_split_csv(split_file, classes), split, str(split_file))
    gone = [s for s in samples if not (root / s.path).is_file()]
    if len(gone) == len(samples):
        raise SemodelError(f"none of the {len(samples)} {name} files of {split_file} is in {root}; {hint}")
    if gone:
        say(
            f"warning: {len(gone)} of {len(samples)} {name} file(s) of {split_file} are gone from {root} "
            f"(first: {gone[0].path}); they are skipped"
        )
        samples = [s for s in samples if (root / s.path).is_file()]
    return EvalSet(root, samples, name, f"{name} split of {split_file}")


def folder_eval_set(folder: Path, classes: list[str], split: str) -> EvalSet:
    """An ImageFolder (plain, or with train/val/test folders) whose class names are the checkpoint's."""
    data = scan_dataset(folder)
    if sorted(data.classes) != sorted(classes):
        missing = sorted(set(classes) - set(data.classes))
        extra = sorted(set(data.classes) - set(classes))
        raise SemodelError(
            f"{folder}: class folders do not match the checkpoint's classes: checkpoint has "
            f"[{', '.join(classes)}], folder has [{', '.join(data.classes)}] "
            f"(missing: {', '.join(missing) or '-'}; not in checkpoint: {', '.join(extra) or '-'})"
        )
    report_bad_files(data, say)
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(s.path, index[data.classes[s.label]], s.split) for s in data.samples]
    if any(s.split for s in samples):
        samples, name = pick_split(samples, split, str(folder))
        return EvalSet(data.root, samples, name, f"{name}/ of {folder}")
    if split not in ("auto", "all"):
        raise SemodelError(f"--split {split}: {folder} has no train/val/test folders; leave --split out")
    return EvalSet(data.root, samples, "all", f"all images of {folder}")


# ----------------------------------------------------------------------------- inference
