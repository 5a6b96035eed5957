"""Decoding primitives shared by the models' own samplers and the rollout loop (re-exported by
:mod:`lightning_rlm.rollout`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["position_ids_from_mask", "sample_categorical"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counting only attended tokens, so left padding does not shift them. [N, T] -> [N, T]."""
    # Pad slots get position 0; their outputs are never used and they are masked as keys.
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One id per row of ``probs [N, V]`` by inverting the CDF with one uniform per row. Same distribution
    as ``torch.multinomial(probs, 1)``, an order of magnitude cheaper on CPU (multinomial draws an
    exponential per vocabulary entry). Zero-probability ids are never drawn. Returns ``[N]``."""
    cdf = probs.float().cumsum(-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    u = torch.rand(total.shape, generator=generator, device=total.device) * total  # [N, 1]
    # Keep u strictly below the total, where rounding of rand * total could land.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # first id whose cdf exceeds u
