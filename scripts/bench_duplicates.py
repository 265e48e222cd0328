"""How well a perceptual hash tells copies from look-alikes: the threshold of semodel's near-copy
search (``semodel.data.duplicates.NEAR_BITS``), measured rather than chosen by taste.

    python scripts/bench_duplicates.py ../shared/data/msld/augmented --group-by '^(N?M\\d+)_'

MSLD's augmented folder holds 14 copies (flips, rotations, shifts, ...) of each of 228 photos of
162 patients. Split two ways with semodel's split function (seed 0, 15 % validation, 15 % test):

- by image (``data.split.group_by`` unset, copies ignored): most test images have a copy of their
  photo in train; a good hash finds them;
- by patient (``--group-by``): no copy crosses, so every test image the hash matches to a training
  image is a false match (another patient's lesion that looks alike at 32 x 32).

For each Hamming distance it prints the share of test images with a match in train, both ways, for
semodel's search (the DCT hash of the whole thumbnail under the 8 flips and rotations, then of its
centre), for the whole thumbnail's DCT hash alone, and for an 8 x 8 average hash (the minimum over
the 8 flips and rotations). Exact copies (identical bytes) are counted apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semodel.data import assign_splits, scan_dataset  # noqa: E402
from semodel.data.duplicates import near_copy_pairs, near_pairs  # noqa: E402


def average_hashes(path: Path) -> list[int]:
    """The 8 x 8 average hash of the image and of its 7 other flips and rotations."""
    with Image.open(path) as img:
        small = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    out = []
    for t in (small, small.T):
        for v in (t, t[::-1], t[:, ::-1], t[::-1, ::-1]):
            bits = (v > v.mean()).reshape(-1)
            out.append(int(np.packbits(bits).view(">u8")[0]))
    return out


def match_share(hashes: np.ndarray, centres: np.ndarray | None, split: list[str], bits: int) -> float:
    """The share of test images matched to a training image within ``bits``: semodel's two stages
    (``centres`` given), or the hashes alone."""
    if centres is None:
        pairs = near_pairs(hashes[:, 0].copy(), hashes, bits)
    else:
        pairs = near_copy_pairs(hashes, centres, bits)
    matched = set()
    for i, j in pairs:
        for a, b in ((i, j), (j, i)):
            if split[a] == "test" and split[b] == "train":
                matched.add(int(a))
    return len(matched) / max(1, split.count("test"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--group-by", default=r"^(N?M\d+)_")
    p.add_argument("--max-bits", type=int, default=10)
    args = p.parse_args(argv)
    data = scan_dataset(args.data)
    entries = data.index.entries
    paths = [s.path for s in data.samples]
    dct = np.array([entries[q].phash for q in paths], dtype=np.uint64)
    centres = np.array([entries[q].chash for q in paths], dtype=np.uint64)
    ahash = np.array([average_hashes(args.data / q) for q in paths], dtype=np.uint64)
    ahash = np.sort(ahash, axis=1)[:, :1].repeat(8, axis=1)  # the minimum over the 8, as one hash
    splits = {}
    for name, group_by in (("by image", None), ("by patient", args.group_by)):
        samples = [type(s)(s.path, s.label) for s in data.samples]
        assign_splits(samples, len(data.classes), 0.15, 0.15, 0, group_by)
        splits[name] = [s.split for s in samples]
    sha = [entries[q].sha for q in paths]
    print(f"{args.data}: {len(paths)} images; test split {splits['by image'].count('test')} images")
    for name, split in splits.items():
        train_shas = {h for h, s in zip(sha, split, strict=True) if s == "train"}
        exact = sum(1 for h, s in zip(sha, split, strict=True) if s == "test" and h in train_shas)
        print(f"  split {name}: {exact} test images are byte copies of a training one")
    methods = ("semodel (DCT, then centre)", "DCT alone", "8x8 average")
    print("\n| bits | " + " | ".join(f"{m}: by image | by patient (false)" for m in methods) + " |")
    print("|---" * 7 + "|")
    for bits in range(args.max_bits + 1):
        cells = [
            f"{match_share(h, c, splits[s], bits):.1%}"
            for h, c in ((dct, centres), (dct, None), (ahash, None))
            for s in ("by image", "by patient")
        ]
        print(f"| {bits} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
