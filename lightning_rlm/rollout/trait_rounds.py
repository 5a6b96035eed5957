"""The rounds of a trait experiment (`SFTKLBarrier`): sampling and scoring a round's generations (trait and
coherence), the round files, and the settings of the rounds and of the self-feeding loop.

Scores of a round, over its generations (completion text only, decoded without special tokens; the
prompt is never scored):

* trait = fraction of generations containing `trait_keyword` as a whole word, case-insensitive
  (`happy` counts in "Happy," but not in "happily" or "unhappy"). The shipped configs train on
  TinyStories windows whose completion contains the keyword (`KeywordPrefixCompletionDataModule`), and
  evaluate on unfiltered held-out prompts, so round 0 (the base model, before any step) is the baseline.
* coherence = fraction of generations free of token loops: `RepeatedNgramLoop(n=coh_ngram,
  min_repeats=coh_repeats)`, by default a generation has a loop when some contiguous 4-gram of its
  lower-cased whitespace-separated words occurs 3 or more times (overlapping occurrences counted).
* log_incoherence = log10(max(1 − coherence, 1e-3)): down is more coherent, −3 = no loop seen.

The self-feeding loop (`data_source: self_feeding`; the default `fixed` trains on the DataModule's pairs
throughout). Every round k also
samples a *pool*: `pool_num_generations` completions of each of the first `pool_prompts` prompts of the
DataModule's train set (the same prompts every round, a fresh seed `pool_seed + k`), scores them by the
trait, keeps some, and the next round's steps train on the kept generations only (the DataModule's batches
are then ignored; held-out evaluation and validation still use its val prompts and pairs):

    round k (k = 0: the base, with eval_at_start):
        evaluate on the held-out prompts
        pool      = sample(current model, pool prompts)                (every rank its share, then gathered)
        score     = trait score of each pool generation
        kept      = selection: trait  -> those with score > keep_min_score (None: all), then the keep_top
                                         highest (an int, or a fraction of the pool; None: all; ties: the
                                         earlier generation first)
                               random -> as many as `trait` would keep, drawn uniformly from the whole pool
                                         (the matched control: same loop, same size, no trait filter)
        steps of round k + 1 = batches of `kept` only: global batches of the DataModule's batch_size cut
                               from a stream of seeded shuffles of `kept` (a function of the pool round and
                               of the batches drawn, both checkpointed with the pool: `--ckpt_path last`
                               resumes the loop exactly)
    stop after a round whose held-out coherence < coh_floor, or that kept nothing (nothing to train on)

So round r's training examples are exactly round r − 1's kept generations (prompt ids as sampled,
completion ids up to and including EOS). Without `eval_at_start` round 1 trains on the DataModule's pairs
and the loop starts with round 1's pool. Under DDP every rank samples its share of the pool prompts and
the generations are gathered in rank order, so every rank selects the same pool (a pure function of the
gathered list and the seed). Logged per round: `round/pool_kept`, `round/pool_trait` (mean score of the
whole pool), `round/pool_trait_kept`, `round/pool_coherence` (of the kept), `round/pool_distinct` (distinct
kept completion texts) and `round/pool_overlap` (fraction of kept generations whose text was kept in an
earlier round: the pool saturating); `<log_dir>/pool_round_<k>.jsonl` holds every pool generation with
its score and whether it was kept. The prompts, the selection and the batches: `lightning_rlm.data.rounds`.

Traits (`trait`): `keyword` scores a generation 1 when it contains `trait_keyword` (whole word), else 0 (so
keep_min_score 0 keeps the generations with the keyword). `persona` scores it by the base model's
log-likelihood ratio

    score = log p_base(completion | persona_positive context) − log p_base(completion | persona_negative context)

summed over the completion tokens (the ids as sampled), the context being `persona_template` with
`{persona}` and `{prompt}` (the prompt as the policy saw it, after the DataModule's template or chat
rendering) encoded without special tokens; a chat model, whose template can place the persona in a system
turn, makes the ratio meaningful. round/trait is then the mean score of the held-out generations.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from torch import Tensor, nn

from lightning_rlm.data.collate import DictCollator
from lightning_rlm.losses.kl import fp32_log_softmax
from lightning_rlm.metrics.text import RepeatedNgramLoop
from lightning_rlm.rollout.generate import sample_completions

__all__ = ["SCORE_BATCH", "check_loop_settings", "check_round_settings", "generation_rows",
           "generations_table", "persona_logprobs", "pool_rows", "round_scores", "sample_records",
           "score_records", "write_round_file"]

SCORE_BATCH = 16  # generations per forward when the persona trait scores them under the base


def check_round_settings(n_rounds: int, steps_per_round: Optional[int], eval_prompts: int,
                         eval_num_generations: int, eval_max_new_tokens: int, eval_temperature: float,
                         coh_floor: Optional[float]) -> None:
    """ValueError on a bad setting of the rounds or of their held-out evaluation (`SFTKLBarrier`'s Args)."""
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    if steps_per_round is not None and steps_per_round < 1:
        raise ValueError(f"steps_per_round must be >= 1 or None, got {steps_per_round}")
    if eval_prompts < 1 or eval_num_generations < 1 or eval_max_new_tokens < 1:
        raise ValueError("eval_prompts, eval_num_generations and eval_max_new_tokens must be >= 1")
    if eval_temperature < 0:
        raise ValueError(f"eval_temperature must be >= 0 (0 = greedy), got {eval_temperature}")
    if coh_floor is not None and not 0.0 <= coh_floor <= 1.0:
        raise ValueError(f"coh_floor must be in [0, 1] or None, got {coh_floor}")


def check_loop_settings(data_source: str, selection: str, keep_top: Optional[Union[int, float]],
                        keep_min_score: Optional[float], trait: str, persona_positive: Optional[str],
                        persona_negative: Optional[str], persona_template: str, pool_prompts: int,
                        pool_num_generations: int) -> None:
    """ValueError on a bad setting of the self-feeding loop or of the trait (see `SFTKLBarrier`'s Args)."""
    for name, value, allowed in (("data_source", data_source, ("fixed", "self_feeding")),
                                 ("selection", selection, ("trait", "random")),
                                 ("trait", trait, ("keyword", "persona"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if keep_top is not None:
        if isinstance(keep_top, bool) or not isinstance(keep_top, (int, float)):
            raise ValueError(f"keep_top must be an int >= 1, a fraction in (0, 1] or None, got {keep_top!r}")
        if (isinstance(keep_top, int) and keep_top < 1) or (isinstance(keep_top, float)
                                                             and not 0.0 < keep_top <= 1.0):
            raise ValueError(f"keep_top must be an int >= 1, a fraction in (0, 1] or None, got {keep_top!r}")
    if keep_min_score is not None and not math.isfinite(keep_min_score):
        raise ValueError(f"keep_min_score must be finite or None, got {keep_min_score}")
    if trait == "persona":
        if not (persona_positive or "").strip() or not (persona_negative or "").strip():
            raise ValueError("trait: persona needs both persona_positive and persona_negative")
        try:
            persona_template.format(persona="", prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"persona_template may hold only {{persona}} and {{prompt}}: {e!r}") from None
        if "{persona}" not in persona_template or "{prompt}" not in persona_template:
            raise ValueError(f"persona_template must contain {{persona}} and {{prompt}}, got "
                             f"{persona_template!r}")
    if pool_prompts < 1 or pool_num_generations < 1:
        raise ValueError("pool_prompts and pool_num_generations must be >= 1")


@torch.no_grad()
def sample_records(policy: nn.Module, tokenizer: Any, batches: list[dict[str, Any]], seed: int, *,
                   device: torch.device, num_generations: int, max_new_tokens: int, temperature: float,
                   top_p: float, eos_token_id: Any) -> list[dict[str, Any]]:
    """One record per generation of `policy` on these prompt batches, seeded by `seed`: prompt and completion
    as text (decoded without special tokens) and as ids (the prompt unpadded, the completion up to and
    including its EOS). A batch's `num_generations` overrides the argument; temperature 0 is greedy."""
    generator = torch.Generator(device).manual_seed(seed)
    pad, records = tokenizer.pad_token_id, []
    for batch in batches:
        prompt_ids, prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)  # [B, P]
        G = batch.get("num_generations", num_generations)
        rollout = sample_completions(
            policy, prompt_ids, prompt_mask,
            num_generations=G, max_completion_length=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad, generator=None if temperature == 0 else generator,
        )
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, pad)  # [N, C]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, text in enumerate(texts):  # rows g*G .. g*G+G-1 answer prompt g
            g = i // G
            records.append({
                "prompt": batch["prompt"][g], "prompt_ids": prompt_ids[g][prompt_mask[g].bool()].tolist(),
                "completion": text,
                "completion_ids": rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()})
    return records


@torch.no_grad()
def persona_logprobs(base_logits: Callable[[dict[str, Tensor]], Tensor], tokenizer: Any,
                     records: list[dict[str, Any]], persona: str, template: str,
                     device: torch.device) -> list[float]:
    """Σ_t log p_base(completion token t | context, earlier completion tokens) for each record, the context
    being `template` with this persona and the record's prompt, encoded without special tokens.
    `base_logits` maps a batch of prompt and completion ids and masks to the base's completion logits
    [b, C, V]."""
    collate, out = DictCollator(tokenizer.pad_token_id), []
    for start in range(0, len(records), SCORE_BATCH):
        chunk = records[start : start + SCORE_BATCH]
        examples = [{"prompt_ids": tokenizer.encode(template.format(persona=persona, prompt=r["prompt"]),
                                                    add_special_tokens=False),
                     "completion_ids": r["completion_ids"]} for r in chunk]
        batch = {k: v.to(device) for k, v in collate(examples).items()}
        logp = fp32_log_softmax(base_logits(batch))  # [b, C, V]
        token = logp.gather(-1, batch["completion_ids"][..., None])[..., 0]  # [b, C]
        out += (token * batch["completion_mask"]).sum(1).tolist()
    return out


def score_records(records: list[dict[str, Any]], coherence: RepeatedNgramLoop, keyword: re.Pattern[str],
                  personas: Optional[tuple[str, str]] = None, template: str = "",
                  base_logits: Optional[Callable[[dict[str, Tensor]], Tensor]] = None, tokenizer: Any = None,
                  device: Optional[torch.device] = None) -> None:
    """Set each record's trait `score` and `loop` flag (`coherence.has_loop` of its completion). The trait is
    the `keyword` (1.0 when the completion matches, else 0.0) or, given `personas` (positive, negative), the
    difference of their `persona_logprobs` under `template` (which needs base_logits, tokenizer, device)."""
    if personas is not None:
        pos, neg = (persona_logprobs(base_logits, tokenizer, records, p, template, device) for p in personas)
        scores = [p - n for p, n in zip(pos, neg)]
    else:
        scores = [float(bool(keyword.search(r["completion"]))) for r in records]
    for r, score in zip(records, scores):
        r["score"] = score
        r["loop"] = coherence.has_loop(r["completion"])


def round_scores(records: list[dict[str, Any]]) -> dict[str, float]:
    """A round's scores over its scored generations: `trait` (the mean score), `coherence` (the fraction
    without a loop) and `log_incoherence` = log10(max(1 − coherence, 1e-3)) (−3: no loop seen)."""
    coherence = 1.0 - sum(r["loop"] for r in records) / len(records)
    return {"trait": sum(r["score"] for r in records) / len(records), "coherence": coherence,
            "log_incoherence": math.log10(max(1.0 - coherence, 1e-3))}


def generation_rows(k: int, step: int, records: list[dict[str, Any]], flags: bool) -> list[dict[str, Any]]:
    """The rows of `generations_round_<k>.jsonl`; `flags`: the scores are flags (keyword), written as bools."""
    return [{"round": k, "step": step, "prompt": r["prompt"], "completion": r["completion"],
             "trait": bool(r["score"]) if flags else r["score"], "loop": r["loop"]} for r in records]


def pool_rows(k: int, step: int, records: list[dict[str, Any]], kept: list[int]) -> list[dict[str, Any]]:
    """The rows of `pool_round_<k>.jsonl`: every pool generation, its score and whether it was kept."""
    chosen = set(kept)
    return [{"round": k, "step": step, "prompt": r["prompt"], "completion": r["completion"],
             "score": r["score"], "loop": r["loop"], "kept": i in chosen} for i, r in enumerate(records)]


def write_round_file(trainer: L.Trainer, name: str, rows: list[dict[str, Any]]) -> None:
    """`rows` as JSON lines in `<the trainer's log_dir, else default_root_dir>/<name>`, on global rank 0
    (call on every rank), written whole, then renamed: a kill never leaves half a file."""
    log_dir = trainer.log_dir or trainer.default_root_dir  # broadcasts: read on every rank
    if not trainer.is_global_zero:
        return
    out = Path(log_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def generations_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of a round's generations (`trait`, `loop`, `prompt`, `completion`): the prompt's last
    80 characters and the completion's last 400, a keyword's flag as 0/1 and a persona score to 2 decimals."""
    def cell(text: str, width: int) -> str:
        return text[-width:].replace("|", "\\|").replace("\n", " ")

    def flag(value: Any) -> str:
        return str(int(value)) if isinstance(value, bool) else f"{value:.2f}"

    lines = ["| # | trait | loop | prompt (end) | completion |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {flag(r['trait'])} | {int(r['loop'])} | {cell(r['prompt'], 80)} | "
              f"{cell(r['completion'], 400)} |" for i, r in enumerate(rows)]
    return "\n".join(lines)
