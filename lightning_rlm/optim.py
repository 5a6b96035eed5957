"""The one optimiser helper of every method: AdamW with linear warm-up, then a constant, cosine or linear rate;
and per-role parameter groups (`parameter_groups: {role: {"lr": ..., "weight_decay": ...}}`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_rlm.checks import check_at_least, check_one_of, check_positive

Schedule = Literal["constant", "cosine", "linear"]
GROUP_SETTINGS = ("lr", "weight_decay")  # what `parameter_groups` may set per role


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """LR multiplier: linear warmup to 1, then constant, or a cosine / linear decay to `min_ratio` at
    `total_steps` (`total_steps` <= `warmup_steps`, e.g. 0 for an unknown length: constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup(param_groups: Iterable[dict[str, Any]], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0, total_steps: float = 0,
                 min_lr_ratio: float = 0.0, schedule: Schedule = "constant") -> dict[str, Any]:
    """`configure_optimizers` output: AdamW over `param_groups` (a group may set its own `lr` or
    `weight_decay`) with the :func:`warmup_cosine` schedule, stepped per batch."""
    opt = torch.optim.AdamW(list(param_groups), lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    total = int(total_steps) if math.isfinite(total_steps) else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, total, min_lr_ratio, schedule))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def adamw_warmup_cosine(module: nn.Module, total_steps: float, lr: float, weight_decay: float,
                        betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float,
                        lr_schedule: str) -> dict[str, Any]:
    """:func:`adamw_warmup` over the trainable parameters of `module`, matrices decayed (not biases, norms)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return adamw_warmup(groups, lr=lr, betas=betas, warmup_steps=warmup_steps, total_steps=total_steps,
                        min_lr_ratio=min_lr_ratio, schedule=lr_schedule)  # type: ignore[arg-type]


def check_group_settings(parameter_groups: Optional[dict[str, dict[str, float]]], roles: Sequence[str]) -> None:
    """`parameter_groups` names only `roles` and only the settings `lr` (> 0) and `weight_decay` (>= 0)."""
    for role, settings in (parameter_groups or {}).items():
        check_one_of("a parameter_groups role", role, tuple(roles))
        for key, value in settings.items():
            check_one_of(f"a parameter_groups[{role!r}] setting", key, GROUP_SETTINGS)
            if key == "lr":
                check_positive(**{f"parameter_groups.{role}.lr": value})
            else:
                check_at_least(0.0, **{f"parameter_groups.{role}.weight_decay": value})


def role_param_groups(roles: dict[str, list[nn.Parameter]], parameter_groups: dict[str, dict[str, float]],
                      lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, per role of `roles` (each parameter in one role): one group of its trainable
    matrices with the role's weight decay (named the role) and one of its vectors without (`<role>_no_decay`),
    both with the role's lr; a role or setting that `parameter_groups` does not name takes `lr` /
    `weight_decay`. Empty groups are left out; the :func:`adamw_warmup` schedule scales every group."""
    groups: list[dict[str, Any]] = []
    for role, params in roles.items():
        params = [p for p in params if p.requires_grad]
        role_lr = parameter_groups.get(role, {}).get("lr", lr)
        wd = parameter_groups.get(role, {}).get("weight_decay", weight_decay)
        for suffix, chosen, decay in (("", [p for p in params if p.dim() >= 2], wd),
                                      ("_no_decay", [p for p in params if p.dim() < 2], 0.0)):
            if chosen:
                groups.append({"params": chosen, "lr": role_lr, "weight_decay": decay, "name": role + suffix})
    return groups


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all present gradients together (0 when none): what clipping by norm measures."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
