"""``semodel lr-find``: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", section 3.3).

From the config's starting weights (``model.pretrained`` included), with its model, optimizer
(the parameter groups of ``semodel.optim``) and training data (the training split, the same
augmentation), one optimizer step per batch with the learning rate rising exponentially from
``start`` to ``end``, for at most one epoch. The training code's own setup builds all of it
(``train.setup_run``) and its own step does the work (``train.forward_backward``,
``train.optimizer_step``); only the schedule is replaced by the exponential ramp. ``train.freeze``
is not applied (it happens in ``train.train_one_epoch``): the whole model learns, as after the freeze.

- **Smoothing.** The loss of each step is averaged with an exponential moving average, bias-corrected
  as in Adam; its time constant is a twentieth of the scan (``smoothing_beta``: 0.8 for 100 steps).
- **Stop.** The scan stops early when the smoothed loss passes ``DIVERGED`` (4) times its minimum,
  or when a loss is not finite; Ctrl-C stops it too, and what was measured is kept.
- **Suggestion.** The learning rate where the smoothed loss falls fastest against log10(lr): the
  most negative ``numpy.gradient`` of the smoothed loss over log10(lr), over the steps up to the
  minimum of the smoothed loss (past it the loss only rises). None when the loss never fell.

Nothing is written until the scan is done: then a new run folder ``<name>-lr-find``
(``files.make_run_dir``: never an existing run's) receives ``lr_find.csv`` (step, lr, loss,
smoothed_loss), ``lr_find.png`` and ``config.yaml``.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semodel.config import Config, StartOptions, config_from_options, write_yaml
from semodel.distributed import World
from semodel.errors import SemodelError
from semodel.files import make_run_dir, run_name, write_text_atomic
from semodel.runlog import Logger, log_line
from semodel.runtime import Interrupt
from semodel.train import Log, Run, Start, forward_backward, optimizer_step, setup_run

DIVERGED = 4.0  # stop when the smoothed loss exceeds this many times its minimum
MIN_STEPS = 10  # fewer points say nothing about the shape of the curve


@dataclass
class ScanOptions:
    """The range of the test: ``steps`` learning rates from ``start`` to ``end``, spaced
    exponentially (at most one epoch's optimizer steps)."""

    start: float = 1e-7
    end: float = 10.0
    steps: int = 100

    def check(self) -> None:
        if not (math.isfinite(self.start) and self.start > 0):
            raise SemodelError(f"--start {self.start:g}: the smallest learning rate must be > 0")
        if not (math.isfinite(self.end) and self.end > self.start):
            raise SemodelError(f"--end {self.end:g}: must be larger than --start ({self.start:g})")
        if self.steps < MIN_STEPS:
            raise SemodelError(f"--steps {self.steps}: at least {MIN_STEPS} steps make a curve")


@dataclass
class Scan:
    """What the test measured, one entry per optimizer step, and why it stopped."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    planned: int = 0
    stopped: str | None = None  # why it ended before its last step, or None


@dataclass
class LrFindResult:
    scan: Scan
    suggestion: float | None  # the suggested optim.lr, rounded to two digits
    run_dir: Path


def lr_at(step: int, steps: int, start: float, end: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: exponential from start to end."""
    return start * (end / start) ** (step / max(steps - 1, 1))


def smoothing_beta(steps: int) -> float:
    """The moving average's beta: a time constant of steps / 20 steps, between 2 and 50."""
    tau = min(max(steps / 20, 2.0), 50.0)
    return 1 - 1 / tau


def suggest(scan: Scan) -> int | None:
    """The index of the steepest descent of the smoothed loss against log10(lr), among the steps
    before its minimum; None when the minimum comes before the third step (no descent to measure)."""
    import numpy as np

    if len(scan.smoothed) < 3:
        return None
    smoothed = np.asarray(scan.smoothed)
    low = int(np.argmin(smoothed))
    if low < 2:
        return None
    slope = np.gradient(smoothed, np.log10(scan.lrs))  # central differences inside, one-sided at the ends
    return int(np.argmin(slope[:low]))


def rounded_lr(lr: float) -> str:
    """Two significant digits, written so that YAML reads a float (``3.2e-03``)."""
    return f"{lr:.1e}"


# ----------------------------------------------------------------------------- the scan


def lr_find(
    cfg: Config, config_path: Path | None, options: ScanOptions, quiet: bool = False, log: Log | None = None
) -> LrFindResult:
    """Run the range test for ``cfg``; write its new run folder; return the scan and the suggestion."""
    log = log or log_line
    options.check()
    run = setup_run(cfg, World(), Start(config_path, None, None, log, quiet))
    run.ema = None  # the EMA weights play no part in the test
    run.logger = Logger(Path("."), False, None)  # no TensorBoard: a no-op
    steps_per_epoch = len(run.loaders.sampler) // cfg.train.accum_steps  # whole accumulations only
    steps = min(options.steps, steps_per_epoch)
    if steps < MIN_STEPS:
        raise SemodelError(
            f"one epoch of {cfg.data.root} has {steps_per_epoch} optimizer steps (batches of "
            f"{cfg.data.batch_size}); the range test needs at least {MIN_STEPS}: lower data.batch_size"
        )
    if steps < options.steps:
        log(
            f"note: one epoch has {steps_per_epoch} optimizer steps: the scan takes {steps} "
            f"(--steps {options.steps})"
        )
    log(f"lr-find: {steps} steps, lr from {options.start:.1e} to {options.end:.1e} (exponential)")
    scan = run_scan(run, steps, options)
    index = suggest(scan)
    suggestion = float(rounded_lr(scan.lrs[index])) if index is not None else None
    run_dir = write_results(run, config_path, scan, index)
    report(scan, suggestion, run_dir, log)
    return LrFindResult(scan, suggestion, run_dir)


def run_scan(run: Run, steps: int, options: ScanOptions) -> Scan:
    """One optimizer step per ``accum_steps`` batches, each at the next learning rate of the ramp."""
    from tqdm import tqdm

    cfg = run.cfg

    def factor(i: int) -> float:  # of each group's configured lr (backbone_lr_scale keeps its ratio)
        return lr_at(min(i, steps - 1), steps, options.start, options.end) / cfg.optim.lr

    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, factor)
    run.train_model.train()
    run.loaders.sampler.set_epoch(1)
    scan, beta, average = Scan(planned=steps), smoothing_beta(steps), 0.0
    pending: list[float] = []
    bar = tqdm(total=steps, desc="lr-find", leave=False, disable=not run.show_bars, dynamic_ncols=True)
    run.optimizer.zero_grad(set_to_none=True)
    with Interrupt("stopping the scan; what it measured is kept") as interrupt:
        for images, labels in run.loaders.train:
            if images.numel() == 0:
                continue
            loss, _, _ = forward_backward(run, 1, images, labels, sync=True)
            value = loss.item()
            if not math.isfinite(value):
                lr = lr_at(len(scan.lrs), steps, options.start, options.end)
                scan.stopped = f"the loss became {value} at lr {lr:.1e}"
                break
            pending.append(value)
            if len(pending) < cfg.train.accum_steps:
                continue
            scan.lrs.append(lr_at(len(scan.lrs), steps, options.start, options.end))
            scan.losses.append(sum(pending) / len(pending))
            pending.clear()
            optimizer_step(run)
            average = beta * average + (1 - beta) * scan.losses[-1]
            scan.smoothed.append(average / (1 - beta ** len(scan.losses)))  # bias-corrected
            bar.update()
            if scan.smoothed[-1] > DIVERGED * min(scan.smoothed):
                scan.stopped = (
                    f"the smoothed loss passed {DIVERGED:g}x its minimum at lr {scan.lrs[-1]:.1e} (diverged)"
                )
                break
            if interrupt.requested:
                scan.stopped = "interrupted"
                break
            if len(scan.lrs) == steps:
                break
    bar.close()
    if not scan.lrs:
        raise SemodelError(f"lr-find: no step was measured ({scan.stopped}); try a smaller --start")
    return scan


# ----------------------------------------------------------------------------- results


def write_results(run: Run, config_path: Path | None, scan: Scan, index: int | None) -> Path:
    """A new run folder with lr_find.csv, lr_find.png and config.yaml; removed again if a write fails."""
    name = run_name(run.cfg.log.name, config_path, "run") + "-lr-find"
    run_dir = make_run_dir(Path(run.cfg.log.out_dir).expanduser(), name)
    try:
        write_text_atomic(run_dir / "lr_find.csv", csv_text(scan))
        write_yaml(run.cfg, run_dir / "config.yaml")
        save_plot(scan, index, run_dir / "lr_find.png")
    except (SemodelError, OSError):
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def csv_text(scan: Scan) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    for step, row in enumerate(zip(scan.lrs, scan.losses, scan.smoothed, strict=True), 1):
        writer.writerow([step, *(repr(v) for v in row)])
    return out.getvalue()


def save_plot(scan: Scan, index: int | None, path: Path) -> None:
    """Loss against lr (log x): each step's loss, the smoothed loss, the suggestion marked."""
    from semodel.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot(scan.lrs, scan.losses, color="0.7", lw=0.8, label="loss of the step's batch")
    ax.plot(scan.lrs, scan.smoothed, color="C0", lw=1.8, label="smoothed loss")
    if index is not None:
        lr = scan.lrs[index]
        ax.axvline(lr, color="C3", ls="--", lw=1)
        ax.plot([lr], [scan.smoothed[index]], "o", color="C3", label=f"suggested optim.lr {rounded_lr(lr)}")
    low = min(range(len(scan.smoothed)), key=scan.smoothed.__getitem__)
    top, bottom = max(scan.smoothed[: low + 1]), min(min(scan.losses), min(scan.smoothed))
    span = max(top - bottom, 1e-3 * max(abs(top), 1.0))
    ax.set_ylim(bottom - 0.05 * span, top + 0.6 * span)  # the divergence's tail runs off the top
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {len(scan.lrs)} of {scan.planned} steps")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def report(scan: Scan, suggestion: float | None, run_dir: Path, log: Log) -> None:
    low = min(range(len(scan.smoothed)), key=scan.smoothed.__getitem__)
    if scan.stopped:
        log(f"stopped after step {len(scan.lrs)} of {scan.planned}: {scan.stopped}")
    log(
        f"smoothed loss: {scan.smoothed[0]:.4f} at lr {scan.lrs[0]:.1e}, lowest {scan.smoothed[low]:.4f} "
        f"at lr {scan.lrs[low]:.1e}"
    )
    log(f"wrote {run_dir / 'lr_find.csv'} and {run_dir / 'lr_find.png'}")
    if suggestion is None:
        log(
            "no suggestion: the smoothed loss did not fall before its lowest point; "
            "try a smaller --start, or more --steps"
        )
    else:
        log(f"suggested optim.lr: {rounded_lr(suggestion)} (where the smoothed loss falls fastest)")


def lr_find_from_cli(
    config_path: Path | None,
    overrides: list[str],
    start: StartOptions,
    options: ScanOptions,
    quiet: bool,
    log: Log | None = None,
) -> LrFindResult:
    options.check()  # before the data and the model are built
    return lr_find(config_from_options(config_path, overrides, start), config_path, options, quiet, log)
