"""Scanning a data folder: which files are images, the classes, and the layouts (class folders, or
train/ val/ test/ folders holding them)."""

from __future__ import annotations

import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semodel.data.images import IMAGE_EXTENSIONS
from semodel.data.index import Index, build_index
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
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> its folder (pre-split layouts)
    index: Index | None = None  # the pass over the files (semodel.data.index), where checked
    copies: Any = None  # semodel.data.duplicates.Copies: clusters of copies, where checked
    leaks: Any = None  # semodel.data.duplicates.Leaks: copies across the splits, once split
    conflicts: list[list[str]] = field(default_factory=list)  # clusters of copies in two classes

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """Each readable image's (height, width), where the scan read them (else empty)."""
        if self.index is None:
            return {}
        return {p: (e.height, e.width) for p, e in self.index.entries.items() if not e.error}

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self, name: str) -> list[int]:
        c = Counter(s.label for s in self.split(name))
        return [c.get(i, 0) for i in range(len(self.classes))]


# Folder names of a pre-split layout (any case) and the split each one holds.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Files whose presence makes a folder a semodel run (with its config.yaml): never scanned as data.
RUN_FILES = ("split.csv", "folds.csv", "last.pt", "best.pt", "metrics.json", "cv.json")


def is_image_name(name: str) -> bool:
    """An image file name by the one rule every command uses: an image extension (any case), not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden_folder(name: str) -> bool:
    """Skipped without a word: hidden folders and ``__MACOSX/`` (what macOS leaves in a zip)."""
    return name.startswith(".") or name == "__MACOSX"


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / f).exists() for f in RUN_FILES)


def skip_reason(path: Path, excluded: Sequence[str]) -> str | None:
    """Why a folder met during a scan is not data, or None."""
    if os.path.realpath(path) in excluded:
        return "log.out_dir (where the runs are written) lies in the data folder: not scanned"
    if is_run_folder(path):
        return "a semodel run folder (config.yaml and its results): not scanned"
    return None


def is_data_folder(path: Path, excluded: Sequence[str], skipped: list[tuple[Path, str]]) -> bool:
    """Whether a folder met during a scan holds data: not hidden (skipped without a word), not a run
    folder or ``excluded`` (added to ``skipped`` with the reason)."""
    if is_hidden_folder(path.name):
        return False
    reason = skip_reason(path, excluded)
    if reason is not None:
        skipped.append((path, reason))
    return reason is None


@dataclass
class Listing:
    """What ``list_images`` found: the image files (and each one's real path, links resolved), the
    other (non-hidden) files it left out, and what it skipped with a reason (broken links, run
    folders)."""

    images: list[Path]
    others: list[Path]
    reals: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(folder: Path, top: Path | None = None, excluded: Sequence[str] = ()) -> Listing:
    """Image files under ``folder``, recursively, in sorted order: the scan every command uses
    (train, eval, predict, cv, inspect), so that they all see the same files.

    - Names that start with ``.`` are skipped, files and folders alike: notebook checkpoint copies
      (``.ipynb_checkpoints/``), ``.DS_Store``, macOS ``._photo.jpg`` resource files, ``.git/``; so
      is ``__MACOSX/``.
    - Only files with an image extension (``IMAGE_EXTENSIONS``, any case) are images.
    - Links are followed, files and folders, except a folder seen before (a link loop, or the same
      folder twice) and a folder that holds ``top`` (default ``folder``): ``data/cat/up -> data``
      would list the other classes' images as cats. A broken link is skipped with its reason.
    - A semodel run folder, and the folders in ``excluded`` (real paths), are skipped with a reason.
    """
    out, seen = Listing([], []), set()
    top_real = os.path.realpath(top if top is not None else folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or top_real.startswith(real.rstrip(os.sep) + os.sep):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [
            d for d in sorted(dirnames) if is_data_folder(Path(dirpath) / d, excluded, out.skipped)
        ]
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if not path.is_file():
                if path.is_symlink():
                    out.skipped.append((path, "broken link (its target is missing)"))
                continue
            if is_image_name(name):
                out.images.append(path)
                out.reals.append(os.path.realpath(path) if path.is_symlink() else os.path.join(real, name))
            else:
                out.others.append(path)
    return out


def visible(name: str) -> str:
    """A folder name with what makes it differ shown: quoted (spaces), non-ASCII as escapes."""
    return ascii(name) if not name.isascii() else repr(name)


def name_difference(a: str, b: str) -> str:
    if a.strip() != a or b.strip() != b:
        return "surrounding spaces"
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        return "Unicode normalization (one NFC, one NFD: they print alike)"
    return "case"


def check_class_names(names: Sequence[str], where: str) -> None:
    """Class names that would merge on macOS or Windows, or that print alike, are refused."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name).strip().casefold()
        if key in seen:
            other = seen[key]
            raise SemodelError(
                f"{where}: class folders {visible(other)} and {visible(name)} differ only in "
                f"{name_difference(other, name)}; they merge on macOS and Windows and read as one class: "
                "rename or merge them"
            )
        seen[key] = name


@dataclass
class Layout:
    """How a data folder is laid out: its split folders (split -> folder name; empty for class
    folders at the root), and what the scan leaves out at the top, with the reason."""

    splits: dict[str, str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def holds_images(folder: Path) -> bool:
    try:
        return any(e.is_file() and is_image_name(e.name) for e in os.scandir(folder))
    except OSError:
        return False


def find_layout(root: Path, excluded: Sequence[str] = ()) -> Layout:
    """Class folders at the root, or split folders (``train/``, ``val|valid|validation/``,
    ``test/``, any case) holding them. Folders that are runs (or ``excluded``) and images lying at
    the root are skipped with a reason; a root that mixes split and class folders is an error."""
    layout, folders = Layout({}), []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir():
            if is_data_folder(path, excluded, layout.skipped):
                folders.append(path)
        elif is_image_name(entry.name):
            layout.skipped.append((path, "an image at the data root, outside any class folder"))
    split_folders = [f for f in folders if f.name.lower() in SPLIT_FOLDERS]
    if not split_folders:
        return layout
    for f in split_folders:
        split = SPLIT_FOLDERS[f.name.lower()]
        if split in layout.splits:
            raise SemodelError(
                f"{root}: {layout.splits[split]}/ and {f.name}/ both hold the {split} split; keep one"
            )
        layout.splits[split] = f.name
    names = ", ".join(f"{f.name}/" for f in split_folders)
    classes = ", ".join(f"{f.name}/" for f in folders if f not in split_folders and holds_images(f))
    if classes:
        raise SemodelError(
            f"{root} mixes split folders ({names}) with class folders ({classes}); "
            "put the class folders inside the split folders, or the split folders elsewhere"
        )
    if "train" not in layout.splits:
        raise SemodelError(f"{root}: has {names} but no train/ folder (the images to train on)")
    layout.splits = {split: layout.splits[split] for split in SPLITS if split in layout.splits}
    layout.skipped += [
        (f, "not a split folder (train, val, valid, validation, test): skipped")
        for f in folders
        if f not in split_folders
    ]
    return layout


def has_presplit(root: Path) -> bool:
    """Whether ``root`` holds split folders (train/ and val/ or test/ ...) rather than class folders."""
    root = Path(root).expanduser()
    return root.is_dir() and bool(find_layout(root).splits)


def class_folders(
    folder: Path, skipped: list[tuple[Path, str]], excluded: Sequence[str], loose: bool
) -> list[str]:
    """The class folders directly under ``folder``; what else lies there is added to ``skipped``
    (with ``loose``, images lying beside the class folders too)."""
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir():
            if is_data_folder(path, excluded, skipped):
                names.append(entry.name)
        elif loose and is_image_name(entry.name):
            skipped.append((path, f"an image in {folder.name}/, outside any class folder"))
    return names


def scan_classes(
    folder: Path, where: str, skipped: list[tuple[Path, str]] | None = None, excluded: Sequence[str] = ()
) -> tuple[list[str], dict[str, Listing]]:
    """Class names (sorted folder names, hidden ones skipped) and their files; every class must
    have images, and no two names may merge on a case-insensitive file system. ``skipped``
    collects what else lies in a split folder (None: the data root, whose rest ``find_layout`` lists)."""
    classes = class_folders(folder, skipped if skipped is not None else [], excluded, skipped is not None)
    if not classes:
        raise SemodelError(f"{where}: no class folders found (expected {folder}/<class>/<image files>)")
    check_class_names(classes, where)
    files = {c: list_images(folder / c, excluded=excluded) for c in classes}
    empty = [c for c in classes if not files[c].images]
    if empty:
        raise SemodelError(
            f"{where}: class folder(s) without image files: {', '.join(empty)} "
            f"(image files: {', '.join(IMAGE_EXTENSIONS)}; hidden files and folders are skipped)"
        )
    return classes, files


@dataclass
class ClassFolder:
    split: str
    label: int
    path: Path
    listing: Listing


def check_distinct_folders(folders: Sequence[ClassFolder], root: Path) -> None:
    """A class folder that is a link to another class folder (or two that link to one folder)
    would give two labels to the same images."""
    seen: dict[str, Path] = {}
    for f in folders:
        real = os.path.realpath(f.path)
        if real in seen:
            a, b = seen[real].relative_to(root), f.path.relative_to(root)
            raise SemodelError(
                f"{root}: class folders {a}/ and {b}/ are the same folder ({real}), linked: every image "
                "would get two labels; remove the link"
            )
        seen[real] = f.path


def owner_of(real: str, owners: Sequence[tuple[str, ClassFolder]]) -> ClassFolder | None:
    """The class folder whose real path holds the real file ``real`` (the deepest one)."""
    best = None
    for prefix, folder in owners:
        if real.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, folder)
    return best[1] if best else None


def collect_samples(folders: Sequence[ClassFolder], root: Path) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Every real file once, under the class whose folder holds it (a link into another class
    folder, or a second link to one file, is skipped with the reason)."""
    owners = [(os.path.realpath(f.path).rstrip(os.sep) + os.sep, f) for f in folders]
    # A folder that holds no other class folder owns every file under its own real path: the
    # search over all folders is needed only for files reached through a link.
    alone = {id(f) for p, f in owners if not any(q != p and q.startswith(p) for q, _ in owners)}
    own_prefix = {id(f): p for p, f in owners}
    samples, skipped, kept = [], [], {}
    for f in folders:
        for path, real in zip(f.listing.images, f.listing.reals, strict=True):
            rel = path.relative_to(root).as_posix()
            mine = id(f) in alone and real.startswith(own_prefix[id(f)])
            owner = f if mine else owner_of(real, owners)
            if owner is not None and owner is not f:
                skipped.append((rel, f"a link into {owner.path.relative_to(root).as_posix()}/: listed there"))
            elif real in kept:
                skipped.append((rel, f"the same file as {kept[real]}: listed once"))
            else:
                kept[real] = rel
                samples.append(Sample(rel, f.label, f.split))
    return samples, skipped


def scan_folders(root: Path, layout: Layout, excluded: Sequence[str]) -> tuple[list[str], list[ClassFolder]]:
    """The classes and every (split, class) folder of the layout."""
    if not layout.splits:
        classes, files = scan_classes(root, str(root), None, excluded)
        return classes, [ClassFolder("", i, root / c, files[c]) for i, c in enumerate(classes)]
    classes: list[str] = []
    folders = []
    for split in layout.splits:  # in SPLITS order: train first, whose classes the others must have
        folder = root / layout.splits[split]
        split_classes, files = scan_classes(folder, str(folder), layout.skipped, excluded)
        classes = classes or split_classes
        extra = sorted(set(split_classes) - set(classes))
        missing = sorted(set(classes) - set(split_classes))
        if extra or missing:
            raise SemodelError(
                f"{folder}: classes differ from {layout.splits['train']}/ "
                f"(missing: {', '.join(missing) or '-'}; not in train: {', '.join(extra) or '-'})"
            )
        folders += [ClassFolder(split, classes.index(c), folder / c, files[c]) for c in split_classes]
    return classes, folders


def scan_dataset(root: str | Path, check: bool = True, exclude: Sequence[str | Path] = ()) -> Dataset:
    """Scan ``root``: class folders, or split folders (``train/ [val/] [test/]``) holding them.

    ``check``: decode every image (unreadable ones are left out) and list what was skipped, with
    the reason. ``exclude``: folders never scanned (a run's ``log.out_dir``).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise SemodelError(f"data folder not found: {root}")
    if not root.is_dir():
        raise SemodelError(f"data root is not a folder: {root}")
    excluded = [os.path.realpath(Path(p).expanduser()) for p in exclude]
    layout = find_layout(root, excluded)
    classes, folders = scan_folders(root, layout, excluded)
    if len(classes) < 2:
        raise SemodelError(f"{root}: found one class ({classes[0]}); a classifier needs at least two")
    check_distinct_folders(folders, root)
    samples, skipped = collect_samples(folders, root)
    bad, index = [], None
    if check:  # one read of every image: decodes?, size, hashes; kept beside the data for the next start
        index = build_index(root, [s.path for s in samples], progress=sys.stderr.isatty())
        bad = [(p, e.error) for p, e in index.entries.items() if e.error]
    if bad:
        bad_set = {p for p, _ in bad}
        samples = [s for s in samples if s.path not in bad_set]
    if check:
        rel = [(p.relative_to(root).as_posix(), why) for p, why in layout.skipped]
        rel += [(p.relative_to(root).as_posix(), why) for f in folders for p, why in f.listing.skipped]
        others = [p.relative_to(root).as_posix() for f in folders for p in f.listing.others]
        bad += [(path, f"not an image file ({Path(path).suffix or 'no extension'})") for path in others]
        bad += skipped + rel
    data = Dataset(root, classes, samples, bad, split_folders=dict(layout.splits), index=index)
    for label, c in enumerate(classes):
        if not any(s.label == label for s in samples):
            raise SemodelError(
                f"{root}: class '{c}' has no readable image (the skipped files are listed above)"
            )
    return data


def report_bad_files(data: Dataset, log: Callable[[str], None] = print, limit: int = 10) -> None:
    if not data.bad_files:
        return
    log(f"warning: skipping {len(data.bad_files)} file(s) or folder(s) of {data.root}:")
    for path, reason in data.bad_files[:limit]:
        log(f"  {data.root / path}: {reason}")
    if len(data.bad_files) > limit:
        log(f"  ... and {len(data.bad_files) - limit} more")
