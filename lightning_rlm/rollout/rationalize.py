"""Rationalization: give a ground-truth completion the reasoning trace that explains it best.

For one (prefix, ground truth) pair and K sampled reasoning traces r_1..r_K (`lightning-rlm rationalize`,
seed 000's "ground truth completions are given plausible reasoning traces"), in GAN-RL's prompt format:

    context_k  = prompt + r_k + think_close          (the prompt as GAN-RL renders it, ending in "<think>")
    score_k    = log p(ground truth | context_k)     summed over the ground truth's tokens, temperature 1
    baseline   = log p(ground truth | prompt + think_close)          (no reasoning: the empty trace)
    best       = argmax_k score_k   (ties: the first);   gain = score_best − baseline

Every piece is encoded on its own without special tokens (`encode(prompt) + encode(r_k) +
encode(think_close) + encode(ground truth)`), as GAN-RL concatenates prompt, reasoning and `think_close` ids,
so a row's scores are a function of its texts: anyone can recompute them. Traces are sampled from a prompt
that may show the ground truth as a hint (STaR's rationalization), but they are always scored, and later
trained on, after the plain prompt.

This module holds the pure logic (choice, rows, summary) and the model side (sampling, scoring); the
command is `lightning_rlm.workflow.rationalize`, the SFT data `lightning_rlm.data.rationales`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_rlm.data.collate import pad_left, pad_right
from lightning_rlm.rollout.generate import completion_logprobs, sample_completions

__all__ = [
    "ROW_FIELDS",
    "ground_truth_logprobs",
    "ngram_overlap",
    "pick_best",
    "rationale_row",
    "sample_traces",
    "summarize",
    "summary_line",
]

# The fields of every row `lightning-rlm rationalize` writes (data.rationales reads prompt, reasoning,
# think_close, completion and gain).
ROW_FIELDS = ("prefix", "ground_truth", "prompt", "reasoning", "think_close", "completion", "score",
              "baseline_score", "gain", "all_scores", "best", "traces", "ground_truth_tokens",
              "ground_truth_overlap", "hint")


# ----- pure logic (unit-tested on hand-built scores) -----------------------------------------------------------
def pick_best(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties; NaN never wins unless all are NaN)."""
    if not scores:
        raise ValueError("pick_best needs at least one score")
    best = 0
    for i, s in enumerate(scores):
        if math.isnan(scores[best]) or (not math.isnan(s) and s > scores[best]):
            best = i
    return best


def ngram_overlap(reasoning: str, ground_truth: str, n: int = 4) -> float:
    """Share of the ground truth's word n-grams that occur in the reasoning (lower-cased words): how much of
    the answer a trace copies, e.g. from a hint. 0 when the ground truth has fewer than n words."""
    def grams(text: str) -> list[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]

    truth = grams(ground_truth)
    if not truth:
        return 0.0
    seen = set(grams(reasoning))
    return sum(g in seen for g in truth) / len(truth)


def rationale_row(*, prefix: str, ground_truth: str, prompt: str, think_close: str, traces: Sequence[str],
                  scores: Sequence[float], baseline_score: float, ground_truth_tokens: int,
                  hint: bool = False) -> dict[str, Any]:
    """One dataset row: the best trace by ground-truth log-likelihood, its gain over no reasoning, every
    trace and score. `completion` is the ground truth (what SFT trains after the reasoning)."""
    if len(traces) != len(scores):
        raise ValueError(f"{len(traces)} traces but {len(scores)} scores")
    best = pick_best(scores)
    score = float(scores[best])
    return {
        "prefix": prefix, "ground_truth": ground_truth, "prompt": prompt, "reasoning": traces[best],
        "think_close": think_close, "completion": ground_truth, "score": score,
        "baseline_score": float(baseline_score), "gain": score - float(baseline_score),
        "all_scores": [float(s) for s in scores], "best": best, "traces": list(traces),
        "ground_truth_tokens": int(ground_truth_tokens),
        "ground_truth_overlap": ngram_overlap(traces[best], ground_truth), "hint": bool(hint),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """rows, mean score / baseline / gain (nats), mean gain per ground-truth token, and the share of rows
    whose best trace beats no reasoning (gain > 0)."""
    n = len(rows)
    if n == 0:
        return {"rows": 0, "mean_score": 0.0, "mean_baseline": 0.0, "mean_gain": 0.0,
                "mean_gain_per_token": 0.0, "share_better": 0.0}
    tokens = sum(r["ground_truth_tokens"] for r in rows)
    return {
        "rows": n,
        "mean_score": sum(r["score"] for r in rows) / n,
        "mean_baseline": sum(r["baseline_score"] for r in rows) / n,
        "mean_gain": sum(r["gain"] for r in rows) / n,
        "mean_gain_per_token": sum(r["gain"] for r in rows) / max(tokens, 1),
        "share_better": sum(r["gain"] > 0 for r in rows) / n,
    }


def summary_line(stats: dict[str, float]) -> str:
    return (f"{int(stats['rows'])} rows: mean gain {stats['mean_gain']:+.3f} nats "
            f"({stats['mean_gain_per_token']:+.4f} per ground-truth token; score {stats['mean_score']:.2f} vs "
            f"{stats['mean_baseline']:.2f} without reasoning); the best trace beats no reasoning on "
            f"{100 * stats['share_better']:.1f}% of rows")


# ----- the model side ------------------------------------------------------------------------------------------
@torch.no_grad()
def ground_truth_logprobs(model: nn.Module, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                          pad_token_id: int, batch_size: Optional[int] = None) -> list[float]:
    """Σ_t log p(target_t | context, target_<t) under `model` (temperature 1) for each (context, target) pair.

    One forward per `batch_size` pairs (None: all at once) over the context left-padded and the target
    right-padded (positions from the attention mask, so padding does not move a token). Eval mode, no grad.
    """
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    if any(not c for c in contexts) or any(not t for t in targets):
        raise ValueError("every context and every target needs at least one token")
    device = next(model.parameters()).device
    step = batch_size or max(1, len(contexts))
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(contexts), step):
            ctx_ids, ctx_mask = pad_left([list(c) for c in contexts[start : start + step]], pad_token_id)  # [n, P]
            tgt_ids, tgt_mask = pad_right([list(t) for t in targets[start : start + step]], pad_token_id)  # [n, C]
            ids = torch.cat([ctx_ids, tgt_ids], dim=1).to(device)  # [n, P+C]
            attn = torch.cat([ctx_mask, tgt_mask], dim=1).to(device)  # [n, P+C]
            logp = completion_logprobs(model, ids, attn, tgt_ids.shape[1])  # [n, C]
            assert isinstance(logp, Tensor)
            out += torch.where(tgt_mask.bool().to(device), logp, torch.zeros_like(logp)).sum(1).tolist()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def sample_traces(model: nn.Module, prompts: Sequence[Sequence[int]], *, num_traces: int, max_new_tokens: int,
                  eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> list[list[list[int]]]:
    """`num_traces` reasoning traces per prompt (token ids, stopped at EOS or `max_new_tokens`, EOS left out,
    as GAN-RL's reasoning phase): ``traces[i][k]`` is prompt i's k-th trace."""
    device = next(model.parameters()).device
    ids, mask = pad_left([list(p) for p in prompts], pad_token_id)  # [B, P]
    rollout = sample_completions(model, ids.to(device), mask.to(device), num_generations=num_traces,
                                 max_completion_length=max_new_tokens, temperature=temperature, top_p=top_p,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    rows = [[t for t in row[m.bool()].tolist() if t not in eos]
            for row, m in zip(rollout.completion_ids, rollout.completion_mask)]  # [B*K] ragged
    return [rows[i * num_traces : (i + 1) * num_traces] for i in range(len(prompts))]
