"""Attention ablation: the same backbone and recipe with no attention, SE (r = 16), SE with a
learned width, and ECA, over several split seeds; mean +- std of test accuracy, parameters and
training throughput per variant.

    python scripts/ablate_attention.py ../shared/data/msld/original --group-by '^(N?M\\d+)_' \
        --model se_resnet18 --image-size 64 --epochs 30 --seeds 0 1 2

Every run is a normal ``semodel train`` run (``--out``/<variant>-s<seed>/), with the split made by
patient (``--group-by``, a regex whose first group is the patient id), stratified by class, 60/20/20
by default; the seed sets both the split and the initialisation, so each seed is another split
and the variants of one seed see the same split. Test accuracy is of the weights validation chose
(best.pt, by ``train.monitor``). Parameters are those of the model that predicts: for the
learned width, after pruning. Images/s is the training throughput (augmentation and data loading
included) averaged over the epochs after the first.

Recipe: ``--config`` (a semodel YAML; its data.root is replaced) or the built-in one below;
``--set key=value`` changes it for every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from semodel.config import apply_overrides, read_yaml, validate  # noqa: E402
from semodel.errors import SemodelError  # noqa: E402

VARIANTS = {
    "none": {"attention": "none"},
    "se": {"attention": "se", "reduction": 16},
    "learned": {"attention": "se", "reduction": "learned"},
    "eca": {"attention": "eca"},
}

RECIPE: dict[str, Any] = {
    "model": {"name": "se_resnet18"},
    "data": {
        "image_size": 64,
        "batch_size": 32,
        "num_workers": "auto",
        "split": {"val": 0.2, "test": 0.2},
        "augment": {"scale": [0.35, 1.0], "hflip": 0.5, "vflip": 0.5},
    },
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "schedule": {"name": "cosine", "warmup_epochs": 2},
    "train": {"epochs": 30, "label_smoothing": 0.1, "monitor": "val_balanced_acc"},
    "log": {"tensorboard": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="an ImageFolder: DATA/<class>/<image>")
    p.add_argument(
        "--group-by", default=None, help="regex over file names; its first group is the patient id"
    )
    p.add_argument(
        "--config", type=Path, default=None, help="a semodel YAML recipe (default: the built-in one)"
    )
    p.add_argument("--model", default=None, help="backbone (default: the recipe's, se_resnet18)")
    p.add_argument(
        "--variants", default="none,se,learned,eca", help="comma-separated: none, se, learned, eca"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split + init seeds")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every run")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="folder for the runs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, variant: str, seed: int):
    raw = read_yaml(args.config) if args.config else json.loads(json.dumps(RECIPE))
    changes = [
        f"data.root={args.data}",
        f"data.split.seed={seed}",
        f"train.seed={seed}",
        f"train.device={args.device}",
        f"log.out_dir={args.out}",
        f"log.name={variant}-s{seed}",
    ]
    if args.group_by:
        changes.append(f"data.split.group_by={args.group_by}")
    if args.model:
        changes.append(f"model.name={args.model}")
    for key, value in (
        ("train.epochs", args.epochs),
        ("data.image_size", args.image_size),
        ("data.batch_size", args.batch_size),
    ):
        if value is not None:
            changes.append(f"{key}={value}")
    changes += [f"model.{k}={v}" for k, v in VARIANTS[variant].items()]
    raw = apply_overrides(raw, [*args.overrides, *changes])
    return validate(raw, f"{variant} seed {seed}")


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    from semodel.checkpoint import build_from_checkpoint, load_checkpoint
    from semodel.train import fit

    cfg = run_config(args, variant, seed)
    run_dir = Path(args.out) / f"{variant}-s{seed}"
    if (run_dir / "metrics.json").is_file():
        print(f"{variant} seed {seed}: done before, reading {run_dir / 'metrics.json'}", flush=True)
    else:
        if run_dir.exists():
            raise SemodelError(
                f"{run_dir} exists without metrics.json (an unfinished run): remove it or resume it "
                f"with semodel train --resume {run_dir / 'last.pt'}"
            )
        t0 = time.time()
        run_dir = fit(cfg, quiet=True, log=lambda line: None)
        print(f"{variant} seed {seed}: {time.time() - t0:.0f}s  {run_dir}", flush=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "test" not in metrics:
        raise SemodelError(f"{run_dir}: no test split (set data.split.test > 0)")
    model = build_from_checkpoint(load_checkpoint(run_dir / "best.pt"))  # pruned if the width was learned
    speeds = [h["train"]["images_per_s"] for h in metrics["history"]]
    return {
        "variant": variant,
        "seed": seed,
        "run_dir": str(run_dir),
        "test_acc": metrics["test"]["acc"],
        "test_balanced_acc": metrics["test"]["balanced_acc"],
        "best_epoch": metrics["best"]["epoch"],
        "params": sum(p.numel() for p in model.parameters()),
        "images_per_s": statistics.mean(speeds[1:] if len(speeds) > 1 else speeds),
        "wall_time_s": metrics["wall_time_s"],
        "learned_widths": metrics.get("learned_widths"),
    }


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.1f} %"
    return f"{100 * statistics.mean(values):.1f} +- {100 * statistics.stdev(values):.1f} %"


def summarize(results: list[dict[str, Any]], variants: list[str]) -> str:
    header = ["attention", "params", "test acc (mean +- std)", "balanced acc", "train img/s", "per seed"]
    rows = []
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        params = sorted({r["params"] for r in rs})
        rows.append(
            [
                {"se": "se (r = 16)", "learned": "se (learned width)"}.get(v, v),
                f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}",
                mean_std([r["test_acc"] for r in rs]),
                mean_std([r["test_balanced_acc"] for r in rs]),
                f"{statistics.mean(r['images_per_s'] for r in rs):.0f}",
                " ".join(f"{100 * r['test_acc']:.1f}" for r in rs),
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    try:
        if unknown:
            raise SemodelError(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        if not args.data.is_dir():
            raise SemodelError(f"data folder not found: {args.data}")
        for v in variants:  # every config is valid before the first run starts
            run_config(args, v, args.seeds[0])
        results = [run_one(args, v, seed) for seed in args.seeds for v in variants]
    except SemodelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(
        f"\n{run_config(args, variants[0], args.seeds[0]).model.name}, seeds {args.seeds}, device: {device}, "
        f"torch {torch.__version__}"
    )
    print(summarize(results, variants))
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "argv": sys.argv[1:], "results": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
