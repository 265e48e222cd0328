"""Time of ``semodel.stats.bootstrap_intervals``: N images x R resamples, per image and per patient.

    python scripts/bench_stats.py                       # 1000 images x 1000 resamples, 2 classes
    python scripts/bench_stats.py --images 5000 --classes 5 --repeats 5

Synthetic probabilities (labels drawn at random, the true class's logit raised by 1.5). Each
setting runs once untimed (warm-up), then ``--repeats`` times; the best and the median wall
time are printed. Threads: torch's default unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from semodel.stats import bootstrap_intervals  # noqa: E402


def synthetic(images: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(classes, (images,), generator=generator)
    logits = torch.randn(images, classes, generator=generator) + 1.5 * torch.eye(classes)[targets]
    return logits.softmax(1), targets


def seconds(run, repeats: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--images-per-patient", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probs, targets = synthetic(args.images, args.classes)
    names = [f"class{k}" for k in range(args.classes)]
    patients = [i // args.images_per_patient for i in range(args.images)]
    print(
        f"{args.images} images x {args.resamples} resamples, {args.classes} classes, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for label, groups in (("per image", None), (f"per patient ({args.images_per_patient} images)", patients)):
        times = seconds(
            lambda g=groups: bootstrap_intervals(probs, targets, names, g, args.resamples), args.repeats
        )
        print(f"  {label:<28} best {min(times):.3f} s   median {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
