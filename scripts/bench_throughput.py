"""Training throughput of semodel models against their timm / torchvision counterparts.

    python scripts/bench_throughput.py --device cpu
    python scripts/bench_throughput.py --device cuda --batch-size 256 --image-size 224 --channels-last
    python scripts/bench_throughput.py --device cuda --batch-size 256 --image-size 224 \
        --channels-last --compile

One measured step is a full training step: forward, cross-entropy loss, backward, SGD step
(momentum 0.9, the same settings for every model). Data are random tensors made once on the
device. Both models of a pair run with the same batch size, image size, dtype (bf16 autocast on
CUDA, fp32 on CPU unless ``--amp``), memory format and ``--compile`` setting, in train mode.
Warm-up steps are timed separately (compilation lands there). ``*-fused`` pairs compare semodel's
default SE-ResNet (fused SE tail, semodel/models/fused.py) with the same model built with the tail
as separate ops (``set_fused(model, False)``). The two models of a pair are timed
interleaved in rounds (A, B, A, B, ...) and each model's median over the rounds is reported, so
that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from semodel.models import build_model  # noqa: E402
from semodel.models.fused import set_fused  # noqa: E402

# a model key -> builder(num_classes)
Builder = Callable[[int], nn.Module]


def _semodel(name: str, fused: bool = True, **kw: Any) -> Builder:
    def make(nc: int) -> nn.Module:
        model = build_model(name, num_classes=nc, **kw)
        set_fused(model, fused)  # the fused SE tail is the default; off for the comparison
        return model

    return make


def _timm(name: str) -> Builder:
    def make(nc: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=nc)

    return make


def _tv(name: str) -> Builder:
    def make(nc: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=nc)

    return make


MODELS: dict[str, Builder] = {
    "semodel:se_resnet18": _semodel("se_resnet18"),
    "semodel:se_resnet18(attention=none)": _semodel("se_resnet18", attention="none"),
    "semodel:se_resnet18(unfused)": _semodel("se_resnet18", fused=False),
    "semodel:se_resnet50": _semodel("se_resnet50"),
    "semodel:se_resnet50(attention=none)": _semodel("se_resnet50", attention="none"),
    "semodel:se_resnet50(unfused)": _semodel("se_resnet50", fused=False),
    "semodel:se_densenet121": _semodel("se_densenet121"),
    "timm:seresnet18": _timm("seresnet18"),
    "timm:seresnet50": _timm("seresnet50"),
    "torchvision:resnet18": _tv("resnet18"),
    "torchvision:resnet50": _tv("resnet50"),
    "torchvision:densenet121": _tv("densenet121"),
}

PAIRS = {
    # pair name -> (semodel model, counterpart)
    "r18-timm": ("semodel:se_resnet18", "timm:seresnet18"),
    "r18-se-overhead": ("semodel:se_resnet18", "semodel:se_resnet18(attention=none)"),
    "r18-tv": ("semodel:se_resnet18(attention=none)", "torchvision:resnet18"),
    "r18-fused": ("semodel:se_resnet18", "semodel:se_resnet18(unfused)"),
    "r50-timm": ("semodel:se_resnet50", "timm:seresnet50"),
    "r50-tv": ("semodel:se_resnet50(attention=none)", "torchvision:resnet50"),
    "r50-se-overhead": ("semodel:se_resnet50", "semodel:se_resnet50(attention=none)"),
    "r50-fused": ("semodel:se_resnet50", "semodel:se_resnet50(unfused)"),
    "d121-tv": ("semodel:se_densenet121", "torchvision:densenet121"),
}
DEFAULTS = {
    "cpu": dict(pairs="r18-timm,r18-se-overhead", batch_size=32, image_size=64, num_classes=1000),
    "cuda": dict(
        pairs="r50-timm,r50-tv,r50-se-overhead,r50-fused,d121-tv",
        batch_size=256,
        image_size=224,
        num_classes=1000,
    ),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            name = m.group(1).strip()
    except OSError:
        pass
    return f"{name}, torch threads {torch.get_num_threads()}"


def rss_mib() -> float | None:
    """Peak resident set size of this process (Linux: ru_maxrss is in KiB)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return None


class Runner:
    """One model with its optimizer and a compiled-or-not training step."""

    def __init__(
        self, key: str, args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        self.key = key
        self.device = device
        torch.manual_seed(0)
        model = MODELS[key](args.num_classes).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.params = sum(p.numel() for p in model.parameters())
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.loss_fn = nn.CrossEntropyLoss()
        self.x, self.y = x, y
        self.amp = args.amp_dtype
        self.forward = torch.compile(model) if args.compile else model
        self.warmup_s = 0.0
        self.times: list[float] = []  # seconds per step, one entry per round
        self.peak_mib: float | None = None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.forward(self.x)
            loss = self.loss_fn(out.float(), self.y)
        loss.backward()
        self.opt.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return time.perf_counter() - t0


def bench_pair(a_key: str, b_key: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    runners = []
    for key in (a_key, b_key):
        r = Runner(key, args, device, x, y)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r.warmup_s = r.run(args.warmup)
        if device.type == "cuda":
            r.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        runners.append(r)
    for _ in range(args.rounds):
        for r in runners:  # A, B, A, B, ...
            r.times.append(r.run(args.steps) / args.steps)
    a, b = runners
    ips = [args.batch_size / statistics.median(r.times) for r in runners]
    row = {
        "model": a.key,
        "counterpart": b.key,
        "params": a.params,
        "counterpart_params": b.params,
        "images_per_s": round(ips[0], 2),
        "counterpart_images_per_s": round(ips[1], 2),
        "ratio": round(ips[0] / ips[1], 4),
        "warmup_s": round(a.warmup_s, 3),
        "counterpart_warmup_s": round(b.warmup_s, 3),
        "step_ms_rounds": [round(t * 1e3, 2) for t in a.times],
        "counterpart_step_ms_rounds": [round(t * 1e3, 2) for t in b.times],
        "peak_mib": None if a.peak_mib is None else round(a.peak_mib, 1),
        "counterpart_peak_mib": None if b.peak_mib is None else round(b.peak_mib, 1),
    }
    del runners, a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_pair(a_key: str, b_key: str, args: argparse.Namespace, device: torch.device, top: int) -> None:
    """One profiled training step per model (after warm-up): top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    for key in (a_key, b_key):
        r = Runner(key, args, device, x, y)
        r.run(max(1, args.warmup))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            r.run(1)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n--- profile: {key} (one step) ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--pairs",
        default=None,
        help=f"comma-separated, from: {', '.join(PAIRS)} (default depends on the device)",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed-in-the-median warm-up steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the benchmark, profile one step of each model of each pair, top N ops",
    )
    args = p.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    d = DEFAULTS[device.type]
    args.pairs = args.pairs or d["pairs"]
    args.batch_size = args.batch_size or d["batch_size"]
    args.image_size = args.image_size or d["image_size"]
    args.num_classes = args.num_classes or d["num_classes"]
    args.amp_dtype = torch.bfloat16 if (device.type == "cuda" or args.amp) else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    pairs = [s.strip() for s in args.pairs.split(",") if s.strip()]
    for s in pairs:
        if s not in PAIRS:
            p.error(f"unknown pair {s!r}; choose from {', '.join(PAIRS)}")

    dev = device_name(device)
    dtype = "bf16 autocast" if args.amp_dtype is not None else "fp32"
    print(f"device: {device.type} ({dev})")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch_size}, "
        f"{args.image_size} px, {args.num_classes} classes, {dtype}, "
        f"channels_last {args.channels_last}, compile {args.compile}; "
        f"warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps (interleaved)"
    )
    rows = []
    for s in pairs:
        a, b = PAIRS[s]
        print(f"running {s}: {a} vs {b} ...", flush=True)
        rows.append(bench_pair(a, b, args, device))

    mem_col = "peak MiB" if device.type == "cuda" else None
    header = [
        "model",
        "counterpart",
        "params",
        "cp params",
        "img/s",
        "cp img/s",
        "ratio",
        "warm-up s",
        "cp warm-up s",
    ] + ([mem_col, "cp " + mem_col] if mem_col else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["model"],
            r["counterpart"],
            f"{r['params']:,}",
            f"{r['counterpart_params']:,}",
            f"{r['images_per_s']:.1f}",
            f"{r['counterpart_images_per_s']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['warmup_s']:.2f}",
            f"{r['counterpart_warmup_s']:.2f}",
        ]
        if mem_col:
            cells += [f"{r['peak_mib']:.0f}", f"{r['counterpart_peak_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print()
    print("\n".join(lines))
    print("\nratio = semodel img/s / counterpart img/s (> 1: semodel faster); medians over rounds.")
    rss = rss_mib() if device.type == "cpu" else None
    if rss is not None:
        print(f"process peak RSS: {rss:.0f} MiB (all models together)")

    if args.json:
        out = {
            "device": device.type,
            "device_name": dev,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "num_classes": args.num_classes,
            "dtype": dtype,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "peak_rss_mib": rss,
            "results": rows,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")

    if args.profile:
        for s in pairs:
            profile_pair(*PAIRS[s], args, device, args.profile)


if __name__ == "__main__":
    main()
