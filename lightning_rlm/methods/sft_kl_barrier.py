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
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_rlm.adapters import add_lora, frozen_copy, reference_mode
from lightning_rlm.data.pairs import keyword_pattern
from lightning_rlm.distributed import all_gather_objects
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses.kl import KL_AGGREGATES, KL_DIRECTIONS, aggregate_kl, kl_barrier, per_position_kl
from lightning_rlm.metrics.text import RepeatedNgramLoop
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.hf import enable_gradient_checkpointing, load_policy
from lightning_rlm.optim import adamw_warmup
from lightning_rlm.rollout import position_ids_from_mask, sample_completions

LOGGED_AGGREGATES = ("mean", "rmse", "p95", "max", "logsumexp")


def round_schedule(n_rounds: int, steps_per_round: Optional[int], max_steps: Optional[int],
                   fast_dev_run: bool = False) -> tuple[int, int]:
    """(rounds, steps_per_round) to run under `max_steps` (-1/None: unbounded); ValueError if none can.

    Without steps_per_round, max_steps is split into min(n_rounds, max_steps) rounds (so max_steps <
    n_rounds gives max_steps rounds of one step). An explicit steps_per_round must fit, unless fast_dev_run
    (then as many rounds as fit, each at most max_steps // rounds steps).
    """
    bounded = max_steps is not None and max_steps >= 0
    if steps_per_round is None:
        if not bounded:
            raise ValueError(f"SFTKLBarrier's rounds need trainer.max_steps (split into n_rounds={n_rounds} "
                             f"rounds) or model steps_per_round; got max_steps={max_steps}")
        rounds = max(1, min(n_rounds, max_steps))
        return rounds, max(1, max_steps // rounds)
    if not bounded or steps_per_round * n_rounds <= max_steps:
        return n_rounds, steps_per_round
    if fast_dev_run:
        rounds = max(1, min(n_rounds, max_steps))
        return rounds, max(1, min(steps_per_round, max_steps // rounds))
    raise ValueError(f"SFTKLBarrier's steps_per_round={steps_per_round} x n_rounds={n_rounds} = "
                     f"{steps_per_round * n_rounds} steps do not fit trainer.max_steps={max_steps}; raise "
                     "max_steps, lower n_rounds or steps_per_round, or leave steps_per_round unset")


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

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """NLL, the barrier's divergence under every aggregator, and the loss (with grad) for one batch."""
        h = self.hparams
        mask = batch["completion_mask"].bool()  # [B, C]
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
            self.run_round(0)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # compare with global_step (optimizer steps), so gradient accumulation cannot trigger a round twice
        if self._steps_per_round is None or self.rounds_done >= self._n_rounds:
            return
        if self.global_step >= (self.rounds_done + 1) * self._steps_per_round:
            self.rounds_done += 1
            coherence = self.run_round(self.rounds_done)
            floor = self.hparams.coh_floor
            if floor is not None and coherence < floor:
                rank_zero_info(f"round {self.rounds_done}: coherence {coherence:.3f} < coh_floor {floor}: "
                               "stopping early")
                self._log_scalars({"round/early_stop": 1.0})
                self.trainer.should_stop = True
        if self.rounds_done >= self._n_rounds:
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
    def generate_round(self) -> tuple[list[str], list[str]]:
        """(prompts, completions) of the current model on the held-out prompts, same seed every round."""
        h = self.hparams
        generator = torch.Generator(self.device).manual_seed(h.eval_seed)
        prompts, completions = [], []
        for batch in self.eval_batches():
            rollout = sample_completions(
                self.policy, batch["prompt_ids"].to(self.device), batch["prompt_mask"].to(self.device),
                num_generations=h.eval_num_generations, max_completion_length=h.eval_max_new_tokens,
                temperature=h.eval_temperature, top_p=h.eval_top_p, eos_token_id=self.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                generator=None if h.eval_temperature == 0 else generator,
            )
            pad = self.tokenizer.pad_token_id
            ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, pad)  # [N, C]
            completions += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            prompts += [p for p in batch["prompt"] for _ in range(h.eval_num_generations)]
        return prompts, completions

    def score_round(self, completions: list[str]) -> dict[str, Any]:
        """Per-generation trait/loop flags and the round's trait, coherence and log-incoherence."""
        trait = [bool(self.trait_pattern.search(c)) for c in completions]
        loop = [self.coherence.has_loop(c) for c in completions]
        coherence = 1.0 - sum(loop) / len(loop)
        return {"trait_flags": trait, "loop_flags": loop, "trait": sum(trait) / len(trait),
                "coherence": coherence, "log_incoherence": math.log10(max(1.0 - coherence, 1e-3))}

    def run_round(self, k: int) -> float:
        """Generate, save `generations_round_<k>.jsonl`, log the round's scores; returns its coherence."""
        prompts, completions = self.generate_round()
        # Each rank sampled its shard of the held-out prompts: score the union, so every rank takes the same
        # early-stopping decision (one rank stopping alone would leave the others waiting in a collective).
        parts = all_gather_objects((prompts, completions))
        prompts = [p for part_prompts, _ in parts for p in part_prompts]
        completions = [c for _, part_completions in parts for c in part_completions]
        s = self.score_round(completions)
        self.history.append({"round": k, "step": self.global_step, "trait": s["trait"],
                             "coherence": s["coherence"]})
        self._log_scalars({"round/coherence": s["coherence"], "round/trait": s["trait"],
                           "round/log_incoherence": s["log_incoherence"], "round/index": float(k)})
        rank_zero_info(f"round {k} (step {self.global_step}): trait {s['trait']:.3f}, "
                       f"coherence {s['coherence']:.3f}")
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # broadcasts: read on every rank
        if self.trainer.is_global_zero:
            rows = [{"round": k, "step": self.global_step, "prompt": p, "completion": c, "trait": t,
                     "loop": lp}
                    for p, c, t, lp in zip(prompts, completions, s["trait_flags"], s["loop_flags"])]
            out = Path(log_dir)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"generations_round_{k}.jsonl"
            tmp = path.with_suffix(".jsonl.tmp")  # written whole, then renamed: a kill never leaves half a file
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, path)
            self._log_table(k, rows)
        return s["coherence"]

    def _log_scalars(self, metrics: dict[str, float]) -> None:
        # straight to the loggers: self.log from a hook is subject to log_every_n_steps and would drop rounds
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _log_table(self, k: int, rows: list[dict[str, Any]]) -> None:
        def cell(text: str, width: int) -> str:
            return text[-width:].replace("|", "\\|").replace("\n", " ")

        lines = ["| # | trait | loop | prompt (end) | completion |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {int(r['trait'])} | {int(r['loop'])} | {cell(r['prompt'], 80)} | "
                  f"{cell(r['completion'], 400)} |" for i, r in enumerate(rows[: self.hparams.table_rows])]
        log_text(self, "round/generations", "\n".join(lines), step=k)

    # ----- optimisation and state -------------------------------------------------------------------------
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
        checkpoint["sft_kl_barrier_state"] = {"rounds_done": self.rounds_done, "history": list(self.history),
                                              "steps_per_round": self._steps_per_round,
                                              "n_rounds": self._n_rounds}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sft_kl_barrier_state", {})
        self.rounds_done = int(state.get("rounds_done", 0))
        self.history = list(state.get("history", []))
        self._steps_per_round = state.get("steps_per_round", self._steps_per_round)
        self._n_rounds = int(state.get("n_rounds", self._n_rounds))
