"""Data: scan an ImageFolder, find bad files, split (stratified, grouped), transforms, loaders."""

from __future__ import annotations

import csv
import io
import os
import random
import re
import sys
import threading
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from semodel.errors import SemodelError, first_line
from semodel.files import write_text_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
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


# ----------------------------------------------------------------------------- images


_OPEN_LOCK = threading.Lock()


def open_image(path: str | Path) -> Image.Image:
    """``Image.open``, with more pixels than ``Image.MAX_IMAGE_PIXELS`` an error.

    PIL raises ``DecompressionBombError`` only above twice its limit; between the two it warns
    (two lines on stderr) and then decodes the whole image (up to 180 M pixels: 0.5 GB as RGB).
    The warning filter is process-wide, hence the lock (images are opened in threads).
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None


def load_rgb(path: str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, RGBA, palette, CMYK and 16-bit files included.

    ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), the largest
    reduction that keeps both sides at least this large: a 12-megapixel photo wanted at a few
    hundred pixels decodes several times faster. Other formats ignore it.
    """
    with open_image(path) as img:
        if draft is not None:
            img.draft(None, draft)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255.
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray((arr / top * 255).clip(0, 255).astype("uint8"), mode="L")
        elif img.mode == "F":
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((arr.clip(0, 1) * 255).astype("uint8"), mode="L")
        if img.mode in ("P", "LA", "PA") or (img.mode == "RGBA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """``load_rgb`` with the reason a file cannot be used as one short SemodelError."""
    try:
        return load_rgb(path)
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "is a folder"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not an image (unknown file format)"
    except Image.DecompressionBombError:
        reason = "too many pixels (decompression bomb guard)"
    except (OSError, SyntaxError, ValueError) as e:
        reason = f"corrupt image ({first_line(e, 100)})"
    raise SemodelError(reason)


def check_image(path: Path) -> str | None:
    """None if the file decodes as an image, else the reason it does not."""
    try:
        with open_image(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            img.load()
        return None
    except Image.DecompressionBombError:
        return "too many pixels (decompression bomb guard)"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot decode ({first_line(e, 80)})"


def find_bad_files(root: Path, paths: Sequence[str], workers: int = 4) -> list[tuple[str, str]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_image(root / p), paths))
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


# ----------------------------------------------------------------------------- scanning


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


# ----------------------------------------------------------------------------- splitting


def group_of(path: str, pattern: re.Pattern[str] | None) -> str:
    """The group (e.g. patient) a file belongs to: the regex's first group over the file name."""
    name = Path(path).name
    if pattern is None:
        return path
    m = pattern.search(name)
    if not m:
        return path  # unmatched files form their own group
    return m.group(1) if m.groups() else m.group(0)


def majority_label(members: Iterable[Sample]) -> int:
    """The class a group belongs to: the one most of its files have."""
    return Counter(m.label for m in members).most_common(1)[0][0]


def assign_splits(
    samples: list[Sample], num_classes: int, val: float, test: float, seed: int, group_by: str | None
) -> list[Sample]:
    """Stratified by class, grouped: all files of one group land in the same split.

    Per class, groups are shuffled with ``seed`` and dealt to test, then val, then train until
    each split holds its share of that class's files. A group belongs to the class most of its
    files have.
    """
    pattern = re.compile(group_by) if group_by else None
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        s.group = group_of(s.path, pattern)
        groups[s.group].append(s)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        by_class[majority_label(members)].append(g)
    rng = random.Random(seed)
    for label in range(num_classes):
        names = by_class[label]
        rng.shuffle(names)
        total = sum(len(groups[g]) for g in names)
        targets = [("test", round(total * test)), ("val", round(total * val))]
        filled = {"test": 0, "val": 0}
        for g in names:
            size = len(groups[g])
            split = "train"
            for name, target in targets:
                deficit = target - filled[name]
                # Take the group if it brings the split closer to its target (or the split is
                # still empty: a split with a target gets at least one group).
                if deficit > 0 and (size <= 2 * deficit or filled[name] == 0):
                    split = name
                    break
            if split != "train":
                filled[split] += size
            for s in groups[g]:
                s.split = split
    return samples


def check_splits(data: Dataset, names: Iterable[str]) -> None:
    for name in names:
        counts = data.counts(name)
        missing = [c for c, n in zip(data.classes, counts, strict=True) if n == 0]
        if missing:
            raise SemodelError(
                f"{data.root}: the {name} split has no image of class(es) {', '.join(missing)}; "
                f"add images, raise data.split.{name if name != 'train' else 'val'}, "
                "or change data.split.seed"
            )


def write_sample_csv(path: Path, key: str, rows: Iterable[tuple[Any, Sample]], classes: list[str]) -> None:
    """A file list as CSV with columns ``key`` (split or fold), class, group, path (atomically)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow([key, "class", "group", "path"])
    for value, s in rows:
        w.writerow([value, classes[s.label], s.group, s.path])
    write_text_atomic(path, text.getvalue())


def read_sample_csv(path: Path, key: str, classes: list[str]) -> list[tuple[str, Sample]]:
    """``(key value, sample)`` per row of a file written by ``write_sample_csv``; labels in the order
    of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                if row["class"] not in index:
                    raise SemodelError(
                        f"{path}: class '{row['class']}' is not one of the classes {', '.join(classes)}"
                    )
                rows.append((row[key], Sample(row["path"], index[row["class"]], "", row.get("group") or "")))
    except (KeyError, csv.Error) as e:
        raise SemodelError(f"{path}: not a semodel {key} file (no column {first_line(e)})") from None
    except OSError as e:
        raise SemodelError(f"{path}: cannot read ({e.strerror or e})") from None
    return rows


def write_split_csv(data: Dataset, path: Path) -> None:
    write_sample_csv(path, "split", ((s.split, s) for s in data.samples), data.classes)


def read_split_csv(path: Path, classes: list[str]) -> list[Sample]:
    samples = []
    for split, s in read_sample_csv(path, "split", classes):
        s.split = split
        samples.append(s)
    return samples


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


# ----------------------------------------------------------------------------- transforms


def eval_transform(preprocess: dict[str, Any]):
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(preprocess["resize"], antialias=True),
            v2.CenterCrop(preprocess["image_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def train_transform(cfg: Any):
    import torch
    from torchvision.transforms import v2

    a = cfg.data.augment
    steps: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.data.image_size, scale=tuple(a.scale), antialias=True),
    ]
    if a.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(a.hflip))
    if a.vflip > 0:
        steps.append(v2.RandomVerticalFlip(a.vflip))
    if a.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif a.auto_augment == "rand":
        steps.append(v2.RandAugment())
    if a.color_jitter > 0:
        j = a.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.data.mean), list(cfg.data.std))]
    if a.random_erasing > 0:
        steps.append(v2.RandomErasing(a.random_erasing))
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- loading


# What reading a file that is gone or damaged since the scan raises: the loaders skip such an image.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def warn_skipped(path: Path, error: BaseException) -> None:
    print(f"warning: skipping {path}: {first_line(error, 100)}", file=sys.stderr)


class ImageList:
    """A map-style dataset over (path, label) pairs; unreadable files yield None (skipped by collate)."""

    def __init__(self, root: Path, samples: Sequence[Sample], transform: Callable):
        self.root = Path(root)
        self.items = [(s.path, s.label) for s in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            image = load_rgb(self.root / path)
        except UNREADABLE as e:
            warn_skipped(self.root / path, e)
            return None
        return self.transform(image), label


def collate_skip_bad(batch):
    import torch
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(batch)


def default_workers(device_type: str) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cpu":
        # On a CPU the model needs the cores; a worker only pays off on larger machines.
        return 0 if cpus <= 4 else min(4, cpus // 4)
    return max(0, min(8, cpus - 1))
