"""What a run trains on: the data folder scanned, checked and split (or a resumed run's split read)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from semodel.data.duplicates import find_copies, find_leaks, label_conflicts, leak_phrase, together
from semodel.data.index import build_index
from semodel.data.scan import Dataset, Sample, report_bad_files, scan_dataset
from semodel.data.split import assign_splits, check_group_pattern, check_splits, read_split_csv
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
    exclude = [cfg.log.out_dir]  # a run folder inside the data is never data
    if split_file is not None and split_file.exists():
        data = scan_dataset(root, check=False, exclude=exclude)
        check_classes(data, classes)
        data.samples = read_split_csv(split_file, data.classes)
        data.split_file = split_file
        gone = [s for s in data.samples if not (root / s.path).is_file()]
        if gone:
            log(f"warning: {len(gone)} file(s) of split.csv are gone from {root}; they are skipped")
            data.samples = [s for s in data.samples if s not in gone]
        # counted again on the run's split (the index read from its cache), so that its metrics.json
        # keeps them; said once, when the run started
        data.index = build_index(root, [s.path for s in data.samples])
        count_copies(data)
        count_leaks(data)
        return data
    data = scan_dataset(root, exclude=exclude)
    check_classes(data, classes)
    report_bad_files(data, log)
    warn_upsampling(cfg, data, log)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(data.classes):
        raise SemodelError(
            f"model.num_classes is {cfg.model.num_classes} but {root} has {len(data.classes)} classes "
            f"({', '.join(data.classes)}); remove model.num_classes or fix the data"
        )
    if split is not None:
        bad = {path for path, _ in data.bad_files}
        data.samples = [s for s in split if s.path not in bad]
    else:
        split_with_copies(cfg, data, log)
    names = ["train", "val"] + (["test"] if any(s.split == "test" for s in data.samples) else [])
    check_splits(data, names)
    return data


def split_with_copies(cfg: Any, data: Dataset, log: Callable[[str], None]) -> None:
    """The copies among the images, the split (by ``data.split``, or the split folders', with the
    validation split carved from train/ where it has no folder), and the leaks across it."""
    find_data_copies(cfg, data, log)
    if not data.split_folders:
        sp = cfg.data.split
        warn(check_group_pattern(data.samples, sp.group_by), log)
        kept = copies_kept_together(cfg, data, data.samples, log)
        assign_splits(data.samples, len(data.classes), sp.val, sp.test, sp.seed, sp.group_by, together=kept)
    elif "val" not in data.split_folders:
        carve_validation(cfg, data, log)
    report_leaks(cfg, data, log)


def warn(line: str | None, log: Callable[[str], None]) -> None:
    if line:
        log(line)


def carve_validation(cfg: Any, data: Dataset, log: Callable[[str], None]) -> None:
    """A pre-split folder without a validation folder: ``data.split.val`` of its training images
    become the validation split, by the split's rules (stratified, grouped, seeded)."""
    sp, train = cfg.data.split, data.split("train")
    warn(check_group_pattern(train, sp.group_by), log)
    kept = copies_kept_together(cfg, data, train, log)
    assign_splits(train, len(data.classes), sp.val, 0.0, sp.seed, sp.group_by, together=kept)
    grouped = f", grouped by data.split.group_by {sp.group_by!r}" if sp.group_by else ""
    log(
        f"no validation folder in {data.root}: {len(data.split('val'))} of the {len(train)} images of "
        f"{data.split_folders['train']}/ held out for validation (data.split.val {sp.val:g}, stratified by "
        f"class{grouped}, seed {sp.seed})"
    )


def warn_upsampling(cfg: Any, data: Dataset, log: Callable[[str], None]) -> None:
    """Training far above the images' own size upsamples every image: more compute, no detail."""
    shorter = sorted(min(size) for size in data.sizes.values() if min(size) > 0)
    if not shorter:
        return
    median = shorter[len(shorter) // 2]
    size = cfg.data.image_size
    if size > 2 * median:
        log(
            f"warning: data.image_size is {size} px, {size / median:.1f}x the images' median shorter side "
            f"({median} px): every image is upsampled, which adds no detail and costs "
            f"{(size / median) ** 2:.0f}x the compute; set data.image_size near {median}"
        )


def count_copies(data: Dataset) -> None:
    """The copies among the samples (from the index's hashes) and the label conflicts among them."""
    data.copies = find_copies({s.path: data.index.entries[s.path] for s in data.samples})
    data.conflicts = label_conflicts(data.copies, {s.path: s.label for s in data.samples})


def count_leaks(data: Dataset) -> None:
    data.leaks = find_leaks(data.copies, {s.path: s.split for s in data.samples})


def find_data_copies(cfg: Any, data: Dataset, log: Callable[[str], None]) -> None:
    """Exact and near copies among the images (from the index's hashes); copies of one photo in
    two class folders are a label conflict: a warning naming them, or with ``data.conflicts:
    error`` an error."""
    if data.index is None:
        return
    count_copies(data)
    if not data.conflicts:
        return
    shown = "; ".join(" = ".join(members[:3]) for members in data.conflicts[:3])
    text = (
        f"{len(data.conflicts)} photo(s) are in two class folders (exact or flipped/rotated copies, a "
        f"label conflict): {shown}"
    )
    if cfg.data.conflicts == "error":
        raise SemodelError(f"{data.root}: {text}; fix the labels, or set data.conflicts: warn")
    log(f"warning: {text} (data.conflicts: warn; error stops here)")


def copies_kept_together(
    cfg: Any, data: Dataset, samples: list[Sample], log: Callable[[str], None], unit: str = "split"
) -> list[list[str]]:
    """The clusters of copies among ``samples`` that the split (or ``unit``: a cv fold) keeps
    together (none with ``data.split.duplicates: ignore``), and a line that says how many."""
    if data.copies is None:
        return []
    clusters = together(data.copies, [s.path for s in samples])
    images = sum(len(m) for m in clusters)
    if cfg.data.split.duplicates == "ignore":
        log(
            f"copies: {len(clusters)} clusters of copies ({images} images) may be split apart "
            "(data.split.duplicates: ignore)"
        )
        return []
    if clusters:
        log(
            f"copies: {len(clusters)} clusters of exact or flipped/rotated copies ({images} images) kept "
            f"in one {unit} each (data.split.duplicates: group)"
        )
    return clusters


def report_leaks(cfg: Any, data: Dataset, log: Callable[[str], None]) -> None:
    """Copies across the splits: counted for metrics.json; for split folders a warning (or with
    ``data.leakage: error`` an error) with the counts and a few pairs."""
    if data.copies is None:
        return
    count_leaks(data)
    if not data.leaks.any() or cfg.data.leakage == "ignore":
        return
    counts = ", ".join(
        leak_phrase(pair, n, data.leaks.totals[pair]) for pair, n in data.leaks.counts.items() if n
    )
    pairs = [pair for examples in data.leaks.examples.values() for pair in examples][:3]
    text = (
        f"copies across the splits: {counts} (exact, or flipped/rotated); the figures of those splits are "
        f"optimistic. For example: {'; '.join(f'{a} ~ {b}' for a, b in pairs)}"
    )
    if not data.split_folders:
        log(f"note: {text}")
    elif cfg.data.leakage == "error":
        raise SemodelError(f"{data.root}: {text}; set data.leakage: warn to train anyway")
    else:
        log(f"warning: {text} (data.leakage: warn; error stops here, ignore hides this)")
