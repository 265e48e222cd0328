"""SIGKILL ``semodel train`` at random moments, resume each time, and check that nothing is lost.

    python scripts/kill_resume.py --kills 20 [--seed 0] [--epochs 4] [--workdir DIR] [--plain]

1. Generates a small ImageFolder (3 texture classes x 12 JPEGs) and a deterministic CPU config:
   se_resnet18 (cifar stem) at 16 px, batch 4 (5 optimizer steps per epoch), EMA, mixup, a
   test split, ``train.deterministic: true``, ``data.num_workers: 0``, one thread per process.
2. Trains it once straight: the reference.
3. Starts ``semodel train`` (``--config`` the first time, then ``--resume <run>/last.pt``) and
   kills it with SIGKILL, ``--kills`` times. Each kill aims (seeded) at startup, a training
   epoch, validation, a checkpoint write, the final test, or anywhere, and fires after a random
   delay into it (up to how long that phase took in the reference run). After every kill each
   ``*.pt`` in the run folder must load with ``torch.load(weights_only=True)`` and with
   ``semodel.checkpoint.load_checkpoint``.
4. Resumes once more, without a kill, until the run completes, and compares last.pt, best.pt
   and metrics.json with the reference: every tensor ``torch.equal`` (weights, EMA, optimizer
   state, RNG states), and the same progress, best epoch and metrics.

Prints ``kills survived: K / corrupted checkpoints: C / final weights match: yes|no`` and where
the kills landed; exits 1 if any check fails.

A kill before the first ``last.pt`` exists leaves a run folder with nothing to resume: the script
deletes that folder and starts again with ``--config`` (what a user would do; ``--config`` alone
would make a second folder, ``<name>-2``).

Each ``semodel train`` runs through this script's ``--child`` wrapper: semodel's own entry point
(``semodel.cli.main``, as ``python -m semodel``) with hooks that append "phase begins/ends" lines
to a trace file; they only write lines. The trace aims the kills and tells where each one landed.
A checkpoint temp file (``.last.pt.XXXX.tmp``) found after a kill proves that the kill hit
``save_checkpoint`` between creating the temp file and renaming it. ``--plain`` runs
``python -m semodel train`` itself and kills at uniform random times (then only the temp files
tell where a kill landed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLASSES = 3
PER_CLASS = 12  # 6 train, 3 val, 3 test per class
# What the kills aim at, in these proportions; the last ~10% of the kills aim at the final test.
AIM_SHARES = {"anywhere": 0.15, "startup": 0.1, "train": 0.25, "val": 0.2, "save": 0.3}
ATTEMPT_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- the child process


def child(trace: str, argv: list[str]) -> None:
    """``semodel ARGV`` with phase marks: ``<time> + <phase>`` on entry, ``<time> - <phase>`` on exit."""
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def mark(sign: str, name: str) -> None:
        os.write(fd, f"{time.time():.6f} {sign} {name}\n".encode())

    mark("+", "startup")
    import functools
    import inspect

    import semodel.cli
    import semodel.train as train

    now = {"epoch": 0, "startup": True, "finish": False}

    def hook(fn, label):
        @functools.wraps(fn)
        def hooked(*args, **kwargs):
            if now["startup"]:
                now["startup"] = False
                mark("-", "startup")
            name = label(args, kwargs)
            mark("+", name)
            try:
                return fn(*args, **kwargs)
            finally:
                mark("-", name)

        return hooked

    signature = inspect.signature(train.train_one_epoch)

    def train_label(args, kwargs):
        now["epoch"] = signature.bind(*args, **kwargs).arguments["epoch"]
        return f"train {now['epoch']}"

    def finish_label(args, kwargs):
        now["finish"] = True
        return "finish"

    train.train_one_epoch = hook(train.train_one_epoch, train_label)
    train.predict_probs = hook(
        train.predict_probs, lambda a, k: "test" if now["finish"] else f"val {now['epoch']}"
    )
    train.save_checkpoint = hook(train.save_checkpoint, lambda a, k: f"save {Path(a[1]).name} {now['epoch']}")
    train.finish_run = hook(train.finish_run, finish_label)
    sys.argv = ["semodel", *argv]
    semodel.cli.main()


# ----------------------------------------------------------------------------- setup


def write_config(
    path: Path, data_root: Path, out_dir: Path, name: str, epochs: int, tensorboard: bool
) -> Path:
    import yaml

    config = {
        "model": {"name": "se_resnet18", "stem": "cifar"},
        "data": {
            "root": str(data_root),
            "image_size": 16,
            "batch_size": 4,
            "num_workers": 0,
            "split": {"val": 0.25, "test": 0.25, "seed": 0},
            "augment": {"scale": [0.5, 1.0], "hflip": 0.5},
            "mixup": 0.2,
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "train": {
            "epochs": epochs,
            "device": "cpu",
            "seed": 0,
            "deterministic": True,
            "ema": True,
            "ema_decay": 0.9,
            "label_smoothing": 0.1,
            "monitor": "val_loss",
        },
        "log": {"out_dir": str(out_dir), "name": name, "tensorboard": tensorboard},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepare(workdir: Path, epochs: int, tensorboard: bool = True) -> dict[str, Path]:
    from semodel.synthetic import make_synthetic

    data = workdir / "data"
    if not data.exists():
        make_synthetic(data, CLASSES, PER_CLASS, size=24, seed=0)
    runs = workdir / "runs"
    return {
        "reference": write_config(workdir / "reference.yaml", data, runs, "reference", epochs, tensorboard),
        "killed": write_config(workdir / "killed.yaml", data, runs, "killed", epochs, tensorboard),
        "runs": runs,
        "logs": workdir / "logs",
    }


# ----------------------------------------------------------------------------- one attempt


def command(args: list[str], trace: Path, plain: bool) -> list[str]:
    if plain:
        return [sys.executable, "-m", "semodel", *args]
    return [sys.executable, str(Path(__file__).resolve()), "--child", str(trace), "--", *args]


def child_env() -> dict[str, str]:
    # One thread in every process: the reference and the killed runs compute alike, and a
    # second OpenMP thread only spins on a busy 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def read_trace(trace: Path) -> list[tuple[float, str, str]]:
    """(time, '+' or '-', phase) per complete line."""
    if not trace.exists():
        return []
    lines = trace.read_text().split("\n")[:-1]  # the last piece is empty or an unfinished line
    out = []
    for line in lines:
        t, sign, name = line.split(" ", 2)
        out.append((float(t), sign, name))
    return out


def landed_in(events: list[tuple[float, str, str]]) -> str:
    """The phase a process was in when its trace stopped: the innermost one still open."""
    stack: list[str] = []
    last = "start"
    for _, sign, name in events:
        if sign == "+":
            stack.append(name)
        elif stack and stack[-1] == name:
            stack.pop()
        last = name
    if stack:
        return stack[-1]
    return f"between phases (after {last})" if events else "startup"


def category(phase: str, temp_files: list[str]) -> str:
    if temp_files or phase.startswith("save "):
        return "checkpoint write"
    if phase == "unknown":
        return "unknown (--plain: no trace)"
    for prefix, what in (
        ("train", "training step"),
        ("val", "validation"),
        ("test", "final test"),
        ("finish", "final test"),
        ("startup", "startup"),
    ):
        if phase.startswith(prefix):
            return what
    return "between phases (logging, TensorBoard, loader setup)"


def phase_durations(events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Median seconds per kind of phase in a trace; ``save`` is all the writes of one epoch."""
    opened: dict[str, float] = {}
    spans: dict[str, list[float]] = {}
    saves: dict[str, float] = {}
    for t, sign, name in events:
        if sign == "+":
            opened[name] = t
            continue
        span = t - opened.pop(name, t)
        kind = name.split()[0]
        if kind == "save":
            epoch = name.split()[-1]
            saves[epoch] = saves.get(epoch, 0.0) + span
        else:
            spans.setdefault(kind, []).append(span)
    durations = {kind: statistics.median(v) for kind, v in spans.items()}
    durations["save"] = statistics.median(saves.values()) if saves else 0.5
    return durations


@dataclass
class Attempt:
    rc: int | None  # None: killed
    seconds: float
    trace: list[tuple[float, str, str]]
    log: Path


def run_attempt(
    args: list[str], trace: Path, log: Path, plain: bool, trigger: str | None = None, delay: float = 0.0
) -> Attempt:
    """Run ``semodel ARGS``; with a trigger, SIGKILL it ``delay`` s after the trace shows ``+ trigger``.

    ``trigger`` "" means the process start. A process that ends by itself first is not killed.
    """
    trace.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command(args, trace, plain), stdout=out, stderr=subprocess.STDOUT, env=child_env()
        )
        try:
            if trigger is None:
                rc = process.wait(timeout=ATTEMPT_TIMEOUT_S)
                return Attempt(rc, time.time() - t0, read_trace(trace), log)
            start = t0
            if trigger:
                start = None
                while start is None and process.poll() is None and time.time() - t0 < ATTEMPT_TIMEOUT_S:
                    marks = read_trace(trace)
                    start = next((t for t, sign, name in marks if sign == "+" and name == trigger), None)
                    if start is None:
                        time.sleep(0.002)
            if start is not None:
                while process.poll() is None and time.time() < start + delay:
                    time.sleep(min(0.002, max(0.0, start + delay - time.time())))
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return Attempt(None, time.time() - t0, read_trace(trace), log)
            return Attempt(process.returncode, time.time() - t0, read_trace(trace), log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# ----------------------------------------------------------------------------- checks


def check_checkpoints(run_dir: Path) -> tuple[dict[str, int], list[str]]:
    """Every ``*.pt`` in ``run_dir``: epoch per loadable file, and the problems of the others."""
    import torch

    from semodel.checkpoint import load_checkpoint

    epochs, problems = {}, []
    for path in sorted(run_dir.glob("*.pt")):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            epochs[path.name] = int(raw["epoch"])
            load_checkpoint(path)
        except Exception as e:  # any failure to load is the finding
            first = str(e).splitlines()[0][:200] if str(e) else ""
            problems.append(f"{path.name}: {type(e).__name__}: {first}")
    return epochs, problems


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp")) if run_dir.exists() else []


def _differences(a: Any, b: Any, where: str, out: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        if not same:
            out.append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out.append(f"{where} (keys {sorted(set(a) ^ set(b), key=str)[:5]})")
        for key in a.keys() & b.keys():
            _differences(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where} (length {len(a)} vs {len(b)})")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _differences(x, y, f"{where}[{i}]", out)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):  # NaN == NaN
        out.append(where)


def _without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timing = ("images_per_s", "epoch_time_s")
    return [{**h, "train": {k: v for k, v in h["train"].items() if k not in timing}} for h in history]


def compare_runs(reference: Path, run_dir: Path) -> list[str]:
    """What differs between two finished runs of the same config (names, paths and timings aside)."""
    import torch

    differences: list[str] = []
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / name, map_location="cpu", weights_only=True)
        b = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        for state in (a, b):
            state.pop("run_dir")
            state["config"]["log"].pop("name")
            state["history"] = _without_timing(state["history"])
        _differences(a, b, name, differences)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (reference, run_dir))
    for key in ("best", "epochs", "val", "test", "calibration"):
        _differences(a.get(key), b.get(key), f"metrics.json:{key}", differences)
    _differences(
        _without_timing(a["history"]), _without_timing(b["history"]), "metrics.json:history", differences
    )
    return differences


# ----------------------------------------------------------------------------- the loop


@dataclass
class Kill:
    number: int
    start: str  # "fresh" or "epoch N" (the last.pt it resumed from)
    aim: str
    delay: float
    landed: str
    category: str
    temp_files: list[str]
    checkpoints: dict[str, int]
    corrupted: list[str]


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    completed_early: bool = False
    final_rc: int | None = None
    leftover_temp_files: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    reference_s: float = 0.0
    total_s: float = 0.0

    @property
    def corrupted(self) -> int:
        return sum(len(k.corrupted) for k in self.kills)

    @property
    def weights_match(self) -> bool:
        return self.final_rc == 0 and not self.differences

    @property
    def ok(self) -> bool:
        clean = self.corrupted == 0 and not self.leftover_temp_files
        return bool(self.kills) and clean and self.weights_match

    def summary(self) -> str:
        return (
            f"kills survived: {len(self.kills)} / corrupted checkpoints: {self.corrupted} / "
            f"final weights match: {'yes' if self.weights_match else 'no'}"
        )

    def landed(self) -> Counter:
        return Counter(k.category for k in self.kills)


def plan(rng: random.Random, kills: int) -> list[str]:
    """The aim of each kill: AIM_SHARES of them in a seeded random order, then the final test."""
    finish = kills // 10
    deck = [aim for aim, share in AIM_SHARES.items() for _ in range(round(share * (kills - finish)))]
    while len(deck) < kills - finish:
        deck.append("save")
    deck = deck[: kills - finish]
    rng.shuffle(deck)
    return deck + ["finish"] * finish


def spans(events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Seconds per named phase (``save best.pt 2``: 0.21, ...); the last one of each name."""
    opened, out = {}, {}
    for t, sign, name in events:
        if sign == "+":
            opened[name] = t
        elif name in opened:
            out[name] = t - opened.pop(name)
    return out


def choose(
    rng: random.Random,
    aim: str,
    planned_epoch: int,
    done: int,
    epochs: int,
    reference: dict[str, float],
    plain: bool,
) -> tuple[str, str, float]:
    """(what, trigger phase, delay) of one kill, when last.pt holds ``done`` epochs.

    The kill fires ``delay`` s after the trace shows ``+ trigger`` ("" = the process start);
    ``reference`` has the seconds each phase took in the reference run.
    """
    per_epoch = reference["train"] + reference["val"] + reference["save"]
    remaining = reference["startup"] + (epochs - done) * per_epoch + reference.get("finish", 1.0)
    if plain or aim == "anywhere":
        return "anywhere", "", rng.uniform(0, remaining)
    if aim == "startup":
        return aim, "", rng.uniform(0, reference["startup"])
    if aim == "finish" or done >= epochs:  # (only the final test is left)
        return "finish", "finish", rng.uniform(0, reference.get("finish", 1.0))
    epoch = min(epochs, max(done + 1, planned_epoch))  # or the next epoch to run
    if aim == "save":
        names = sorted(name for name in reference if name.startswith("save ") and name.endswith(f" {epoch}"))
        name = rng.choice(names)
        return f"save (epoch {epoch})", name, rng.uniform(0, reference[name])
    return f"{aim} (epoch {epoch})", f"{aim} {epoch}", rng.uniform(0, reference[aim])


def kill_loop(
    workdir: Path,
    kills: int = 20,
    seed: int = 0,
    epochs: int = 4,
    aims: list[str] | None = None,
    plain: bool = False,
    tensorboard: bool = True,
    say=print,
) -> Report:
    """The whole experiment in ``workdir``: reference run, ``kills`` killed attempts, the final resume.

    ``aims`` (cycled) replaces the seeded choice of what each kill aims at.
    """
    t_start = time.time()
    workdir = Path(workdir)
    paths = prepare(workdir, epochs, tensorboard)
    runs, logs = paths["runs"], paths["logs"]
    report = Report()

    reference = runs / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    ref = run_attempt(
        ["train", "--config", str(paths["reference"]), "--quiet"],
        logs / "reference.trace",
        logs / "reference.log",
        plain=False,
    )
    report.reference_s = ref.seconds
    if ref.rc != 0:
        raise RuntimeError(f"the reference run failed (exit code {ref.rc}); see {ref.log}")
    durations = phase_durations(ref.trace)
    first_step = next(t for t, sign, name in ref.trace if name.startswith("train"))
    durations["startup"] = first_step - ref.trace[0][0] + 0.3  # + starting Python
    say(
        f"reference: {epochs} epochs straight in {ref.seconds:.1f}s; phases (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in durations.items())
    )
    reference_phases = {**spans(ref.trace), **durations}

    rng = random.Random(seed)
    aims = aims or plan(rng, kills)
    aimed_at_epochs = sum(aim in ("train", "val", "save") for aim in aims)
    run_dir = runs / "killed"
    shutil.rmtree(run_dir, ignore_errors=True)
    last = run_dir / "last.pt"

    def next_args() -> tuple[list[str], str, int]:
        if last.exists():
            done = check_checkpoints(run_dir)[0]["last.pt"]
            return ["train", "--resume", str(last), "--quiet"], f"epoch {done}", done
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume: start again
        return ["train", "--config", str(paths["killed"]), "--quiet"], "fresh", 0

    aimed = 0
    for number in range(kills):
        args, start, done = next_args()
        aim = aims[number % len(aims)]
        # Spread the kills aimed at an epoch's phases over the epochs, in order.
        planned_epoch = 1 + aimed * epochs // max(1, aimed_at_epochs)
        aimed += aim in ("train", "val", "save")
        aim, trigger, delay = choose(rng, aim, planned_epoch, done, epochs, reference_phases, plain)
        name = f"kill-{number + 1:02d}"
        attempt = run_attempt(args, logs / f"{name}.trace", logs / f"{name}.log", plain, trigger, delay)
        if attempt.rc is not None:
            if attempt.rc != 0:
                raise RuntimeError(
                    f"attempt {number + 1} failed by itself (exit code {attempt.rc}); see {attempt.log}"
                )
            report.completed_early = True
            say(f"attempt {number + 1} completed the run before its kill ({aim}, +{delay:.3f}s)")
            break
        temps = temp_files(run_dir)
        phase = landed_in(attempt.trace) if not plain else "unknown"
        checkpoints, corrupted = check_checkpoints(run_dir) if run_dir.exists() else ({}, [])
        kill = Kill(
            number + 1, start, aim, delay, phase, category(phase, temps), temps, checkpoints, corrupted
        )
        report.kills.append(kill)
        on_disk = " ".join(f"{n}(epoch {e})" for n, e in checkpoints.items()) or "none"
        say(
            f"kill {kill.number:2d}/{kills}  from {start:8s}  aim {aim:18s} +{delay:.3f}s  "
            f"landed in: {phase:24s}"
            f"  checkpoints: {on_disk}"
            + (f"  temp file left: {', '.join(temps)}" if temps else "")
            + (f"  CORRUPTED: {'; '.join(corrupted)}" if corrupted else "")
        )

    # Resume until the run completes.
    args, start, _ = next_args()
    final = run_attempt(args, logs / "final.trace", logs / "final.log", plain)
    report.final_rc = final.rc
    say(f"final attempt from {start}: exit code {final.rc} in {final.seconds:.1f}s")
    if final.rc == 0:
        report.leftover_temp_files = temp_files(run_dir)
        report.differences = compare_runs(reference, run_dir)
    report.total_s = time.time() - t_start
    return report


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[3:]
        child(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--kills", type=int, default=20, help="How many times to SIGKILL the run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill aims and delays.")
    parser.add_argument("--epochs", type=int, default=4, help="Epochs of the run (5 steps each).")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Folder for the data, runs and logs (default: a temp folder, then deleted).",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="Run `python -m semodel train`, no phase trace; kill at uniform random times.",
    )
    args = parser.parse_args()
    if args.kills < 1 or args.epochs < 1:
        parser.error("--kills and --epochs must be at least 1")

    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume."))
    try:
        report = kill_loop(workdir, args.kills, args.seed, args.epochs, plain=args.plain)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    landed = report.landed()
    temps = sum(1 for k in report.kills if k.temp_files)
    print()
    print(
        "kills landed in: "
        + ", ".join(f"{what} {n}" for what, n in landed.most_common())
        + f"  ({temps} left a checkpoint temp file behind: killed inside save_checkpoint)"
    )
    if report.completed_early:
        print(f"note: the run completed after {len(report.kills)} of {args.kills} kills")
    if report.leftover_temp_files:
        print(f"temp files left after the run completed: {', '.join(report.leftover_temp_files)}")
    if report.differences:
        print(
            f"differences from the uninterrupted run ({len(report.differences)}): "
            + ", ".join(report.differences[:10])
        )
    print(f"reference run {report.reference_s:.1f}s, everything {report.total_s:.0f}s")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
