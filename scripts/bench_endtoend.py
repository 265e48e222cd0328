"""End to end: ``semodel train`` against a plain PyTorch loop doing the same work, and where
semodel's wall time went.

    python scripts/bench_endtoend.py ../shared/data/msld/augmented --image-size 64 --epochs 3 --limit 800
    python scripts/bench_endtoend.py ../shared/data/msld/augmented --image-size 128 --epochs 3

Each side runs in a fresh process of its own, timed from its start to its end (both pay Python's
start and their imports). semodel: ``semodel.train.fit`` on the config (default
``configs/monkeypox/se_resnet18.yaml``, with ``--image-size``, ``--epochs``, ``--batch-size`` and
any ``--set key=value`` on top): what ``semodel train`` does after parsing its arguments, with its
data scan and split, validation metrics, TensorBoard, checkpoints and final test.

The reference is written plainly below (``reference_run``): the same model (``build_model`` with
the config's model options, memory format as ``train.channels_last``), the same training images,
batch size, epochs, AdamW settings (fused kernel where PyTorch has one for the device), cosine
schedule with warm-up, label smoothing, EMA (``AveragedModel``) and mixed precision in the training
step (semodel's ``train.amp`` rule: bf16 autocast on a GPU, and on a CPU that computes bf16
natively); training images decoded once into uint8 tensors kept large enough for the smallest
crop (as semodel's ``data.cache`` keeps them), and per image torchvision's random resized crop
(the config's scale, antialiased) and flips; the EMA weights' loss and accuracy (fp32, as semodel
scores) on the validation images every epoch and on the test images at the end; no checkpoints,
no logging. It
uses the split semodel's run wrote (``split.csv``), so both see the same images. Its wall time
includes decoding.

Printed: both wall times and the ratio (reference / semodel: 1.0 = no overhead, 0.9 = semodel takes
11% longer), semodel's own time budget (``metrics.json: time_budget``, where the semodel under test
has one) and the same parts measured from outside by wrapping ``semodel.train``'s functions (works
on any version: ``--semodel DIR`` imports semodel from DIR, e.g. a copy of an older tree). Last,
each epoch's validation time against ``semodel eval best.pt --split val`` on the same images in a
fresh process (its scoring: decoding, forward passes, metrics; its imports and start apart).

``--limit N`` trains on a subset: whole patients (``data.split.group_by``), in a seeded order,
until N images, linked (symlinks, never copies) into ``--workdir`` (default ``.bench/endtoend``,
git-ignored). ``--rounds R`` repeats both runs, the order alternating, and reports medians.
``--threads`` sets torch's intra-op threads for both (default: torch's). ``--json`` writes
every figure. ``--parts`` (DATA is then not read) times the pieces alone: an optimizer step per
kernel, an EMA update, the CPU copy a checkpoint write starts from. ``--step-ab`` times semodel's
training step in one process on batches read ahead against batches fed by the loader.
``--side-by-side`` starts both runs at the same time (with ``--threads 1`` each has a core of a
2-core machine): a shared machine's speed drifts by 10-20% over minutes, which moves runs timed one
after the other; side by side both see the same drift. The reference then reads a split.csv made
by semodel's own split function before either starts (checked against semodel's run).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "monkeypox" / "se_resnet18.yaml"
PARTS = ("startup", "data_wait", "train_step", "ema", "validation", "checkpoint", "logging", "final_test")


# ----------------------------------------------------------------------------- data subset


def subset(data: Path, limit: int, group_by: str, out: Path, seed: int = 0) -> Path:
    """``out``: symlinks to whole patients' images of ``data`` (class folders kept), >= ``limit`` images."""
    import random

    if out.exists():
        return out
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(data.glob("*/*")):
        if path.is_file():
            match = re.match(group_by, path.name)
            key = match.group(1) if match else path.name
            groups.setdefault((path.parent.name, key), []).append(path)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    chosen: list[Path] = []
    for key in keys:
        if len(chosen) >= limit:
            break
        chosen += groups[key]
    tmp = out.with_name(out.name + ".tmp")
    for path in chosen:
        (tmp / path.parent.name).mkdir(parents=True, exist_ok=True)
        (tmp / path.parent.name / path.name).symlink_to(path.resolve())
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------- semodel, timed from outside


class OutsideClock:
    """semodel's time budget measured by wrapping ``semodel.train``'s functions (any version)."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.t_fit = 0.0
        self.first_epoch: float | None = None
        self.validations: list[float] = []  # seconds of each epoch's validation
        self.saved: list[tuple[Any, str, Any]] = []

    def timed(self, fn: Callable, part: str) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] += time.perf_counter() - t0

        return wrapper

    def timed_validation(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.validations.append(time.perf_counter() - t0)
                self.parts["validation"] += self.validations[-1]

        return wrapper

    def install(self, train) -> None:
        clock = self
        setup_run, train_one_epoch = train.setup_run, train.train_one_epoch

        class TimedLoader:  # the training batches, with the time blocked in next() counted
            def __init__(self, loader) -> None:
                self.loader = loader

            def __len__(self) -> int:
                return len(self.loader)

            def __iter__(self):
                it = iter(self.loader)
                while True:
                    t0 = time.perf_counter()
                    item = next(it, None)
                    clock.parts["data_wait"] += time.perf_counter() - t0
                    if item is None:
                        return
                    yield item

        def setup(*args, **kwargs):
            run = setup_run(*args, **kwargs)
            run.loaders.train = TimedLoader(run.loaders.train)
            if run.ema is not None:
                run.ema.update_parameters = clock.timed(run.ema.update_parameters, "ema")
            return run

        def one_epoch(*args, **kwargs):
            if clock.first_epoch is None:
                clock.first_epoch = time.perf_counter()
            t0 = time.perf_counter()
            inner = clock.parts["data_wait"] + clock.parts["ema"]
            try:
                return train_one_epoch(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                clock.parts["train_step"] += spent - (clock.parts["data_wait"] + clock.parts["ema"] - inner)

        hooks = {
            "setup_run": setup,
            "train_one_epoch": one_epoch,
            "validate": self.timed_validation(train.validate),
            "save_state": self.timed(train.save_state, "checkpoint"),
            "record_epoch": self.timed(train.record_epoch, "logging"),
            "log_epoch": self.timed(train.log_epoch, "logging"),
            "finish_run": self.timed(train.finish_run, "final_test"),
        }
        for name, hook in hooks.items():
            self.saved.append((train, name, getattr(train, name)))
            setattr(train, name, hook)

    def uninstall(self) -> None:
        for module, name, fn in self.saved:
            setattr(module, name, fn)
        self.saved = []

    def report(self, wall: float) -> dict[str, float]:
        parts = dict(self.parts)
        parts["startup"] = (self.first_epoch or self.t_fit) - self.t_fit
        out = {k: round(v, 3) for k, v in parts.items()}
        out["other"] = round(wall - sum(parts.values()), 3)
        out["wall"] = round(wall, 3)
        return out


def semodel_run(cfg) -> dict[str, Any]:
    import semodel.train as train

    clock = OutsideClock()
    clock.install(train)
    try:
        clock.t_fit = t0 = time.perf_counter()
        run_dir = train.fit(cfg, quiet=True, log=lambda line: None)
        wall = time.perf_counter() - t0
    finally:
        clock.uninstall()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sizes = {f: (run_dir / f).stat().st_size for f in ("best.pt", "last.pt")}
    return {
        "wall": wall,
        "run_dir": str(run_dir),
        "budget": metrics.get("time_budget"),
        "outside": clock.report(wall),
        "test_acc": (metrics.get("test") or {}).get("acc"),
        "checkpoint_bytes": sizes,
        "validations": [round(v, 3) for v in clock.validations],
    }


def eval_run(run_dir: Path) -> dict[str, Any]:
    """``semodel eval best.pt --split val`` in this fresh process (no intervals): the time it takes
    to load the checkpoint and score the validation images (decoding, forward passes, metrics),
    after its imports."""
    import torchmetrics  # noqa: F401  (imports apart: validation pays them in fit's process once)
    from torchvision.transforms import v2  # noqa: F401

    from semodel.evaluate import EvalOptions, evaluate_checkpoint

    t0 = time.perf_counter()
    options = EvalOptions(split="val", resamples=0)
    result = evaluate_checkpoint(run_dir / "best.pt", options=options, log=lambda line: None)
    return {"eval_s": time.perf_counter() - t0, "images": int(result.targets.numel())}


# ----------------------------------------------------------------------------- the reference loop


def reference_run(cfg, split_csv: Path, device) -> dict[str, Any]:
    """The same work as ``semodel train`` on ``cfg``, in a plain PyTorch loop (see the module docstring)."""
    import csv

    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from semodel.models import build_model
    from semodel.runtime import amp_dtype, autocast

    t_start = time.perf_counter()
    parts = dict.fromkeys(("decode", "train_step", "ema", "validation", "final_test"), 0.0)
    d, a, o, t = cfg.data, cfg.data.augment, cfg.optim, cfg.train
    root = Path(d.root).expanduser()
    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["class"] for r in rows})
    size, resize = d.image_size, int(round(d.image_size / d.crop_ratio))

    def keep(x: torch.Tensor) -> torch.Tensor:
        # kept large enough that the smallest crop (area scale[0], aspect 3/4) still has `size` pixels a side
        h, w = x.shape[-2:]
        f = min(1.0, math.sqrt(size**2 / (a.scale[0] * 3 / 4) / (h * w)))
        return TF.resize(x, [math.ceil(h * f), math.ceil(w * f)], antialias=True)

    def decode(split: str, crop: int | None) -> tuple[Any, torch.Tensor]:
        chosen = [r for r in rows if r["split"] == split]
        images = []
        for r in chosen:
            with Image.open(root / r["path"]) as image:
                x = TF.pil_to_tensor(image.convert("RGB"))
            if crop is None:
                images.append(keep(x))
            else:
                images.append(TF.center_crop(TF.resize(x, [resize], antialias=True), [crop, crop]))
        labels = torch.tensor([classes.index(r["class"]) for r in chosen])
        return (images if crop is None else torch.stack(images).to(device)), labels.to(device)

    t0 = time.perf_counter()
    train_x, train_y = decode("train", None)
    val_x, val_y = decode("val", size)
    test_x, test_y = decode("test", size)
    parts["decode"] = time.perf_counter() - t0
    mean = torch.tensor(d.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(d.std, device=device).view(1, 3, 1, 1)
    crop = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(a.scale), antialias=True),
            v2.RandomHorizontalFlip(a.hflip),
            v2.RandomVerticalFlip(a.vflip),
        ]
    )

    def augment(index: list[int]) -> torch.Tensor:
        x = torch.stack([crop(train_x[i]) for i in index]).to(device)
        return (x.float() / 255 - mean) / std

    def evaluate(model, images, labels) -> tuple[float, float]:
        model.eval()
        loss, correct = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(images), 2 * d.batch_size):
                x = (images[i : i + 2 * d.batch_size].float() / 255 - mean) / std
                x = x.contiguous(memory_format=memory_format)
                logits = model(x).float()  # fp32, as semodel scores
                y = labels[i : i + 2 * d.batch_size]
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
        return loss / len(images), correct / len(images)

    from semodel.checkpoint import model_options

    options = model_options(cfg.to_dict())
    model = build_model(options.pop("name"), num_classes=len(classes), **options).to(device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # as semodel's train.channels_last
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused
    )
    steps = math.ceil(len(train_x) / d.batch_size)
    total, warmup = t.epochs * steps, int(round(cfg.schedule.warmup_epochs * steps))

    def factor(i: int) -> float:
        if i < warmup:
            return 0.01 + 0.99 * i / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, total - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    amp = amp_dtype(t.amp, device)  # semodel's rule: bf16 where the GPU or CPU computes it natively
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    generator = torch.Generator().manual_seed(t.seed)
    for _ in range(t.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), d.batch_size):
            index = order[i : i + d.batch_size]
            with autocast(device, amp):
                logits = model(augment(index.tolist()).contiguous(memory_format=memory_format))
            loss = F.cross_entropy(logits.float(), train_y[index], label_smoothing=t.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            t1 = time.perf_counter()
            ema.update_parameters(model)
            parts["ema"] += time.perf_counter() - t1
        loss.item()  # (waits for the device)
        parts["train_step"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        val_loss, val_acc = evaluate(ema.module, val_x, val_y)
        parts["validation"] += time.perf_counter() - t0
    parts["train_step"] -= parts["ema"]
    t0 = time.perf_counter()
    test_loss, test_acc = evaluate(ema.module, test_x, test_y)
    parts["final_test"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    return {"wall": wall, "parts": {k: round(v, 3) for k, v in parts.items()}, "test_acc": test_acc}


# ----------------------------------------------------------------------------- report


def share_line(parts: dict[str, float], wall: float) -> str:
    shown = [(k, v) for k, v in parts.items() if k not in ("wall", "checkpoint_background") and v >= 0.05]
    return ", ".join(f"{k} {v:.1f}s ({v / wall:.1%})" for k, v in sorted(shown, key=lambda kv: -kv[1]))


def parts_timing(threads: int | None) -> None:
    """``--parts``: the pieces the end-to-end figures hinge on, alone: an optimizer step per kernel
    (per-tensor loop, foreach, fused), an EMA update (AveragedModel, semodel's EMA) and the CPU copy
    of the state a checkpoint write starts from (median ms, SE-ResNet-18, 11.3 M parameters)."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from semodel.checkpoint import cpu_copy
    from semodel.models import build_model
    from semodel.optim import EMA, param_groups

    if threads:
        torch.set_num_threads(threads)
    model = build_model("se_resnet18", num_classes=2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def ms(fn: Callable, n: int = 9) -> float:
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name, kind, extra in (
        ("AdamW", torch.optim.AdamW, {"betas": (0.9, 0.999)}),
        ("SGD momentum", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ):
        row = []
        for label, kernel in (
            ("loop", {"foreach": False}),
            ("foreach", {"foreach": True}),
            ("fused", {"fused": True}),
        ):
            optimizer = kind(param_groups(model, 0.05, 1e-3), lr=1e-3, **extra, **kernel)
            row.append(f"{label} {ms(optimizer.step):.0f} ms")
        print(f"{name} step: " + ", ".join(row))
    plain = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.995), use_buffers=True)
    lean = EMA(model, 0.995)
    print(
        f"EMA update: AveragedModel {ms(lambda: plain.update_parameters(model)):.0f} ms, "
        f"semodel.optim.EMA {ms(lambda: lean.update_parameters(model)):.0f} ms"
    )
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "ema": lean.module.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    size = sum(t.numel() * t.element_size() for t in _tensors(state)) / 2**20
    print(
        f"CPU copy of weights + EMA + AdamW state ({size:.0f} MiB): {ms(lambda: cpu_copy(state), 5):.0f} ms"
    )


def step_ab(args, rounds: int = 8) -> None:
    """``--step-ab``: is semodel's training step slower when the loader decodes between steps?
    In one process (one machine state), alternately 10 steps on batches read ahead and 6 steps fed
    by the training loader, ``rounds`` times; the median step time (ms) of each, the loader's
    time apart. Differences between whole runs' steps are then the machine's, not the pipeline's."""
    import itertools

    import torch

    import semodel.train as train
    from semodel.distributed import World

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = config_of(args)
    run = train.setup_run(cfg, World(), train.Start(None, None, None, lambda line: None, True))
    run.resumed = True  # (a new run logs sample images from its first step)
    run.train_model.train()

    def step_ms(batches, n: int) -> float:
        spent, it = 0.0, iter(batches)
        for _ in range(n):
            images, labels = next(it)
            t0 = time.perf_counter()
            train.forward_backward(run, 2, images, labels, True)
            train.optimizer_step(run)
            spent += time.perf_counter() - t0
        return spent / n * 1000

    run.loaders.sampler.set_epoch(1)
    ahead = list(itertools.islice(iter(run.loaders.train), 10))
    step_ms(ahead, 5)  # warm-up
    run.loaders.sampler.set_epoch(2)
    fed = iter(run.loaders.train)
    a, b = [], []
    for _ in range(rounds):
        a.append(step_ms(ahead, 10))
        b.append(step_ms(fed, 6))
    ahead_ms, fed_ms = statistics.median(a), statistics.median(b)
    print(
        f"training step, median of {rounds}: batches read ahead {ahead_ms:.1f} ms, "
        f"fed by the loader {fed_ms:.1f} ms (ratio {fed_ms / ahead_ms:.3f})"
    )


def _tensors(obj: Any):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="an ImageFolder (MSLD: ../shared/data/msld/augmented)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--limit", type=int, default=None, help="about N images (whole patients)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for semodel")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-reference", action="store_true", help="time semodel only")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="run semodel and the reference at the same time (with --threads 1: a core each)",
    )
    p.add_argument("--workdir", type=Path, default=REPO / ".bench" / "endtoend")
    p.add_argument("--semodel", type=Path, default=None, help="import semodel from this folder")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--parts", action="store_true", help="time the optimizer step, EMA update and state copy")
    p.add_argument("--step-ab", action="store_true", help="the step on batches read ahead vs from the loader")
    p.add_argument("--child", choices=["semodel", "reference", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--split-csv", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_of(args):
    """The semodel config of the run, and the data folder (the --limit subset)."""
    from semodel.config import load_config

    data = args.data.expanduser().resolve()
    if args.limit:
        group_by = load_config(args.config, []).data.split.group_by or r"^(.*)$"
        data = subset(data, args.limit, group_by, args.workdir / f"data-{args.limit}")
    overrides = [
        f"data.root={data}",
        f"data.image_size={args.image_size}",
        f"train.epochs={args.epochs}",
        f"train.device={args.device}",
        f"log.out_dir={args.workdir / 'runs'}",
        f"log.name=e2e-{args.image_size}px",
        *([f"data.batch_size={args.batch_size}"] if args.batch_size else []),
        *args.overrides,
    ]
    return load_config(args.config, overrides), data


def child(args) -> None:
    """One timed run in this fresh process (both sides pay their own imports); the result as JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = config_of(args)
    if args.child == "eval":  # --split-csv: the run's split.csv, in the run folder
        result = eval_run(args.split_csv.parent)
    elif args.child == "semodel":
        result = semodel_run(cfg)
    else:
        result = reference_run(cfg, args.split_csv, torch.device(args.device))
    result["threads"] = torch.get_num_threads()
    args.out.write_text(json.dumps(result, default=str))


def child_command(argv: list[str], who: str, out: Path, split_csv: Path | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", who, "--out", str(out)]
    return command + (["--split-csv", str(split_csv)] if split_csv is not None else [])


def timed_child(argv: list[str], who: str, out: Path, split_csv: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run(child_command(argv, who, out, split_csv), check=True)
    result = json.loads(out.read_text())
    result["process_wall"] = time.perf_counter() - t0  # with Python's start and the imports
    return result


def side_by_side(argv: list[str], workdir: Path, split_csv: Path) -> dict[str, Any]:
    """semodel and the reference started together, each in its own process (``--threads 1``: one
    core each). The speed of a shared machine drifts by 10-20% over minutes, which moves runs
    timed one after the other; running side by side, both see the same drift."""
    running = {}
    for who in ("semodel", "reference"):
        out = workdir / f"{who}.json"
        command = child_command(argv, who, out, split_csv if who == "reference" else None)
        running[who] = (subprocess.Popen(command), out)
    t0, row = time.perf_counter(), {}
    try:
        while running:
            for who, (proc, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                if proc.returncode != 0:
                    raise subprocess.CalledProcessError(proc.returncode, f"the {who} run")
                row[who] = json.loads(out.read_text()) | {"process_wall": time.perf_counter() - t0}
                del running[who]
            time.sleep(0.05)
    finally:  # one run failed (or Ctrl-C): the other is not left running on its own
        for proc, _ in running.values():
            proc.kill()
    return row


def reference_split(cfg, workdir: Path) -> Path:
    """split.csv of the data as semodel splits it (the same function, config and seed), for a
    reference that starts before semodel's run has written its own."""
    from semodel.data import prepare_dataset, write_split_csv

    path = workdir / "split.csv"
    write_split_csv(prepare_dataset(cfg, log=lambda line: None), path)
    return path


def timed_rounds(args, argv: list[str], cfg) -> list[dict[str, Any]]:
    """``--rounds`` pairs of runs: side by side, or one after the other in alternating order."""
    rounds: list[dict[str, Any]] = []
    split_csv = reference_split(cfg, args.workdir) if args.side_by_side else None
    for r in range(args.rounds):
        if split_csv is not None:
            rounds.append(side_by_side(argv, args.workdir, split_csv))
            same = Path(rounds[-1]["semodel"]["run_dir"], "split.csv").read_bytes() == split_csv.read_bytes()
            print(
                f"round {r + 1} (side by side): semodel {rounds[-1]['semodel']['process_wall']:.1f}s, "
                f"reference {rounds[-1]['reference']['process_wall']:.1f}s"
                + ("" if same else "  (warning: semodel's split.csv differs from the reference's)"),
                flush=True,
            )
            continue
        row: dict[str, Any] = {}
        order = ["semodel", "reference"] if r % 2 == 0 or args.no_reference else ["reference", "semodel"]
        for who in order:
            out = args.workdir / f"{who}.json"
            if who == "semodel":
                row["semodel"] = timed_child(argv, "semodel", out)
            elif not args.no_reference:  # the split of semodel's run (this round's or the last)
                split_run = row.get("semodel") or rounds[-1]["semodel"]
                row["reference"] = timed_child(
                    argv, "reference", out, Path(split_run["run_dir"]) / "split.csv"
                )
            if who in row:
                print(f"round {r + 1}: {who} {row[who]['process_wall']:.1f}s", flush=True)
        rounds.append(row)
    return rounds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    sys.path.insert(0, str((args.semodel or REPO).resolve()))
    if args.child:
        child(args)
        return 0
    if args.parts:
        parts_timing(args.threads)
        return 0
    if args.step_ab:
        step_ab(args)
        return 0
    import torch

    import semodel

    cfg, data = config_of(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"semodel {semodel.__file__}  torch {torch.__version__}  threads {args.threads or 'default'}  "
        f"{args.device}  {cfg.model.name} {args.image_size}px  batch {cfg.data.batch_size}  "
        f"epochs {args.epochs}  data {data}",
        flush=True,
    )
    rounds = timed_rounds(args, argv, cfg)
    # semodel eval on the validation images of the last run, in a fresh process of its own.
    last_run = Path(rounds[-1]["semodel"]["run_dir"])
    try:
        rounds[-1]["eval"] = timed_child(argv, "eval", args.workdir / "eval.json", last_run / "split.csv")
    except subprocess.CalledProcessError:  # a semodel without semodel.evaluate's API (--semodel)
        rounds[-1]["eval"] = None
    report(args, rounds, data)
    return 0


def report(args, rounds: list[dict[str, Any]], data: Path) -> None:
    s_wall = statistics.median(r["semodel"]["process_wall"] for r in rounds)
    last = rounds[-1]["semodel"]
    print()
    print(
        f"semodel train: {s_wall:.1f}s (median of {len(rounds)}; fit itself {last['wall']:.1f}s)  "
        f"checkpoints: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in last["checkpoint_bytes"].items())
    )
    if not args.no_reference:
        r_wall = statistics.median(r["reference"]["process_wall"] for r in rounds)
        ratios = [r["reference"]["process_wall"] / r["semodel"]["process_wall"] for r in rounds]
        ref = rounds[-1]["reference"]
        print(f"reference loop: {r_wall:.1f}s  ({share_line(ref['parts'], ref['wall'])})")
        work = ref["parts"]["train_step"] + ref["parts"]["validation"]
        print(
            f"reference outside its training step {1 - ref['parts']['train_step'] / ref['wall']:.1%}, "
            f"outside the step and validation's forward passes {1 - work / ref['wall']:.1%}"
        )
        print(
            f"ratio reference / semodel: {statistics.median(ratios):.3f}  (per round: "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + "; >= 0.9: semodel within 11% of the plain loop)"
        )
    budget = last["budget"]
    if budget:
        outside = budget["wall"] - budget["train_step"]
        work = budget["train_step"] + budget.get("validation", 0.0)  # forward passes only since val_data
        print(
            f"semodel time budget (metrics.json): outside the training step {outside / budget['wall']:.1%}, "
            f"outside the step and validation's forward passes {1 - work / budget['wall']:.1%}, "
            f"checkpoint writes {budget['checkpoint'] / budget['wall']:.1%} "
            f"(+ {budget['checkpoint_background']:.1f}s in the background)"
        )
        print(f"  {share_line(budget, budget['wall'])}")
    outside = last["outside"]
    print(f"semodel parts timed from outside: {share_line(outside, outside['wall'])}")
    validations, scored = last["validations"], rounds[-1]["eval"]
    if scored is None:
        print("validation per epoch: " + ", ".join(f"{v:.2f}s" for v in validations) + "; eval: failed")
        return _write_json(args, rounds, data)
    print(
        "validation per epoch: "
        + ", ".join(f"{v:.2f}s" for v in validations)
        + f"; semodel eval on the same {scored['images']} images (after its imports): {scored['eval_s']:.2f}s"
        + f"; later epochs / eval: {statistics.median(validations[1:] or validations) / scored['eval_s']:.2f}"
    )
    _write_json(args, rounds, data)


def _write_json(args, rounds: list[dict[str, Any]], data: Path) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"data": str(data)}, "rounds": rounds}
        args.json.write_text(json.dumps(record, default=str, indent=1))


if __name__ == "__main__":
    sys.exit(main())
