"""The optimiser every LM-style method uses: AdamW (no decay on biases and norms) with warmup + cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """LR multiplier: linear warmup, then constant or cosine decay to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(module: nn.Module, total_steps: float, lr: float, weight_decay: float,
                        betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float,
                        lr_schedule: str) -> dict[str, Any]:
    """`configure_optimizers` output: AdamW over trainable params (matrices decayed), stepped per batch."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(betas),
    )
    total = int(total_steps) if math.isfinite(total_steps) else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, total, min_lr_ratio, lr_schedule))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
