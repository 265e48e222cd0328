"""The attention tail of a residual block alone: fused node vs the plain composition.

    python scripts/bench_se_tail.py --device cpu --batch-size 32 --image-size 64
    python scripts/bench_se_tail.py --device cuda --batch-size 256 --image-size 224 --channels-last

Times forward + backward of ``relu(se(x) + identity)`` at the four SE-ResNet-50 stage shapes
(C = 256, 512, 1024, 2048 at 1/4, 1/8, 1/16, 1/32 of the image size; ``--stages resnet18``:
C = 64 ... 512), SE with r = 16:

- plain: ``relu(se(x) + identity)`` as separate PyTorch ops (``fused_tail`` off)
- fused: ``semodel.models.fused.se_residual_tail`` (the default in SE-ResNet blocks)

and, as the floor, the tail of a block without attention, ``relu(x + identity)``. Both variants
run on the same tensors, interleaved in rounds (plain, fused, plain, fused, ...); the median per
variant is reported with the ratio plain / fused (> 1: the fused node is faster). bf16 autocast on
CUDA, fp32 on CPU unless ``--amp``. The same script prints the maximum difference of the output
and of the input gradient between the two, as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import semodel.models.fused as fused  # noqa: E402
from semodel.models.attention import SqueezeExcite  # noqa: E402
from semodel.models.fused import se_residual_tail  # noqa: E402

STAGES = {  # channels, downsampling of the image
    "resnet50": ((256, 4), (512, 8), (1024, 16), (2048, 32)),
    "resnet18": ((64, 4), (128, 8), (256, 16), (512, 32)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 64 on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--stages", choices=list(STAGES), default="resnet50", help="whose stage shapes")
    p.add_argument(
        "--always-fused",
        action="store_true",
        help=f"the fused node at every size (by default tensors under {fused.MIN_FUSED_ELEMENTS} "
        "elements take the plain ops)",
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 32)
    size = args.image_size or (224 if cuda else 64)
    amp = torch.bfloat16 if (cuda or args.amp) else None
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, torch threads {torch.get_num_threads()}"
    if args.always_fused:
        fused.MIN_FUSED_ELEMENTS = 0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    print(
        f"device: {name}; torch {torch.__version__}; batch {batch}, {size} px, "
        f"{'bf16 autocast' if amp else 'fp32'}, channels_last {args.channels_last}, {args.stages} stages, "
        "fused node "
        f"{'at every size' if args.always_fused else f'from {fused.MIN_FUSED_ELEMENTS} elements'}; "
        f"{args.rounds} rounds x {args.steps} steps, forward + backward"
    )
    rows = []
    for channels, down in STAGES[args.stages]:
        hw = max(1, size // down)
        torch.manual_seed(0)
        se = SqueezeExcite(channels, 16).to(device)
        dtype = amp or torch.float32
        x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
        identity = torch.randn_like(x)
        grad = torch.randn_like(x)
        x.requires_grad_()
        identity.requires_grad_()

        variants = {
            "no attention": lambda x=x, i=identity: torch.relu(x + i),
            "plain": lambda x=x, i=identity, se=se: torch.relu(se(x) + i),
            "fused": lambda x=x, i=identity, se=se: se_residual_tail(x, i, se),
        }

        def step(fn, grad=grad) -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = fn()
            out.backward(grad)
            return out

        # sanity: the same output and input gradient
        outs = {}
        for key in ("plain", "fused"):
            x.grad = None
            out = step(variants[key])
            outs[key] = (out.detach().float(), x.grad.detach().float())
        diff_out = (outs["plain"][0] - outs["fused"][0]).abs().max().item()
        diff_grad = (outs["plain"][1] - outs["fused"][1]).abs().max().item()

        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            for _ in range(3):
                step(fn)
        for _ in range(args.rounds):
            for key, fn in variants.items():
                x.grad = identity.grad = None
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(fn)
                sync()
                times[key].append((time.perf_counter() - t0) / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "channels": channels,
            "hw": hw,
            "no_attention_ms": round(med["no attention"], 3),
            "plain_ms": round(med["plain"], 3),
            "fused_ms": round(med["fused"], 3),
            "ratio": round(med["plain"] / med["fused"], 3),
            "max_abs_diff_out": diff_out,
            "max_abs_diff_grad": diff_grad,
        }
        rows.append(row)
        print(
            f"C {channels:4d} at {hw:3d}x{hw:<3d}  no attention {row['no_attention_ms']:8.3f} ms  "
            f"plain {row['plain_ms']:8.3f} ms  fused {row['fused_ms']:8.3f} ms  "
            f"plain/fused {row['ratio']:.3f}  (|diff| out {diff_out:.1e}, grad {diff_grad:.1e})",
            flush=True,
        )
    plain_cost = sum(r["plain_ms"] - r["no_attention_ms"] for r in rows)
    fused_cost = sum(r["fused_ms"] - r["no_attention_ms"] for r in rows)
    print(
        f"attention cost over the four stages (one block each): plain {plain_cost:.3f} ms, "
        f"fused {fused_cost:.3f} ms"
        f" -> fused costs {fused_cost / plain_cost:.2f} of plain"
        if plain_cost > 0
        else ""
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "batch_size": batch,
                    "image_size": size,
                    "channels_last": args.channels_last,
                    "amp": amp is not None,
                    "stages": args.stages,
                    "always_fused": args.always_fused,
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
