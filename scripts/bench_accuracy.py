"""The accuracy guard: one recipe, several seeds, trained each way a speed change allows, and the
test accuracy of every run with the paired difference per seed.

    python scripts/bench_accuracy.py ../shared/data/msld/augmented --image-size 64 --epochs 20 --seeds 0 1 2 3

Every change to the data path or the training step names this check beside its speed figure
(docs/performance.md). By default three ways are compared:

- ``uncached-fp32``: ``data.cache: none``, ``train.amp: off`` (the reference: the DataLoader path
  crops the full-resolution photo, fp32 throughout);
- ``cached-fp32``: ``data.cache: auto``, ``train.amp: off``;
- ``default``: the defaults (``data.cache: auto``, ``train.amp: auto``: bf16 on CPUs that compute
  it natively).

``--variant NAME=key=value,key=value`` replaces them (the first is the reference). Seed s sets both
``data.split.seed`` and ``train.seed``: the runs of one seed share the split (grouped by patient, as
the recipe's ``data.split.group_by`` says) and the initial weights, so their difference is the
change's, and the spread over seeds is the noise of the split and the training. Each run is
``semodel train`` in a process of its own, into ``--workdir`` (default ``.bench/accuracy``,
git-ignored); a run whose metrics.json exists is not trained again, so a killed benchmark
continues where it stopped (``--fresh`` starts over).

Printed: per seed the test accuracy (and balanced accuracy) of each way, the paired difference to
the reference, then mean +- std over seeds, the mean paired difference +- its std, how many seeds
each way won, and the wall time per run. ``--json`` writes every figure.

``--inference`` then scores each seed's best.pt of the last way on its test split as ``eval`` and
``predict`` do, in fp32 and under bf16 autocast, on the same decoded batches: the forward passes'
images/s both ways, the accuracy both ways, how many top-1 answers differ and the largest
difference of a probability.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "monkeypox" / "se_resnet18.yaml"
DEFAULT_VARIANTS = (
    "uncached-fp32=data.cache=none,train.amp=off",
    "cached-fp32=data.cache=auto,train.amp=off",
    "default=",
)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value,key=value")
    return name, [s for s in sets.split(",") if s]


def train_once(args: argparse.Namespace, name: str, sets: list[str], seed: int) -> dict:
    """One ``semodel train`` run (or the one already done): its metrics.json and wall time."""
    run_name = f"{name}-seed{seed}"
    run_dir = args.workdir / run_name
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way: train it again
        overrides = [
            f"data.root={args.data}",
            f"data.image_size={args.image_size}",
            f"train.epochs={args.epochs}",
            f"data.split.seed={seed}",
            f"train.seed={seed}",
            f"log.out_dir={args.workdir}",
            f"log.name={run_name}",
            *args.set,
            *sets,
        ]
        command = [sys.executable, "-m", "semodel", "train", "--config", str(args.config), "--quiet"]
        for item in overrides:
            command += ["--set", item]
        print(f"[{time.strftime('%H:%M:%S')}] {run_name}: semodel train ... {' '.join(sets)}", flush=True)
        log = args.workdir / f"{run_name}.log"
        with open(log, "w") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        if code != 0:
            raise SystemExit(f"{run_name} failed (exit {code}); see {log}")
    metrics = json.loads(metrics_file.read_text())
    test = metrics["test"]
    return {
        "acc": test["acc"],
        "balanced_acc": test["balanced_acc"],
        "n_test": test["n"],
        "best_epoch": metrics["best"]["epoch"] if isinstance(metrics.get("best"), dict) else None,
        "wall_s": metrics["wall_time_s"],
        "train_step_s": metrics.get("time_budget", {}).get("train_step"),
    }


def score_both_ways(run_dir: Path) -> dict:
    """best.pt of ``run_dir`` on its test split, in fp32 and under bf16 autocast (forward passes timed
    on batches decoded beforehand)."""
    import torch

    from semodel.checkpoint import build_from_checkpoint, load_checkpoint
    from semodel.evalsets import run_eval_set
    from semodel.loaders import eval_loader
    from semodel.runtime import predict_probs

    state = load_checkpoint(run_dir / "best.pt")
    model = build_from_checkpoint(state).to(memory_format=torch.channels_last)
    images = run_eval_set(state, run_dir / "best.pt", "test")
    batches = list(eval_loader(images.root, images.samples, state["preprocess"], 64))
    cpu, out = torch.device("cpu"), {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        predict_probs(model, batches[:1], cpu, dtype, channels_last=True)  # warm-up
        t0 = time.perf_counter()
        probs, targets, _ = predict_probs(model, batches, cpu, dtype, channels_last=True)
        seconds = time.perf_counter() - t0
        out[name] = {"probs": probs, "images_per_s": len(targets) / seconds}
        out[name]["acc"] = float((probs.argmax(1) == targets).float().mean())
    return {
        "n": len(targets),
        "fp32_images_per_s": out["fp32"]["images_per_s"],
        "bf16_images_per_s": out["bf16"]["images_per_s"],
        "fp32_acc": out["fp32"]["acc"],
        "bf16_acc": out["bf16"]["acc"],
        "top1_differ": int((out["fp32"]["probs"].argmax(1) != out["bf16"]["probs"].argmax(1)).sum()),
        "max_prob_diff": float((out["fp32"]["probs"] - out["bf16"]["probs"]).abs().max()),
    }


def print_inference(rows: dict[int, dict]) -> None:
    head = ("seed", "test images", "fp32 img/s", "bf16 img/s", "ratio", "fp32 acc", "bf16 acc")
    print("\n| " + " | ".join((*head, "top-1 differ", "max prob diff")) + " |")
    print("|---" * (len(head) + 2) + "|")
    for seed, r in rows.items():
        fp32, bf16 = r["fp32_images_per_s"], r["bf16_images_per_s"]
        print(
            f"| {seed} | {r['n']} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x | {r['fp32_acc']:.2%} | "
            f"{r['bf16_acc']:.2%} | {r['top1_differ']} | {r['max_prob_diff']:.4f} |"
        )


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(names: list[str], seeds: list[int], results: dict) -> dict:
    """Mean +- std per way, and the paired differences to the reference (the first way)."""
    ref = names[0]
    summary = {}
    for name in names:
        acc = [results[name][s]["acc"] for s in seeds]
        diff = [results[name][s]["acc"] - results[ref][s]["acc"] for s in seeds]
        walls = [results[name][s]["wall_s"] for s in seeds]
        summary[name] = {
            "acc_mean": mean_std(acc)[0],
            "acc_std": mean_std(acc)[1],
            "balanced_acc_mean": statistics.mean(results[name][s]["balanced_acc"] for s in seeds),
            "diff_mean": mean_std(diff)[0],
            "diff_std": mean_std(diff)[1],
            "seeds_better": sum(d > 0 for d in diff),
            "seeds_worse": sum(d < 0 for d in diff),
            "wall_s_mean": statistics.mean(walls),
        }
    return summary


def print_tables(names: list[str], seeds: list[int], results: dict, summary: dict) -> None:
    ref = names[0]
    print("\n| seed | " + " | ".join(names) + " | " + " | ".join(f"{n} - {ref}" for n in names[1:]) + " |")
    print("|---" * (len(names) * 2) + "|")
    for s in seeds:
        accs = [f"{results[n][s]['acc']:.2%}" for n in names]
        diffs = [f"{(results[n][s]['acc'] - results[ref][s]['acc']) * 100:+.2f}" for n in names[1:]]
        print(f"| {s} | " + " | ".join(accs + diffs) + " |")
    print(
        "\n| way | test acc, mean +- std | balanced acc, mean | paired diff to " + ref + " (points) "
        "| seeds better / worse | wall time per run |"
    )
    print("|---|---|---|---|---|---|")
    for n in names:
        m = summary[n]
        diff = "(reference)" if n == ref else f"{m['diff_mean'] * 100:+.2f} +- {m['diff_std'] * 100:.2f}"
        wins = "" if n == ref else f"{m['seeds_better']} / {m['seeds_worse']}"
        print(
            f"| {n} | {m['acc_mean']:.2%} +- {m['acc_std']:.2%} | {m['balanced_acc_mean']:.2%} | {diff} "
            f"| {wins} | {m['wall_s_mean']:.0f} s |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="an ImageFolder, e.g. ../shared/data/msld/augmented")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--variant", action="append", default=None, help="NAME=key=value,... (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value for every run")
    p.add_argument("--workdir", type=Path, default=REPO / ".bench" / "accuracy")
    p.add_argument("--fresh", action="store_true", help="train every run again")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--inference", action="store_true", help="score best.pt in fp32 and bf16 too")
    args = p.parse_args(argv)
    args.data, args.workdir = args.data.resolve(), args.workdir.resolve()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: not a folder")
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = dict(parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS))
    names = list(variants)
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    for seed in args.seeds:  # seed by seed: a stopped benchmark still has whole pairs
        for name in names:
            results[name][seed] = train_once(args, name, variants[name], seed)
    summary = summarize(names, args.seeds, results)
    print(
        f"\n{args.data}, {args.config.name} at {args.image_size} px, {args.epochs} epochs, seeds "
        f"{' '.join(map(str, args.seeds))}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    print_tables(names, args.seeds, results, summary)
    inference = {}
    if args.inference:
        inference = {s: score_both_ways(args.workdir / f"{names[-1]}-seed{s}") for s in args.seeds}
        print(f"\neach seed's {names[-1]} best.pt on its test split, fp32 against bf16 autocast:")
        print_inference(inference)
    if args.json:
        payload = {"variants": variants, "seeds": args.seeds, "results": results, "summary": summary}
        payload["inference"] = inference
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
