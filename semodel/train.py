"""fit(): the training loop, from a validated Config to a run folder.

Read top to bottom: setup (run folder, device, data, model, optimizer), then the epoch loop
(train, validate, log, checkpoint, early stop), then the final test of the best weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from semodel import __version__, distributed
from semodel.cache import cached_loaders
from semodel.cache import choose as choose_cache
from semodel.cache import refuse as refuse_cache
from semodel.checkpoint import (
    load_checkpoint,
    model_options,
    remove_stale_temp_files,
    save_checkpoint,
    write_text_atomic,
)
from semodel.config import Config, apply_overrides, config_from_dict, load_config, write_yaml
from semodel.data import (
    ImageList,
    Sample,
    collate_skip_bad,
    default_workers,
    eval_transform,
    prepare_dataset,
    preprocess_of,
    train_transform,
)
from semodel.errors import SemodelError
from semodel.evaluate import autocast, predict_probs
from semodel.metrics import classification_metrics
from semodel.models import build_model, learned_widths, prune_attention, sparsity_loss
from semodel.models.attention import format_widths, learned_blocks
from semodel.predict import resolve_device

# Metric to monitor -> (key in the validation metrics, whether higher is better)
MONITORS = {
    "val_acc": ("acc", True),
    "val_loss": ("loss", False),
    "val_f1": ("f1_macro", True),
    "val_balanced_acc": ("balanced_acc", True),
}


# ----------------------------------------------------------------------------- setup helpers


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device supports it, else fp16 (with a grad scaler); off on CPU unless asked."""
    if setting == "off" or (setting == "auto" and device.type == "cpu"):
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, gate_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """No weight decay on norm weights and biases (1-D tensors): decaying them only hurts.

    The unit gates of learned-width SE blocks get their own group, without decay and with
    ``gate_lr_scale`` x the learning rate: a gate travels from 1 (open) to 0 (closed) in about
    1 / (lr x scale) steps where the task does not need its unit.
    """
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.endswith("unit_gate"):
                gates.append(p)
            else:
                (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": lr * gate_lr_scale})
    return groups


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lr, cfg.model.learned.gate_lr_scale)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def lr_factor(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``i``: linear warm-up, then the schedule."""
    s = cfg.schedule
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(round(s.warmup_epochs * steps_per_epoch))

    def factor(i: int) -> float:
        if i < warmup:
            return 0.01 + 0.99 * i / warmup
        if s.name == "constant":
            return 1.0
        if s.name == "step":
            return s.gamma ** ((i // steps_per_epoch) // s.step_size)
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def gate_travel(cfg: Config, steps_per_epoch: int) -> float:
    """How far a learned-width SE gate can move over the whole run under AdamW: the sum of its
    learning rates (Adam moves a parameter by about lr per step at most, whatever the gradient)."""
    factor = lr_factor(cfg, steps_per_epoch)
    rate = cfg.optim.lr * cfg.model.learned.gate_lr_scale
    return rate * sum(factor(i) for i in range(cfg.train.epochs * steps_per_epoch))


class EpochBatchSampler(Sampler[list[int]]):
    """Batches in a fresh order every epoch, reproducible from (seed, epoch), sharded over ranks.

    The epoch's order is cut into batches of ``batch_size``; rank r of W takes batches
    r, r + W, r + 2W, ... (the batch count is padded to a multiple of W by repeating the first
    batches, so every rank makes the same number of steps). W processes with batch B thus see
    exactly the micro-batches of one process with batch B and ``accum_steps`` W (when the batch
    count is a multiple of W: else the padding repeats some, and the last accumulation is short).
    ``set_epoch(epoch, start)`` skips this rank's first ``start`` batches (resume mid-epoch).
    With ``weights`` the order is drawn with replacement in proportion to them (``balance: sampler``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world, self.weights = (
            n,
            batch_size,
            seed,
            rank,
            world,
            weights,
        )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        batches += batches[: (-len(batches)) % self.world]
        return batches[self.rank :: self.world]

    def __iter__(self):
        return iter(self.batches()[self.start :])

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.batch_size) / self.world) - self.start


class Interrupt:
    """First Ctrl-C: finish the step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Interrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: finishing the current step, then saving last.pt (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def discard_new_run(run_dir: Path) -> None:
    """Remove a run folder made just now by a run that could not start (what it wrote: the split
    and the config); a folder holding anything else is left as it is."""
    for name in ("split.csv", "config.yaml"):
        (run_dir / name).unlink(missing_ok=True)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def new_run_dir(cfg: Config, config_path: Path | None) -> Path:
    name = cfg.log.name or (config_path.stem if config_path else "run")
    base = Path(cfg.log.out_dir).expanduser()
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}-{n}"
    candidate.mkdir(parents=True)
    return candidate


# ----------------------------------------------------------------------------- logging


class Logger:
    """TensorBoard (one event stream in the run folder) + console lines."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def confusion(self, matrix, classes, step: int) -> None:
        if self.writer:
            import matplotlib.pyplot as plt

            from semodel.plots import confusion_figure

            fig = confusion_figure(matrix, classes, f"validation, epoch {step}")
            self.writer.add_figure("val/confusion_matrix", fig, step)
            plt.close(fig)

    def samples(self, images: torch.Tensor, mean, std) -> None:
        if self.writer:
            from torchvision.utils import make_grid

            images = images[:32].float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(
                1, 3, 1, 1
            )
            self.writer.add_image("train/augmented_samples", make_grid(images.clamp(0, 1), nrow=8), 0)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own stream (SummaryWriter.add_hparams would open a new one).
            exp, ssi, sei = hparams_summary(hparams, metrics)
            fw = self.writer._get_file_writer()
            for summary in (exp, ssi, sei):
                fw.add_summary(summary)
            self.scalars(metrics, 0)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section in ("model", "optim", "schedule", "train", "data"):
        for key, value in config[section].items():
            if isinstance(value, (int, float, str, bool)):
                out[f"{section}.{key}"] = value
    return out


# ----------------------------------------------------------------------------- the run


def diverged(what: str, state: RunState) -> str:
    kept = "the last good checkpoint is kept" if state.epoch > 0 else "no checkpoint had been written yet"
    return f"{what}; stopped without saving it ({kept}). Try a lower optim.lr or set train.clip_grad"


def log_line(message: str) -> None:
    """One line on stdout, flushed at once: logs of a run in the background stay current."""
    print(message, flush=True)


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained (after an interrupt)
    global_step: int = 0  # optimizer steps
    best_value: float | None = None
    best_epoch: int = 0
    stale_epochs: int = 0


def fit(
    cfg: Config,
    config_path: Path | None = None,
    resume: Path | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    on_finish: Callable[[nn.Module], None] | None = None,
    resumed: dict[str, Any] | None = None,
    split: list[Sample] | None = None,
) -> Path:
    """Train ``cfg``; returns the run folder. ``resume`` continues from a checkpoint
    (``resumed``: that checkpoint already loaded, so it is not read twice). ``split``: the files
    and their splits (``semodel cv``'s fold) instead of splitting ``data.root`` (a new run only).

    Under torchrun every process calls this; rank 0 writes the run folder and prints.
    ``on_finish(model)`` is called on every rank with the trained (last-epoch) model.
    """
    t_start = time.time()
    log = log or log_line
    world = distributed.init(cfg.train.device)
    if not world.is_main:
        log, quiet = (lambda message: None), True
    where: dict[str, Any] = {}  # _fit fills in run_dir and resume_hint, for the message below
    try:
        return _fit(cfg, config_path, resume, resumed, quiet, log, on_finish, world, t_start, where, split)
    except RuntimeError as e:
        # A worker killed (OOM killer, a signal) or exited: torch raises a RuntimeError from
        # wherever the main process is; the run stops, last.pt stays as the last epoch left it.
        if not str(e).startswith("DataLoader worker (pid"):
            raise
        reason = str(e).strip().splitlines()[0][:200]
        raise SemodelError(
            f"a data loader worker process died ({reason}); out of memory? try a lower "
            f"data.num_workers or data.batch_size; {resume_note(where)}"
        ) from None
    finally:
        distributed.shutdown(world)


def resume_note(where: dict[str, Any]) -> str:
    """What is kept after a failure, and the command that continues the run."""
    run_dir = where.get("run_dir")
    if run_dir is None or not (run_dir / "last.pt").exists():
        return "no checkpoint had been written yet; start the run again"
    return f"{run_dir / 'last.pt'} is kept; resume with: {where['resume_hint']}"


def _fit(
    cfg,
    config_path,
    resume,
    resumed,
    quiet,
    log,
    on_finish,
    world: distributed.World,
    t_start: float,
    where: dict[str, Any],
    split: list[Sample] | None = None,
) -> Path:
    if resume and resumed is None:
        resumed = load_checkpoint(resume)
    show_bars = not quiet and sys.stderr.isatty()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device, "train.device")
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if cfg.train.sync_bn and world.distributed and device.type != "cuda":
        raise SemodelError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)")
    dtype = amp_dtype(cfg.train.amp, device)
    refuse_cache(cfg, device)  # a data.cache the device or the augmentations cannot take: before any folder

    # Run folder and data: rank 0 scans, splits and writes split.csv, and sends the split to the
    # others (so that other nodes need the images, but not the run folder).
    run_dir = data = None
    if world.is_main:
        run_dir = Path(resume).parent if resume else new_run_dir(cfg, config_path)
        stale = remove_stale_temp_files(run_dir)  # left by a run killed while writing a checkpoint
        if stale:
            log(f"removed {stale} unfinished checkpoint temp file(s) from {run_dir}")
        try:
            data = prepare_dataset(
                cfg,
                run_dir,
                resume=resumed is not None,
                log=log,
                classes=list(resumed["classes"]) if resumed else None,
                split=split,
            )
        except SemodelError:
            if not resume:
                discard_new_run(run_dir)
            raise
        write_yaml(cfg, run_dir / "config.yaml")  # after the data checks: a failed resume keeps the old one
    run_dir, data = distributed.broadcast_object((run_dir, data), world)
    workers = cfg.data.num_workers if cfg.data.num_workers != "auto" else default_workers(device.type)
    train_set = ImageList(data.root, data.split("train"), train_transform(cfg))
    weights = None
    counts = torch.tensor(data.counts("train"), dtype=torch.float)
    if cfg.data.balance == "sampler":
        weights = (1.0 / counts)[torch.tensor([label for _, label in train_set.items])]
    sampler = EpochBatchSampler(
        len(train_set), cfg.data.batch_size, cfg.train.seed, world.rank, world.size, weights
    )
    loader_kw: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate_skip_bad,
    )
    if workers > 0:
        loader_kw["prefetch_factor"] = 4
    preprocess = preprocess_of(cfg)
    # Each rank evaluates every W-th validation image; predictions are gathered before metrics,
    # so that they cover every validation image exactly once.
    if len(data.split("val")) < world.size:
        raise SemodelError(
            f"{len(data.split('val'))} validation images for {world.size} processes: "
            "each process needs at least one; use fewer processes or a larger data.split.val"
        )
    val_samples = data.split("val")[world.rank :: world.size]
    cache, cache_why = choose_cache(cfg, device, len(train_set), len(val_samples))
    if cache == "none":
        train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kw)
        val_loader = DataLoader(
            ImageList(data.root, val_samples, eval_transform(preprocess)),
            cfg.data.batch_size * 2,
            **loader_kw,
        )
    log(
        f"data: {data.root}  classes: {', '.join(data.classes)}  "
        f"train/val/test: {len(data.split('train'))}/{len(data.split('val'))}/{len(data.split('test'))}  "
        + (f"workers: {workers}" if cache == "none" else cache_why)
        + (f"  processes: {world.size} x batch {cfg.data.batch_size}" if world.distributed else "")
    )
    if cache != "none":  # decode once; augment whole batches on the device (semodel/cache.py)
        train_loader, val_loader = cached_loaders(
            cfg, cache, data.root, data.split("train"), val_samples, sampler, device, log
        )

    # Model, optimizer, schedule
    m = cfg.model
    options = model_options(cfg.to_dict())
    try:
        model = build_model(
            options.pop("name"),
            num_classes=len(data.classes),
            pretrained=None if resumed else m.pretrained,
            **options,
        )
    except SemodelError:  # e.g. model.pretrained names a missing file or cannot be downloaded
        if world.is_main and not resume:
            discard_new_run(run_dir)
        raise
    if cfg.train.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(sampler) / cfg.train.accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = None
    if cfg.train.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    penalty = None
    gated = [block for _, block in learned_blocks(model)]  # reduction: learned
    if gated and m.learned.penalty > 0 and cfg.optim.name == "adamw":
        travel = gate_travel(cfg, steps_per_epoch)
        if travel < 2:  # gates start at 1: they could barely reach 0 by the last step
            log(
                f"note: reduction: learned: in {cfg.train.epochs * steps_per_epoch} optimizer steps a gate can "
                f"move by about {travel:.1f} in all and starts at 1, so few units can close; raise "
                f"model.learned.gate_lr_scale (e.g. to {math.ceil(3 * m.learned.gate_lr_scale / travel)}) "
                "or train for more steps"
            )
    if gated and m.learned.penalty > 0:

        def penalty() -> torch.Tensor:
            return m.learned.penalty * sparsity_loss(gated)

    class_weights = None
    if cfg.data.balance == "loss":
        class_weights = (counts.sum() / (len(counts) * counts)).to(device)
    mix = make_mixer(cfg, len(data.classes))

    state = RunState()
    if resumed:
        model.load_state_dict(resumed["model"])
        # Keep the optimizer's state (momentum, Adam moments) but this config's hyperparameters,
        # so that `--set optim.lr=...` on resume takes effect; a stored value would override it.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)
        scheduler.base_lrs = [settings["initial_lr"] for settings in configured]
        # The stored lr follows the stored schedule; with `--set train.epochs=...` (or another
        # schedule) the next step must use this run's schedule at the restored step.
        schedule = zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        for group, base_lr, factor in schedule:
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed.get("ema"):
            ema.module.load_state_dict(resumed["ema"])
            ema.n_averaged.fill_(max(1, resumed["progress"]["global_step"]))
        state = RunState(**resumed["progress"])
        rng_states = resumed.get("rng_ranks") or [resumed["rng"]]
        set_rng_state(rng_states[world.rank] if len(rng_states) == world.size else rng_states[0])
        log(f"resuming {run_dir} at epoch {state.epoch + 1} (step {state.step_in_epoch} of it)")
    elif world.distributed:
        torch.manual_seed(cfg.train.seed + world.rank)  # each rank its own augmentation stream
    attention = m.attention + (" learned width" if m.attention == "se" and m.reduction == "learned" else "")
    log(
        f"model: {m.name} (attention {attention})  device: {device}  amp: {dtype or 'off'}  "
        f"params: {sum(p.numel() for p in model.parameters()):,}"
    )

    train_model: nn.Module = torch.compile(model) if cfg.train.compile else model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    monitor_key, higher_better = MONITORS[cfg.train.monitor]
    logger = Logger(run_dir, cfg.log.tensorboard and world.is_main, state.epoch + 1 if resumed else None)
    config_dict = cfg.to_dict()

    def checkpoint(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
        rngs = distributed.gather_objects(rng_state(), world)  # a collective: every rank calls it
        if not world.is_main:
            return None
        return {
            "config": config_dict,
            "classes": data.classes,
            "preprocess": preprocess,
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": state.epoch,
            "progress": vars(state).copy(),
            "best": {"metric": cfg.train.monitor, "value": state.best_value, "epoch": state.best_epoch},
            "metrics": metrics or {},
            "history": history,
            "rng": rngs[0],
            "rng_ranks": rngs if world.distributed else [],
            "world_size": world.size,
            "run_dir": str(run_dir),
        }

    resume_hint = f"semodel train --resume {run_dir / 'last.pt'}" + (
        f" --nproc {world.size}" if world.distributed else ""
    )
    where.update(run_dir=run_dir, resume_hint=resume_hint)

    def save(ckpt: dict[str, Any], name: str) -> None:
        try:
            save_checkpoint(ckpt, run_dir / name)
        except SemodelError as e:  # disk full, I/O error: say what is kept and how to go on
            raise SemodelError(f"{e}; {resume_note(where)}") from None

    history: list[dict[str, Any]] = list(resumed.get("history", [])) if resumed else []
    with Interrupt() as interrupt:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch + 1
            sampler.set_epoch(epoch, state.step_in_epoch)
            t0 = time.time()
            train_stats = train_one_epoch(
                train_model,
                ema,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                device,
                dtype,
                cfg,
                mix,
                class_weights,
                state,
                interrupt,
                logger,
                show_bars,
                epoch,
                resumed is None,
                world,
                penalty,
            )
            if interrupt.requested:
                ckpt = checkpoint(None)
                if world.is_main:
                    save(ckpt, "last.pt")
                log(f"interrupted in epoch {epoch}; saved {run_dir / 'last.pt'}\nresume with: {resume_hint}")
                logger.close()
                raise SystemExit(130)
            train_time = time.time() - t0
            distributed.broadcast_buffers(model, world)
            if ema is not None:
                distributed.broadcast_buffers(ema.module, world)
            eval_model = ema.module if ema is not None else model
            probs, targets, val_loss = predict_probs(
                eval_model, val_loader, device, dtype, cfg.train.channels_last
            )
            if world.distributed:
                parts = distributed.gather_objects((probs, targets, val_loss * len(targets)), world)
                probs = torch.cat([p for p, _, _ in parts])
                targets = torch.cat([t for _, t, _ in parts])
                val_loss = sum(loss for _, _, loss in parts) / len(targets)
            if not math.isfinite(val_loss):  # the weights diverged in the epoch's last steps
                raise SemodelError(diverged(f"validation loss became {val_loss} after epoch {epoch}", state))
            metrics = classification_metrics(probs, targets, data.classes)
            metrics["loss"] = val_loss
            state.epoch, state.step_in_epoch = epoch, 0

            value = metrics[monitor_key]
            improved = state.best_value is None or (
                value > state.best_value if higher_better else value < state.best_value
            )
            if improved:
                state.best_value, state.best_epoch, state.stale_epochs = value, epoch, 0
            else:
                state.stale_epochs += 1
            history.append({"epoch": epoch, "train": train_stats, "val": metrics})
            ckpt = checkpoint(metrics)
            if world.is_main:
                # best.pt first: a crash between the two writes leaves last.pt one epoch behind,
                # and the resumed run redoes the epoch and its best.pt. (The other order could
                # leave a last.pt whose best epoch best.pt never received.)
                if improved:
                    save(ckpt, "best.pt")
                save(ckpt, "last.pt")

            lr = optimizer.param_groups[0]["lr"]
            logger.scalars(
                {
                    "train/loss": train_stats["loss"],
                    "train/acc": train_stats["acc"],
                    "val/loss": val_loss,
                    "val/acc": metrics["acc"],
                    "val/balanced_acc": metrics["balanced_acc"],
                    "val/f1_macro": metrics["f1_macro"],
                    "val/auc": metrics["auc"],
                    "lr": lr,
                    "perf/images_per_s": train_stats["images_per_s"],
                    "perf/epoch_time_s": time.time() - t0,
                },
                epoch,
            )
            logger.confusion(metrics["confusion_matrix"], data.classes, epoch)
            widths = learned_widths(eval_model)
            if widths:
                logger.scalars(width_scalars(widths), epoch)
            log(
                f"epoch {epoch}/{cfg.train.epochs}  train loss {train_stats['loss']:.4f} acc {train_stats['acc']:.1%}  "
                f"val loss {val_loss:.4f} acc {metrics['acc']:.1%} f1 {metrics['f1_macro']:.3f}  lr {lr:.2e}  "
                f"{train_stats['images_per_s']:.0f} img/s  {train_time:.1f}s"
                + (f"  SE units open {open_fraction(widths):.0%}" if widths else "")
                + ("  *best*" if improved else "")
            )
            if cfg.train.patience and state.stale_epochs >= cfg.train.patience:
                log(f"early stopping: {cfg.train.monitor} has not improved for {state.stale_epochs} epochs")
                break

    if on_finish is not None:
        on_finish(model)
    distributed.barrier(world)
    if world.is_main:
        finish_run(
            cfg,
            run_dir,
            data,
            model,
            ema is not None,
            state,
            history,
            device,
            dtype,
            loader_kw,
            logger,
            log,
            t_start,
        )
    logger.close()
    return run_dir


def finish_run(
    cfg, run_dir, data, model, use_ema, state, history, device, dtype, loader_kw, logger, log, t_start
):
    """Test the best weights on the held-out split (if any); write metrics.json and hparams."""
    result: dict[str, Any] = {
        "best": {"metric": cfg.train.monitor, "value": state.best_value, "epoch": state.best_epoch},
        "epochs": state.epoch,
        "wall_time_s": round(time.time() - t_start, 1),
        "device": str(device),
        "semodel_version": __version__,
        "history": history,
    }
    best = load_checkpoint(run_dir / "best.pt")
    result["val"] = best["metrics"]
    model.load_state_dict(best["ema"] if use_ema else best["model"])
    if learned_widths(model):
        # reduction: learned: remove the closed units; eval, predict and export do the same on load.
        params = sum(p.numel() for p in model.parameters())
        widths = prune_attention(model)
        pruned = sum(p.numel() for p in model.parameters())
        result["learned_widths"] = widths
        result["params"] = {"trained": params, "pruned": pruned}
        log(f"learned SE widths (best weights, hidden units kept of started): {format_widths(widths)}")
        log(
            f"pruned the closed SE units: {params:,} -> {pruned:,} parameters "
            f"(SE hidden units {sum(w['width'] for w in widths.values())} of {sum(w['start'] for w in widths.values())})"
        )
    if data.split("test"):
        test_loader = DataLoader(
            ImageList(data.root, data.split("test"), eval_transform(best["preprocess"])),
            cfg.data.batch_size * 2,
            **loader_kw,
        )
        probs, targets, test_loss = predict_probs(model, test_loader, device, dtype, cfg.train.channels_last)
        test = classification_metrics(probs, targets, data.classes)
        test["loss"] = test_loss
        result["test"] = test
        log(
            f"test (best epoch {state.best_epoch}): acc {test['acc']:.1%}  balanced acc {test['balanced_acc']:.1%}  "
            f"f1 {test['f1_macro']:.3f}  n={test['n']}"
        )
    write_text_atomic(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    final = {
        f"hparam/{k}": v for k, v in (result.get("test") or result["val"]).items() if isinstance(v, float)
    }
    logger.hparams(flat_hparams(cfg.to_dict()), final)
    log(
        f"done in {result['wall_time_s']:.0f}s: {run_dir}  (best {cfg.train.monitor} {state.best_value:.4f} "
        f"at epoch {state.best_epoch}; checkpoints best.pt, last.pt)"
    )


def open_fraction(widths: dict[str, dict[str, int]]) -> float:
    """Share of the learned SE blocks' starting parameters that are still open (units weighted by 2C)."""
    total = sum(w["start"] * w["channels"] for w in widths.values())
    return sum(w["width"] * w["channels"] for w in widths.values()) / max(total, 1)


def width_scalars(widths: dict[str, dict[str, int]]) -> dict[str, float]:
    """TensorBoard scalars for learned widths: per block, and the open share of all SE parameters."""
    scalars = {f"attention/width/{name}": float(w["width"]) for name, w in widths.items()}
    scalars["attention/open_fraction"] = open_fraction(widths)
    return scalars


def make_mixer(cfg: Config, num_classes: int):
    """Batch-level mixup / cutmix (torchvision v2), or None."""
    from torchvision.transforms import v2

    choices = []
    if cfg.data.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.data.mixup, num_classes=num_classes))
    if cfg.data.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.data.cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def train_one_epoch(
    model,
    ema,
    loader,
    optimizer,
    scheduler,
    scaler,
    device,
    dtype,
    cfg: Config,
    mix,
    class_weights,
    state: RunState,
    interrupt: Interrupt,
    logger: Logger,
    show_bars: bool,
    epoch: int,
    first_run: bool,
    world: distributed.World = distributed.World(),
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    from tqdm import tqdm

    model.train()
    accum = cfg.train.accum_steps
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.time()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{cfg.train.epochs}",
        leave=False,
        disable=not show_bars,
        dynamic_ncols=True,
    )
    optimizer.zero_grad(set_to_none=True)
    pending = 0
    last_batch = len(loader) - 1
    for index, (images, labels) in enumerate(bar):
        if images.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if first_run and epoch == 1 and state.step_in_epoch == 0:
            logger.samples(images, cfg.data.mean, cfg.data.std)
        hard_labels = labels
        if mix is not None:
            images, labels = mix(images, labels)
        # Under DDP, gradients are averaged across ranks only on the micro-batch that steps.
        skip_sync = world.distributed and pending + 1 < accum and index < last_batch
        with model.no_sync() if skip_sync else nullcontext():
            with autocast(device, dtype):
                logits = model(images)
            loss = F.cross_entropy(
                logits.float(), labels, weight=class_weights, label_smoothing=cfg.train.label_smoothing
            )
            if not torch.isfinite(loss):
                raise SemodelError(
                    diverged(
                        f"loss became {loss.item()} in epoch {epoch}, step {state.step_in_epoch + 1}", state
                    )
                )
            total = (
                loss + penalty() if penalty is not None else loss
            )  # the sparsity loss of learned SE widths
            scaler.scale(total / accum).backward()
        pending += 1
        state.step_in_epoch += 1
        if pending == accum:
            optimizer_step(model, ema, optimizer, scheduler, scaler, cfg)
            state.global_step += 1
            pending = 0
        n = hard_labels.numel()
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == hard_labels).sum().item()
        seen += n
        if show_bars:
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.1%}",
                lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                ips=f"{seen / (time.time() - t0):.0f}",
            )
        if pending == 0 and distributed.any_rank(interrupt.requested, world):
            interrupt.requested = True  # every rank stops after the same step
            break
    if pending and not interrupt.requested:
        optimizer_step(model, ema, optimizer, scheduler, scaler, cfg)
        state.global_step += 1
    bar.close()
    elapsed = max(time.time() - t0, 1e-9)
    totals = distributed.gather_objects((loss_sum, correct, seen), world)
    loss_sum, correct, seen = (sum(t[i] for t in totals) for i in range(3))
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "images_per_s": seen / elapsed}


def optimizer_step(model, ema, optimizer, scheduler, scaler, cfg: Config) -> None:
    if cfg.train.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if ema is not None:
        ema.update_parameters(model)


# ----------------------------------------------------------------------------- CLI entry


def train_from_cli(config_path: Path | None, overrides: list[str], resume: Path | None, quiet: bool) -> Path:
    if resume is not None:
        state = load_checkpoint(resume)
        if "progress" not in state or "optimizer" not in state:
            raise SemodelError(f"{resume}: has no training state to resume from")
        raw = apply_overrides(state["config"], overrides)
        cfg = config_from_dict(
            raw, f"{resume} (with --set {' '.join(overrides)})" if overrides else str(resume)
        )
        if config_path is not None and os.environ.get("RANK", "0") == "0":
            print(
                f"note: --resume continues with the config stored in {resume}; {config_path} is not read",
                file=sys.stderr,
            )
        return fit(cfg, None, resume, quiet, resumed=state)
    cfg = load_config(config_path, overrides)
    return fit(cfg, config_path, None, quiet)
