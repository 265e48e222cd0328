"""Optimizer, parameter groups and the learning-rate schedule of a config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lr, cfg.model.learned.gate_lr_scale)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


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
