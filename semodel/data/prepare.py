"""What a run trains on: the data folder scanned, checked and split (or a resumed run's split read)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from semodel.data.scan import Dataset, Sample, report_bad_files, scan_dataset
from semodel.data.split import assign_splits, check_splits, read_split_csv
from semodel.errors import SemodelError


def check_classes(data: Dataset, classes: list[str] | None) -> None:
    """On resume: the data must have the classes the run was trained on."""
    if classes is not None and list(classes) != data.classes:
        raise SemodelError(
            f"{data.root}: the run was trained on the classes {', '.join(classes)}, but this folder has "
            f"{', '.join(data.classes)}; resume with the run's data (data.root)"
        )


def make_synthetic_if_missing(cfg: Any, log: Callable[[str], None] = print) -> None:
    """Generate ``cfg.data.synthetic`` into ``data.root`` when that folder does not exist yet."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.synthetic is not None and not root.exists():
        from semodel.synthetic import make_synthetic

        s = cfg.data.synthetic
        log(f"generating a synthetic dataset in {root} ({s.classes} classes x {s.per_class} images)")
        make_synthetic(root, s.classes, s.per_class, s.image_size, s.seed)


def prepare_dataset(
    cfg: Any,
    split_file: Path | None = None,
    classes: list[str] | None = None,
    split: list[Sample] | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Scan, check and split ``cfg.data.root``; nothing is written but a missing synthetic dataset.

    ``split_file``: the ``split.csv`` of the run being resumed; where it exists its split is
    reused (``Dataset.split_file`` then names it), else the data is split anew.
    ``classes``: the classes of the run being resumed, which the data must have.
    ``split``: the files to use and their splits, chosen by the caller (``semodel cv``: one fold),
    instead of splitting ``data.root``; paths relative to it, labels in its class order.
    """
    root = Path(cfg.data.root).expanduser()
    make_synthetic_if_missing(cfg, log)
    if split_file is not None and split_file.exists():
        data = scan_dataset(root, check=False)
        check_classes(data, classes)
        data.samples = read_split_csv(split_file, data.classes)
        data.split_file = split_file
        gone = [s for s in data.samples if not (root / s.path).is_file()]
        if gone:
            log(f"warning: {len(gone)} file(s) of split.csv are gone from {root}; they are skipped")
            data.samples = [s for s in data.samples if s not in gone]
        return data
    data = scan_dataset(root)
    check_classes(data, classes)
    report_bad_files(data, log)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(data.classes):
        raise SemodelError(
            f"model.num_classes is {cfg.model.num_classes} but {root} has {len(data.classes)} classes "
            f"({', '.join(data.classes)}); remove model.num_classes or fix the data"
        )
    if split is not None:
        bad = {path for path, _ in data.bad_files}
        data.samples = [s for s in split if s.path not in bad]
    elif not any(s.split for s in data.samples):
        sp = cfg.data.split
        assign_splits(data.samples, len(data.classes), sp.val, sp.test, sp.seed, sp.group_by)
    names = ["train", "val"] + (["test"] if any(s.split == "test" for s in data.samples) else [])
    check_splits(data, names)
    return data
