"""Quiet-STaR's loss math (pure torch), shared by `QuietStar` (HF causal LMs) and `QuietStarGRU`.

At each thinking position K thoughts z_k are sampled and scored by the log-likelihood of the true tokens
after them, the reward r_k (`talk_reward`). REINFORCE with a leave-one-out baseline
(`reinforce_advantage`) gives each thought the advantage A_k = r_k - b_k, optionally bounded
(`bound_advantage`); the policy loss is -mean(A_k * log pi(z_k)). The rest are the NLLs and metrics the
methods log: the talk NLL (`talk_nll`), the next-token NLL with and without the thought, by difficulty and at
the tokens of interest (`next_token_metrics`), the thoughts' sampling entropy (`thought_entropy_stats`) and per-thought means (`thought_means`).

Weighted means are sum(x * w) / max(sum(w), 1) with w 1 on the entries that count (real labels, real
thoughts) and 0 elsewhere (`weighted_mean`), so padding never enters a mean.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlm.losses.policy import leave_one_out_baseline

__all__ = ["BoundMode", "bound_advantage", "last_context_nll", "next_token_metrics", "reinforce_advantage", "talk_logprobs",
           "talk_nll", "talk_reward", "talk_targets", "thought_entropy_stats", "thought_length_stats", "thought_means",
           "token_logprobs", "weighted_mean"]

BoundMode = Literal["clip", "tanh"]


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) at every position, in float32: logits [..., V], targets [...] long -> [...]; a target
    of -100 gives 0.

    >>> token_logprobs(torch.zeros(2, 4), torch.tensor([1, -100])).abs().tolist()  # uniform: log(1/4)
    [1.3862943649291992, 0.0]
    """
    return -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            reduction="none").view(targets.shape)


def weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """sum(x * weight) / max(sum(weight), 1): with a 0/1 weight of x's shape, the mean over the entries of
    weight 1 (0 when there are none).

    >>> weighted_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1.0, 1.0, 0.0])).item()
    1.5
    """
    return (x * weight).sum() / weight.sum().clamp(min=1)


def thought_means(weight: Tensor, **values: Optional[Tensor]) -> dict[str, Tensor]:
    """`weighted_mean` of each per-thought value [B, P, Lq] over the thoughts of weight [B, P, Lq] 1 (e.g. the
    real ones), by name; None values are left out.

    >>> thought_means(torch.tensor([1.0, 0.0]), reward=torch.tensor([-2.0, 5.0]), mix_weight=None)
    {'reward': tensor(-2.)}
    """
    return {name: weighted_mean(value, weight) for name, value in values.items() if value is not None}


def talk_targets(labels: Tensor, n_talk: int) -> tuple[Tensor, Tensor]:
    """The talk targets x_{t+1+j}, j < n_talk, of next-token labels [B, T] (labels[:, t] = x_{t+1}): labels
    shifted left by j [J, B, T] (clamped at the window's end) and whether t + j is inside the window
    [J, 1, T, 1] bool (broadcasts against [J, B, T, K]).

    >>> shifted, inside = talk_targets(torch.tensor([[7, 8, 9]]), 2)
    >>> shifted[1].tolist(), inside[1].flatten().tolist()
    ([[8, 9, 9]], [True, True, False])
    """
    T = labels.shape[1]
    pos = torch.arange(T, device=labels.device)
    shifted = torch.stack([labels[:, (pos + j).clamp(max=T - 1)] for j in range(n_talk)])  # [J, B, T]
    in_window = torch.stack([pos + j < T for j in range(n_talk)])[:, None, :, None]  # [J, 1, T, 1]
    return shifted, in_window


def talk_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p of the talk targets after each thought: logits [B * P, Lq, J, V] (rows b * P + k: thought k of
    window b), targets [B, Lq, J] -> [B, P, Lq, J]."""
    B, Lq, J = targets.shape
    rows = logits.shape[0] // B
    return token_logprobs(logits, targets.repeat_interleave(rows, 0)).view(B, rows, Lq, J)


def talk_reward(logp: Tensor, valid: Tensor) -> Tensor:
    """Each thought's reward: the summed log-likelihood of its valid talk targets. logp [B, P, Lq, J],
    valid [B, Lq, J] float (1: the target exists and is a real label) -> [B, P, Lq], detached.

    >>> talk_reward(torch.tensor([[[[-1.0, -2.0]]]]), torch.tensor([[[1.0, 0.0]]])).tolist()
    [[[-1.0]]]
    """
    return (logp * valid[:, None]).sum(-1).detach()


def talk_nll(logp: Tensor, valid: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """Mean NLL of the valid talk targets over all P thoughts: logp [B, P, Lq, J], valid [B, Lq, J] float.
    `gate` [B, P, Lq] float (e.g. "the thought beats the empty one") zeroes a thought's targets in the sum
    while the denominator stays P * sum(valid): -sum(logp * valid * gate) / max(P * sum(valid), 1).

    >>> logp = torch.tensor([-1.0, -3.0]).view(1, 2, 1, 1)  # two thoughts, one target
    >>> valid, gate = torch.ones(1, 1, 1), torch.tensor([[[1.0], [0.0]]])  # the gate drops thought 1
    >>> talk_nll(logp, valid).item(), talk_nll(logp, valid, gate).item()
    (2.0, 0.5)
    """
    w = valid[:, None] if gate is None else valid[:, None].expand_as(logp) * gate[..., None]  # [B, P, Lq, J]
    return -(logp * w).sum() / (valid.sum() * logp.shape[1]).clamp(min=1)


def last_context_nll(eot_logits: Tensor, last_tokens: Tensor, weight: Tensor) -> Tensor:
    """Seed 001's surrogate loss on the re-fed last context token (`add_last_context_token`): the NLL of x_t
    predicted at <eot>, mean over the thoughts of weight 1. eot_logits [B * P, Lq, V] (rows b * P + k),
    last_tokens [B, Lq] (x_t of each thinking position), weight [B, P, Lq] -> scalar.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5]], [[0.25, 0.75]]]))  # B=1, P=2 thoughts, Lq=1, V=2
    >>> round(last_context_nll(logits, torch.tensor([[1]]), torch.ones(1, 2, 1)).item(), 4)  # -(ln .5 + ln .75)/2
    0.4904
    """
    B, Lq = last_tokens.shape
    P = eot_logits.shape[0] // B
    logp = token_logprobs(eot_logits, last_tokens.repeat_interleave(P, 0)).view(B, P, Lq)  # [B, P, Lq]
    return weighted_mean(-logp, weight)


def reinforce_advantage(reward: Tensor, null_reward: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """REINFORCE advantages A_k = r_k - b_k of the K thoughts along `dim` of reward, with the leave-one-out
    baseline b_k = mean_{i != k} r_i (TRICE's control variate; 0 when K = 1). `null_reward` (size 1 along
    `dim`), e.g. the empty thought's reward, joins the others: b_k = (sum_{i != k} r_i + r_null) / K.

    >>> reinforce_advantage(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [-1.5, 0.0, 1.5]
    >>> reinforce_advantage(torch.tensor([1.0, 3.0]), torch.tensor([2.0])).tolist()  # b = (3 + 2) / 2, (1 + 2) / 2
    [-1.5, 1.5]
    """
    null = None if null_reward is None else null_reward.movedim(dim, -1)
    return reward - leave_one_out_baseline(reward.movedim(dim, -1), null).movedim(-1, dim)


def bound_advantage(advantage: Tensor, bound: float, mode: BoundMode = "clip") -> tuple[Tensor, Tensor]:
    """Advantages bounded to [-b, b]: `clip` clamps, `tanh` is b * tanh(A / b) (smooth, about A near 0). The
    bound is on the baseline-subtracted reward, as in Quiet-STaR's code: one on the raw log-likelihood (about
    -2 nats per character) would make every thought's reward equal. Returns the bounded advantages and the
    fraction of |A| > b (`frac_bounded`).

    >>> bound_advantage(torch.tensor([-2.0, 0.5, 3.0]), 1.0)[0].tolist()
    [-1.0, 0.5, 1.0]
    """
    frac = (advantage.abs() > bound).float().mean()
    bounded = advantage.clamp(-bound, bound) if mode == "clip" else bound * torch.tanh(advantage / bound)
    return bounded, frac


def next_token_metrics(base_nll: Tensor, label_w: Tensor, positions: Tensor, nll_thought: Tensor,
                       gap_buckets: tuple[float, float], interest_percentile: float) -> dict[str, Tensor]:
    """The next-token NLL where the model thinks, against the base model's, as logged (no graph needed).

    base_nll [B, L]: the base model's NLL of every next token; label_w [B, L]: 1 at real labels, 0 elsewhere;
    positions [Lq]: the thinking positions; nll_thought [B, Lq]: the NLL there after the thought. Returns
        nll: the model's own NLL, nll_thought at the thinking positions and base_nll elsewhere, mean over
            real labels (comparable with a plain LM's);
        nll_thought, nll_base_at_thought and gap (their difference, < 0: thoughts help): means over the
            thinking positions with a real label;
        gap_easy | gap_medium | gap_hard: the gap where the base NLL is < lo, in [lo, hi), >= hi for
            gap_buckets = (lo, hi) (only the buckets that hold a position);
        nll_interest, nll_base_interest: both NLLs at the "tokens of interest", the thinking positions whose
            base NLL is at least the batch's `interest_percentile` quantile (absent without real positions).

    >>> base, w = torch.tensor([[0.5, 2.0, 4.0, 1.0]]), torch.ones(1, 4)
    >>> m = next_token_metrics(base, w, torch.tensor([1, 2]), torch.tensor([[1.0, 4.5]]), (1.0, 3.0), 0.5)
    >>> [m[k].item() for k in ("nll", "gap", "gap_medium", "gap_hard", "nll_interest", "nll_base_interest")]
    [1.75, -0.25, -1.0, 0.5, 4.5, 4.0]
    """
    pos_w = label_w[:, positions]  # [B, Lq]
    n_pos = pos_w.sum().clamp(min=1)
    nll_base_at = base_nll[:, positions]  # [B, Lq]
    gap = nll_thought - nll_base_at  # [B, Lq]
    nll = (((base_nll * label_w).sum() - (nll_base_at * pos_w).sum() + (nll_thought * pos_w).sum())
           / label_w.sum().clamp(min=1))
    stats = {"nll": nll, "nll_thought": (nll_thought * pos_w).sum() / n_pos,
             "nll_base_at_thought": (nll_base_at * pos_w).sum() / n_pos, "gap": (gap * pos_w).sum() / n_pos}
    real = pos_w.bool()  # [B, Lq]
    lo, hi = gap_buckets
    for name, sel in (("easy", nll_base_at < lo), ("medium", (nll_base_at >= lo) & (nll_base_at < hi)),
                      ("hard", nll_base_at >= hi)):
        sel = sel & real
        if bool(sel.any()):
            stats[f"gap_{name}"] = gap[sel].mean()
    if bool(real.any()):
        cut = torch.quantile(nll_base_at[real].float(), interest_percentile)
        hard = real & (nll_base_at >= cut)  # [B, Lq]
        stats["nll_interest"] = nll_thought[hard].mean()
        stats["nll_base_interest"] = nll_base_at[hard].mean()
    return stats


def thought_entropy_stats(entropy: Tensor, weight: Tensor, steps: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The policy's entropy at each thought's sampling steps, entropy [B, P, Lq, M], over the thoughts of
    weight [B, P, Lq] 1: `thought_entropy`, the weighted mean of each thought's mean step entropy, and
    `thought_entropy_max`, the largest step entropy of a real thought (absent, and the mean 0, when M = 0).
    `steps` [B, P, Lq, M] bool (variable-length thoughts): the steps that were sampled; a thought's mean is
    over those (the first step always is), and the others count nothing.

    >>> e, w = torch.tensor([[[[1.0, 3.0], [2.0, 9.0]]]]), torch.ones(1, 1, 2)
    >>> {k: v.item() for k, v in thought_entropy_stats(e, w, torch.tensor([[[[True, True], [True, False]]]])).items()}
    {'thought_entropy': 2.0, 'thought_entropy_max': 3.0}
    """
    if not entropy.numel():
        return {"thought_entropy": torch.zeros((), device=entropy.device)}
    if steps is None:
        per_thought, largest = entropy.mean(-1), entropy.amax(-1)
    else:
        kept = torch.where(steps, entropy, torch.zeros_like(entropy))
        per_thought = kept.sum(-1) / steps.sum(-1).clamp(min=1)
        largest = kept.amax(-1)  # entropies are >= 0, so the unsampled steps' 0 never wins
    return {"thought_entropy": weighted_mean(per_thought, weight),
            "thought_entropy_max": largest[weight.bool()].max()}


def thought_length_stats(lengths: Tensor, unfinished: Tensor, weight: Tensor, nll_base_at: Tensor,
                         gap_buckets: tuple[float, float]) -> dict[str, Tensor]:
    """Where variable-length thoughts think: lengths [B, P, Lq] (tokens), unfinished [B, P, Lq] bool (reached
    the limit without ending), over the thoughts of weight [B, P, Lq] 1; nll_base_at [B, Lq], the base model's
    NLL of the token each position predicts (its difficulty; the thought is sampled before that token is seen).
    Returns `thought_len`, `frac_empty`, `frac_unfinished`, and per base-NLL bucket (`gap_buckets` = (lo, hi):
    easy < lo <= medium < hi <= hard, the buckets of `next_token_metrics`) `frac_empty_<bucket>` and
    `thought_len_<bucket>` (only the buckets that hold a real thought).

    >>> n, u = torch.tensor([[[0, 3, 2]]]), torch.tensor([[[False, True, False]]])
    >>> m = thought_length_stats(n, u, torch.ones(1, 1, 3), torch.tensor([[0.5, 0.7, 4.0]]), (1.0, 3.0))
    >>> {k: round(v.item(), 3) for k, v in m.items()}
    {'thought_len': 1.667, 'frac_empty': 0.333, 'frac_unfinished': 0.333, 'frac_empty_easy': 0.5, 'thought_len_easy': 1.5, 'frac_empty_hard': 0.0, 'thought_len_hard': 2.0}
    """
    lengths = lengths.float()
    empty = (lengths == 0).float()
    stats = {"thought_len": weighted_mean(lengths, weight), "frac_empty": weighted_mean(empty, weight),
             "frac_unfinished": weighted_mean(unfinished.float(), weight)}
    lo, hi = gap_buckets
    base = nll_base_at[:, None].expand_as(lengths)  # [B, P, Lq]
    for name, sel in (("easy", base < lo), ("medium", (base >= lo) & (base < hi)), ("hard", base >= hi)):
        w = weight * sel
        if bool(w.sum() > 0):
            stats[f"frac_empty_{name}"] = weighted_mean(empty, w)
            stats[f"thought_len_{name}"] = weighted_mean(lengths, w)
    return stats
