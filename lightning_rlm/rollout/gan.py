"""GAN-RL's rollouts: the generator's two-phase samples, the reasoning discriminator's judgements, the scores
of both, and the rows of ``<log_dir>/rollouts.jsonl``.

Two-phase sampling: a phase (:func:`sample_phase`) samples up to its budget after each prompt and keeps the
sampled tokens without EOS, so the next step's input is ``prompt + those tokens + an appended tail``. The
generator (:func:`sample_two_phase`): reasoning, then ``think_close``, then the completion. The reasoning
discriminator (:func:`judge_continuations`): reasoning, then ``think_close`` and its answer prefix, then one
forward (:func:`left_padded_hidden`) that its value head and its answer (:func:`sample_answer`) read.

Every training rollout is appended to ``<log_dir>/rollouts.jsonl`` by :func:`write_rollouts` (one JSON object a
line, written in a single ``os.write`` to an ``O_APPEND`` descriptor: ``step, rank, prefix, reasoning,
completion, ground_truth, reward, d_prob, d_prob_ground_truth, advantage``; with the reasoning discriminator
also its reasoning, answer and value on the generated completion and on the ground truth, :func:`judgement_row`).
Non-finite numbers are written as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_rlm.data.collate import pad_left
from lightning_rlm.logging_utils import append_jsonl_line
from lightning_rlm.rollout.generate import (
    Rollout,
    completion_logprobs,
    position_ids_from_mask,
    sample_completions,
)

__all__ = [
    "GANRollout",
    "Judgement",
    "PhaseSampler",
    "Scores",
    "finite",
    "judge_continuations",
    "judgement_row",
    "left_padded_hidden",
    "prediction_rows",
    "rollouts_file",
    "sample_answer",
    "sample_phase",
    "sample_two_phase",
    "strip_eos",
    "summed_logprobs",
    "write_rollouts",
]

# One sampling phase: (prompts, max_new) -> (the rollout [B, ≤ max_new] or None, each row's tokens without EOS).
PhaseSampler = Callable[[list[list[int]], int], tuple[Optional[Rollout], list[list[int]]]]


@dataclass
class GANRollout:
    """One two-phase generation for B prefixes. Lengths exclude the stop token (EOS)."""

    prefixes: list[str]
    reasoning: Optional[Rollout]  # [B, R] phase 1, None when reasoning_tokens == 0
    completion: Rollout  # [B, C] phase 2 (its prompt = prompt + reasoning + think_close)
    reasoning_texts: list[str]
    completion_texts: list[str]
    reasoning_lengths: Tensor  # [B]
    completion_lengths: Tensor  # [B]


@dataclass
class Judgement:
    """The reasoning discriminator on M (prefix, completion) inputs. Lengths exclude the stop token."""

    reasoning: Optional[Rollout]  # [M, R] its deliberation, None when d_reasoning_tokens == 0
    reasoning_texts: list[str]
    reasoning_lengths: Tensor  # [M]
    reasoning_logp: Tensor  # [M] summed log-probs of the reasoning tokens (incl. the EOS that ended it), grad
    p_real: Tensor  # [M] P(answer "real") over the two answers, at the sampling temperature (detached)
    said_real: Tensor  # [M] bool, the sampled answers
    answer_logp: Tensor  # [M] log-prob of the sampled answer (grad)
    value: Tensor  # [M] the value head's estimate of its chance of being right, in (0, 1) (grad)


@dataclass
class Scores:
    """The discriminator on a rollout's B generated completions and their B ground truths."""

    d_loss: Tensor  # scalar, with grad
    stats: dict[str, Tensor]  # detached scalars, logged as <split>/<name>
    d_prob: Tensor  # [B] P(ground truth) of the generated completions (head: softmax; reasoning: P(answer real))
    d_prob_real: Tensor  # [B] the same on the ground truths
    rewards: Tensor  # [B] the generator's
    judgement: Optional[Judgement] = None  # the reasoning discriminator's, rows [generated; ground truths]


# ----- sampling -----------------------------------------------------------------------------------------------------
def strip_eos(ids: Tensor, mask: Tensor, eos_token_id: int | Sequence[int]) -> list[list[int]]:
    """Token lists of the masked positions of each row of ``ids [B, T]`` (``mask [B, T]``), without EOS."""
    eos = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {int(eos_token_id)}
    return [[t for t in row[m.bool()].tolist() if t not in eos] for row, m in zip(ids, mask)]


def sample_phase(
    model: nn.Module,
    prompts: list[list[int]],
    max_new: int,
    *,
    temperature: float,
    top_p: float,
    top_k: Optional[int],
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: Optional[Callable[[], torch.Generator]],
    device: torch.device,
) -> tuple[Optional[Rollout], list[list[int]]]:
    """One sampling phase: one completion of up to ``max_new`` tokens after each of the left-padded ``prompts``
    (:func:`~lightning_rlm.rollout.generate.sample_completions` on ``device``; ``temperature`` 0: greedy;
    ``generator`` is called for the torch generator when sampling starts), and each row's sampled tokens without
    EOS. ``(None, B empty lists)`` when ``max_new`` is 0."""
    if max_new <= 0:
        return None, [[] for _ in prompts]
    ids, mask = pad_left(prompts, pad_token_id)  # [B, P]
    out = sample_completions(
        model, ids.to(device), mask.to(device), num_generations=1, max_completion_length=max_new,
        temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        generator=None if generator is None else generator(),
    )  # [B, ≤ max_new]
    return out, strip_eos(out.completion_ids, out.completion_mask, eos_token_id)


def sample_two_phase(sample: PhaseSampler, prefixes: list[str], prompts: list[list[int]], close_ids: list[int], *,
                     reasoning_tokens: int, completion_tokens: int, tokenizer: Any, device: torch.device) -> GANRollout:
    """Reasoning after ``prompts`` (≤ ``reasoning_tokens``, stopped by EOS; none when 0), then ``close_ids``
    appended to each row's reasoning without its EOS, then the completion (≤ ``completion_tokens`` ≥ 1)."""
    reasoning, reasoning_ids = sample(prompts, reasoning_tokens)  # [B, R]
    completion, completion_ids = sample([p + r + close_ids for p, r in zip(prompts, reasoning_ids)],
                                        completion_tokens)  # [B, C]
    assert completion is not None, "completion_tokens must be >= 1"
    return GANRollout(
        prefixes=list(prefixes), reasoning=reasoning, completion=completion,
        reasoning_texts=tokenizer.batch_decode(reasoning_ids, skip_special_tokens=True),
        completion_texts=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        reasoning_lengths=torch.tensor([len(r) for r in reasoning_ids], device=device),  # [B]
        completion_lengths=torch.tensor([len(c) for c in completion_ids], device=device),  # [B]
    )


def summed_logprobs(model: nn.Module, part: Optional[Rollout], rows: int, temperature: float,
                    device: torch.device) -> Tensor:
    """``[rows]`` summed log-probs under ``model`` of ``part``'s sampled tokens (incl. the EOS that ended a
    row), with grad when enabled; zeros when ``part`` is None (nothing was sampled)."""
    if part is None:
        return torch.zeros(rows, device=device)  # [rows]
    logp = completion_logprobs(model, part, temperature=temperature)  # [rows, C]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(part.completion_mask.bool(), logp, zero).sum(-1)  # [rows]


def left_padded_hidden(backbone: nn.Module, seqs: list[list[int]], pad_token_id: int, device: torch.device) -> Tensor:
    """The decoder ``backbone``'s last hidden states ``[M, L, H]`` on ``seqs`` left-padded to one length ``L``
    (positions from the mask, no cache), so ``[:, -1]`` is every row's last real token."""
    ids, mask = pad_left(seqs, pad_token_id)  # [M, L]
    ids, mask = ids.to(device), mask.to(device)
    return backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False).last_hidden_state  # [M, L, H]


def judge_continuations(
    policy: nn.Module,
    backbone: nn.Module,
    value_head: nn.Sequential,
    prompts: list[list[int]],
    *,
    sample: PhaseSampler,
    reasoning_tokens: int,
    tail: list[int],
    answer_ids: list[int],
    temperature: float,
    generator: torch.Generator,
    tokenizer: Any,
    device: torch.device,
) -> Judgement:
    """The reasoning discriminator on M rendered prompts (prefix and continuation in each).

    It deliberates after its prompt (``sample``, up to ``reasoning_tokens``, stopped by EOS; no grad), ``tail``
    (``think_close`` + the answer prefix) is appended, and one ``backbone`` forward over prompt + reasoning +
    tail gives: the value ``sigmoid(value_head(hidden state of the last prompt token)) [M]`` (read before any
    reasoning) and the answer, sampled with uniforms from ``generator`` from the softmax over the
    ``answer_ids`` (real, generated) of ``policy``'s LM head at the last token, at ``temperature``
    (:func:`sample_answer`). The reasoning log-probs (:func:`summed_logprobs`), the answer's log-prob and the
    value carry gradients when grad is enabled.
    """
    m = len(prompts)
    with torch.no_grad():
        reasoning, reasoning_ids = sample(prompts, reasoning_tokens)  # [M, R]
    reasoning_logp = summed_logprobs(policy, reasoning, m, temperature, device)  # [M]
    hidden = left_padded_hidden(backbone, [p + r + tail for p, r in zip(prompts, reasoning_ids)],
                                tokenizer.pad_token_id, device)  # [M, L, H]
    rows = torch.arange(m, device=device)
    last_prompt = hidden.shape[1] - 1 - torch.tensor([len(r) + len(tail) for r in reasoning_ids],
                                                     device=device)  # [M]: left padding
    value_dtype = value_head[-1].weight.dtype
    value = torch.sigmoid(value_head(hidden[rows, last_prompt].to(value_dtype)).squeeze(-1))  # [M]
    lm_head = policy.get_base_model().get_output_embeddings()
    logits = lm_head(hidden[:, -1])[:, answer_ids].float() / temperature  # [M, 2]: real, generated
    u = torch.rand(m, generator=generator, device=device)  # [M]
    p_real, said_real, answer_logp = sample_answer(logits, u)  # [M] each
    return Judgement(
        reasoning=reasoning, reasoning_texts=tokenizer.batch_decode(reasoning_ids, skip_special_tokens=True),
        reasoning_lengths=torch.tensor([len(r) for r in reasoning_ids], device=device),  # [M]
        reasoning_logp=reasoning_logp, p_real=p_real, said_real=said_real, answer_logp=answer_logp, value=value,
    )


def sample_answer(logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A two-way answer ("real", "generated") sampled from ``softmax(logits [M, 2])`` with uniforms ``u [M]``.

    Returns:
        ``p_real [M]`` (detached P("real")), ``said_real [M]`` (bool: ``u < p_real``) and the sampled
        answer's log-prob ``[M]`` (with grad).
    """
    logp = logits.log_softmax(-1)  # [M, 2]
    p_real = logp[:, 0].detach().exp()  # [M]
    said_real = u < p_real  # [M]
    return p_real, said_real, torch.where(said_real, logp[:, 0], logp[:, 1])


# ----- rows ---------------------------------------------------------------------------------------------------------
def finite(x: Tensor) -> Optional[float]:
    """A scalar tensor as a float, or None when it is not finite (JSON has no NaN)."""
    v = float(x)
    return v if math.isfinite(v) else None


def judgement_row(j: Optional[Judgement], i: int, b: int) -> dict[str, Any]:
    """The reasoning discriminator's side of rollout i: its reasoning, answer and value on the generated
    completion (row i) and on the ground truth (row b + i); nothing for the head discriminator."""
    if j is None:
        return {}
    answer = lambda k: "real" if bool(j.said_real[k]) else "generated"  # noqa: E731
    return {"d_reasoning": j.reasoning_texts[i], "d_answer": answer(i), "d_value": finite(j.value[i]),
            "d_reasoning_ground_truth": j.reasoning_texts[b + i], "d_answer_ground_truth": answer(b + i),
            "d_value_ground_truth": finite(j.value[b + i])}


def prediction_rows(rollout: GANRollout, truths: list[str], scores: Scores) -> list[dict[str, Any]]:
    """One row per prefix for `lightning-rlm predict`: the generator's reasoning and completion beside the
    ground truth, the discriminator's P(real) and the reward (and :func:`judgement_row`)."""
    b = len(rollout.prefixes)
    return [{"prefix": p, "reasoning": r, "completion": c, "ground_truth": t, "d_prob": float(d),
             "reward": float(w), **judgement_row(scores.judgement, i, b)}
            for i, (p, r, c, t, d, w) in enumerate(zip(rollout.prefixes, rollout.reasoning_texts,
                                                       rollout.completion_texts, truths, scores.d_prob.tolist(),
                                                       scores.rewards.tolist()))]


def rollouts_file(trainer: Optional[Any], filename: str) -> Optional[Path]:
    """``<log_dir>/<filename>`` of a Lightning ``trainer`` (its ``log_dir``, else its ``default_root_dir``); None
    without a trainer or a folder."""
    if trainer is None:
        return None
    log_dir = trainer.log_dir or trainer.default_root_dir
    return Path(log_dir) / filename if log_dir else None


def write_rollouts(path: Path, *, step: int, rank: int, rollout: GANRollout, truths: list[str], scores: Scores,
                   advantages: Tensor) -> None:
    """Append one line per rollout of the batch to ``path`` (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    b = len(rollout.prefixes)
    for i in range(b):
        append_jsonl_line(path, {
            "step": step, "rank": rank, "prefix": rollout.prefixes[i],
            "reasoning": rollout.reasoning_texts[i], "completion": rollout.completion_texts[i],
            "ground_truth": truths[i], "reward": finite(scores.rewards[i]), "d_prob": finite(scores.d_prob[i]),
            "d_prob_ground_truth": finite(scores.d_prob_real[i]), "advantage": finite(advantages[i]),
            **judgement_row(scores.judgement, i, b),
        })
