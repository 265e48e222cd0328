"""Scanning a data folder: which files are images, the classes, and the layouts (class folders, or
train/ val/ test/ folders holding them)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from semodel.data.images import IMAGE_EXTENSIONS, find_bad_files
from semodel.errors import SemodelError

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    path: str  # relative to the data root, POSIX separators
    label: int
    split: str = ""
    group: str = ""


@dataclass
class Dataset:
    """What a run trains on: the root, the classes, and every usable file with its split."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    split_file: Path | None = None  # the split.csv its split was read from (a resumed run)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self, name: str) -> list[int]:
        c = Counter(s.label for s in self.split(name))
        return [c.get(i, 0) for i in range(len(self.classes))]


def is_image_name(name: str) -> bool:
    """An image file name by the one rule every command uses: an image extension (any case), not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class Listing:
    """What ``list_images`` found: the image files, and the other (non-hidden) files it left out."""

    images: list[Path]
    others: list[Path]


def list_images(folder: Path, top: Path | None = None) -> Listing:
    """Image files under ``folder``, recursively, in sorted order: the scan every command uses
    (train, eval, predict, cv, inspect), so that they all see the same files.

    - Names that start with ``.`` are skipped, files and folders alike: notebook checkpoint copies
      (``.ipynb_checkpoints/``), ``.DS_Store``, macOS ``._photo.jpg`` resource files, ``.git/``.
    - Only files with an image extension (``IMAGE_EXTENSIONS``, any case) are images.
    - Links are followed, files and folders, except a folder seen before (a link loop, or the same
      folder twice) and a folder that holds ``top`` (default ``folder``): ``data/cat/up -> data``
      would list the other classes' images as cats.
    """
    images, others, seen = [], [], set()
    top_real = os.path.realpath(top if top is not None else folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or top_real.startswith(real.rstrip(os.sep) + os.sep):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue
            (images if is_image_name(name) else others).append(path)
    return Listing(images, others)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_classes(folder: Path, where: str) -> tuple[list[str], dict[str, Listing]]:
    """Class names (sorted folder names, hidden ones skipped) and their files; every class must
    have images."""
    classes = _class_folders(folder)
    if not classes:
        raise SemodelError(f"{where}: no class folders found (expected {folder}/<class>/<image files>)")
    files = {c: list_images(folder / c) for c in classes}
    empty = [c for c in classes if not files[c].images]
    if empty:
        raise SemodelError(
            f"{where}: class folder(s) without image files: {', '.join(empty)} "
            f"(image files: {', '.join(IMAGE_EXTENSIONS)}; hidden files and folders are skipped)"
        )
    return classes, files


def has_presplit(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def scan_dataset(root: str | Path, check: bool = True) -> Dataset:
    """Scan ``root``: either ``train/ val/ [test/]`` subfolders or plain class folders (unsplit)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise SemodelError(f"data folder not found: {root}")
    if not root.is_dir():
        raise SemodelError(f"data root is not a folder: {root}")
    samples: list[Sample] = []
    others: list[str] = []  # non-image files in the class folders: listed as skipped

    def add(files: dict[str, Listing], split: str = "") -> None:
        for label, c in enumerate(classes):
            samples.extend(Sample(p.relative_to(root).as_posix(), label, split) for p in files[c].images)
            others.extend(p.relative_to(root).as_posix() for p in files[c].others)

    if has_presplit(root):
        classes, _ = scan_classes(root / "train", f"{root}/train")
        for split in SPLITS:
            if not (root / split).is_dir():
                continue
            split_classes, files = scan_classes(root / split, f"{root}/{split}")
            extra = sorted(set(split_classes) - set(classes))
            missing = sorted(set(classes) - set(split_classes))
            if extra or missing:
                raise SemodelError(
                    f"{root}/{split}: classes differ from train/ "
                    f"(missing: {', '.join(missing) or '-'}; not in train: {', '.join(extra) or '-'})"
                )
            add(files, split)
    else:
        classes, files = scan_classes(root, str(root))
        add(files)
    if len(classes) < 2:
        raise SemodelError(f"{root}: found one class ({classes[0]}); a classifier needs at least two")
    bad = find_bad_files(root, [s.path for s in samples]) if check else []
    if bad:
        bad_set = {p for p, _ in bad}
        samples = [s for s in samples if s.path not in bad_set]
    if check:
        bad += [(path, f"not an image file ({Path(path).suffix or 'no extension'})") for path in others]
    data = Dataset(root, classes, samples, bad)
    for label, c in enumerate(classes):
        if not any(s.label == label for s in samples):
            raise SemodelError(
                f"{root}: class '{c}' has no readable image (all {len(bad)} bad files listed above)"
            )
    return data


def report_bad_files(data: Dataset, log: Callable[[str], None] = print, limit: int = 10) -> None:
    if not data.bad_files:
        return
    log(f"warning: skipping {len(data.bad_files)} file(s) that are not readable images:")
    for path, reason in data.bad_files[:limit]:
        log(f"  {data.root / path}: {reason}")
    if len(data.bad_files) > limit:
        log(f"  ... and {len(data.bad_files) - limit} more")
