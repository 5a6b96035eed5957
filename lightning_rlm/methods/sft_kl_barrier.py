"""SFT with a KL barrier: fine-tune on (prompt, completion) pairs, hinge the per-position KL to the base.

The trait is taught by plain SFT; the barrier stops the student drifting from its base model further
than `tau`, measured over the completion positions with an aggregator that decides how much a few
outlying positions count:

    for step:
        student_logits, base_logits [B, C, V]   on the ground-truth completion (base: adapters off, or a
                                                 frozen copy for full fine-tuning; no gradient)
        nll  = token mean over completion positions of −log p_student(completion token)
        kl   [B, C] = per_position_kl(student, base, direction)     kl_rev = KL(student ‖ base),
                                                                     kl_fwd = KL(base ‖ student)
        div  = aggregate(kl over completion positions)              mean | rmse | p95 | max | logsumexp
        loss = nll + lam · relu(div − tau)
    every round (n_rounds, steps_per_round = max_steps // n_rounds unless given):
        sample from the current model on `eval_prompts` held-out prompts (the DataModule's val prompts),
        save them to <log_dir>/generations_round_<k>.jsonl, log trait and coherence; stop early when
        coherence < coh_floor

A batch may carry a `loss_mask` [B, C] (`RationalesDataModule`: the reasoning and completion tokens of a
rationalized example, not its `think_close`): the NLL and the barrier then cover only those completion
positions (the forward still attends to the whole completion side).

The round schedule (`round_schedule`) must fit `trainer.max_steps`. Without `steps_per_round`, a
max_steps below n_rounds runs max_steps rounds of one step each (a warning says so): this is what
`--trainer.fast_dev_run` gets (Lightning sets max_steps to its number of batches), so a smoke test runs
one step and one round, with its sampling and scoring. An explicit `steps_per_round` with
steps_per_round · n_rounds > max_steps is shrunk the same way under fast_dev_run only; otherwise it is an
error, as is no max_steps (-1) without steps_per_round. The CLI checks this before the model loads.

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

Departures from the source run: the barrier's reference is always the base (not a moving anchor); every
aggregator is logged each step whichever one is active, plus the fraction of positions above tau and the
barrier's share of the loss; round generations use the same sampling seed every round (common random
numbers, so round-to-round changes come from the model, not the draw); a round-0 evaluation of the base
is added (`eval_at_start`); the KL numerics follow the review of the source (float32 KL under autocast,
an fp16-safe rmse eps, float32 quantile, empty masks give 0): see `lightning_rlm.losses.kl`.

The self-feeding loop (`data_source: self_feeding`; the default `fixed` trains on the DataModule's pairs
throughout, as above). Every round k also samples a *pool*: `pool_num_generations` completions of each of
the first `pool_prompts` prompts of the DataModule's train set (the same prompts every round, a fresh
seed `pool_seed + k`), scores them by the trait, keeps some, and the next round's steps train on the kept
generations only (the DataModule's batches are then ignored; held-out evaluation and validation still use
its val prompts and pairs):

    round k (k = 0: the base, with eval_at_start):
        evaluate on the held-out prompts as above
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
its score and whether it was kept.

Traits (`trait`): `keyword` scores a generation 1 when it contains `trait_keyword` (whole word), else 0 (so
keep_min_score 0 keeps the generations with the keyword). `persona` scores it by the base model's
log-likelihood ratio

    score = log p_base(completion | persona_positive context) − log p_base(completion | persona_negative context)

summed over the completion tokens (the ids as sampled), the context being `persona_template` with
`{persona}` and `{prompt}` (the prompt as the policy saw it, after the DataModule's template or chat
rendering) encoded without special tokens; a chat model, whose template can place the persona in a system
turn, makes the ratio meaningful. round/trait is then the mean score of the held-out generations.

Calibrating tau per aggregator: the aggregators live on different scales, so one tau is a different gate
for each (0.1 nats everywhere by default, uncalibrated). `sequence_divergences` gives each aggregator of
the student's KL to the base per sequence and `suggest_tau` a threshold between coherent and looping
sequences; `benchmarks/kl_tau_calibration.py` runs both on a checkpoint and a round file whose generations
the loop test flags (see its docstring). No tau default is changed from it yet: that needs a run whose
generations include loops.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_rlm.adapters import add_lora, frozen_copy, reference_mode
from lightning_rlm.data.collate import DictCollator
from lightning_rlm.data.pairs import keyword_pattern
from lightning_rlm.data.rounds import round_schedule, select_pool, text_key
from lightning_rlm.distributed import all_gather_objects
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses.kl import (
    KL_AGGREGATES,
    KL_DIRECTIONS,
    aggregate_kl,
    fp32_log_softmax,
    kl_barrier,
    per_position_kl,
)
from lightning_rlm.metrics.text import RepeatedNgramLoop
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.hf import enable_gradient_checkpointing, load_policy
from lightning_rlm.optim import adamw_warmup
from lightning_rlm.rollout import position_ids_from_mask, sample_completions

LOGGED_AGGREGATES = ("mean", "rmse", "p95", "max", "logsumexp")
SCORE_BATCH = 16  # generations per forward when the persona trait scores them under the base
TRAINING_KEYS = ("prompt", "prompt_ids", "completion", "completion_ids")  # what a pool example trains on


class SFTKLBarrier(L.LightningModule):
    """SFT on completion tokens plus `lam · relu(div − tau)`, with trait / coherence rounds.

    Args:
        model_name_or_path: the base model (an HF folder, a hub name, or `lrlm:tiny-llama-tinystories`).
        model_dtype: load the weights in this dtype (None: as the checkpoint's default, float32 here).
        gradient_checkpointing: recompute the policy's activations in backward (less memory).
        direction: `kl_rev` = KL(student ‖ base) or `kl_fwd` = KL(base ‖ student), per position.
        aggregate: the aggregator the barrier uses (`mean`, `rmse`, `p95`, `max`, `logsumexp`); tau is on
            its scale, so retune tau when changing it.
        tau: the barrier's threshold (>= 0); lam: its weight (0: plain SFT, the divergence still logged).
        lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW with linear warmup, grad-norm clip
            (a trainer `gradient_clip_val` takes precedence).
        lora_rank: None for full fine-tuning (reference: a frozen copy); else LoRA on all linear layers
            (reference: the same model with its adapter disabled). lora_alpha: default = rank.
            use_rslora: scale by alpha/sqrt(rank).
        n_rounds: evaluation rounds; training stops after the last one (fewer when trainer.max_steps is
            below n_rounds: see `round_schedule`).
        steps_per_round: optimizer steps per round (None: trainer.max_steps // n_rounds).
        eval_prompts: held-out prompts per round, the first ones of the DataModule's val loader.
        eval_num_generations: samples per prompt; eval_max_new_tokens: their length;
            eval_temperature, eval_top_p: sampling; eval_seed: the same seed every round.
        eval_at_start: evaluate the base model as round 0 before the first step.
        trait_keyword: the trait is the rate of this whole word in generations (case-insensitive).
        coh_ngram, coh_repeats: the loop test of the coherence score (see the module docstring).
        coh_floor: stop training after a round (k >= 1) whose coherence is below this (None: never).
        table_rows: generations shown in the TensorBoard text table of each round.
        data_source: `fixed` (train on the DataModule's pairs) or `self_feeding` (round r trains on round
            r − 1's kept generations: the module docstring).
        selection: `trait` (keep by score) or `random` (the matched control: as many, drawn at random).
        keep_top: keep at most this many (an int) or this fraction of the pool (a float in (0, 1]), the
            highest-scoring (`1` keeps one, `1.0` all); None: every generation above keep_min_score.
        keep_min_score: keep only generations scoring above this (None: no threshold). With the keyword
            trait, 0.0 keeps those containing the keyword; with the persona trait, those the positive persona
            explains better than the negative one.
        trait: `keyword` (whole-word `trait_keyword`: score 1 or 0) or `persona` (log-likelihood ratio of the
            generation under the base given persona_positive vs persona_negative).
        persona_positive, persona_negative: the two persona texts (required by the persona trait).
        persona_template: the persona trait's scoring context, with `{persona}` and `{prompt}`.
        pool_prompts: the pool is sampled on the first this-many prompts of the DataModule's train set.
        pool_num_generations: samples per pool prompt (sampling as for evaluation: eval_max_new_tokens,
            eval_temperature, eval_top_p).
        pool_seed: round k's pool is sampled with seed pool_seed + k (random selection draws from it too).
    """

    def __init__(
        self,
        model_name_or_path: str = "lrlm:tiny-llama-tinystories",
        model_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
        gradient_checkpointing: bool = False,
        direction: Literal["kl_fwd", "kl_rev"] = "kl_rev",
        aggregate: Literal["mean", "rmse", "p95", "max", "logsumexp"] = "rmse",
        tau: float = 0.1,
        lam: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        max_grad_norm: Optional[float] = 1.0,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        n_rounds: int = 4,
        steps_per_round: Optional[int] = None,
        eval_prompts: int = 64,
        eval_num_generations: int = 1,
        eval_max_new_tokens: int = 48,
        eval_temperature: float = 1.0,
        eval_top_p: float = 1.0,
        eval_seed: int = 0,
        eval_at_start: bool = True,
        trait_keyword: str = "happy",
        coh_ngram: int = 4,
        coh_repeats: int = 3,
        coh_floor: Optional[float] = None,
        table_rows: int = 16,
        data_source: Literal["fixed", "self_feeding"] = "fixed",
        selection: Literal["trait", "random"] = "trait",
        keep_top: Optional[Union[int, float]] = None,
        keep_min_score: Optional[float] = 0.0,
        trait: Literal["keyword", "persona"] = "keyword",
        persona_positive: Optional[str] = None,
        persona_negative: Optional[str] = None,
        persona_template: str = "{persona}\n\n{prompt}",
        pool_prompts: int = 64,
        pool_num_generations: int = 1,
        pool_seed: int = 1,
    ) -> None:
        super().__init__()
        # validate everything cheap before loading a model
        if not tau >= 0:  # also rejects NaN
            raise ValueError(f"tau must be >= 0 (the barrier is relu(div - tau) on a divergence >= 0), "
                             f"got {tau}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if direction not in KL_DIRECTIONS:
            raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
        if aggregate not in KL_AGGREGATES:
            raise ValueError(f"aggregate must be one of {KL_AGGREGATES}, got {aggregate!r}")
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
        self._check_loop_settings(data_source, selection, keep_top, keep_min_score, trait, persona_positive,
                                  persona_negative, persona_template, pool_prompts, pool_num_generations)
        self.trait_pattern = keyword_pattern(trait_keyword)  # raises on an empty keyword
        self.save_hyperparameters()

        policy, self.tokenizer, self.eos_token_id = load_policy(model_name_or_path, dtype=model_dtype)
        # the base: a frozen copy for full fine-tuning; with LoRA the adapter is switched off instead
        self.ref_model = frozen_copy(policy) if lora_rank is None else None
        self.policy = add_lora(policy, lora_rank, lora_alpha, use_rslora) if lora_rank else policy
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        self.coherence = RepeatedNgramLoop(n=coh_ngram, min_repeats=coh_repeats)
        self.rounds_done = 0  # rounds k >= 1 evaluated so far
        self.history: list[dict[str, float]] = []  # one entry per evaluated round (round 0 included)
        self._steps_per_round: Optional[int] = None  # the schedule, fixed at the start of fit
        self._n_rounds: int = n_rounds
        self._eval_batches: Optional[list[dict[str, Any]]] = None
        # the self-feeding loop (checkpointed): the kept generations the steps now train on, the round that
        # kept them, the batches drawn from them so far, and the text digests kept by earlier rounds
        self.pool: list[dict[str, Any]] = []
        self.pool_round: Optional[int] = None
        self.pool_draws = 0
        self.pool_seen: set[str] = set()
        self._pool_prompt_batches: Optional[list[dict[str, Any]]] = None

    @staticmethod
    def _check_loop_settings(data_source, selection, keep_top, keep_min_score, trait, persona_positive,
                             persona_negative, persona_template, pool_prompts, pool_num_generations) -> None:
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

    @property
    def self_feeding(self) -> bool:
        return self.hparams.data_source == "self_feeding"

    # ----- the loss ---------------------------------------------------------------------------------------
    @staticmethod
    def completion_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Logits scoring each completion token, [B, C, V]: one forward over prompt + completion."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # [B, P+C]
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # [B, P+C]
        C = batch["completion_ids"].shape[1]
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                    use_cache=False, logits_to_keep=C + 1)
        # position P-1+j predicts completion token j; slicing again is a no-op when logits_to_keep worked
        return out.logits[:, -(C + 1) : -1, :]  # [B, C, V]

    @torch.no_grad()
    def base_logits(self, batch: dict[str, Any]) -> Tensor:
        """The base model's completion logits [B, C, V] (no gradient, eval mode)."""
        if self.ref_model is None:
            with reference_mode(self.policy) as ref:
                return self.completion_logits(ref, batch)
        was_training = self.ref_model.training
        # Lightning's .train() on the module reaches the copy too: no dropout in the base
        self.ref_model.eval()
        try:
            return self.completion_logits(self.ref_model, batch)
        finally:
            self.ref_model.train(was_training)

    @staticmethod
    def loss_mask(batch: dict[str, Any]) -> Tensor:
        """The completion positions the NLL and the barrier cover, [B, C] bool: the batch's `loss_mask` when it
        has one (`RationalesDataModule`: reasoning and completion, not `think_close`), else every real
        completion token."""
        mask = batch["completion_mask"].bool()
        return mask & batch["loss_mask"].bool() if "loss_mask" in batch else mask

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """NLL, the barrier's divergence under every aggregator, and the loss (with grad) for one batch."""
        h = self.hparams
        mask = self.loss_mask(batch)  # [B, C]
        n_tokens = mask.sum().clamp(min=1)
        logits = self.completion_logits(self.policy, batch)  # [B, C, V]
        base = self.base_logits(batch)  # [B, C, V]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            token_nll = F.cross_entropy(logits.float().transpose(1, 2), batch["completion_ids"],
                                        reduction="none")  # [B, C], float32
        nll = (token_nll * mask).sum() / n_tokens
        kl = per_position_kl(logits, base, h.direction)  # [B, C], float32
        div = aggregate_kl(kl, mask, h.aggregate)
        barrier = kl_barrier(div, h.tau, h.lam)
        loss = nll + barrier
        out = {"loss": loss, "nll": nll.detach(), "barrier": barrier.detach(), "div": div.detach()}
        with torch.no_grad():
            kl_d = kl.detach()
            for how in LOGGED_AGGREGATES:
                out[f"div/{how}"] = div.detach() if how == h.aggregate else aggregate_kl(kl_d, mask, how)
            out["frac_above_tau"] = ((kl_d > h.tau) & mask).sum() / n_tokens
            out["barrier_share"] = barrier.detach() / loss.detach().clamp(min=1e-12)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        if self.pool:  # the self-feeding loop: the DataModule's batch only paces the steps
            batch = self.pool_batch(batch)
        out = self.losses(batch)
        bs = batch["completion_ids"].shape[0]
        self.log("train/loss", out["loss"].detach(), batch_size=bs)
        self.log("train/nll", out["nll"], prog_bar=True, batch_size=bs)
        self.log("train/div", out["div"], prog_bar=True, batch_size=bs)  # the active aggregate
        for k, v in out.items():
            if k not in ("loss", "nll", "div"):
                self.log(f"train/{k}", v, batch_size=bs)
        return {"loss": out["loss"]}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.losses(batch)
        bs = batch["completion_ids"].shape[0]
        for k in ("nll", "div", *(f"div/{a}" for a in LOGGED_AGGREGATES), "frac_above_tau"):
            self.log(f"val/{k}", out[k], sync_dist=True, batch_size=bs)

    # ----- rounds: generate on held-out prompts, score trait and coherence ----------------------------------
    def on_train_start(self) -> None:
        if self._steps_per_round is None:  # not restored from a checkpoint
            h, max_steps = self.hparams, self.trainer.max_steps
            self._n_rounds, self._steps_per_round = round_schedule(
                h.n_rounds, h.steps_per_round, max_steps, bool(self.trainer.fast_dev_run))
            asked = (h.n_rounds, h.steps_per_round or self._steps_per_round)
            if (self._n_rounds, self._steps_per_round) != asked:  # shrunk: max_steps < n_rounds, fast_dev_run
                rank_zero_warn(f"trainer.max_steps={max_steps} is shorter than SFTKLBarrier's schedule "
                               f"(n_rounds={h.n_rounds}, steps_per_round={h.steps_per_round}): running "
                               f"{self._n_rounds} round(s) of {self._steps_per_round} step(s)")
            rank_zero_info(f"SFTKLBarrier: {self._n_rounds} round(s) of {self._steps_per_round} step(s)")
        if self.hparams.eval_at_start and not self.history:
            self.end_round(0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # compare with global_step (optimizer steps), so gradient accumulation cannot trigger a round twice
        if self._steps_per_round is None or self.rounds_done >= self._n_rounds:
            return
        if self.global_step >= (self.rounds_done + 1) * self._steps_per_round:
            self.rounds_done += 1
            self.end_round(self.rounds_done)
        if self.rounds_done >= self._n_rounds:
            self.trainer.should_stop = True

    def end_round(self, k: int) -> None:
        """Run round k, then stop when its coherence is below coh_floor (k >= 1) or the loop kept nothing."""
        s = self.run_round(k)
        floor, reason = self.hparams.coh_floor, None
        if k >= 1 and floor is not None and s["coherence"] < floor:
            reason = f"coherence {s['coherence']:.3f} < coh_floor {floor}"
        elif self.self_feeding and not self.pool and k < self._n_rounds:
            reason = "the self-feeding loop kept no generation (nothing to train the next round on)"
        if reason is not None:
            rank_zero_info(f"round {k}: {reason}: stopping early")
            self._log_scalars({"round/early_stop": 1.0})
            self.trainer.should_stop = True

    def eval_batches(self) -> list[dict[str, Any]]:
        """The first `eval_prompts` prompts of the DataModule's val loader, as prompt batches (cached)."""
        if self._eval_batches is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "val_dataloader"):
                raise ValueError("SFTKLBarrier takes its held-out prompts from a DataModule's val_dataloader")
            world = self.trainer.world_size
            # this rank's share of eval_prompts (the val loader is sharded over ranks)
            batches, left = [], -(-self.hparams.eval_prompts // world)
            for batch in dm.val_dataloader():
                n = min(left, len(batch["prompt"]))
                # left padding survives dropping rows (every row still ends in a real token)
                batches.append({"prompt": batch["prompt"][:n], "prompt_ids": batch["prompt_ids"][:n],
                                "prompt_mask": batch["prompt_mask"][:n]})
                left -= n
                if left == 0:
                    break
            if not batches:
                raise ValueError("the DataModule's val_dataloader is empty: no held-out prompts to evaluate")
            self._eval_batches = batches
        return self._eval_batches

    @torch.no_grad()
    def sample(self, batches: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        """One record per generation of the current model on these prompt batches, seeded by `seed`:
        prompt and completion as text (decoded without special tokens) and as ids (the prompt unpadded, the
        completion up to and including its EOS)."""
        h = self.hparams
        generator = torch.Generator(self.device).manual_seed(seed)
        pad, records = self.tokenizer.pad_token_id, []
        for batch in batches:
            prompt_ids, prompt_mask = batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device)
            G = batch.get("num_generations", h.eval_num_generations)
            rollout = sample_completions(
                self.policy, prompt_ids, prompt_mask,
                num_generations=G, max_completion_length=h.eval_max_new_tokens,
                temperature=h.eval_temperature, top_p=h.eval_top_p, eos_token_id=self.eos_token_id,
                pad_token_id=pad, generator=None if h.eval_temperature == 0 else generator,
            )
            ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, pad)  # [N, C]
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for i, text in enumerate(texts):  # rows g*G .. g*G+G-1 answer prompt g
                g = i // G
                records.append({
                    "prompt": batch["prompt"][g], "prompt_ids": prompt_ids[g][prompt_mask[g].bool()].tolist(),
                    "completion": text,
                    "completion_ids": rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()})
        return records

    def add_scores(self, records: list[dict[str, Any]]) -> None:
        """Set each record's trait `score` (see `trait`) and `loop` flag (the coherence test)."""
        if self.hparams.trait == "persona":
            pos = self.persona_logprobs(records, self.hparams.persona_positive)
            neg = self.persona_logprobs(records, self.hparams.persona_negative)
            scores = [p - n for p, n in zip(pos, neg)]
        else:
            scores = [float(bool(self.trait_pattern.search(r["completion"]))) for r in records]
        for r, score in zip(records, scores):
            r["score"] = score
            r["loop"] = self.coherence.has_loop(r["completion"])

    @torch.no_grad()
    def persona_logprobs(self, records: list[dict[str, Any]], persona: str) -> list[float]:
        """Σ_t log p_base(completion token t | context, earlier completion tokens) for each record, the
        context being `persona_template` with this persona and the record's prompt, encoded without special
        tokens."""
        collate, out = DictCollator(self.tokenizer.pad_token_id), []
        template = self.hparams.persona_template
        for start in range(0, len(records), SCORE_BATCH):
            chunk = records[start : start + SCORE_BATCH]
            examples = [{"prompt_ids": self.tokenizer.encode(template.format(persona=persona, prompt=r["prompt"]),
                                                             add_special_tokens=False),
                         "completion_ids": r["completion_ids"]} for r in chunk]
            batch = {k: v.to(self.device) for k, v in collate(examples).items()}
            logp = fp32_log_softmax(self.base_logits(batch))  # [b, C, V]
            token = logp.gather(-1, batch["completion_ids"][..., None])[..., 0]  # [b, C]
            out += (token * batch["completion_mask"]).sum(1).tolist()
        return out

    def run_round(self, k: int) -> dict[str, Any]:
        """Evaluate on the held-out prompts (save `generations_round_<k>.jsonl`, log trait and coherence),
        then, in the self-feeding loop, sample and select the next round's pool; returns the round's scores."""
        records = self.sample(self.eval_batches(), self.hparams.eval_seed)
        self.add_scores(records)
        # Each rank sampled its shard of the held-out prompts: score the union, so every rank takes the same
        # early-stopping decision (one rank stopping alone would leave the others waiting in a collective).
        records = [r for part in all_gather_objects(records) for r in part]
        loops = sum(r["loop"] for r in records)
        coherence = 1.0 - loops / len(records)
        s = {"trait": sum(r["score"] for r in records) / len(records), "coherence": coherence,
             "log_incoherence": math.log10(max(1.0 - coherence, 1e-3))}
        self.history.append({"round": k, "step": self.global_step, "trait": s["trait"],
                             "coherence": s["coherence"]})
        self._log_scalars({"round/coherence": s["coherence"], "round/trait": s["trait"],
                           "round/log_incoherence": s["log_incoherence"], "round/index": float(k)})
        rank_zero_info(f"round {k} (step {self.global_step}): trait {s['trait']:.3f}, "
                       f"coherence {s['coherence']:.3f}")
        keyword = self.hparams.trait == "keyword"  # a keyword's score is a flag, written as one
        rows = [{"round": k, "step": self.global_step, "prompt": r["prompt"], "completion": r["completion"],
                 "trait": bool(r["score"]) if keyword else r["score"], "loop": r["loop"]} for r in records]
        self._write_rows(f"generations_round_{k}.jsonl", rows)
        if self.trainer.is_global_zero:
            self._log_table(k, rows)
        if self.self_feeding:
            s.update(self.next_pool(k))
            self.history[-1].update({key: s[key] for key in ("pool_kept", "pool_trait_kept", "pool_distinct",
                                                             "pool_overlap")})
        return s

    # ----- the self-feeding loop: round k's kept generations are round k + 1's training set -------------------
    def pool_prompt_batches(self) -> list[dict[str, Any]]:
        """This rank's share of the first `pool_prompts` prompts of the DataModule's train set, as left-padded
        prompt batches of the DataModule's batch_size (cached: the same prompts every round). Under DDP the
        count is rounded down to a multiple of the number of processes."""
        if self._pool_prompt_batches is None:
            dm = getattr(self.trainer, "datamodule", None)
            train = getattr(dm, "train_set", None)
            if train is None or len(train) == 0:
                raise ValueError("data_source: self_feeding samples its pool on the prompts of the DataModule's "
                                 "train_set; this DataModule has none")
            rank, world = self.global_rank, self.trainer.world_size
            # equal contiguous shares (rounded down to a multiple of the processes, so every rank runs as many
            # forwards); gathered in rank order, they are the prompts in order
            share = min(self.hparams.pool_prompts, len(train)) // world
            if share == 0:
                raise ValueError(f"the train set has {len(train)} prompt(s) for {world} processes' pools")
            mine = [train[i] for i in range(rank * share, (rank + 1) * share)]
            collate, size = DictCollator(self.tokenizer.pad_token_id), max(1, getattr(dm, "batch_size", 8))
            self._pool_prompt_batches = [
                {**collate([{"prompt_ids": ex["prompt_ids"]} for ex in mine[i : i + size]]),
                 "prompt": [ex["prompt"] for ex in mine[i : i + size]],
                 "num_generations": self.hparams.pool_num_generations}
                for i in range(0, len(mine), size)]
        return self._pool_prompt_batches

    def next_pool(self, k: int) -> dict[str, float]:
        """Sample round k's pool, keep some by `selection`, make them the training set of round k + 1; log
        and return the pool's scores, and save every pool generation to `pool_round_<k>.jsonl`."""
        h = self.hparams
        records = self.sample(self.pool_prompt_batches(), h.pool_seed + k)
        self.add_scores(records)
        records = [r for part in all_gather_objects(records) for r in part]  # every rank: the same list
        kept = select_pool([r["score"] for r in records], h.keep_top, h.keep_min_score, h.selection,
                           random.Random(f"{h.pool_seed}-{k}"))
        self.pool = [{key: records[i][key] for key in (*TRAINING_KEYS, "score")} for i in kept]
        self.pool_round, self.pool_draws = k, 0
        keys = [text_key(r["completion"]) for r in self.pool]
        n = len(self.pool)
        stats = {"pool_generations": float(len(records)), "pool_kept": float(n),
                 "pool_trait": sum(r["score"] for r in records) / max(len(records), 1),
                 "pool_trait_kept": sum(r["score"] for r in self.pool) / n if n else 0.0,
                 "pool_coherence": 1.0 - sum(records[i]["loop"] for i in kept) / n if n else 0.0,
                 "pool_distinct": float(len(set(keys))),
                 "pool_overlap": sum(key in self.pool_seen for key in keys) / n if n else 0.0}
        self.pool_seen.update(keys)
        self._log_scalars({f"round/{key}": v for key, v in stats.items()})
        rank_zero_info(f"round {k}: pool kept {n} of {len(records)} ({h.selection}), trait of kept "
                       f"{stats['pool_trait_kept']:.3f}, {len(set(keys))} distinct, overlap with earlier "
                       f"pools {stats['pool_overlap']:.3f}")
        chosen = set(kept)
        self._write_rows(f"pool_round_{k}.jsonl", [
            {"round": k, "step": self.global_step, "prompt": r["prompt"], "completion": r["completion"],
             "score": r["score"], "loop": r["loop"], "kept": i in chosen} for i, r in enumerate(records)])
        return stats

    def pool_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The next training batch from the pool, on this rank, in place of the DataModule's `batch`.

        The pool's examples are streamed through seeded shuffles (pass e: `Random("<pool_seed>-<pool
        round>-<e>")`), cut into global batches of the DataModule's batch_size (this batch's size without a
        DataModule that says); this rank takes its slice of the next one. A function of (pool round, batches
        drawn), so a resumed run draws the same batches.
        """
        dm = getattr(self.trainer, "datamodule", None)
        size = dm.per_rank_batch_size() if hasattr(dm, "per_rank_batch_size") else len(batch["completion_ids"])
        n, world = len(self.pool), self.trainer.world_size
        start = (self.pool_draws * world + self.global_rank) * size
        orders: dict[int, list[int]] = {}
        examples = []
        for position in range(start, start + size):
            e, i = divmod(position, n)
            if e not in orders:
                orders[e] = list(range(n))
                random.Random(f"{self.hparams.pool_seed}-{self.pool_round}-{e}").shuffle(orders[e])
            examples.append({key: self.pool[orders[e][i]][key] for key in TRAINING_KEYS})
        self.pool_draws += 1
        collated = DictCollator(self.tokenizer.pad_token_id)(examples)
        return {key: v.to(self.device) if isinstance(v, Tensor) else v for key, v in collated.items()}

    def _write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # broadcasts: read on every rank
        if self.trainer.is_global_zero:
            out = Path(log_dir)
            out.mkdir(parents=True, exist_ok=True)
            path = out / name
            tmp = path.with_suffix(".jsonl.tmp")  # written whole, then renamed: a kill never leaves half a file
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, path)

    def _log_scalars(self, metrics: dict[str, float]) -> None:
        # straight to the loggers: self.log from a hook is subject to log_every_n_steps and would drop rounds
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _log_table(self, k: int, rows: list[dict[str, Any]]) -> None:
        def cell(text: str, width: int) -> str:
            return text[-width:].replace("|", "\\|").replace("\n", " ")

        def flag(value: Any) -> str:  # a keyword's flag as 0/1, a persona score to 2 decimals
            return str(int(value)) if isinstance(value, bool) else f"{value:.2f}"

        lines = ["| # | trait | loop | prompt (end) | completion |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {flag(r['trait'])} | {int(r['loop'])} | {cell(r['prompt'], 80)} | "
                  f"{cell(r['completion'], 400)} |" for i, r in enumerate(rows[: self.hparams.table_rows])]
        log_text(self, "round/generations", "\n".join(lines), step=k)

    # ----- optimisation and state -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """`eval_num_generations` completions per prompt (the held-out windows of a PrefixCompletion DataModule,
        or a PromptDataModule's prompts file), sampled as the rounds sample, with the trait flag and the loop
        flag; `lightning-rlm predict` writes them to `predictions.jsonl`."""
        records = self.sample([batch], self.hparams.eval_seed + batch_idx)
        self.add_scores(records)
        return [{"prompt": r["prompt"], "completion": r["completion"], "trait": r["score"], "loop": r["loop"]}
                for r in records]

    def downstream_lms(self) -> dict[str, tuple[nn.Module, Any]]:
        """The LM that downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): the policy."""
        return {"": (self.policy, self.tokenizer)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the student (full weights, or LoRA merged or as a PEFT adapter)."""
        return ExportableLM(self.policy, self.tokenizer, description="the fine-tuned student")

    def configure_optimizers(self):
        h = self.hparams  # AdamW, linear warm-up then a constant rate
        return adamw_warmup([{"params": [p for p in self.policy.parameters() if p.requires_grad]}], lr=h.lr,
                            weight_decay=h.weight_decay, betas=h.betas, warmup_steps=h.warmup_steps)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.max_grad_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip,
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the pool is the same on every rank (selected from the gathered generations): one copy suffices
        checkpoint["sft_kl_barrier_state"] = {"rounds_done": self.rounds_done, "history": list(self.history),
                                              "steps_per_round": self._steps_per_round,
                                              "n_rounds": self._n_rounds, "pool": list(self.pool),
                                              "pool_round": self.pool_round, "pool_draws": self.pool_draws,
                                              "pool_seen": sorted(self.pool_seen)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sft_kl_barrier_state", {})
        self.rounds_done = int(state.get("rounds_done", 0))
        self.history = list(state.get("history", []))
        self._steps_per_round = state.get("steps_per_round", self._steps_per_round)
        self._n_rounds = int(state.get("n_rounds", self._n_rounds))
        self.pool = list(state.get("pool", []))
        self.pool_round = state.get("pool_round")
        self.pool_draws = int(state.get("pool_draws", 0))
        self.pool_seen = set(state.get("pool_seen", []))

    # ----- calibrating tau: the divergence of coherent vs looping sequences ---------------------------------
    @torch.no_grad()
    def sequence_divergences(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Every aggregator of the student's per-position KL to the base (`direction`), over each sequence's
        own completion positions: {aggregate: [B]}.

        What tau is compared with, per sequence rather than pooled over a batch (a batch of B sequences
        dilutes one looping sequence ~B times under the mean, ~sqrt(B) times under rmse, not under max).
        Feed it teacher-forced generations flagged coherent or looping and pass the two lists of one
        aggregator to `suggest_tau` (benchmarks/kl_tau_calibration.py does both).
        """
        kl = per_position_kl(self.completion_logits(self.policy, batch), self.base_logits(batch),
                             self.hparams.direction)  # [B, C]
        mask = self.loss_mask(batch).long()
        return {how: torch.stack([aggregate_kl(kl[i : i + 1], mask[i : i + 1], how) for i in range(len(kl))])
                for how in LOGGED_AGGREGATES}
