"""AdamW with two parameter groups (no weight decay on norms and biases) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sftlab.config import TrainConfig


def build_optimizer(params: dict[str, nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    # Vectors (biases, norm scales) and scalars never decay; matrices do.
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in params.values())
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=tuple(train.betas), **kind)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the decay.

    >>> [round(lr_factor(s, total_steps=10, warmup_steps=2, schedule="linear"), 3) for s in (0, 1, 2, 9)]
    [0.5, 1.0, 1.0, 0.125]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / decay_steps
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=train.warmup_steps,
                                          schedule=train.schedule))
