"""fit(): the training loop, from a validated Config to a run folder.

Read top to bottom: ``fit`` sets up a ``Run`` (device, data, model, optimizer, then the run
folder), runs the epoch loop (train, validate, checkpoint, log, early stop), and tests the best
weights at the end. Nothing is written into the run folder until everything that can fail at the
start (data, model, pretrained weights, the resumed state) has been built.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import semodel.distributed as distributed
from semodel._version import __version__
from semodel.analysis import analyse, fit_calibration, groups_of, prediction_rows, write_predictions
from semodel.checkpoint import (
    Progress,
    best_state,
    cpu_copy,
    load_checkpoint,
    load_resumable,
    model_options,
    restore_training,
    save_checkpoint,
    training_state,
)
from semodel.config import (
    Config,
    StartOptions,
    apply_overrides,
    config_from_dict,
    config_from_options,
    write_yaml,
)
from semodel.data import Dataset, Sample, prepare_dataset, write_split_csv
from semodel.data.cache import refuse as refuse_cache
from semodel.distributed import World
from semodel.errors import Interrupted, SemodelError, first_line
from semodel.files import (
    BackgroundWriter,
    make_run_dir,
    read_json,
    remove_stale_temp_files,
    run_name,
    write_json,
)
from semodel.loaders import KeptBatches, Loaders, build_loaders, eval_loader, make_mixer
from semodel.metrics import classification_metrics
from semodel.models import (
    build_model,
    learned_widths,
    load_pretrained,
    pretrained_model_options,
    prune_attention,
    sparsity_loss,
)
from semodel.models.attention import format_widths, learned_blocks
from semodel.optim import EMA, gate_travel, make_optimizer, make_scheduler
from semodel.preprocess import preprocess_of
from semodel.runlog import Logger, epoch_scalars, flat_hparams, log_line, open_fraction, width_scalars
from semodel.runlog import quiet as quiet_log
from semodel.runtime import (
    Interrupt,
    amp_dtype,
    autocast,
    predict_probs,
    resolve_device,
    rng_state,
    seed_everything,
)
from semodel.timing import Budget, timed

# Metric to monitor -> (key in the validation metrics, whether higher is better)
MONITORS = {
    "val_acc": ("acc", True),
    "val_loss": ("loss", False),
    "val_f1": ("f1_macro", True),
    "val_balanced_acc": ("balanced_acc", True),
}

Log = Callable[[str], None]
PROGRESS_EVERY = 20  # training steps between reads of the summed loss (NaN check, progress bar)


@dataclass
class Resume:
    """A run to continue: its ``last.pt`` and that file, already loaded."""

    path: Path
    state: dict[str, Any]


@dataclass
class Start:
    """How ``fit`` was asked to run, besides the config."""

    config_path: Path | None
    resume: Resume | None
    split: list[Sample] | None  # semodel cv: the fold's files and splits
    log: Log
    quiet: bool
    t_start: float = field(default_factory=time.time)


@dataclass
class Predictions:
    """Softmax probabilities (N x C) and targets (N) of every image of a split, once each."""

    probs: torch.Tensor
    targets: torch.Tensor


@dataclass
class EpochResult:
    epoch: int
    train: dict[str, float]  # loss, acc, images_per_s
    val: dict[str, Any]  # classification_metrics + loss
    started: float  # time.time() at the epoch's start
    train_time: float
    improved: bool = False
    predictions: Predictions | None = None  # the validation split's, behind ``val``


@dataclass
class Objective:
    """What the loss of a batch is made of, besides the logits and labels."""

    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None  # data.balance: loss
    mix: Callable | None = None  # mixup / cutmix
    penalty: Callable[[], torch.Tensor] | None = None  # sparsity loss of learned SE widths


@dataclass
class Run:
    """Everything a training run holds, from setup to the final test."""

    cfg: Config
    world: World
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    data: Dataset
    loaders: Loaders
    model: nn.Module  # the plain module: what checkpoints hold
    train_model: nn.Module  # the model as trained: compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any  # AveragedModel or None
    objective: Objective
    log: Log
    show_bars: bool
    resumed: bool
    t_start: float
    run_dir: Path | None = None  # made once everything else is set up
    logger: Logger | None = None
    progress: Progress = field(default_factory=Progress)
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)  # where the wall time goes (semodel.timing)
    checkpoints: BackgroundWriter = field(default_factory=BackgroundWriter)  # last.pt / best.pt writes
    # The best epoch's validation predictions, when that epoch ran in this process: the calibration
    # at the end fits on them instead of scoring the validation split once more.
    best_predictions: Predictions | None = None
    best_snapshot: dict[str, Any] | None = None  # best.pt's content as last written (this process)

    # What the checkpoint format reads (semodel.checkpoint.TrainingRun).
    @cached_property
    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @cached_property
    def preprocess(self) -> dict[str, Any]:
        return preprocess_of(self.cfg)

    @property
    def monitor(self) -> str:
        return self.cfg.train.monitor

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation scores and best.pt selects: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def resume_hint(self) -> str:
        nproc = f" --nproc {self.world.size}" if self.world.distributed else ""
        return f"semodel train --resume {self.run_dir / 'last.pt'}{nproc}"


# ----------------------------------------------------------------------------- fit


def fit(
    cfg: Config,
    config_path: Path | None = None,
    resume: Path | Resume | None = None,
    quiet: bool = False,
    log: Log | None = None,
    split: list[Sample] | None = None,
) -> Path:
    """Train ``cfg``; returns the run folder.

    ``resume`` continues a run from its ``last.pt`` (a path, or a ``Resume`` holding the file
    already loaded). ``split``: the files and their splits (``semodel cv``'s fold) instead of
    splitting ``data.root`` (a new run only). Under torchrun every process calls this; rank 0
    writes the run folder and prints. Ctrl-C saves last.pt and raises ``Interrupted``.
    """
    t_start = time.time()
    if isinstance(resume, (str, Path)):
        resume = Resume(Path(resume), load_resumable(resume))
    world = distributed.init(cfg.train.device)
    if world.is_main:
        start = Start(config_path, resume, split, log or log_line, quiet, t_start)
    else:
        start = Start(config_path, resume, split, quiet_log, True, t_start)
    run = None
    try:
        run = setup_run(cfg, world, start)
        open_run_folder(run, start)
        train_epochs(run)
        distributed.barrier(world)
        if world.is_main:
            with run.budget.part("final_test"):
                finish_run(run)
            record_time_budget(run)
        return run.run_dir
    except RuntimeError as e:
        # A worker killed (OOM killer, a signal) or exited: torch raises a RuntimeError from
        # wherever the main process is; the run stops, last.pt stays as the last epoch left it.
        if not str(e).startswith("DataLoader worker (pid"):
            raise
        raise SemodelError(
            f"a data loader worker process died ({first_line(e)}); out of memory? try a lower "
            f"data.num_workers or data.batch_size; {resume_note(run)}"
        ) from None
    finally:
        if run is not None and run.logger is not None:
            run.logger.close()
        distributed.shutdown(world)


def resume_note(run: Run | None) -> str:
    """What is kept after a failure, and the command that continues the run."""
    if run is None or run.run_dir is None or not (run.run_dir / "last.pt").exists():
        return "no checkpoint had been written yet; start the run again"
    return f"{run.run_dir / 'last.pt'} is kept; resume with: {run.resume_hint}"


def diverged(what: str, progress: Progress) -> str:
    kept = "the last good checkpoint is kept" if progress.epoch > 0 else "no checkpoint had been written yet"
    return f"{what}; stopped without saving it ({kept}). Try a lower optim.lr or set train.clip_grad"


# ----------------------------------------------------------------------------- setup


def setup_run(cfg: Config, world: World, start: Start) -> Run:
    """Device, data, loaders, model, optimizer and (on resume) the saved state; writes nothing."""
    resume, log = start.resume, start.log
    pretrained = cfg.model.pretrained if resume is None else None  # a resumed run has its own weights
    cfg = fit_to_pretrained(cfg, pretrained, log)  # before the build: best.pt's config rebuilds the shapes
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = training_device(cfg, world)
    dtype = amp_dtype(cfg.train.amp, device)
    refuse_cache(cfg, device)  # a data.cache the device or the augmentations cannot take
    data = load_data(cfg, world, start)
    loaders = build_loaders(cfg, data, device, world, log)
    model = build_training_model(cfg, len(data.classes), pretrained, device, world, log)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(loaders.sampler) / cfg.train.accum_steps)
    run = Run(
        cfg=cfg,
        world=world,
        device=device,
        dtype=dtype,
        data=data,
        loaders=loaders,
        model=model,
        train_model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(cfg, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        ema=make_ema(cfg, model),
        objective=make_objective(cfg, data, model, device),
        log=log,
        show_bars=not start.quiet and sys.stderr.isatty(),
        resumed=resume is not None,
        t_start=start.t_start,
        budget=Budget(start.t_start),
    )
    if run.objective.penalty is not None:
        warn_short_gate_travel(cfg, steps_per_epoch, log)
    if resume is not None:
        restore(run, resume)
    elif world.distributed:
        torch.manual_seed(cfg.train.seed + world.rank)  # each rank its own augmentation stream
    run.train_model = wrap_for_training(model, cfg, world, device)
    m = cfg.model
    attention = m.attention + (" learned width" if m.attention == "se" and m.reduction == "learned" else "")
    precision = precision_note(cfg.train.amp, run.dtype, device)
    log(
        f"model: {m.name} (attention {attention})  device: {device}  {precision}  "
        f"params: {sum(p.numel() for p in model.parameters()):,}"
    )
    return run


def precision_note(setting: str, dtype: torch.dtype | None, device: torch.device) -> str:
    """The training step's precision, and why where ``train.amp: auto`` chose it on a CPU."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")  # type: ignore[arg-type]
    if setting != "auto" or device.type != "cpu":
        return f"amp: {name}"
    if dtype is None:
        return "amp: off (this CPU has no native bf16)"
    return "amp: bf16 (this CPU computes bf16 natively; train.amp: off for fp32)"


def training_device(cfg: Config, world: World) -> torch.device:
    device = resolve_device(cfg.train.device, "train.device")
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise SemodelError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)")
    return device


def load_data(cfg: Config, world: World, start: Start) -> Dataset:
    """Rank 0 scans, checks and splits the data (or reads the resumed run's split.csv) and sends the
    result to the others, so that other nodes need the images but not the run folder."""
    data, resume = None, start.resume
    if world.is_main:
        split_file = resume.path.parent / "split.csv" if resume else None
        classes = list(resume.state["classes"]) if resume else None
        data = prepare_dataset(cfg, split_file, classes, start.split, start.log)
    return distributed.broadcast_object(data, world)


def fit_to_pretrained(cfg: Config, pretrained: str | None, log: Log) -> Config:
    """``cfg`` with the model options the ``pretrained`` weights need (timm's SE-ResNet-18/34 SE
    widths: ``model.min_channels: 8``), checked before anything is built or downloaded."""
    if not pretrained:
        return cfg
    options = model_options(cfg.to_dict())
    overrides = pretrained_model_options(options.pop("name"), pretrained, options)
    if not overrides:
        return cfg
    changes = ", ".join(f"model.{key}: {value}" for key, value in overrides.items())
    log(f"model options set to fit the pretrained weights ({pretrained}): {changes}")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=overrides)})


def build_training_model(
    cfg: Config, num_classes: int, pretrained: str | None, device: torch.device, world: World, log: Log
) -> nn.Module:
    """The configured model on ``device``, started from the ``pretrained`` weights if given."""
    options = model_options(cfg.to_dict())
    name = options.pop("name")
    model = build_model(name, num_classes=num_classes, **options)
    if pretrained:
        log(f"pretrained ({pretrained}): {load_pretrained(model, name, pretrained)}")
    if cfg.train.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device).to(memory_format=memory_format)


def make_ema(cfg: Config, model: nn.Module) -> EMA | None:
    return EMA(model, cfg.train.ema_decay) if cfg.train.ema else None


def make_objective(cfg: Config, data: Dataset, model: nn.Module, device: torch.device) -> Objective:
    objective = Objective(cfg.train.label_smoothing, mix=make_mixer(cfg, len(data.classes)))
    if cfg.data.balance == "loss":
        counts = torch.tensor(data.counts("train"), dtype=torch.float)
        objective.class_weights = (counts.sum() / (len(counts) * counts)).to(device)
    gated = [block for _, block in learned_blocks(model)]  # reduction: learned
    weight = cfg.model.learned.penalty
    if gated and weight > 0:

        def penalty() -> torch.Tensor:
            return weight * sparsity_loss(gated)

        objective.penalty = penalty
    return objective


def warn_short_gate_travel(cfg: Config, steps_per_epoch: int, log: Log) -> None:
    """Learned SE widths under AdamW: say so when the run is too short for gates to close."""
    if cfg.optim.name != "adamw":
        return
    travel = gate_travel(cfg, steps_per_epoch)
    if travel < 2:  # gates start at 1: they could barely reach 0 by the last step
        scale = cfg.model.learned.gate_lr_scale
        log(
            f"note: reduction: learned: in {cfg.train.epochs * steps_per_epoch} optimizer steps a gate can "
            f"move by about {travel:.1f} in all and starts at 1, so few units can close; raise "
            f"model.learned.gate_lr_scale (e.g. to {math.ceil(3 * scale / travel)}) or train for more steps"
        )


def restore(run: Run, resume: Resume) -> None:
    """The resumed checkpoint's state into ``run``; a checkpoint that does not fit is one error line."""
    try:
        restore_training(run, resume.state, run.world.rank, run.world.size)
    except (RuntimeError, ValueError, KeyError) as e:
        raise SemodelError(
            f"{resume.path}: its training state does not fit the configured run ({first_line(e)}); "
            "resume with the run's own config (leave out --set keys that change the model or optimizer)"
        ) from None
    p = run.progress
    run.log(f"resuming {resume.path.parent} at epoch {p.epoch + 1} (step {p.step_in_epoch} of it)")


def wrap_for_training(model: nn.Module, cfg: Config, world: World, device: torch.device) -> nn.Module:
    train_model = torch.compile(model) if cfg.train.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # train.freeze leaves parts of the model without gradients for its first epochs.
        unused = cfg.train.freeze.epochs > 0
        train_model = DistributedDataParallel(train_model, device_ids=ids, find_unused_parameters=unused)
    return train_model


def model_part(name: str) -> str:
    """``head`` (the classifier), ``se`` (the attention layers) or ``backbone``: what train.freeze names."""
    if name.startswith(("fc.", "classifier.")) or name in ("fc", "classifier"):
        return "head"
    return "se" if ".se." in f".{name}." else "backbone"


def apply_freeze(run: Run, epoch: int) -> None:
    """``train.freeze``: during its first epochs only the parts it lists learn; the others keep their
    weights (no gradient) and their batch-norm statistics (BN in eval mode). Then everything learns."""
    freeze = run.cfg.train.freeze
    if not freeze.epochs or epoch > freeze.epochs + 1:
        return
    frozen = epoch <= freeze.epochs
    for name, p in run.model.named_parameters():
        p.requires_grad_(not frozen or model_part(name) in freeze.train)
    if frozen:
        for name, module in run.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and model_part(name) not in freeze.train:
                module.eval()
    if epoch in (1, freeze.epochs + 1):
        verb = "learns" if len(freeze.train) == 1 else "learn"
        what = f"only {' and '.join(freeze.train)} {verb} (train.freeze)" if frozen else "everything learns"
        run.log(f"epoch {epoch}: {what}")


def open_run_folder(run: Run, start: Start) -> None:
    """Rank 0 makes the run folder (a new run) and writes split.csv, config.yaml and opens the
    TensorBoard stream; every rank learns the folder. A new folder that cannot be written is removed."""
    run_dir, resume = None, start.resume
    if run.world.is_main:
        if resume is not None:
            run_dir = resume.path.parent
            stale = remove_stale_temp_files(run_dir)  # left by a run killed while writing a checkpoint
            if stale:
                run.log(f"removed {stale} unfinished checkpoint temp file(s) from {run_dir}")
        else:
            name = run_name(run.cfg.log.name, start.config_path, "run")
            run_dir = make_run_dir(Path(run.cfg.log.out_dir).expanduser(), name)
        try:
            if run.data.split_file is None:
                write_split_csv(run.data, run_dir / "split.csv")
            write_yaml(run.cfg, run_dir / "config.yaml")
            purge = run.progress.epoch + 1 if run.resumed else None
            run.logger = Logger(run_dir, run.cfg.log.tensorboard, purge)
        except SemodelError:
            if resume is None:  # only what this run wrote is in it
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    run.run_dir = distributed.broadcast_object(run_dir, run.world)
    if run.logger is None:
        run.logger = Logger(run.run_dir, False, None)


# ----------------------------------------------------------------------------- the epoch loop


def train_epochs(run: Run) -> None:
    """Train epoch after epoch until ``train.epochs``, early stopping, or Ctrl-C. Checkpoints are
    written in the background; on an error the write in flight is waited for before it is raised,
    and a finished run's last write goes on while ``finish_run`` tests the best weights."""
    run.budget.fill("startup")
    try:
        with Interrupt("finishing the current step, then saving last.pt") as interrupt:
            while run.progress.epoch < run.cfg.train.epochs:
                epoch = run.progress.epoch + 1
                run.loaders.sampler.set_epoch(epoch, run.progress.step_in_epoch)
                started = time.time()
                train_stats = train_one_epoch(run, epoch, interrupt)
                if interrupt.requested:
                    save_state(run, None, ["last.pt"])
                    wait_for_checkpoints(run)
                    last = run.run_dir / "last.pt"
                    run.log(f"interrupted in epoch {epoch}; saved {last}\nresume with: {run.resume_hint}")
                    raise Interrupted()
                result = EpochResult(epoch, train_stats, {}, started, time.time() - started)
                with run.budget.part("validation"):
                    result.val, result.predictions = validate(run, epoch)
                with run.budget.part("logging"):
                    record_epoch(run, result)
                # best.pt first: a crash between the two writes leaves last.pt one epoch behind, and
                # the resumed run redoes the epoch and its best.pt. (The other order could leave a
                # last.pt whose best epoch best.pt never received.)
                save_state(run, result.val, ["best.pt", "last.pt"] if result.improved else ["last.pt"])
                with run.budget.part("logging"):
                    log_epoch(run, result)
                if early_stop(run):
                    break
    except BaseException:
        wait_for_checkpoints(run)  # the files are complete before a failed run ends
        raise


def train_one_epoch(run: Run, epoch: int, interrupt: Interrupt) -> dict[str, float]:
    """One pass over the training batches (from where an interrupted epoch stopped); loss, accuracy
    and images/s over all ranks. The loss and accuracy add up on the device (``Tally``) and are
    read every ``PROGRESS_EVERY`` steps and at the end: no host sync per step."""
    from tqdm import tqdm

    run.train_model.train()
    apply_freeze(run, epoch)
    accum = run.cfg.train.accum_steps
    loader = run.loaders.train
    tally = Tally(len(loader), run.device, run.progress.step_in_epoch)
    pending, t0, since = 0, time.time(), run.budget.mark()
    last_batch = len(loader) - 1
    desc = f"epoch {epoch}/{run.cfg.train.epochs}"
    batches = timed(loader, run.budget)  # the time blocked in the loader is the budget's data_wait
    bar = tqdm(batches, desc, len(loader), leave=False, disable=not run.show_bars, dynamic_ncols=True)
    run.optimizer.zero_grad(set_to_none=True)
    for index, (images, labels) in enumerate(bar):
        if images.numel() == 0:
            continue
        # Under DDP, gradients are averaged across ranks only on the micro-batch that steps.
        sync = not run.world.distributed or pending + 1 >= accum or index >= last_batch
        loss, logits, labels = forward_backward(run, epoch, images, labels, sync)
        pending += 1
        run.progress.step_in_epoch += 1
        if pending == accum:
            optimizer_step(run)
            pending = 0
        tally.add(loss, logits, labels)
        cadence = (index + 1) % PROGRESS_EVERY == 0  # the same batches on every rank
        if cadence:
            tally.check(epoch, run.progress)
            if run.show_bars:
                bar.set_postfix(tally.postfix(run.optimizer, t0), refresh=False)
        # Under DDP every rank stops after the same step (a collective: at the progress cadence).
        asked = pending == 0 and (cadence or not run.world.distributed)
        if asked and distributed.any_rank(interrupt.requested, run.world):
            interrupt.requested = True
            break
    if pending and not interrupt.requested:
        optimizer_step(run)
    bar.close()
    tally.check(epoch, run.progress)  # before anything is saved
    elapsed = max(time.time() - t0, 1e-9)
    totals = distributed.gather_objects(tally.totals(), run.world)
    loss_sum, correct, seen = (sum(t[i] for t in totals) for i in range(3))
    run.budget.rest_to("train_step", since)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "images_per_s": seen / elapsed}


class Tally:
    """An epoch's training loss and accuracy, added up on the device: reading them is a host sync
    (on CUDA, a wait for every queued step), so ``check`` and ``totals`` do it at a cadence."""

    def __init__(self, steps: int, device: torch.device, start: int) -> None:
        self.losses = torch.zeros(max(steps, 1), device=device)  # each step's mean loss
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.sizes: list[int] = []
        self.start, self.checked = start, 0  # steps done before (resume), steps checked finite

    @property
    def steps(self) -> int:
        return len(self.sizes)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses[self.steps] = loss.detach()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.sizes.append(labels.numel())

    def check(self, epoch: int, progress: Progress) -> None:
        """The steps since the last check had finite losses; else the error that names the first."""
        new = self.losses[self.checked : self.steps]
        finite = torch.isfinite(new)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            step = self.start + self.checked + first + 1
            what = f"loss became {new[first].item()} in epoch {epoch}, step {step}"
            raise SemodelError(diverged(what, progress))
        self.checked = self.steps

    def totals(self) -> tuple[float, int, int]:
        """Summed loss (x batch size), correct predictions and images so far."""
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.losses.device)
        loss_sum = float((self.losses[: self.steps] * sizes).sum()) if self.sizes else 0.0
        return loss_sum, int(self.correct), sum(self.sizes)

    def postfix(self, optimizer: torch.optim.Optimizer, t0: float) -> dict[str, str]:
        loss_sum, correct, seen = self.totals()
        lr = optimizer.param_groups[0]["lr"]
        rate = seen / max(time.time() - t0, 1e-9)
        return {
            "loss": f"{loss_sum / seen:.3f}",
            "acc": f"{correct / seen:.1%}",
            "lr": f"{lr:.1e}",
            "ips": f"{rate:.0f}",
        }


def forward_backward(
    run: Run, epoch: int, images: torch.Tensor, labels: torch.Tensor, sync: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and backward of one micro-batch; returns the loss, the logits and the (unmixed) labels."""
    cfg, objective = run.cfg, run.objective
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if not run.resumed and epoch == 1 and run.progress.step_in_epoch == 0:
        run.logger.samples(images, cfg.data.mean, cfg.data.std)
    targets = labels
    if objective.mix is not None:
        images, targets = objective.mix(images, labels)
    with run.train_model.no_sync() if not sync else nullcontext():
        with autocast(run.device, run.dtype):
            logits = run.train_model(images)
        loss = F.cross_entropy(
            logits.float(), targets, weight=objective.class_weights, label_smoothing=objective.label_smoothing
        )
        # (A non-finite loss is caught by train_one_epoch's Tally, at the progress cadence.)
        total = loss + objective.penalty() if objective.penalty is not None else loss
        run.scaler.scale(total / cfg.train.accum_steps).backward()
    return loss, logits, labels


def optimizer_step(run: Run) -> None:
    if run.cfg.train.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.progress.global_step += 1
    if run.ema is not None:
        t0 = time.perf_counter()
        run.ema.update_parameters(run.model)
        run.budget.add("ema", time.perf_counter() - t0)


def validate(run: Run, epoch: int) -> tuple[dict[str, Any], Predictions]:
    """Metrics of the selected weights on the whole validation split (every rank scores its share),
    and the predictions they come from."""
    distributed.broadcast_buffers(run.model, run.world)
    if run.ema is not None:
        distributed.broadcast_buffers(run.ema.module, run.world)
    batches = timed(run.loaders.val, run.budget, "val_data")
    # Scored in fp32, as eval and predict score: the figures a run reports (and picks best.pt by)
    # are the ones `semodel eval` reproduces, on any machine; train.amp covers the training step.
    probs, targets, loss = predict_probs(
        run.eval_model, batches, run.device, None, run.cfg.train.channels_last
    )
    if run.world.distributed:
        parts = distributed.gather_objects((probs, targets, loss * len(targets)), run.world)
        probs = torch.cat([p for p, _, _ in parts])
        targets = torch.cat([t for _, t, _ in parts])
        loss = sum(part_loss for _, _, part_loss in parts) / len(targets)
    if not math.isfinite(loss):  # the weights diverged in the epoch's last steps
        raise SemodelError(diverged(f"validation loss became {loss} after epoch {epoch}", run.progress))
    since = run.budget.mark()
    metrics = classification_metrics(probs, targets, run.data.classes)
    run.budget.rest_to("val_metrics", since)
    metrics["loss"] = loss
    return metrics, Predictions(probs, targets)


def record_epoch(run: Run, result: EpochResult) -> None:
    """Advance the progress past the epoch and note whether the monitored metric improved."""
    p = run.progress
    key, higher_better = MONITORS[run.cfg.train.monitor]
    value = result.val[key]
    result.improved = p.best_value is None or (
        value > p.best_value if higher_better else value < p.best_value
    )
    p.epoch, p.step_in_epoch = result.epoch, 0
    if result.improved:
        p.best_value, p.best_epoch, p.stale_epochs = value, result.epoch, 0
        run.best_predictions = result.predictions
    else:
        p.stale_epochs += 1
    # The learning rate and the epoch's time (training + validation) go into the history, for
    # results.csv and the curves of the run report.
    train = {
        **result.train,
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_time_s": time.time() - result.started,
    }
    run.history.append({"epoch": result.epoch, "train": train, "val": result.val})


def save_state(run: Run, metrics: dict[str, Any] | None, names: list[str]) -> None:
    """Write the run's checkpoint to ``names`` in the run folder (rank 0; every rank must call it).

    The state is copied to the CPU now and written by a background thread while training goes on
    (best.pt slim: ``checkpoint.best_state``); the previous write is waited for first, and its
    failure raised here.
    """
    rngs = distributed.gather_objects(rng_state(), run.world)  # a collective: every rank calls it
    if not run.world.is_main:
        return
    wait_for_checkpoints(run)
    with run.budget.part("checkpoint"):
        state = cpu_copy(training_state(run, metrics, rngs))
        if "best.pt" in names:
            run.best_snapshot = best_state(state)
        files = [(run.run_dir / name, run.best_snapshot if name == "best.pt" else state) for name in names]
        run.checkpoints.submit(lambda: write_checkpoints(files))


def write_checkpoints(files: list[tuple[Path, dict[str, Any]]]) -> None:
    """(On the background writer's thread.) Each file atomically, in order."""
    for path, state in files:
        save_checkpoint(state, path)


def wait_for_checkpoints(run: Run) -> None:
    """Until the background checkpoint write is done; a failed one (disk full, I/O error) is one
    error line that says what is kept and how to go on."""
    with run.budget.part("checkpoint"):
        try:
            run.checkpoints.wait()
        except SemodelError as e:
            raise SemodelError(f"{e}; {resume_note(run)}") from None
        finally:
            run.budget.background = run.checkpoints.busy


def log_epoch(run: Run, result: EpochResult) -> None:
    epoch, train, val = result.epoch, result.train, result.val
    lr = run.optimizer.param_groups[0]["lr"]
    run.logger.scalars(epoch_scalars(train, val, lr, time.time() - result.started), epoch)
    run.logger.confusion(val["confusion_matrix"], run.data.classes, epoch)
    widths = learned_widths(run.eval_model)
    if widths:
        run.logger.scalars(width_scalars(widths), epoch)
    run.log(
        f"epoch {epoch}/{run.cfg.train.epochs}  train loss {train['loss']:.4f} acc {train['acc']:.1%}  "
        f"val loss {val['loss']:.4f} acc {val['acc']:.1%} f1 {val['f1_macro']:.3f}  lr {lr:.2e}  "
        f"{train['images_per_s']:.0f} img/s  {result.train_time:.1f}s"
        + (f"  SE units open {open_fraction(widths):.0%}" if widths else "")
        + ("  *best*" if result.improved else "")
    )


def early_stop(run: Run) -> bool:
    patience, stale = run.cfg.train.patience, run.progress.stale_epochs
    if patience and stale >= patience:
        run.log(f"early stopping: {run.cfg.train.monitor} has not improved for {stale} epochs")
        return True
    return False


# ----------------------------------------------------------------------------- the end


def finish_run(run: Run) -> None:
    """Test the best weights on the held-out split (if any); write metrics.json and hparams."""
    p = run.progress
    result: dict[str, Any] = {
        "best": {"metric": run.monitor, "value": p.best_value, "epoch": p.best_epoch},
        "epochs": p.epoch,
        "wall_time_s": round(time.time() - run.t_start, 1),
        "device": str(run.device),
        "semodel_version": __version__,
        "history": run.history,
    }
    try:
        best = best_weights(run)
        result["val"] = best["metrics"]
        run.model.load_state_dict(best["ema"] if run.ema is not None else best["model"])
        pruned = prune_learned_widths(run)
        result.update(pruned)
        result["calibration"] = calibrate_best(run, best, pruned=bool(pruned))
        result["data"] = data_facts(run.data)
        if run.data.split("test"):
            result.update(test_best(run, best))
    finally:
        wait_for_checkpoints(run)  # the last epoch's files, written meanwhile
    save_checkpoint(best, run.run_dir / "best.pt")  # now with the calibration
    write_json(run.run_dir / "metrics.json", result)
    final = {
        f"hparam/{k}": v for k, v in (result.get("test") or result["val"]).items() if isinstance(v, float)
    }
    run.logger.hparams(flat_hparams(run.config), final)
    run.log(
        f"done in {result['wall_time_s']:.0f}s: {run.run_dir}  (best {run.monitor} {p.best_value:.4f} "
        f"at epoch {p.best_epoch}; checkpoints best.pt, last.pt)"
    )


def best_weights(run: Run) -> dict[str, Any]:
    """best.pt's content: as this process last wrote it, or (its best epoch ran before a resume)
    read from the file."""
    if run.best_snapshot is not None:
        return dict(run.best_snapshot)
    wait_for_checkpoints(run)
    return load_checkpoint(run.run_dir / "best.pt")


def prune_learned_widths(run: Run) -> dict[str, Any]:
    """reduction: learned: remove the closed SE units of the best weights (eval, predict and export do
    the same on load); the widths and parameter counts for metrics.json."""
    if not learned_widths(run.model):
        return {}
    params = sum(p.numel() for p in run.model.parameters())
    widths = prune_attention(run.model)
    pruned = sum(p.numel() for p in run.model.parameters())
    kept, started = sum(w["width"] for w in widths.values()), sum(w["start"] for w in widths.values())
    run.log(f"learned SE widths (best weights, hidden units kept of started): {format_widths(widths)}")
    run.log(
        f"pruned the closed SE units: {params:,} -> {pruned:,} parameters "
        f"(SE hidden units {kept} of {started})"
    )
    return {"learned_widths": widths, "params": {"trained": params, "pruned": pruned}}


def split_predictions(
    run: Run, split: str, preprocess: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best weights (in ``run.model``) on a whole split: probabilities, targets, mean loss."""
    if split == "val" and isinstance(run.loaders.val, KeptBatches) and not run.world.distributed:
        loader = run.loaders.val  # every validation image, decoded once already (the same batches)
    else:
        samples, batch_size = run.data.split(split), run.cfg.data.batch_size * 2
        loader = eval_loader(run.data.root, samples, preprocess, batch_size, **run.loaders.loader_kw)
    return predict_probs(
        run.model, loader, run.device, None, run.cfg.train.channels_last
    )  # fp32: see validate


def calibrate_best(run: Run, best: dict[str, Any], pruned: bool) -> dict[str, Any]:
    """Fit the temperature and (two classes) the operating threshold on the validation split, into
    ``best`` (finish_run writes it to best.pt, where eval, predict and export find them).

    The best epoch's validation predictions are the best weights' on the validation split, so they
    are used as they are; the split is scored again only when that epoch ran before a resume, or
    when closed SE units were ``pruned`` from the weights since.
    """
    kept = run.best_predictions
    if kept is None or pruned:
        probs, targets, _ = split_predictions(run, "val", best["preprocess"])
    else:
        probs, targets = kept.probs, kept.targets
    best["calibration"] = fit_calibration(probs, targets, run.cfg.train.target_sensitivity)
    cal = best["calibration"]
    threshold = (
        f"; threshold {cal['threshold']:.4f} ({cal['threshold_rule']})"
        if cal["threshold"] is not None
        else ""
    )
    run.log(
        f"calibration on val: temperature {cal['temperature']:.3f} (ECE {cal['ece_before']:.3f} -> "
        f"{cal['ece_after']:.3f}){threshold}"
    )
    return cal


def data_facts(data: Dataset) -> dict[str, Any]:
    """metrics.json's ``data``: the root, what was skipped, and the copies the scan found."""
    facts: dict[str, Any] = {"root": str(data.root), "skipped": [list(f) for f in data.bad_files]}
    if data.copies is not None:
        facts["copies"] = {
            "clusters": len(data.copies.clusters),
            "images": sum(len(m) for m in data.copies.clusters),
            "exact": data.copies.exact,
            "near_bits": data.copies.near_bits,
            "conflicts": data.conflicts,
        }
    if data.leaks is not None:
        facts["leakage"] = data.leaks.as_dict()
    return facts


def test_best(run: Run, best: dict[str, Any]) -> dict[str, Any]:
    """The best weights on the test split: metrics, their intervals (metrics.json) and one row per
    image (test_predictions.csv)."""
    samples = run.data.split("test")
    probs, targets, loss = split_predictions(run, "test", best["preprocess"])
    test = classification_metrics(probs, targets, run.data.classes)
    test["loss"] = loss
    run.log(
        f"test (best epoch {run.progress.best_epoch}): acc {test['acc']:.1%}  balanced acc "
        f"{test['balanced_acc']:.1%}  f1 {test['f1_macro']:.3f}  n={test['n']}"
    )
    if len(targets) != len(samples):  # an image became unreadable since the scan: no table
        return {"test": test}
    groups = groups_of(samples, run.cfg.data.split.group_by)
    write_predictions(
        run.run_dir / "test_predictions.csv", prediction_rows(samples, run.data.classes, probs, groups)
    )
    analysis = analyse(probs, targets, run.data.classes, groups, best["calibration"], resamples=1000)
    return {"test": test, "test_analysis": analysis}


def record_time_budget(run: Run) -> None:
    """Where the run's wall time went (semodel.timing): two lines on the console and ``time_budget``
    in metrics.json; after ``finish_run``, so that the final test is in it."""
    report = run.budget.report()
    path = run.run_dir / "metrics.json"
    write_json(path, {**read_json(path), "time_budget": report})
    run.log(run.budget.summary())


# ----------------------------------------------------------------------------- CLI entry


def train_from_cli(
    config_path: Path | None,
    overrides: list[str],
    resume: Path | None,
    quiet: bool,
    options: StartOptions | None = None,
) -> Path:
    """``semodel train``: a new run from ``--config`` and/or ``--data DIR [--model ...]`` (``options``),
    or ``--resume``."""
    if resume is None:
        cfg = config_from_options(config_path, overrides, options or StartOptions())
        return fit(cfg, config_path, quiet=quiet)
    state = load_resumable(resume)
    source = f"{resume} (with --set {' '.join(overrides)})" if overrides else str(resume)
    cfg = config_from_dict(apply_overrides(state["config"], overrides), source)
    if config_path is not None and os.environ.get("RANK", "0") == "0":
        print(
            f"note: --resume continues with the config stored in {resume}; {config_path} is not read",
            file=sys.stderr,
        )
    return fit(cfg, resume=Resume(Path(resume), state), quiet=quiet)
