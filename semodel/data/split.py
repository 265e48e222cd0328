"""Splitting: patient groups, the stratified grouped split, and the split / fold CSV files."""

from __future__ import annotations

import csv
import io
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from semodel.data.scan import Dataset, Sample
from semodel.errors import SemodelError, first_line
from semodel.files import write_text_atomic


def group_of(path: str, pattern: re.Pattern[str] | None) -> str:
    """The group (e.g. patient) a file belongs to: the regex's first group over the file name."""
    name = Path(path).name
    if pattern is None:
        return path
    m = pattern.search(name)
    if not m:
        return path  # unmatched files form their own group
    return m.group(1) if m.groups() else m.group(0)


def check_group_pattern(samples: Iterable[Sample], group_by: str | None) -> str | None:
    """``data.split.group_by`` that matches no file name is an error (there would be no grouping at
    all); a warning line when it matches only some (each of the others is a group of its own)."""
    if not group_by:
        return None
    pattern = re.compile(group_by)
    names = [Path(s.path).name for s in samples]
    unmatched = [n for n in names if not pattern.search(n)]
    if names and len(unmatched) == len(names):
        raise SemodelError(
            f"data.split.group_by {group_by!r} matches none of the {len(names)} file names "
            f"(e.g. {unmatched[0]!r}), so no two files would be kept together: fix the pattern "
            "(its first group names the patient or object) or remove it"
        )
    if unmatched:
        return (
            f"warning: data.split.group_by {group_by!r} matches {len(names) - len(unmatched)} of "
            f"{len(names)} file names; the other {len(unmatched)} (e.g. {unmatched[0]!r}) are each a "
            "group of their own"
        )
    return None


def majority_label(members: Iterable[Sample]) -> int:
    """The class a group belongs to: the one most of its files have."""
    return Counter(m.label for m in members).most_common(1)[0][0]


def assign_splits(
    samples: list[Sample],
    num_classes: int,
    val: float,
    test: float,
    seed: int,
    group_by: str | None,
    *,
    together: Sequence[Sequence[str]] = (),
) -> list[Sample]:
    """Stratified by class, grouped: all files of one group land in the same split.

    Per class, groups are shuffled with ``seed`` and dealt to test, then val, then train until
    each split holds its share of that class's files. A group belongs to the class most of its
    files have. ``together``: sets of paths (copies of one photo) whose groups are dealt as one.
    """
    pattern = re.compile(group_by) if group_by else None
    for s in samples:
        s.group = group_of(s.path, pattern)
    unit = merged_groups(samples, together)
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[unit.get(s.group, s.group)].append(s)
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


def merged_groups(samples: Sequence[Sample], together: Sequence[Sequence[str]]) -> dict[str, str]:
    """Group -> the group it is dealt with, where ``together`` links files of different groups
    (the smallest name of each linked set stands for it)."""
    if not together:
        return {}
    group_of_path = {s.path: s.group for s in samples}
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    for members in together:
        roots = sorted({find(group_of_path[p]) for p in members if p in group_of_path})
        for r in roots[1:]:
            parent[r] = roots[0]
    return {g: find(g) for g in {s.group for s in samples}}


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
