"""The pass over a data folder's files (semodel.data.index) against the decode check it replaced.

    python scripts/bench_scan.py --images 2000 20000 --cached 100000

For each size N it makes (once, into ``--workdir``, default ``.bench/scan``, git-ignored) N
camera-sized JPEGs (about 400 x 350, two class folders, distinct pictures) and times, each in
this process:

- ``decode check``: what every ``semodel train`` start did before the index: every image decoded
  at reduced scale in 4 threads (``check_image``), nothing kept;
- ``first pass``: ``build_index`` with no index yet (decode check, size, content hash, perceptual
  hashes, in ``--workers`` processes), writing ``.semodel-index.json``;
- ``second start``: ``build_index`` again: every file's size and time compared, nothing read;
- ``scan_dataset`` with the index in place: the whole scan a ``semodel train`` start makes.

``--cached M`` then times a second start over M files: hard links to the N images' files (same
size and time, so the index entries of their originals are valid for them), whose index is
written from those entries. Printed: seconds and images/s per step, and the ratio of the first
pass to the decode check (above 1.0: the pass is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semodel.data import check_image, scan_dataset  # noqa: E402
from semodel.data.index import INDEX_NAME, build_index, read_index, write_index  # noqa: E402


def make_images(root: Path, n: int) -> list[str]:
    """n distinct JPEGs of about 400 x 350 in root/a and root/b (made once)."""
    paths = [f"{'ab'[i % 2]}/img_{i:06d}.jpg" for i in range(n)]
    if all((root / p).is_file() for p in paths[-3:]):
        return paths
    rng = np.random.default_rng(n)
    for i, p in enumerate(paths):
        w, h = 380 + int(rng.integers(0, 41)), 330 + int(rng.integers(0, 41))
        coarse = rng.uniform(0, 255, (6, 7, 3))
        smooth = np.kron(coarse, np.ones((h // 6 + 1, w // 7 + 1, 1)))[:h, :w]
        noise = rng.normal(0, 12, (h, w, 3))
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((smooth + noise).clip(0, 255).astype(np.uint8)).save(root / p, quality=90)
        if i % 5000 == 4999:
            print(f"  made {i + 1} images", flush=True)
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_check(root: Path, paths: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda p: check_image(root / p), paths))


def bench_size(workdir: Path, n: int, workers: int) -> dict:
    root = workdir / f"{n}"
    paths = make_images(root, n)
    (root / INDEX_NAME).unlink(missing_ok=True)
    row = {"images": n, "decode_check_s": timed(lambda: decode_check(root, paths))}
    row["first_pass_s"] = timed(lambda: build_index(root, paths, workers=workers))
    row["second_start_s"] = timed(lambda: build_index(root, paths, workers=workers))
    row["scan_dataset_s"] = timed(lambda: scan_dataset(root))
    return row


def bench_cached(workdir: Path, source: int, m: int) -> dict:
    """A second start over m hard links to the ``source`` images, their index written from the
    originals' entries."""
    src_root = workdir / f"{source}"
    entries = read_index(src_root / INDEX_NAME)
    originals = sorted(entries)
    root = workdir / f"links-{m}"
    paths = [f"{'ab'[i % 2]}/link_{i:06d}.jpg" for i in range(m)]
    if not (root / paths[-1]).exists():
        for d in ("a", "b"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(paths):
            os.link(src_root / originals[i % len(originals)], root / p)
    write_index(root / INDEX_NAME, {p: entries[originals[i % len(originals)]] for i, p in enumerate(paths)})
    seconds = timed(lambda: build_index(root, paths))
    index = build_index(root, paths)
    assert index.probed == 0, index.probed
    return {"images": m, "second_start_s": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--cached", type=int, default=100000, help="a second start over this many files (0: skip)")
    p.add_argument(
        "--workers", type=int, default=None, help="processes of the first pass (default: the cores)"
    )
    p.add_argument("--workdir", type=Path, default=REPO / ".bench" / "scan")
    args = p.parse_args(argv)
    rows = [bench_size(args.workdir, n, args.workers) for n in args.images]
    print(f"\n{os.cpu_count()} cores; images of about 400 x 350 px (JPEG, quality 90)")
    print("| images | decode check (before) | first pass | ratio | second start | scan_dataset, cached |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        n, check, first = r["images"], r["decode_check_s"], r["first_pass_s"]
        print(
            f"| {n} | {check:.2f} s ({n / check:.0f}/s) | {first:.2f} s ({n / first:.0f}/s) | "
            f"{check / first:.2f} | {r['second_start_s']:.2f} s | {r['scan_dataset_s']:.2f} s |"
        )
    if args.cached:
        c = bench_cached(args.workdir, max(args.images), args.cached)
        print(f"\nsecond start over {c['images']} files (index in place): {c['second_start_s']:.2f} s")


if __name__ == "__main__":
    main()
