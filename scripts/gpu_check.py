"""Check semodel on a GPU and measure its figures, in one call of at most 8 minutes (docs/gpu.md).

    bash scripts/gpu_check.sh OUTDIR              # on a CUDA machine (H100/H200 class)
    bash scripts/gpu_check.sh --dry-run OUTDIR    # anywhere: the same parts on the CPU, toy sizes

The parts run one after the other, each under its own time cap (coreutils ``timeout``, which
also ends the part's child processes), and a part that fails or runs out of time does not stop
the later ones:

  cuda_tests           pytest -m cuda tests/test_cuda.py: the CUDA tests
  throughput           scripts/bench_throughput.py, eager: semodel vs timm / torchvision pairs
  se_tail              scripts/bench_se_tail.py: the fused SE tail against the plain ops
  data                 scripts/bench_data.py on MSLD: DataLoader workers vs data.cache gpu / ram
  train                one short ``semodel train`` on MSLD: wall time, images/s per epoch
  throughput_compiled  bench_throughput.py --compile on one pair, with the time that is left

(``throughput_compiled`` belongs to the throughput figures but runs last: compiling takes a
minute or more per model, so it gets what the other parts left, and is skipped, not failed, when
too little is left.) Before the first part, a part's cap is cut so that every later part still
gets its own cap within the budget.

OUTDIR receives three files: ``gpu_check.json`` (every figure; per part its status: ok, failed,
timed_out or skipped, its seconds and cap; the device, torch, CUDA and cuDNN versions),
``summary.md`` (one page) and ``gpu_check.log`` (the parts' output, tails kept). Scratch files
(bench JSON, the training run's checkpoints) go to a temporary folder that is removed.

MSLD: the GPU machine cannot see ../shared; copy the augmented images into the git-ignored
folder .bench/msld first (``mkdir -p .bench/msld && cp -r ../shared/data/msld/augmented
.bench/msld/``) and carry .bench with the working tree. ``--data DIR`` names another copy.

The dry run (``--dry-run``) takes the same steps on the CPU with toy sizes (batch 2-8, 32 px,
one step or epoch, 24 generated JPEGs named like MSLD's instead of MSLD); the CUDA tests are
collected and must all be skipped. ``tests/test_gpu_check.py`` runs it. Exit code: 0 when every
part is ok (the compiled throughput may be skipped or cut short for time), 1 otherwise, 2 for a
GPU run on a machine without CUDA. Standard library only (plus torch, for the device's description).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {"gpu": 480.0, "dry-run": 300.0}  # the whole call, part caps and overhead included
MARGIN_S = 10.0  # kept free at the end: the summary, and timeout's kill grace
KILL_AFTER_S = 5  # timeout -k: SIGKILL this long after SIGTERM
STATUSES = ("ok", "failed", "timed_out", "skipped")
LOG_TAIL_LINES = 25  # per part, in the JSON
LOG_KEEP_LINES = 400  # per part, in gpu_check.log
GPU_PAIRS = ["r50-timm", "r50-tv", "r50-se-overhead", "r50-fused", "d121-tv"]
OPTIONAL_PART = "throughput_compiled"  # run last, with the time left; may be skipped
COMPILED_PAIR = "r50-se-overhead"  # does torch.compile take away SE's eager cost?
DEPENDENCIES = ("pydantic", "typer", "yaml", "torchvision", "torchmetrics", "tensorboard", "matplotlib")
OPTIONAL = ("pytest", "timm", "onnx", "onnxruntime", "onnxscript")


@dataclass
class Outcome:
    """What a part's output says: numbers for the table, the rest for the record, and a
    problem that makes the part fail although its command exited 0 (or why it failed)."""

    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class Part:
    name: str
    title: str  # what it checks or measures, one line
    cap_s: float  # the most this part may take
    command: list[str] | None  # None: skipped for ``skip_reason``
    read: Callable[[str, float], Outcome] | None = None  # (log, seconds) -> figures; JSON it wrote
    read_after_failure: bool = False  # read the log even when the command failed (test outcomes)
    optional: bool = False  # takes what is left; skipped when less than ``min_s`` is left
    min_s: float = 5.0
    skip_reason: str | None = None


# ----------------------------------------------------------------------------- running the parts


def run_parts(
    parts: list[Part],
    deadline: float,
    env: dict[str, str],
    work: Path,
    log_path: Path,
    done: Callable[[dict[str, dict]], None],
) -> dict[str, dict]:
    """Run ``parts`` in order within ``deadline`` (time.monotonic); one result dict per part.

    ``done(results)`` is called after each part (the report is rewritten: a call cut short from
    outside still leaves the parts that finished)."""
    results: dict[str, dict] = {}
    for i, part in enumerate(parts):
        later = sum(p.cap_s for p in parts[i + 1 :] if p.command is not None and not p.optional)
        left = deadline - time.monotonic() - later
        cap = min(part.cap_s, left)
        if part.command is None:
            result = skipped(part, part.skip_reason or "not run")
        elif cap < part.min_s:
            result = skipped(
                part, f"no time left ({max(left, 0):.0f} s of the budget; needs {part.min_s:.0f} s)"
            )
        else:
            print(f"gpu_check: {part.name} (cap {cap:.0f} s) ...", flush=True)
            result = run_part(part, cap, env, work / f"{part.name}.log")
        with open(log_path, "a", encoding="utf-8") as log:
            head = f"{part.name}: {result['status']} in {result['seconds']} s (cap {result['cap_s']} s)"
            log.write(f"\n===== {head}\n")
            if part.command is not None:
                log.write("$ " + " ".join(part.command) + "\n")
            log.write(result.pop("_log", ""))
        results[part.name] = result
        print(f"gpu_check: {part.name}: {result['status']} in {result['seconds']} s", flush=True)
        done(results)
    return results


def skipped(part: Part, reason: str) -> dict:
    return {
        "title": part.title,
        "status": "skipped",
        "seconds": 0.0,
        "cap_s": round(part.cap_s, 1),
        "command": part.command,
        "returncode": None,
        "note": reason,
        "figures": {},
        "details": {},
        "log_tail": "",
    }


def run_part(part: Part, cap: float, env: dict[str, str], log_file: Path) -> dict:
    """Run the part's command under ``timeout`` (its child processes too), its output into
    ``log_file``; then read its figures from the output."""
    assert part.command is not None
    command = list(part.command)
    if shutil.which("timeout"):
        command = ["timeout", "-k", str(KILL_AFTER_S), f"{cap:.1f}", *command]
    t0 = time.monotonic()
    with open(log_file, "w", encoding="utf-8", errors="replace") as out:
        try:
            # Python's own timeout only where `timeout` is missing or fails to end the command.
            returncode = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=cap + KILL_AFTER_S + 10,
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = 124
        except OSError as e:  # the program could not be started
            out.write(f"{type(e).__name__}: {e}\n")
            returncode = 127
    seconds = round(time.monotonic() - t0, 1)
    text = log_file.read_text(encoding="utf-8", errors="replace")
    timed_out = returncode in (124, 137)  # timeout's codes: TERM, or KILL after -k
    status = "timed_out" if timed_out else "ok" if returncode == 0 else "failed"
    note = (
        f"stopped at its cap of {cap:.0f} s"
        if timed_out
        else None
        if returncode == 0
        else f"exit code {returncode}"
    )
    outcome = Outcome()
    if part.read is not None and (status == "ok" or part.read_after_failure):
        try:
            outcome = part.read(text, seconds)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # missing or odd output
            outcome = Outcome(problem=f"its output could not be read: {type(e).__name__}: {e}")
    if outcome.problem and status == "ok":
        status, note = "failed", outcome.problem
    elif outcome.problem:
        note = f"{note}; {outcome.problem}"
    lines = text.splitlines()
    kept = lines[-LOG_KEEP_LINES:]
    dropped = f"[... {len(lines) - len(kept)} earlier lines dropped]\n" if len(lines) > len(kept) else ""
    return {
        "title": part.title,
        "status": status,
        "seconds": seconds,
        "cap_s": round(cap, 1),
        "command": part.command,
        "returncode": returncode,
        "note": note,
        "figures": {k: v for k, v in outcome.figures.items() if is_number(v)},
        "details": outcome.details,
        "log_tail": "\n".join(lines[-LOG_TAIL_LINES:]),
        "_log": dropped + "\n".join(kept) + "\n",
    }


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# ----------------------------------------------------------------------------- reading the parts' output

TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
SUMMARY_LINE = re.compile(r"^(SKIPPED|FAILED|ERROR) (?:\[\d+\] )?(\S+?)(?::\d+:| - |$)\s*(.*)$")
WORST = {"ERROR": 4, "FAILED": 3, "XPASS": 2, "SKIPPED": 1, "XFAIL": 1, "PASSED": 0}


def read_pytest(expect_skipped: bool) -> Callable[[str, float], Outcome]:
    """Per-test outcomes from ``pytest -v -ra`` output (also of a run stopped at its cap), with
    the skip reasons and failure messages of its short summary."""

    def read(text: str, seconds: float) -> Outcome:
        outcomes: dict[str, str] = {}
        messages: dict[str, list[str]] = {"SKIPPED": [], "FAILED": [], "ERROR": []}
        for line in text.splitlines():
            m = TEST_LINE.match(line.strip())
            if m:
                test, outcome = m.groups()
                if WORST[outcome] >= WORST.get(outcomes.get(test, "PASSED"), 0):
                    outcomes[test] = outcome  # a teardown ERROR after PASSED counts
            m = SUMMARY_LINE.match(line.strip())
            if m and "::" not in line.split()[0]:
                kind, where, message = m.groups()
                messages[kind].append(f"{where}: {message}" if message else where)
        counts = {k: sum(v == k.upper() for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
        counts["errors"] = sum(v == "ERROR" for v in outcomes.values())
        counts["tests"] = len(outcomes)
        reasons = sorted({m.split(": ", 1)[-1] for m in messages["SKIPPED"]})
        problem = None
        bad = sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR", "XPASS"))
        if not outcomes:
            problem = "no test outcome in the output"
        elif bad:
            problem = f"{len(bad)} test(s) failed: {', '.join(t.split('::')[-1] for t in bad)}"
        elif expect_skipped and (counts["passed"] or not all("CUDA" in r for r in reasons)):
            problem = (
                f"on a machine without CUDA every CUDA test must be skipped for it; skip reasons: {reasons}"
            )
        elif not expect_skipped and counts["skipped"]:
            problem = f"{counts['skipped']} CUDA test(s) skipped on a GPU machine: {'; '.join(reasons)}"
        details = {
            "outcomes": outcomes,
            "skip_reasons": reasons,
            "failures": messages["FAILED"] + messages["ERROR"],
        }
        return Outcome(dict(counts), details, problem)

    return read


def read_throughput(path: Path, pairs: list[str]) -> Callable[[str, float], Outcome]:
    def read(text: str, seconds: float) -> Outcome:
        data = json.loads(path.read_text())
        rows = data.pop("results")
        figures = {}
        for pair, row in zip(pairs, rows, strict=True):
            for key in (
                "images_per_s",
                "counterpart_images_per_s",
                "ratio",
                "warmup_s",
                "counterpart_warmup_s",
            ):
                figures[f"{pair}.{key}"] = row[key]
            for key in ("peak_mib", "counterpart_peak_mib"):
                if row.get(key) is not None:
                    figures[f"{pair}.{key}"] = row[key]
        return Outcome(figures, {"settings": data, "pairs": dict(zip(pairs, rows, strict=True))})

    return read


def read_se_tail(path: Path) -> Callable[[str, float], Outcome]:
    def read(text: str, seconds: float) -> Outcome:
        data = json.loads(path.read_text())
        rows = data.pop("results")
        figures = {}
        for row in rows:
            stage = f"C{row['channels']}x{row['hw']}"
            for key in ("no_attention_ms", "plain_ms", "fused_ms", "ratio"):
                figures[f"{stage}.{key}"] = row[key]
        plain = sum(r["plain_ms"] - r["no_attention_ms"] for r in rows)
        fused = sum(r["fused_ms"] - r["no_attention_ms"] for r in rows)
        figures["se_cost_plain_ms"], figures["se_cost_fused_ms"] = round(plain, 3), round(fused, 3)
        if plain > 0:
            figures["fused_cost_over_plain"] = round(fused / plain, 3)
        worst = max(max(r["max_abs_diff_out"], r["max_abs_diff_grad"]) for r in rows)
        problem = None if worst < 0.1 else f"the fused tail disagrees with the plain ops by {worst:.3g}"
        return Outcome(figures, {"settings": data, "stages": rows}, problem)

    return read


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def read_data(path: Path) -> Callable[[str, float], Outcome]:
    def read(text: str, seconds: float) -> Outcome:
        data = json.loads(path.read_text())
        rows = data["rows"]
        base = rows[0]["images_per_s"]
        figures = {}
        for row in rows:
            key = slug(
                row["pipeline"].replace("DataLoader, ", "dataloader ").replace("data.cache: ", "cache ")
            )
            figures[f"{key}.images_per_s"] = round(row["images_per_s"], 1)
            figures[f"{key}.ratio"] = round(row["images_per_s"] / base, 3)
            if row["setup_s"]:
                figures[f"{key}.decode_once_s"] = round(row["setup_s"], 2)
        images = re.search(r"^(\d+) images of ", text, re.M)
        if images:
            figures["images"] = int(images.group(1))
        return Outcome(figures, data)

    return read


EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) .*?(\d+) img/s\s+([\d.]+)s", re.M)


def read_train(run_dir: Path) -> Callable[[str, float], Outcome]:
    def read(text: str, seconds: float) -> Outcome:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        ips = [h["train"]["images_per_s"] for h in metrics["history"]]
        epoch_s = [float(m.group(4)) for m in EPOCH_LINE.finditer(text)]
        figures = {
            "wall_s": seconds,  # the command, start to exit
            "run_wall_time_s": metrics["wall_time_s"],
            "epochs": metrics["epochs"],
            "train_images_per_s_median": round(statistics.median(ips), 1),
            "train_images_per_s_last": round(ips[-1], 1),
            "best_val": metrics["best"]["value"],
        }
        if epoch_s:
            figures["first_epoch_s"] = epoch_s[0]
            figures["epoch_s_median"] = statistics.median(epoch_s)
        if metrics.get("test"):
            figures["test_acc"] = metrics["test"]["acc"]
            figures["test_balanced_acc"] = metrics["test"]["balanced_acc"]
        cache = re.search(r"data\.cache[^\n]*", text)
        details = {
            "device": metrics["device"],
            "best": metrics["best"],
            "data_line": cache.group(0) if cache else None,
        }
        return Outcome(figures, details)

    return read


def read_endtoend(path: Path) -> Callable[[str, float], Outcome]:
    """bench_endtoend.py's JSON: semodel train against the plain loop, and semodel's time budget."""

    def read(text: str, seconds: float) -> Outcome:
        rounds = json.loads(path.read_text())["rounds"]
        mine, ref = rounds[-1]["semodel"], rounds[-1]["reference"]
        budget = mine.get("budget") or {}
        wall = budget.get("wall") or mine["wall"]
        figures = {
            "semodel_s": round(mine["process_wall"], 2),
            "reference_s": round(ref["process_wall"], 2),
            "ratio": round(ref["process_wall"] / mine["process_wall"], 3),
        }
        if budget:
            figures["outside_train_step_share"] = round(1 - budget["train_step"] / wall, 3)
            figures["checkpoint_share"] = round(budget["checkpoint"] / wall, 4)
        details = {"budget": budget, "reference_parts": ref.get("parts")}
        return Outcome(figures, details)

    return read


# ----------------------------------------------------------------------------- the plan


def find_images(folder: Path) -> Path | None:
    """An ImageFolder at ``folder`` or ``folder/augmented`` (how .bench/msld may be laid out)."""
    for candidate in (folder / "augmented", folder):
        if candidate.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in candidate.iterdir()):
            return candidate
    return None


def make_tiny_msld(root: Path) -> Path:
    """24 small JPEGs named like MSLD's (patient_image_copy), two classes: the dry run's data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, prefix, tint in (("Monkeypox", "M", (190, 90, 80)), ("Others", "NM", (90, 150, 190))):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for patient in range(1, 7):
            for copy in range(2):
                pixels = rng.normal(tint, 40, size=(40, 40, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(
                    root / cls / f"{prefix}{patient:02d}_01_{copy:02d}.jpg", quality=90
                )
    return root


@dataclass
class Sizes:
    """What the parts run at: a GPU run, or the dry run's toy sizes."""

    caps: dict[str, float]
    pairs: list[str]
    throughput: list[str]
    tail: list[str]
    data: list[str]
    train_sets: list[str]
    endtoend: list[str]


def sizes(dry: bool) -> Sizes:
    if dry:
        return Sizes(
            caps={"cuda_tests": 60, "throughput": 40, "se_tail": 30, "data": 30, "train": 60, "endtoend": 90}
            | {"compiled": 60},
            pairs=["r18-se-overhead"],
            throughput="--device cpu --batch-size 2 --image-size 32 --num-classes 10 --steps 1 --warmup 1 "
            "--rounds 1".split(),
            tail="--device cpu --batch-size 2 --image-size 32 --steps 1 --rounds 1 --stages resnet18".split(),
            data="--image-size 32 --batch-size 4 --workers 0 --device cpu".split(),
            train_sets=["data.image_size=32", "data.batch_size=8", "train.epochs=1", "train.device=cpu"]
            + ["data.cache=none", "data.num_workers=0"],
            endtoend="--device cpu --image-size 32 --epochs 1 --batch-size 8 --set data.cache=none".split(),
        )
    # Caps sum to 450 s of the 480 s budget: the rest is the preflight, the margin and, when the
    # parts finish early, the compiled throughput.
    gpu = "--device cuda --batch-size 256 --image-size 224 --channels-last".split()
    return Sizes(
        caps={"cuda_tests": 160, "throughput": 90, "se_tail": 20, "data": 50, "train": 50, "endtoend": 80}
        | {"compiled": 240},
        pairs=[p for p in GPU_PAIRS if p != "r50-timm" or importlib.util.find_spec("timm") is not None],
        throughput=gpu,
        tail=list(gpu),
        data="--image-size 224 --device cuda --workers 0 4 8".split(),
        train_sets=["data.image_size=224", "train.epochs=6", "train.device=cuda", "data.cache=auto"],
        endtoend="--device cuda --image-size 224 --epochs 3 --set data.cache=auto".split(),
    )


def plan(dry: bool, data: Path | None, work: Path, no_cuda: str | None) -> list[Part]:
    """The parts, with their commands, caps and readers, for a GPU run or the dry run."""
    py = sys.executable
    scripts = ROOT / "scripts"
    why_no_data = (
        None
        if data is not None
        else "no MSLD images: copy ../shared/data/msld/augmented to .bench/msld first"
    )
    size = sizes(dry)
    caps, pairs, tp_args, tail_args, data_args = size.caps, size.pairs, size.throughput, size.tail, size.data
    train_sets, e2e_args = list(size.train_sets), size.endtoend
    train_sets += [f"data.root={data}", f"log.out_dir={work / 'runs'}", "log.name=gpu-check-train"]
    config = ROOT / "configs" / "monkeypox" / "se_resnet18.yaml"
    train = [py, "-m", "semodel", "train", "--config", str(config), "--quiet"]
    train += [arg for setting in train_sets for arg in ("--set", setting)]

    compiled_pairs = [COMPILED_PAIR]
    parts = [
        Part(
            "cuda_tests",
            "pytest -m cuda: train/eval/predict/export on CUDA, bf16 and fp16, channels_last, "
            "data.cache gpu, compile, resume, DDP over NCCL",
            caps["cuda_tests"],
            [py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-ra", "-p", "no:cacheprovider"]
            + ["-o", "faulthandler_timeout=100"],
            read_pytest(expect_skipped=dry),
            read_after_failure=True,
            min_s=30,
        ),
        Part(
            "throughput",
            "training step img/s, eager: semodel vs timm/torchvision, SE overhead, fused tail"
            + ("" if dry else " (bf16, channels_last, batch 256, 224 px)")
            + ("" if dry or "r50-timm" in pairs else "; r50-timm left out: timm is not installed"),
            caps["throughput"],
            [py, str(scripts / "bench_throughput.py"), *tp_args, "--pairs", ",".join(pairs)]
            + ["--json", str(work / "throughput.json")],
            read_throughput(work / "throughput.json", pairs),
            min_s=20,
        ),
        Part(
            "se_tail",
            "the residual block's SE tail alone, fused node vs plain ops, forward + backward",
            caps["se_tail"],
            [py, str(scripts / "bench_se_tail.py"), *tail_args, "--json", str(work / "se_tail.json")],
            read_se_tail(work / "se_tail.json"),
        ),
        Part(
            "data",
            "ready training batches/s: DataLoader workers vs data.cache (decoded once)",
            caps["data"],
            None
            if data is None
            else [py, str(scripts / "bench_data.py"), str(data), *data_args]
            + ["--json", str(work / "data.json")],
            read_data(work / "data.json"),
            skip_reason=why_no_data,
            min_s=15,
        ),
        Part(
            "train",
            "semodel train, SE-ResNet-18, configs/monkeypox/se_resnet18.yaml"
            + (" at toy size" if dry else ", 224 px, 10 epochs, data.cache auto"),
            caps["train"],
            None if data is None else train,
            read_train(work / "runs" / "gpu-check-train"),
            skip_reason=why_no_data,
            min_s=20,
        ),
        Part(
            "endtoend",
            "bench_endtoend.py: semodel train against a plain PyTorch loop of the same work, and "
            "where semodel's time went" + (" (toy size)" if dry else ", 224 px, 3 epochs, data.cache auto"),
            caps["endtoend"],
            None
            if data is None
            else [py, str(scripts / "bench_endtoend.py"), str(data), *e2e_args]
            + ["--workdir", str(work / "endtoend"), "--json", str(work / "endtoend.json")],
            read_endtoend(work / "endtoend.json"),
            skip_reason=why_no_data,
            min_s=30,
        ),
        Part(
            "throughput_compiled",
            f"bench_throughput.py --compile, pair {COMPILED_PAIR} (compile time reported apart as warm-up)",
            caps["compiled"],
            None
            if dry
            else [py, str(scripts / "bench_throughput.py"), *tp_args, "--compile", "--pairs", COMPILED_PAIR]
            + ["--warmup", "2", "--rounds", "3", "--steps", "5", "--json", str(work / "compiled.json")],
            read_throughput(work / "compiled.json", compiled_pairs),
            optional=True,
            min_s=90,
            skip_reason="dry run: torch.compile is not run on the CPU (minutes of C++ compilation)",
        ),
    ]
    if no_cuda:
        for part in parts:
            part.command, part.skip_reason = None, no_cuda
    return parts


# ----------------------------------------------------------------------------- the environment


def environment(dry: bool) -> dict[str, Any]:
    """The device and software versions; torch is imported here, once."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "semodel": re.search(r'__version__ = "(.+)"', (ROOT / "semodel" / "_version.py").read_text()).group(
            1
        ),
        "git_commit": git_commit(),
        "missing_modules": [m for m in DEPENDENCIES + OPTIONAL if importlib.util.find_spec(m) is None],
    }
    if dry:  # versions from the package metadata: importing torch here would cost seconds
        from importlib.metadata import PackageNotFoundError, version

        try:
            env["torch"] = version("torch")
        except PackageNotFoundError:
            env["torch"] = None
        env["device"] = f"CPU ({platform.processor() or platform.machine()}), dry run"
        return env
    try:
        import torch
    except ImportError as e:
        env["torch"] = None
        env["problem"] = f"torch cannot be imported: {e}"
        return env
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env["cudnn"] = cudnn
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
        env["driver"] = nvidia_driver()
    else:
        env["device"] = "no CUDA device"
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# ----------------------------------------------------------------------------- the summary


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def not_ok(parts: dict[str, dict]) -> list[str]:
    """The parts that are not ok; the compiled throughput may be skipped or cut short for time
    (it takes what the others left), but not fail."""
    excused = {(OPTIONAL_PART, "skipped"), (OPTIONAL_PART, "timed_out")}
    return [n for n, p in parts.items() if p["status"] != "ok" and (n, p["status"]) not in excused]


def get(parts: dict[str, dict], name: str) -> dict:
    """A part's result, or an empty one (a report written before the part ran)."""
    return parts.get(name) or {"title": name, "details": {}, "figures": {}}


def train_section(train: dict) -> list[str]:
    if not train["figures"]:
        return []
    f = train["figures"]
    lines = [
        "",
        "## semodel train",
        "",
        f"{train['title']}: {fmt(f['wall_s'])} s wall (command start to exit), "
        f"{fmt(f['run_wall_time_s'])} s by metrics.json; {f['epochs']} epochs, first "
        f"{fmt(f.get('first_epoch_s'))} s, median {fmt(f.get('epoch_s_median'))} s per epoch; "
        f"{fmt(f['train_images_per_s_median'], 0)} training images/s (median over epochs); "
        f"best val {fmt(f['best_val'], 4)}, test accuracy {fmt(f.get('test_acc'), 4)}.",
    ]
    if train["details"].get("data_line"):
        lines += ["", f"`{train['details']['data_line']}`"]
    return lines


def endtoend_section(e2e: dict) -> list[str]:
    if not e2e["figures"]:
        return []
    f = e2e["figures"]
    return [
        "",
        "## End to end: semodel train vs a plain loop",
        "",
        f"{e2e['title']}: semodel {fmt(f['semodel_s'])} s, reference loop {fmt(f['reference_s'])} s, "
        f"ratio {fmt(f['ratio'], 3)} (target >= 0.9); outside the training step "
        f"{fmt(f.get('outside_train_step_share'), 3)} of semodel's wall time, checkpoint writes "
        f"{fmt(f.get('checkpoint_share'), 4)}.",
    ]


def summary(report: dict) -> str:
    """The one-page Markdown summary of a report."""
    parts = report["parts"]
    lines = header_section(report) + parts_table(parts)
    for name in ("throughput", "throughput_compiled"):
        lines += throughput_section(name, get(parts, name))
    lines += se_tail_section(get(parts, "se_tail")) + data_section(get(parts, "data"))
    lines += train_section(get(parts, "train")) + endtoend_section(get(parts, "endtoend"))
    failures = [(n, p) for n, p in parts.items() if p["status"] in ("failed", "timed_out")]
    for name, p in failures:
        tail_lines = p["log_tail"].splitlines()[-15:]
        lines += ["", f"## {name}: {p['status']} ({p['note']})", "", "```", *tail_lines, "```"]
    return "\n".join(lines) + "\n"


def header_section(report: dict) -> list[str]:
    env, parts = report["environment"], report["parts"]
    bad = not_ok(parts)
    lines = [
        f"# semodel GPU check ({report['mode']})",
        "",
        f"{env.get('device')} | torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
        + (f", driver {env['driver']}" if env.get("driver") else "")
        + f" | Python {env['python']} | semodel {env['semodel']} (commit {env.get('git_commit') or '?'})",
        "",
        f"Started {report['started']}; {report['seconds']:.0f} s of the {report['budget_s']:.0f} s budget. "
        + (
            ("Every part ok." if report["complete"] else f"Cut short: {len(parts)} parts done, all ok.")
            if not bad
            else "Not ok: " + ", ".join(f"{n} ({parts[n]['status']})" for n in bad) + "."
        ),
    ]
    if env.get("missing_modules"):
        lines += ["", f"**Missing Python modules:** {', '.join(env['missing_modules'])}."]
    return lines


def parts_table(parts: dict[str, dict]) -> list[str]:
    rows = []
    for name, p in parts.items():
        what = p["note"] or ""
        if name == "cuda_tests" and p["figures"]:
            f = p["figures"]
            what = (
                f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"
                + (f"; {p['note']}" if p["note"] else "")
            )
        rows.append([name, p["status"], fmt(p["seconds"]), fmt(p["cap_s"], 0), what])
    return ["", *md_table(["part", "status", "seconds", "cap s", "notes"], rows)]


def throughput_section(name: str, p: dict) -> list[str]:
    if not p["details"].get("pairs"):
        return []
    s = p["details"]["settings"]
    lines = [
        "",
        f"## {'Compiled' if name.endswith('compiled') else 'Eager'} training throughput",
        "",
        f"{s['dtype']}, channels_last {s['channels_last']}, batch {s['batch_size']}, "
        f"{s['image_size']} px; "
        f"median of {s['rounds']} rounds x {s['steps']} steps; warm-up ({s['warmup']} steps"
        + (", compilation included" if s["compile"] else "")
        + ") apart. ratio = semodel / counterpart img/s.",
        "",
    ]
    rows = [
        [
            pair,
            r["model"],
            fmt(r["images_per_s"]),
            r["counterpart"],
            fmt(r["counterpart_images_per_s"]),
            fmt(r["ratio"], 3),
            f"{fmt(r['warmup_s'], 1)} / {fmt(r['counterpart_warmup_s'], 1)}",
        ]
        for pair, r in p["details"]["pairs"].items()
    ]
    return lines + md_table(["pair", "model", "img/s", "counterpart", "img/s", "ratio", "warm-up s"], rows)


def se_tail_section(tail: dict) -> list[str]:
    if not tail["details"].get("stages"):
        return []
    lines = ["", "## SE tail: fused node vs plain ops (forward + backward, one block)", ""]
    rows = [
        [f"{r['channels']} ch, {r['hw']} x {r['hw']}", *(r[k] for k in ("no_attention_ms", "plain_ms"))]
        + [r["fused_ms"], r["ratio"]]
        for r in tail["details"]["stages"]
    ]
    lines += md_table(["stage", "no attention ms", "plain ms", "fused ms", "plain / fused"], rows)
    if "fused_cost_over_plain" in tail["figures"]:
        cost = tail["figures"]["fused_cost_over_plain"]
        lines += ["", f"SE's cost over the four blocks: fused {cost:.2f} of plain."]
    return lines


def data_section(data: dict) -> list[str]:
    if not data["details"].get("rows"):
        return []
    lines = ["", f"## Data pipeline ({data['figures'].get('images', '?')} images)", ""]
    base = data["details"]["rows"][0]["images_per_s"]
    rows = [
        [r["pipeline"], fmt(r["images_per_s"], 0), f"{r['images_per_s'] / base:.2f}x", fmt(r["setup_s"], 1)]
        for r in data["details"]["rows"]
    ]
    return lines + md_table(["pipeline", "images/s", "ratio", "one-off decoding s"], rows)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "outdir", type=Path, help="where gpu_check.json, summary.md and gpu_check.log go (created)"
    )
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at toy sizes")
    p.add_argument(
        "--data", type=Path, default=ROOT / ".bench" / "msld", help="MSLD copy (default .bench/msld)"
    )
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole call (default 480; dry 300)"
    )
    args = p.parse_args(argv)

    t0, started = time.monotonic(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mode = "dry-run" if args.dry_run else "gpu"
    budget = args.budget or BUDGET_S[mode]
    deadline = t0 + budget - MARGIN_S
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    log_path.write_text(f"semodel gpu_check, {mode}, started {started}\n")

    env = environment(args.dry_run)
    no_cuda = None
    if not args.dry_run and not env.get("cuda_available"):
        no_cuda = "no CUDA device here: run scripts/gpu_check.sh --dry-run OUTDIR to test the harness"
    report: dict[str, Any] = {
        "schema": 1,
        "mode": mode,
        "complete": False,  # true once every part has run (a report cut short says false)
        "started": started,
        "seconds": 0.0,
        "budget_s": budget,
        "statuses": list(STATUSES),
        "environment": env,
        "data": None,
        "parts": {},
    }

    def write(results: dict[str, dict]) -> None:
        report["parts"], report["seconds"] = results, round(time.monotonic() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "summary.md").write_text(summary(report))

    work = Path(tempfile.mkdtemp(prefix="semodel-gpu-check-"))
    try:
        data = make_tiny_msld(work / "msld") if args.dry_run else find_images(args.data)
        report["data"] = None if args.dry_run or data is None else str(data)
        process_env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        process_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        if args.dry_run:
            process_env["CUDA_VISIBLE_DEVICES"] = ""  # on the CPU, also on a GPU machine
            process_env.setdefault("OMP_NUM_THREADS", "1")  # toy sizes on a shared CPU: no spinning threads
        parts = plan(args.dry_run, data, work, no_cuda)
        results = run_parts(parts, deadline, process_env, work, log_path, write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["complete"] = True
    write(results)
    print(
        f"gpu_check: wrote gpu_check.json, summary.md and gpu_check.log to {out} in {report['seconds']:.0f} s"
    )
    if no_cuda:
        print(f"gpu_check: {no_cuda}", file=sys.stderr)
        return 2
    return 1 if not_ok(results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
