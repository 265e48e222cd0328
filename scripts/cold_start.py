"""Cold start of ``semodel predict one.jpg`` on CPU, against the floor of importing torch.

    python scripts/cold_start.py --checkpoint runs/demo/best.pt --image data/demo/spots/spots_0000.jpg

Runs each command ``--repeat`` times in a fresh process and prints the median wall time, the
ratio of the two, and which heavy modules the predict process imported (there should be none
beyond torch, PIL and numpy: no torchvision, matplotlib, torchmetrics, tensorboard, onnx).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = [
    "torchvision",
    "matplotlib",
    "torchmetrics",
    "tensorboard",
    "onnx",
    "onnxruntime",
    "yaml",
    "semodel.train",
    "semodel.config",
    "semodel.evaluate",
    "semodel.gradcam",
]


def timed(args: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    predict = [
        sys.executable,
        "-m",
        "semodel",
        "predict",
        args.image,
        "--checkpoint",
        args.checkpoint,
        "--device",
        "cpu",
    ]
    floor = timed([sys.executable, "-c", "import torch"], args.repeat)
    total = timed(predict, args.repeat)
    probe = (
        "import sys, runpy\n"
        f"sys.argv = {['semodel', *predict[3:]]!r}\n"
        "try:\n    runpy.run_module('semodel', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    print(f"python -c 'import torch'        median of {args.repeat}: {floor:.2f} s")
    print(f"semodel predict one image (CPU)  median of {args.repeat}: {total:.2f} s")
    print(f"ratio predict / import torch: {total / floor:.2f}x  (semodel's own share: {total - floor:.2f} s)")
    print(f"heavy modules imported by predict: {loaded.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
