"""Per-position KL to a base model, aggregated over completion positions, and a hinged KL barrier.

The KL barrier of `SFTKLBarrier` keeps a fine-tuned student near its base model only where it has
drifted too far:

    kl[b, t]  = Σ_v p(v) · (log p(v) − log q(v))             per position, summed over the vocabulary
                  kl_fwd: p = base, q = student  (KL(base ‖ student))
                  kl_rev: p = student, q = base  (KL(student ‖ base))
    div       = aggregate(kl over masked positions)          mean | rmse | p95 | max | logsumexp
    barrier   = lam · relu(div − tau)                         zero (and zero gradient) while div <= tau

The aggregators differ in how much a few outlying positions count. The mean dilutes them, which lets a
handful of looping, base-improbable tokens hide under the tau gate; rmse = sqrt(mean(kl²)) is pulled up
by them and fires earlier; p95 and max look only at the tail (their gradient reaches only the positions
at the quantile / the argmax, while the SFT loss keeps the update dense). `logsumexp` is a smooth max,
written here as a log-mean-exp (logsumexp(kl) − log M for M masked positions) so that it is 0 at zero
KL and lies between the mean and the max. All are in nats, but on different scales: tau must be chosen
per aggregator.

Numerics (the source review's points): log-softmax and KL are computed in float32 with autocast off,
even when the logits come from a bf16/fp16 model; aggregation casts to float32 first, so the rmse eps
(1e-6, well above fp16's smallest subnormal ~6e-8) cannot underflow and sqrt has a finite gradient at
zero KL; `torch.quantile` (which rejects bf16) always sees float32; an empty mask gives 0 with a zero
gradient instead of a NaN. Positions are pooled over the whole batch (not averaged per sequence first),
as in the source. Logits are assumed finite (a -inf logit would give 0 · inf = NaN).

Calibrating tau per aggregator: the aggregators live on different scales, so one tau is a different gate
for each (0.1 nats everywhere by default, uncalibrated). `aggregate_kl_per_sequence` (what
`SFTKLBarrier.sequence_divergences` returns for the student's KL to the base) gives each aggregator per
sequence and `suggest_tau` a threshold between coherent and looping sequences;
`benchmarks/kl_tau_calibration.py` runs both on a checkpoint and a round file whose generations the loop
test flags (see its docstring). No tau default is changed from it yet: that needs a run whose generations
include loops.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_rlm.checks import check_one_of

__all__ = ["KLAggregate", "KLDirection", "RMSE_EPS", "aggregate_kl", "aggregate_kl_per_sequence",
           "check_kl_barrier", "fp32_log_softmax", "kl_barrier", "kl_diagnostics", "suggest_tau",
           "per_position_kl"]

KLDirection = Literal["kl_fwd", "kl_rev"]
KLAggregate = Literal["mean", "rmse", "p95", "max", "logsumexp"]
KL_DIRECTIONS: tuple[str, ...] = ("kl_fwd", "kl_rev")
KL_AGGREGATES: tuple[str, ...] = ("mean", "rmse", "p95", "max", "logsumexp")

# Added under the rmse square root; representable in fp16 too (the source's 1e-8 underflowed to 0 there).
RMSE_EPS = 1e-6


def fp32_log_softmax(logits: Tensor) -> Tensor:
    """log-softmax over the last axis in float32, whatever the input dtype and any active autocast."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return torch.log_softmax(logits.float(), dim=-1)


def per_position_kl(student_logits: Tensor, base_logits: Tensor, direction: KLDirection) -> Tensor:
    """KL between student and base next-token distributions at every position, summed over the vocab.

    Args:
        student_logits: [B, T, V] (gradients flow through these).
        base_logits: [B, T, V] (detach or compute under no_grad: the base is a fixed target).
        direction: `kl_fwd` = KL(base ‖ student), `kl_rev` = KL(student ‖ base).

    Returns:
        [B, T] float32 KL in nats (>= 0 up to rounding).
    """
    check_one_of("direction", direction, KL_DIRECTIONS)
    if student_logits.shape != base_logits.shape:
        raise ValueError(f"student and base logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(base_logits.shape)}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        logp_s = fp32_log_softmax(student_logits)  # [B, T, V]
        logp_b = fp32_log_softmax(base_logits)  # [B, T, V]
        logp_p, logp_q = (logp_b, logp_s) if direction == "kl_fwd" else (logp_s, logp_b)
        return (logp_p.exp() * (logp_p - logp_q)).sum(dim=-1)  # [B, T]


def aggregate_kl(kl: Tensor, mask: Tensor, how: KLAggregate) -> Tensor:
    """One float32 scalar from the per-position KL of the masked (completion) positions of a batch.

    Args:
        kl: [B, T] per-position KL (any float dtype; aggregated in float32).
        mask: [B, T] nonzero on the positions that count; the rest are ignored, whatever they hold.
        how: `mean`; `rmse` = sqrt(mean(kl²) + 1e-6); `p95` = 0.95 quantile (linear interpolation);
            `max`; `logsumexp` = logsumexp(kl) − log(M), a smooth max that is 0 at zero KL.

    Returns:
        A 0-d float32 tensor; 0 with a zero gradient when the mask selects nothing.
    """
    check_one_of("aggregate", how, KL_AGGREGATES)
    if kl.shape != mask.shape:
        raise ValueError(f"kl and mask differ in shape: {tuple(kl.shape)} vs {tuple(mask.shape)}")
    keep = mask.bool()  # [B, T]
    kl32 = kl.float()  # [B, T]
    with torch.autocast(device_type=kl.device.type, enabled=False):
        if not bool(keep.any()):
            # masked_fill (not kl * 0) so garbage at unmasked slots cannot turn the zero into a NaN
            return kl32.masked_fill(~keep, 0.0).sum()
        values = kl32[keep]  # [M]
        if how == "mean":
            return values.mean()
        if how == "rmse":
            return (values.pow(2).mean() + RMSE_EPS).sqrt()
        if how == "p95":
            return torch.quantile(values, 0.95)
        if how == "max":
            return values.max()
        return torch.logsumexp(values, dim=0) - math.log(values.numel())


def aggregate_kl_per_sequence(kl: Tensor, mask: Tensor,
                              hows: tuple[str, ...] = KL_AGGREGATES) -> dict[str, Tensor]:
    """Each aggregator of `aggregate_kl` over each sequence's own masked positions: {how: [B] float32}.

    What tau is compared with, per sequence rather than pooled over a batch (a batch of B sequences dilutes
    one looping sequence ~B times under the mean, ~sqrt(B) times under rmse, not under max).

    Args:
        kl: [B, T] per-position KL; mask: [B, T] nonzero on the positions that count; hows: the aggregators.
    """
    return {how: torch.stack([aggregate_kl(kl[i : i + 1], mask[i : i + 1], how) for i in range(len(kl))])
            for how in hows}


def kl_diagnostics(kl: Tensor, mask: Tensor, tau: float, active: str, div: Tensor,
                   hows: tuple[str, ...] = KL_AGGREGATES) -> dict[str, Tensor]:
    """What a KL barrier logs besides its value, without gradient: `div/<how>` for every aggregator in `hows`
    (`active`'s is `div`, the barrier's own divergence, detached) and `frac_above_tau`, the fraction of the
    masked positions whose KL exceeds tau.

    Args:
        kl: [B, T] per-position KL; mask: [B, T] bool, the positions that count; div: the active aggregate.
    """
    with torch.no_grad():
        kl_d = kl.detach()  # [B, T]
        out = {f"div/{how}": div.detach() if how == active else aggregate_kl(kl_d, mask, how) for how in hows}
        out["frac_above_tau"] = ((kl_d > tau) & mask).sum() / mask.sum().clamp(min=1)
    return out


def check_kl_barrier(direction: str, aggregate: str, tau: float, lam: float) -> None:
    """ValueError unless tau >= 0, lam >= 0 (NaN fails both) and direction and aggregate are known."""
    if not tau >= 0:  # also rejects NaN
        raise ValueError(f"tau must be >= 0 (the barrier is relu(div - tau) on a divergence >= 0), got {tau}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if aggregate not in KL_AGGREGATES:
        raise ValueError(f"aggregate must be one of {KL_AGGREGATES}, got {aggregate!r}")


def kl_barrier(div: Tensor, tau: float, lam: float) -> Tensor:
    """`lam · relu(div − tau)`: no penalty and exactly zero gradient while `div <= tau`."""
    return lam * torch.relu(div - tau)


def suggest_tau(coherent: list[float], looping: list[float]) -> dict[str, Any]:
    """A barrier threshold between the divergences of coherent and of looping sequences (one aggregator).

    Returns the medians, `auc` (the chance that a looping sequence scores above a coherent one, ties half:
    how well this aggregator tells them apart), `separable` (the coherent 90th percentile lies below the
    looping 10th) and `tau`: the geometric mean of those two percentiles when separable (the barrier stays
    off on 90% of coherent sequences and fires on 90% of looping ones), else of the two medians.
    """
    if not coherent or not looping:
        raise ValueError("suggest_tau needs at least one coherent and one looping value")
    c, lp = torch.tensor(coherent, dtype=torch.float64), torch.tensor(looping, dtype=torch.float64)
    c90, l10 = torch.quantile(c, 0.9).item(), torch.quantile(lp, 0.1).item()
    c50, l50 = c.median().item(), lp.median().item()
    auc = ((lp[:, None] > c[None, :]).double() + 0.5 * (lp[:, None] == c[None, :]).double()).mean().item()
    separable = c90 < l10
    lo, hi = (c90, l10) if separable else (c50, l50)
    return {"coherent_median": c50, "looping_median": l50, "coherent_p90": c90, "looping_p10": l10,
            "auc": auc, "separable": separable, "tau": math.sqrt(max(lo, 1e-12) * max(hi, 1e-12))}
