"""Where and how tensors run: device choice, mixed precision, inference over a loader, seeds, RNG state,
and the Ctrl-C handler of long loops."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semodel.errors import SemodelError


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SemodelError(f"{option} {name!r}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SemodelError(f"{option} {name!r}: CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SemodelError(
                f"{option} {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SemodelError(f"{option} {name!r}: MPS is not available here; use auto or cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX): there bf16
    autocast trains se_resnet18 1.6-2.1x faster than fp32 (docs/performance.md); elsewhere PyTorch
    emulates bf16 and it would be slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPUs that have it, else fp16 (with a grad scaler); bf16 on CPUs that compute
    it natively, else off."""
    if setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device``; a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    loader,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Softmax probabilities (N x C), targets (N) and the mean cross-entropy over ``loader``.

    ``dtype`` runs the model under autocast; ``tta`` averages the logits with the hflip's.
    """
    model.eval()
    probs, targets, loss_sum = [], [], 0.0
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="eval", unit="batch", file=sys.stderr)
    for images, labels in batches:
        if images.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with autocast(device, dtype):
            logits = model(images).float()
            if tta:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        probs.append(logits.softmax(1).cpu())
        targets.append(labels.cpu())
    if not probs:
        raise SemodelError("no readable image to evaluate")
    targets_t = torch.cat(targets)
    return torch.cat(probs), targets_t, loss_sum / len(targets_t)


# ----------------------------------------------------------------------------- randomness


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
    """Every random stream of this process, as tensors and plain data (a checkpoint can hold it)."""
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


# ----------------------------------------------------------------------------- Ctrl-C


class Interrupt:
    """First Ctrl-C: set ``requested`` (the loop finishes its step, saves, stops). Second: stop at once."""

    def __init__(self, message: str) -> None:
        self.message = message
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
        print(f"\ninterrupt: {self.message} (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C until the block is done, then raise it: a row of output half written (an
    unfinished JSON object) is worse than the same row written in full a moment later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
