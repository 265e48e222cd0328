"""Data pipeline throughput: images/s of ready training batches, per-image decoding + augmentation in
DataLoader workers against ``data.cache`` (decoded once, augmented per batch on the device).

    python scripts/bench_data.py ../shared/data/msld/augmented --image-size 224 --workers 0 2
    python scripts/bench_data.py ../shared/data/msld/augmented --image-size 224 --device cuda --workers 0 4 8

A "batch" is what the training loop receives: normalised float images of ``--image-size`` with a
random resized crop (scale 0.35-1) and a horizontal flip, on ``--device``. Each pipeline runs
``--epochs`` passes over the images after one untimed warm-up batch; the cache's one-off decoding
time is reported separately. The ratio column compares with the first DataLoader row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from semodel.config import validate  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epochs(batches, epochs: int, device: torch.device) -> float:
    """Images per second over ``epochs`` passes (after one warm-up batch)."""
    it = iter(batches)
    next(it)
    sync(device)
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _labels in batches:
            seen += images.shape[0]
    sync(device)
    return seen / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="an ImageFolder")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from torch.utils.data import DataLoader

    from semodel.data import ImageList, collate_skip_bad, scan_dataset, train_transform
    from semodel.data.cache import cached_loaders, choose, photo_sizes
    from semodel.loaders import EpochBatchSampler

    device = torch.device(args.device)
    cfg = validate(
        {
            "data": {
                "root": str(args.data),
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "augment": {"scale": [0.35, 1.0], "hflip": 0.5},
            }
        },
        "bench",
    )
    data = scan_dataset(args.data, check=False)
    samples = data.samples[: args.limit] if args.limit else data.samples
    sampler = EpochBatchSampler(len(samples), args.batch_size, 0)
    rows = []

    class ToDevice:  # the training loop's own transfer, so both pipelines end on the device
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for images, labels in self.loader:
                yield images.to(device, non_blocking=True), labels

    for workers in args.workers:
        loader = DataLoader(
            ImageList(args.data, samples, train_transform(cfg)),
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip_bad,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            **({"prefetch_factor": 4} if workers else {}),
        )
        ips = run_epochs(ToDevice(loader), args.epochs, device)
        rows.append({"pipeline": f"DataLoader, {workers} workers", "images_per_s": ips, "setup_s": 0.0})
        print(f"{rows[-1]['pipeline']}: {ips:.0f} img/s", flush=True)
    kinds = ["ram"] + (["gpu"] if device.type == "cuda" else [])
    for kind in kinds:
        t0 = time.perf_counter()
        plan = choose(cfg, device, lambda: photo_sizes(args.data, samples), 1, setting=kind)
        train, _ = cached_loaders(cfg, plan, args.data, samples, samples[:1], sampler, device, lambda m: None)
        setup = time.perf_counter() - t0
        ips = run_epochs(train, args.epochs, device)
        rows.append(
            {
                "pipeline": f"data.cache: {kind}, augment on {device.type}",
                "images_per_s": ips,
                "setup_s": setup,
            }
        )
        print(f"{rows[-1]['pipeline']}: {ips:.0f} img/s (decoding once: {setup:.1f}s)", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    print(
        f"\n{len(samples)} images of {args.data}, {args.image_size} px, batch {args.batch_size}, "
        f"device {name}, "
        f"{threads} torch threads, torch {torch.__version__}"
    )
    base = rows[0]["images_per_s"]
    print("| pipeline | images/s | ratio | one-off decoding |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pipeline']} | {r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f}x | "
            f"{r['setup_s']:.1f} s |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "argv": sys.argv[1:], "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
