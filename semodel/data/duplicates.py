"""Copies among a data folder's images: exact (the same bytes) and near (perceptual hashes within
``NEAR_BITS`` bits, under any flip or rotation), grouped into clusters, and what they mean for a
split: leaks across pre-split folders, and one cluster in two classes (a label conflict).

Near copies are found without comparing all pairs: a hash is cut into ``NEAR_BITS + 1`` bands, and
two hashes within ``NEAR_BITS`` bits agree on at least one band exactly (pigeonhole); only the
pairs that share a band are compared, in numpy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from semodel.data.index import Entry

# Chosen on MSLD (scripts/bench_duplicates.py, docs/training.md "Copies and leaks"): the distance at
# which a photo's augmented copies are found while photos of other patients are not.
NEAR_BITS = 8


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def bands(bits: int) -> list[tuple[int, int]]:
    """(shift, width) of ``bits + 1`` bands that cover 64 bits."""
    count = bits + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def near_pairs(own: np.ndarray, variants: np.ndarray, bits: int) -> np.ndarray:
    """Index pairs (i, j), i < j, whose hashes are within ``bits``: image i's own hash against
    image j's 8 flips and rotations. ``own``: n uint64; ``variants``: n x 8 uint64."""
    n = len(own)
    found = []
    flat = variants.reshape(-1)
    owner = np.repeat(np.arange(n), variants.shape[1])
    for shift, width in bands(bits):
        mask = np.uint64((1 << width) - 1)
        keys = (flat >> np.uint64(shift)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        query = (own >> np.uint64(shift)) & mask
        lo = np.searchsorted(sorted_keys, query, side="left")
        hi = np.searchsorted(sorted_keys, query, side="right")
        counts = hi - lo
        if counts.sum() == 0:
            continue
        i = np.repeat(np.arange(n), counts)
        starts = np.repeat(lo, counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = order[starts + offsets]
        j = owner[pos]
        close = (i != j) & (popcount(own[i] ^ flat[pos]) <= bits)
        found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def near_copy_pairs(variants: np.ndarray, centres: np.ndarray, bits: int) -> np.ndarray:
    """Pairs of near copies: the whole thumbnails' hashes within ``bits`` (under some flip or
    rotation), then the centres' too: photos rotated by 45 degrees share black corners, which
    dominate the whole thumbnail's low frequencies, but not their centres."""
    pairs = near_pairs(variants[:, 0].copy(), variants, bits)
    i, j = pairs[:, 0], pairs[:, 1]
    return pairs[(popcount(centres[i, :1] ^ centres[j]) <= bits).any(axis=1)]


@dataclass
class Copies:
    """Clusters of copies (each a sorted list of paths, two or more), and how each was found."""

    clusters: list[list[str]]
    exact: int  # clusters held together by identical bytes
    near_bits: int


def find_copies(entries: dict[str, Entry], near_bits: int = NEAR_BITS) -> Copies:
    """Exact and near copies among the readable images of ``entries``, as clusters."""
    paths = [p for p, e in entries.items() if not e.error and e.phash]
    uf = UnionFind(len(paths))
    first_of: dict[str, int] = {}
    exact_links = 0
    for i, p in enumerate(paths):
        sha = entries[p].sha
        if sha in first_of:
            uf.union(first_of[sha], i)
            exact_links += 1
        else:
            first_of[sha] = i
    if paths:
        variants = np.array([entries[p].phash for p in paths], dtype=np.uint64)
        centres = np.array([entries[p].chash for p in paths], dtype=np.uint64)
        for a, b in near_copy_pairs(variants, centres, near_bits):
            uf.union(int(a), int(b))
    groups: dict[int, list[str]] = defaultdict(list)
    for i, p in enumerate(paths):
        groups[uf.find(i)].append(p)
    clusters = sorted(sorted(members) for members in groups.values() if len(members) > 1)
    shas = [{entries[p].sha for p in members} for members in clusters]
    exact = sum(1 for s, members in zip(shas, clusters, strict=True) if len(s) < len(members))
    return Copies(clusters, exact, near_bits)


# ----------------------------------------------------------------------------- leaks and conflicts

SPLIT_PAIRS = (("test", "train"), ("val", "train"), ("test", "val"))


@dataclass
class Leaks:
    """Per split pair (a, b): the images of split a that have a copy in split b, and example pairs."""

    counts: dict[str, int]
    totals: dict[str, int]
    examples: dict[str, list[tuple[str, str]]]

    def any(self) -> bool:
        return any(self.counts.values())

    def as_dict(self) -> dict:
        return {
            pair: {"images": self.counts[pair], "of": self.totals[pair], "examples": self.examples[pair]}
            for pair in self.counts
        }


def find_leaks(copies: Copies, split_of: dict[str, str], shown: int = 3) -> Leaks:
    """For each split pair, the images of the first split with a copy in the second."""
    counts, totals, examples = {}, {}, {}
    sizes = defaultdict(int)
    for split in split_of.values():
        sizes[split] += 1
    for a, b in SPLIT_PAIRS:
        key = f"{a}-{b}"
        hits: list[tuple[str, str]] = []
        for members in copies.clusters:
            in_b = [p for p in members if split_of.get(p) == b]
            if in_b:
                hits += [(p, in_b[0]) for p in members if split_of.get(p) == a]
        counts[key], totals[key], examples[key] = len(hits), sizes[a], hits[:shown]
    return Leaks(counts, totals, examples)


def leak_phrase(pair: str, images: int, total: int) -> str:
    """``3 of 9 test images have a copy in train`` for the split pair ``test-train``."""
    a, b = pair.split("-")
    return f"{images} of {total} {a} images have a copy in {b}"


def label_conflicts(copies: Copies, label_of: dict[str, int]) -> list[list[str]]:
    """Clusters whose copies carry more than one class."""
    return [m for m in copies.clusters if len({label_of[p] for p in m if p in label_of}) > 1]


def together(copies: Copies, paths: Iterable[str]) -> list[list[str]]:
    """The clusters restricted to ``paths`` (those that still have two or more members)."""
    keep = set(paths)
    out = [[p for p in members if p in keep] for members in copies.clusters]
    return [m for m in out if len(m) > 1]
