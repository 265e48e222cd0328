"""Optimizer, parameter groups and the learning-rate schedule of a config."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def is_new_layer(name: str) -> bool:
    """A parameter of the layers a fine-tuned model starts without: the classifier and the
    attention (SE) layers; the rest is the backbone that pretrained weights provide."""
    return name.startswith(("fc.", "classifier.")) or ".se." in f".{name}"


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, gate_lr_scale: float = 1.0, backbone_lr_scale: float = 1
) -> list[dict[str, Any]]:
    """No weight decay on norm weights and biases (1-D tensors): decaying them only hurts.

    The unit gates of learned-width SE blocks get their own group, without decay and with
    ``gate_lr_scale`` x the learning rate: a gate travels from 1 (open) to 0 (closed) in about
    1 / (lr x scale) steps where the task does not need its unit. With ``backbone_lr_scale`` < 1
    the backbone (not ``is_new_layer``) learns at lr x that scale (fine-tuning), in groups of its own.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    gates = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("unit_gate"):
            gates.append(p)
        else:
            backbone = backbone_lr_scale != 1 and not is_new_layer(name)
            groups.setdefault((backbone, p.ndim > 1), []).append(p)
    out = []
    for backbone in (True, False) if backbone_lr_scale != 1 else (False,):
        scale = {"lr": lr * backbone_lr_scale} if backbone else {}
        out.append({"params": groups.get((backbone, True), []), "weight_decay": weight_decay, **scale})
        out.append({"params": groups.get((backbone, False), []), "weight_decay": 0.0, **scale})
    if gates:
        out.append({"params": gates, "weight_decay": 0.0, "lr": lr * gate_lr_scale})
    return out


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lr, cfg.model.learned.gate_lr_scale, o.backbone_lr_scale)
    params = [p for group in groups for p in group["params"]]
    if o.name == "sgd":
        kernels = fast_kernels(torch.optim.SGD, params)
        if cfg.train.freeze.epochs and kernels.get("fused"):
            # Fused SGD cannot take parameters whose momentum starts later than the others'
            # (the frozen ones, once train.freeze ends); the multi-tensor kernels can.
            kernels = {"foreach": True}
        nesterov = o.nesterov and o.momentum > 0
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=nesterov, **kernels)
    kernels = fast_kernels(torch.optim.AdamW, params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), **kernels)


def fast_kernels(optimizer: type[torch.optim.Optimizer], params: list[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` where the optimizer has a fused kernel for the parameters' device, else
    ``foreach=True`` where it has multi-tensor kernels, else {} (PyTorch's choice).

    PyTorch picks ``foreach`` by itself only on CUDA and never picks ``fused``; on a CPU its
    default is the per-tensor loop (``_single_tensor_adam``). The fused CPU kernels (AdamW, SGD:
    PyTorch >= 2.4) do one pass per tensor instead of about ten: AdamW's step on SE-ResNet-18's
    11 M parameters takes 19 ms fused, 66 ms foreach, 82 ms in the loop (2-core CPU, one thread;
    docs/performance.md).
    """
    from torch.utils import _foreach_utils

    devices = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    fused_devices = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", list)()
    foreach_devices = getattr(_foreach_utils, "_get_foreach_kernels_supported_devices", list)()
    accepts = inspect.signature(optimizer).parameters
    if "fused" in accepts and floating and devices <= set(fused_devices):
        return {"fused": True}
    if "foreach" in accepts and devices <= set(foreach_devices):
        return {"foreach": True}
    return {}


class EMA(AveragedModel):
    """The exponential moving average of a model's weights and buffers (``AveragedModel`` with
    ``get_ema_multi_avg_fn``: the same values, checkpoints and ``n_averaged``), updated without
    ``update_parameters``' per-step work: it lists and detaches every tensor again, groups them
    by device, averages BatchNorm's integer counters one by one, and reads ``n_averaged`` from the
    device (a host sync on CUDA) at every step. Here the tensor pairs are listed once, the
    floating-point ones take one ``_foreach_lerp_``, and the integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self._source: nn.Module | None = None
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._others: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._updates = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if model is not self._source:  # the first update (after a resume has set n_averaged)
            self._pair_with(model)
        averaged, current = self._floats
        if self._updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
        if self._others[0]:
            torch._foreach_copy_(*self._others)
        self._updates += 1
        self.n_averaged += 1

    def _pair_with(self, model: nn.Module) -> None:
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        floats, others = ([], []), ([], [])
        for a, b in zip(mine, theirs, strict=True):
            kind = floats if a.is_floating_point() else others
            kind[0].append(a.detach())
            kind[1].append(b.detach())
        self._source, self._floats, self._others = model, floats, others
        self._updates = int(self.n_averaged)


def lr_factor(cfg: Any, steps_per_epoch: int) -> Callable[[int], float]:
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


def make_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The schedule as a ``LambdaLR`` stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def gate_travel(cfg: Any, steps_per_epoch: int) -> float:
    """How far a learned-width SE gate can move over the whole run under AdamW: the sum of its
    learning rates (Adam moves a parameter by about lr per step at most, whatever the gradient)."""
    factor = lr_factor(cfg, steps_per_epoch)
    rate = cfg.optim.lr * cfg.model.learned.gate_lr_scale
    return rate * sum(factor(i) for i in range(cfg.train.epochs * steps_per_epoch))
