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

The round schedule must fit `trainer.max_steps`: a shorter max_steps (as under `--trainer.fast_dev_run`)
runs fewer rounds, with a warning, or is an error (`round_schedule` in `lightning_rlm.data.rounds`). A
round's scores, over its generations' completion text: trait = fraction containing `trait_keyword` as a
whole word (the `persona` trait: the mean log-likelihood ratio), coherence = fraction free of token loops
(`RepeatedNgramLoop(coh_ngram, coh_repeats)`), log_incoherence = log10(max(1 − coherence, 1e-3)). The
shipped configs train on windows whose completion contains the keyword and evaluate on unfiltered held-out
prompts, so round 0 (the base) is the baseline.

Departures from the source run: the barrier's reference is always the base (not a moving anchor); every
aggregator is logged each step whichever one is active, plus the fraction of positions above tau and the
barrier's share of the loss; round generations use the same sampling seed every round (common random
numbers, so round-to-round changes come from the model, not the draw); a round-0 evaluation of the base
is added (`eval_at_start`); the KL numerics follow the review of the source (float32 KL under autocast,
an fp16-safe rmse eps, float32 quantile, empty masks give 0): see `lightning_rlm.losses.kl`.

The self-feeding loop (`data_source: self_feeding`; the default `fixed` trains on the DataModule's pairs):
every round k also samples a pool on the DataModule's train prompts, scores it by the trait (`keyword`: 1
or 0; `persona`: the base's log-likelihood ratio under persona_positive vs persona_negative), keeps some
(`selection`: `trait` by score, or `random`, the matched control) and round k + 1 trains on those only; it
stops after a round that kept nothing. In full: `lightning_rlm.rollout.trait_rounds` (sampling, traits,
scores) and `lightning_rlm.data.rounds` (prompts, selection, batches). Calibrating tau per aggregator:
`sequence_divergences` and `suggest_tau` (`lightning_rlm.losses.kl`).
"""

from __future__ import annotations

import random
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_rlm.adapters import add_lora, frozen_copy, reference_mode
from lightning_rlm.data import rounds
from lightning_rlm.data.pairs import keyword_pattern
from lightning_rlm.distributed import all_gather_objects
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses.kl import (
    aggregate_kl,
    aggregate_kl_per_sequence,
    check_kl_barrier,
    kl_barrier,
    kl_diagnostics,
    per_position_kl,
)
from lightning_rlm.metrics.text import RepeatedNgramLoop
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.hf import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from lightning_rlm.optim import adamw_warmup
from lightning_rlm.rollout import trait_rounds
from lightning_rlm.rollout.generate import position_ids_from_mask

LOGGED_AGGREGATES = ("mean", "rmse", "p95", "max", "logsumexp")


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
        check_kl_barrier(direction, aggregate, tau, lam)
        trait_rounds.check_round_settings(n_rounds, steps_per_round, eval_prompts, eval_num_generations,
                                          eval_max_new_tokens, eval_temperature, coh_floor)
        trait_rounds.check_loop_settings(data_source, selection, keep_top, keep_min_score, trait,
                                         persona_positive, persona_negative, persona_template, pool_prompts,
                                         pool_num_generations)
        self.trait_pattern = keyword_pattern(trait_keyword)  # raises on an empty keyword
        self.save_hyperparameters()

        self.tokenizer, self.eos_token_id = load_tokenizer(model_name_or_path)  # cheap: no weights
        self.policy: Optional[nn.Module] = None  # configure_model
        self.ref_model: Optional[nn.Module] = None
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

    def configure_model(self) -> None:
        """Load the student and its base here, not in `__init__` (as :meth:`GRPO.configure_model
        <lightning_rlm.methods.grpo.GRPO.configure_model>`: in the strategy's context; a no-op once done)."""
        if self.policy is not None:
            return
        h = self.hparams
        policy = load_causal_lm(h.model_name_or_path, dtype=h.model_dtype)
        # the base: a frozen copy for full fine-tuning; with LoRA the adapter is switched off instead
        self.ref_model = frozen_copy(policy) if h.lora_rank is None else None
        self.policy = add_lora(policy, h.lora_rank, h.lora_alpha, h.use_rslora) if h.lora_rank else policy
        if h.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)

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
        out = {"loss": loss, "nll": nll.detach(), "barrier": barrier.detach(), "div": div.detach(),
               **kl_diagnostics(kl, mask, h.tau, h.aggregate, div, LOGGED_AGGREGATES)}
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
            self._n_rounds, self._steps_per_round = rounds.round_schedule(
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
        elif self.hparams.data_source == "self_feeding" and not self.pool and k < self._n_rounds:
            reason = "the self-feeding loop kept no generation (nothing to train the next round on)"
        if reason is not None:
            rank_zero_info(f"round {k}: {reason}: stopping early")
            self._log_scalars({"round/early_stop": 1.0})
            self.trainer.should_stop = True

    def sample(self, batches: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        """One record per generation of the current model on these prompt batches, seeded by `seed`, sampled
        with the eval_* settings: prompt and completion as text and as ids (`trait_rounds.sample_records`)."""
        h = self.hparams
        return trait_rounds.sample_records(
            self.policy, self.tokenizer, batches, seed, device=self.device, eos_token_id=self.eos_token_id,
            num_generations=h.eval_num_generations, max_new_tokens=h.eval_max_new_tokens,
            temperature=h.eval_temperature, top_p=h.eval_top_p)

    def add_scores(self, records: list[dict[str, Any]]) -> None:
        """Set each record's trait `score` (see `trait`) and `loop` flag (the coherence test)."""
        h = self.hparams
        personas = (h.persona_positive, h.persona_negative) if h.trait == "persona" else None
        trait_rounds.score_records(records, self.coherence, self.trait_pattern, personas, h.persona_template,
                                   base_logits=self.base_logits, tokenizer=self.tokenizer, device=self.device)

    def run_round(self, k: int) -> dict[str, Any]:
        """Evaluate on the held-out prompts (save `generations_round_<k>.jsonl`, log trait and coherence),
        then, in the self-feeding loop, sample and select the next round's pool; returns the round's scores."""
        if self._eval_batches is None:  # this rank's share (the val loader is sharded)
            share = -(-self.hparams.eval_prompts // self.trainer.world_size)
            self._eval_batches = rounds.val_prompt_batches(getattr(self.trainer, "datamodule", None), share)
        records = self.sample(self._eval_batches, self.hparams.eval_seed)
        self.add_scores(records)
        # Each rank sampled its shard of the held-out prompts: score the union, so every rank takes the same
        # early-stopping decision (one rank stopping alone would leave the others waiting in a collective).
        records = [r for part in all_gather_objects(records) for r in part]
        s = trait_rounds.round_scores(records)
        self.history.append({"round": k, "step": self.global_step, "trait": s["trait"],
                             "coherence": s["coherence"]})
        self._log_scalars({"round/coherence": s["coherence"], "round/trait": s["trait"],
                           "round/log_incoherence": s["log_incoherence"], "round/index": float(k)})
        rank_zero_info(f"round {k} (step {self.global_step}): trait {s['trait']:.3f}, "
                       f"coherence {s['coherence']:.3f}")
        flags = self.hparams.trait == "keyword"  # a keyword's score is a flag, written as one
        rows = trait_rounds.generation_rows(k, self.global_step, records, flags)
        trait_rounds.write_round_file(self.trainer, f"generations_round_{k}.jsonl", rows)
        if self.trainer.is_global_zero:
            table = trait_rounds.generations_table(rows[: self.hparams.table_rows])
            log_text(self, "round/generations", table, step=k)
        if self.hparams.data_source == "self_feeding":
            s.update(self.next_pool(k))
            self.history[-1].update({key: s[key] for key in ("pool_kept", "pool_trait_kept", "pool_distinct",
                                                             "pool_overlap")})
        return s

    # ----- the self-feeding loop: round k's kept generations are round k + 1's training set ---------------
    def next_pool(self, k: int) -> dict[str, float]:
        """Sample round k's pool, keep some by `selection`, make them the training set of round k + 1; log
        and return the pool's scores, and save every pool generation to `pool_round_<k>.jsonl`."""
        h = self.hparams
        if self._pool_prompt_batches is None:  # this rank's share of the pool prompts, the same every round
            self._pool_prompt_batches = rounds.train_prompt_batches(
                getattr(self.trainer, "datamodule", None), h.pool_prompts, h.pool_num_generations,
                self.global_rank, self.trainer.world_size, self.tokenizer.pad_token_id)
        records = self.sample(self._pool_prompt_batches, h.pool_seed + k)
        self.add_scores(records)
        records = [r for part in all_gather_objects(records) for r in part]  # every rank: the same list
        kept = rounds.select_pool([r["score"] for r in records], h.keep_top, h.keep_min_score, h.selection,
                                  random.Random(f"{h.pool_seed}-{k}"))
        self.pool, stats = rounds.take_pool(records, kept, self.pool_seen)  # adds the kept texts to pool_seen
        self.pool_round, self.pool_draws = k, 0
        self._log_scalars({f"round/{key}": v for key, v in stats.items()})
        rank_zero_info(f"round {k}: pool kept {len(kept)} of {len(records)} ({h.selection}), trait of kept "
                       f"{stats['pool_trait_kept']:.3f}, {int(stats['pool_distinct'])} distinct, overlap "
                       f"with earlier pools {stats['pool_overlap']:.3f}")
        trait_rounds.write_round_file(self.trainer, f"pool_round_{k}.jsonl",
                                      trait_rounds.pool_rows(k, self.global_step, records, kept))
        return stats

    def pool_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The next training batch from the pool on this rank, in place of the DataModule's `batch`: its slice
        of the next global batch of the DataModule's batch_size (this batch's size without a DataModule that
        says) cut from seeded shuffles of the pool (`rounds.pool_batch`: a resumed run draws the same)."""
        dm = getattr(self.trainer, "datamodule", None)
        size = dm.per_rank_batch_size() if hasattr(dm, "per_rank_batch_size") else len(batch["completion_ids"])
        out = rounds.pool_batch(self.pool, self.pool_draws, self.global_rank, self.trainer.world_size, size,
                                self.hparams.pool_seed, self.pool_round, self.tokenizer.pad_token_id)
        self.pool_draws += 1
        return {key: v.to(self.device) if isinstance(v, Tensor) else v for key, v in out.items()}

    def _log_scalars(self, metrics: dict[str, float]) -> None:
        # straight to the loggers: self.log from a hook is subject to log_every_n_steps and would drop rounds
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

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
        own completion positions: {aggregate: [B]} (`aggregate_kl_per_sequence`: what tau is compared with).
        Feed it teacher-forced generations flagged coherent or looping and pass the two lists of one
        aggregator to `suggest_tau` (benchmarks/kl_tau_calibration.py does both).
        """
        kl = per_position_kl(self.completion_logits(self.policy, batch), self.base_logits(batch),
                             self.hparams.direction)  # [B, C]
        return aggregate_kl_per_sequence(kl, self.loss_mask(batch).long(), LOGGED_AGGREGATES)
