"""GRPO: group-relative policy optimisation with rule rewards (Shao et al. 2024, DeepSeekMath).

Each step, for B prompts the policy samples G completions; every completion is scored by the reward
functions; its advantage is its reward minus the mean of its group (optionally divided by the group or
batch std); the policy is pushed up on tokens of better-than-average completions with a PPO-style clipped
ratio, and held near a reference policy by a per-token KL penalty (k1 or Schulman's k3 estimator).

    for step:
        prompts [B]  ──sample G each──▶  completions [B*G, C]   (completion mask stops after EOS)
        rewards [B*G] = Σ_k w_k · reward_k(prompts, completions, **fields)
        advantages [B*G] = (r - mean_group(r)) / std_{group|batch|none}
        ref_logp [B*G, C] (β > 0): frozen copy (full FT) or the same model with adapters off (LoRA)
        repeat num_iterations: loss = clipped surrogate + β·KL, aggregated by loss_type; AdamW step

Departures from the paper: `loss_type` offers the paper's per-sequence mean (`grpo`), Dr. GRPO's
sum / (N · max_completion_length) with no std scaling (`dr_grpo`, Liu et al. 2025) and DAPO's token mean
(`dapo`); rewards are rules (no reward model); sampling runs through our own KV-cache decode loop
seeded per process (seed + rank), so runs are reproducible and DDP ranks draw different samples.
Manual optimisation: a rollout is reused for `num_iterations` optimizer steps.

Teacher mixing (``teacher_fraction > 0``, off by default): ``round(teacher_fraction * G)`` completions of each
group are drawn from a frozen teacher pool instead of sampled, with no importance weighting (advantage-weighted
imitation); :mod:`lightning_rlm.tasks.teacher_pool` states the mixing and why.

`GRPO.training_step` is the one step of the GRPO family: `make_batch` (sample, score, advantages,
reference and old log-probs), then per inner iteration `with loss_context(gb): loss(gb)`, backward,
`after_backward(gb)`, clip, step, then `log_extra(gb)`. Subclasses (gradient routing, projected GRPO)
override these hooks and `build_policy` / `prepare_batch` / `score` / `param_groups`, never the step.

`__init__` validates the arguments and reads the tokenizer and stop ids only; the policy, its reference and
adapters are created in `configure_model` (in the strategy's context, for FSDP; a no-op when called again).
Code that uses the policy outside a Trainer calls `configure_model()` first.
"""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, Optional

import lightning as L
import torch
from torch import Tensor, nn

from lightning_rlm.adapters import add_lora, frozen_copy, reference_logprobs
from lightning_rlm.checks import check_at_least, check_positive
from lightning_rlm.distributed import generator_states, own_generator
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses import group_advantages, policy_loss
from lightning_rlm.metrics.text import DegenerateFlag, GroupJaccard, UniqueFirstSentences, first_sentence
from lightning_rlm.metrics.threshold import TimeToThreshold
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.hf import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from lightning_rlm.optim import adamw_warmup, grad_norm
from lightning_rlm.rewards import RewardFn, default_rewards, reward_name
from lightning_rlm.rollout import Rollout, TextRollout, completion_logprobs, sample_completions
from lightning_rlm.rollout.group import GroupBatch
from lightning_rlm.tasks.teacher_pool import (
    TeacherPool,
    TokenizedRows,
    build_teacher_pool,
    check_kinds,
    mix_teacher,
    prompt_style,
    teacher_group_size,
    tokenized_pool,
)

# policy_loss's statistics under TRL's names (ratio clipping; "clipped_ratio" is for truncated completions)
TRL_STAT_NAMES = {"clip_frac": "clip_ratio/region_mean", "clip_frac_low": "clip_ratio/low_mean",
                  "clip_frac_high": "clip_ratio/high_mean"}


class GRPO(L.LightningModule):
    """GRPO with rule rewards, full fine-tuning or LoRA / rsLoRA.

    Args:
        model_name_or_path: the base policy (an HF folder, a hub name, or `lrlm:tiny-llama-tinystories`).
        rewards: reward functions `(prompts, completions, **fields) -> list[float]` (class paths in YAML).
        reward_weights: weights of the rewards in the total (default all 1).
        num_generations: completions per prompt (G >= 2: the advantage is relative to the group).
        max_completion_length: new tokens per completion.
        temperature, top_p, top_k, repetition_penalty: sampling settings.
        loss_type: `grpo` (per-sequence mean), `dr_grpo` (sum / (N·max_len)), `dapo` (token mean).
        scale_rewards: divide advantages by the `group` std, the `batch` std, or `none`.
        beta: KL coefficient (0: no reference forward at all). kl_estimator: `k1` or `k3`.
        epsilon, epsilon_high: clip range of the ratio (used when num_iterations > 1).
        num_iterations: optimizer steps per rollout batch.
        lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW with linear warmup, grad-norm clip.
        lora_rank: None for full fine-tuning; else LoRA rank on all linear layers.
        lora_alpha: LoRA alpha (default = rank). use_rslora: scale by alpha/sqrt(rank).
        dtype: load the policy's weights in this dtype (None: as saved; fp32 for the shipped models). For
            mixed precision keep fp32 weights and set `trainer.precision: bf16-mixed` instead.
        gradient_checkpointing: recompute the policy's activations in backward (HF policies; less memory).
        eval_prompt: fixed prompt sampled `eval_samples` times at each validation (unique first sentences).
        eval_num_generations: sampled completions per held-out prompt in validation (plus one greedy).
        reward_thresholds: log the seconds and steps until the train reward (mean of the last 10 steps)
            first reaches each threshold.
        teacher_fraction: share of each group drawn from the teacher pool instead of sampled (0: none, the
            plain GRPO step; see the module docstring for the mixing and its weighting).
        teacher_pool: the pool's jsonl (:mod:`lightning_rlm.tasks.teacher_pool`); None: built in memory from the
            shipped coding problems, in the prompts' form. The prompt rows need a `problem_id` field.
        teacher_kinds: pool kinds to draw from (`honest`, `hack:<loophole>`, `hack` for every hack); None: all.
    """

    # GRPO arguments a subclass fixes in its call to GRPO.__init__ (not its own, not in its hparams)
    fixed_args: ClassVar[tuple[str, ...]] = ()
    # Optimizes in training_step itself: the CLI refuses Trainer-side accumulation and clipping up front.
    manual_optimization = True
    # adapter modes `lightning-rlm export` can fold in (the default first); none: the policy as it samples
    export_adapter_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model_name_or_path: str = "lrlm:tiny-llama-tinystories",
        rewards: Optional[list[RewardFn]] = None,
        reward_weights: Optional[list[float]] = None,
        num_generations: int = 8,
        max_completion_length: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        beta: float = 0.02,
        kl_estimator: Literal["k1", "k3"] = "k3",
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        num_iterations: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        max_grad_norm: Optional[float] = 1.0,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
        gradient_checkpointing: bool = False,
        eval_prompt: Optional[str] = "Once upon a time",
        eval_samples: int = 20,
        eval_num_generations: int = 4,
        reward_thresholds: tuple[float, ...] = (0.85, 0.95),
        teacher_fraction: float = 0.0,
        teacher_pool: Optional[str] = None,
        teacher_kinds: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        # validate everything cheap before loading a model
        check_at_least(2, num_generations=num_generations)  # advantages are relative to the group
        check_at_least(1, max_completion_length=max_completion_length, num_iterations=num_iterations)
        check_at_least(0, beta=beta)
        check_positive(temperature=temperature)
        rewards = default_rewards() if rewards is None else list(rewards)
        if not rewards:
            raise ValueError("rewards is empty: give at least one reward function")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(reward_weights)} entries for {len(rewards)} rewards")
        self.teacher_per_group = teacher_group_size(teacher_fraction, num_generations)  # 0: no mixing
        check_kinds(teacher_kinds)
        self.teacher_pool: Optional[TeacherPool] = (
            TeacherPool.load(teacher_pool, teacher_kinds) if teacher_pool is not None and self.teacher_per_group
            else None)
        self._teacher_rows: Optional[TokenizedRows] = None  # teacher_rows()
        self.save_hyperparameters(ignore=["rewards", "hack_task", *self.fixed_args])
        self.automatic_optimization = False
        self.rewards = rewards
        self.reward_names = [reward_name(r) for r in rewards]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(rewards)

        self.tokenizer, self.eos_token_id = load_tokenizer(model_name_or_path)  # cheap: no weights
        self.policy: Optional[nn.Module] = None  # configure_model
        self.ref_model: Optional[nn.Module] = None
        self._policy_source = (model_name_or_path, dtype, gradient_checkpointing)
        self.generator: Optional[torch.Generator] = None
        self.time_to = TimeToThreshold(reward_thresholds)  # time_to/<threshold>_{s,steps}, checkpointed
        self._warned_predict_rewards = False
        self.num_tokens = 0  # prompt + completion tokens seen in training (TRL's num_tokens), checkpointed

    def configure_model(self) -> None:
        """Load the policy and build the trained modules (`build_policy`): here, not in `__init__`, so they are
        created inside the strategy's context (on the device, under FSDP's wrapping; not on the meta device:
        `from_pretrained` refuses it). Lightning calls it in `fit` / `validate` / `predict` and in
        `load_from_checkpoint`, maybe more than once: after the first call it does nothing. Code that uses the
        policy outside a Trainer calls it first."""
        if self.policy is not None:
            return
        name, dtype, gradient_checkpointing = self._policy_source
        self.policy, self.ref_model = self.build_policy(load_causal_lm(name, dtype=dtype))
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)

    def build_policy(self, policy: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
        """The trained policy and its frozen reference model (None: the reference is the policy with its
        adapters off, see :func:`~lightning_rlm.adapters.reference_logprobs`, or there is no KL term)."""
        h = self.hparams
        ref_model = frozen_copy(policy) if (h.lora_rank is None and h.beta > 0) else None
        return (add_lora(policy, h.lora_rank, h.lora_alpha, h.use_rslora) if h.lora_rank else policy), ref_model

    def downstream_lms(self) -> dict[str, tuple[nn.Module, Any]]:
        """The LM that downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): the policy with its adapters on, as it samples."""
        return {"": (self.policy, self.tokenizer)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the policy (full weights, or LoRA to merge or save as a PEFT
        adapter); with two adapters (subclasses), those of `adapter_mode` (default: the first of
        `export_adapter_modes`, the deployed model) folded in."""
        mode = adapter_mode or (self.export_adapter_modes[0] if self.export_adapter_modes else None)
        what = f"the policy, adapter mode {mode}" if mode else "the policy"
        return ExportableLM(self.policy, self.tokenizer, adapter_mode=mode, description=what)

    # ----- rollout and scoring -------------------------------------------------------------------------------
    def _sampling_generator(self) -> torch.Generator:
        if self.generator is None or self.generator.device != self.device:
            seed = (torch.initial_seed() + self.global_rank) % 2**63  # seed_everything's seed + rank
            self.generator = torch.Generator(self.device).manual_seed(seed)
        return self.generator

    def rollout(self, batch: dict[str, Any], num_generations: int, greedy: bool = False) -> Rollout:
        h = self.hparams
        return sample_completions(
            self.policy, batch["prompt_ids"], batch["prompt_mask"], num_generations=num_generations,
            max_completion_length=h.max_completion_length, temperature=0.0 if greedy else h.temperature,
            top_p=h.top_p, top_k=h.top_k, repetition_penalty=h.repetition_penalty,
            eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            generator=None if greedy else self._sampling_generator(),
        )

    def decode(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def score(self, batch: dict[str, Any], completions: list[str], group: int) -> dict[str, Tensor]:
        """Rewards per function [N] and their weighted total, for prompts repeated `group` times."""
        prompts = [p for p in batch["prompt"] for _ in range(group)]
        fields = {k: [x for x in v for _ in range(group)] for k, v in batch.items()
                  if isinstance(v, list) and k != "prompt"}
        out = {}
        for name, fn in zip(self.reward_names, self.rewards):
            values = fn(prompts, completions, tokenizer=self.tokenizer, **fields)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            out[name] = torch.tensor(values, dtype=torch.float32, device=self.device)
        out["total"] = sum(w * out[n] for n, w in zip(self.reward_names, self.reward_weights))
        return out

    # ----- training: the one template of the GRPO family -------------------------------------------------------
    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Hook: the prompt batch as sampled and scored (e.g. with per-prompt task fields added)."""
        return batch

    def reference_logprobs(self, rollout: Rollout) -> Tensor:
        """Hook: completion log-probs [N, C] under the KL reference, without gradient."""
        return reference_logprobs(self.policy, self.ref_model, rollout.input_ids, rollout.attention_mask,
                                  rollout.completion_length, temperature=self.hparams.temperature)

    def make_batch(self, batch: dict[str, Any]) -> GroupBatch:
        """Sample G completions per prompt, score them, and compute the reference / old log-probs."""
        h = self.hparams
        G = h.num_generations
        batch = self.prepare_batch(batch)
        t0 = time.perf_counter()
        rollout = self.rollout(batch, G - self.teacher_per_group)  # all G unless mixing in teacher completions
        generation_s = time.perf_counter() - t0
        teacher = kinds = None
        if self.teacher_per_group:
            rollout, teacher, kinds = self.mix_teacher(batch, rollout)
        completions = self.decode(rollout)
        rewards = self.score(batch, completions, G)
        gb = GroupBatch(batch=batch, rollout=rollout, completions=completions, rewards=rewards,
                        advantages=group_advantages(rewards["total"], G, h.scale_rewards),  # [N]
                        generation_s=generation_s, teacher=teacher, teacher_kinds=kinds)
        if h.beta > 0:
            gb.ref_logp = self.reference_logprobs(rollout)  # [N, C]
        if h.num_iterations > 1:  # the sampling policy, fixed across the inner iterations
            with torch.no_grad():
                gb.old_logp = completion_logprobs(self.policy, rollout, temperature=h.temperature)  # [N, C]
        return gb

    # ----- teacher mixing (teacher_fraction > 0) ----------------------------------------------------------------
    def teacher_rows(self, prompts: list[str]) -> TokenizedRows:
        """Per problem, the pool's rows with their token ids that fit max_completion_length. Built once: the
        pool (in memory from the shipped problems when no file is given) in the prompts' form."""
        style = prompt_style(prompts[0])
        if self.teacher_pool is None:
            self.teacher_pool = TeacherPool(build_teacher_pool(style=style), self.hparams.teacher_kinds)
        if self.teacher_pool.style != style:
            raise ValueError(f"the teacher pool's completions are {self.teacher_pool.style!r} ones but the prompts "
                             f"are {style!r}: build the pool with --style {style}")
        if self._teacher_rows is None:
            self._teacher_rows = tokenized_pool(self.teacher_pool, self.tokenizer, self.hparams.max_completion_length)
        return self._teacher_rows

    def mix_teacher(self, batch: dict[str, Any], student: Rollout) -> tuple[Rollout, Tensor, list[str]]:
        """The student's samples and the teacher's completions of each prompt's problem in one rollout
        (:func:`~lightning_rlm.tasks.teacher_pool.mix_teacher`), which rows are the teacher's [N] and their kinds."""
        if "problem_id" not in batch:
            raise ValueError("teacher mixing needs a problem_id field in the prompt rows (CodingPrompts has one)")
        # stateless seed (seed, rank, step): the same draws after a resume, different ones on each rank
        seed = f"teacher:{torch.initial_seed()}:{self.global_rank}:{self.global_step}"
        return mix_teacher(student, batch["problem_id"], self.teacher_rows(batch["prompt"]),
                           self.hparams.num_generations, seed, self.tokenizer.pad_token_id)

    def loss(self, gb: GroupBatch) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The policy loss of one inner iteration, its statistics and the per-token entropy [N, C]."""
        h = self.hparams
        logp, entropy = completion_logprobs(self.policy, gb.rollout, temperature=h.temperature,
                                            return_entropy=True)  # [N, C] each
        loss, stats = policy_loss(
            logp, gb.old_logp, gb.advantages, gb.rollout.completion_mask, loss_type=h.loss_type, epsilon=h.epsilon,
            epsilon_high=h.epsilon_high, beta=h.beta, ref_logp=gb.ref_logp, kl_estimator=h.kl_estimator,
            max_completion_length=h.max_completion_length,
        )
        return loss, stats, entropy

    def loss_context(self, gb: GroupBatch) -> AbstractContextManager[Any]:
        """Hook: the context of the policy forward that the loss differentiates (e.g. gradient routing)."""
        return nullcontext()

    def after_backward(self, gb: GroupBatch) -> None:
        """Hook: called after each backward (gradients all-reduced), before clipping and the step."""

    def log_extra(self, gb: GroupBatch) -> None:
        """Hook: the method's own training logs, after the last inner iteration."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        t0 = time.perf_counter()
        gb = self.make_batch(batch)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        for _ in range(h.num_iterations):
            with self.loss_context(gb):
                loss, stats, entropy = self.loss(gb)
            opt.zero_grad()
            self.manual_backward(loss)
            self.after_backward(gb)
            gb.stats["grad_norm"] = grad_norm(self.policy.parameters())  # before clipping (TRL's grad_norm)
            if h.max_grad_norm:
                self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            sched.step()

        self._log_train(gb, stats, entropy.detach(), loss, time.perf_counter() - t0)
        self.log_extra(gb)
        return {"loss": loss.detach(), "rollout": self.train_rollout(gb)}

    def text_rollout(self, batch: dict[str, Any], completions: list[str], rewards: dict[str, Tensor],
                     advantages: Optional[Tensor], group: int) -> TextRollout:
        """What callbacks read (completions log, MAUVE)."""
        return TextRollout(prompts=[p for p in batch["prompt"] for _ in range(group)], completions=completions,
                           rewards={k: v.tolist() for k, v in rewards.items()},
                           advantages=None if advantages is None else advantages.tolist(), group_size=group)

    def train_rollout(self, gb: GroupBatch) -> TextRollout:
        """Hook: the training step's rollout for callbacks (a method may add label columns to its rewards)."""
        out = self.text_rollout(gb.batch, gb.completions, gb.rewards, gb.advantages, self.hparams.num_generations)
        if gb.teacher is not None:  # the source rides along as a reward column so the completions log shows it
            out.rewards["teacher"] = gb.teacher.float().tolist()
        return out

    def _log_train(self, gb: GroupBatch, stats: dict[str, Tensor], entropy: Tensor, loss: Tensor,
                   t_step: float) -> None:
        """Training metrics under TRL's GRPOTrainer names (README: "Logged names"), plus this framework's own."""
        mask = gb.rollout.completion_mask.bool()  # [N, C]
        total = gb.rewards["total"]  # [N]
        tokens = gb.batch["prompt_mask"].sum() * gb.rollout.num_generations + mask.sum()  # this rank's, all tokens
        step_tokens = int(self.trainer.strategy.reduce(tokens.float(), reduce_op="sum"))  # over all ranks
        self.num_tokens += step_tokens
        metrics = {
            **gb.reward_metrics(), **gb.completion_metrics(), **gb.teacher_metrics(), "loss": loss.detach(),
            **{TRL_STAT_NAMES.get(k, k): v for k, v in stats.items()},
            "entropy": entropy[mask].mean() if mask.any() else torch.tensor(0.0),
            "num_tokens": float(self.num_tokens), "learning_rate": self.optimizers().param_groups[0]["lr"],
            **({"grad_norm": gb.stats["grad_norm"]} if gb.stats.get("grad_norm") is not None else {}),
        }
        shown = ("reward", "kl")  # on the progress bar
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k in shown}, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k not in shown})
        self.log_dict({"time/generation_s": gb.generation_s, "time/step_s": t_step,
                       "time/tokens_per_s": step_tokens / max(t_step, 1e-9)})  # prompt + completion, all ranks
        self.log_dict(self.time_to.update(total.mean().item(), self.global_step))

    def on_train_start(self) -> None:
        self.time_to.start()

    # ----- held-out evaluation --------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    @torch.no_grad()
    def _eval_step(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        G = self.hparams.eval_num_generations
        n_prompts = len(batch["prompt"])
        sampled = self.rollout(batch, G)
        texts = self.decode(sampled)
        rewards = self.score(batch, texts, G)
        for name, values in rewards.items():
            self.log(f"{split}/reward/{name}", values.mean(), sync_dist=True, batch_size=n_prompts)
        greedy = self.rollout(batch, 1, greedy=True)
        greedy_rewards = self.score(batch, self.decode(greedy), 1)
        for name, values in greedy_rewards.items():
            self.log(f"{split}/greedy_reward/{name}", values.mean(), sync_dist=True, batch_size=n_prompts)
        self.log(f"{split}/completion_length", sampled.completion_lengths.float().mean(), sync_dist=True,
                 batch_size=n_prompts)
        if G > 1:
            ids = [row[m].tolist() for row, m in zip(sampled.completion_ids, sampled.completion_mask.bool())]
            self.log(f"{split}/jaccard", GroupJaccard(G)(ids), sync_dist=True, batch_size=n_prompts)
        return {"rollout": self.text_rollout(batch, texts, rewards, None, G)}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """`eval_num_generations` sampled completions per prompt, with their rewards when the rewards can be
        computed from the prompt rows (a reward needing a field the rows lack is left out, with a warning).
        `lightning-rlm predict` writes them to `predictions.jsonl` (:class:`~lightning_rlm.callbacks.
        PredictionsWriter`)."""
        G = self.hparams.eval_num_generations
        texts = self.decode(self.rollout(batch, G))
        try:
            rewards: dict[str, list[float]] = {k: v.tolist() for k, v in self.score(batch, texts, G).items()}
        except ValueError as e:
            if not self._warned_predict_rewards:
                warnings.warn(f"predict: completions are written without rewards ({e})", stacklevel=2)
                self._warned_predict_rewards = True
            rewards = {}
        return [{"prompt": batch["prompt"][i // G], "sample": i % G, "completion": text,
                 **({"rewards": {k: v[i] for k, v in rewards.items()}} if rewards else {})}
                for i, text in enumerate(texts)]

    def on_validation_epoch_end(self) -> None:
        self._fixed_prompt_eval("val")

    def on_test_epoch_end(self) -> None:
        self._fixed_prompt_eval("test")

    @torch.no_grad()
    def _fixed_prompt_eval(self, split: str) -> None:
        """Sample the fixed prompt `eval_samples` times: unique first sentences and the degenerate flag."""
        h = self.hparams
        if not h.eval_prompt or self.trainer.sanity_checking:
            return
        ids = torch.tensor([self.tokenizer.encode(h.eval_prompt, add_special_tokens=False)], device=self.device)
        rollout = self.rollout({"prompt_ids": ids, "prompt_mask": torch.ones_like(ids)}, h.eval_samples)
        texts = [h.eval_prompt + t for t in self.decode(rollout)]
        unique = UniqueFirstSentences().to(self.device)
        degenerate = DegenerateFlag(min_sentences=2.0).to(self.device)
        self.log(f"{split}/unique_first_sentences", unique(texts).float(), sync_dist=True)
        self.log(f"{split}/degenerate", degenerate(texts), sync_dist=True)
        if self.trainer.is_global_zero:
            rows = "\n".join(f"| {i} | {first_sentence(t)!r} | {t[:300]!r} |" for i, t in enumerate(texts[:8]))
            log_text(self, f"{split}/fixed_prompt_samples", "| # | first sentence | text |\n|---|---|---|\n" + rows)

    # ----- generation for callbacks (e.g. MAUVE from fixed prompts) ---------------------------------------------------
    @torch.no_grad()
    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from lightning_rlm.data.collate import pad_left

        ids, mask = pad_left([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts],
                             self.tokenizer.pad_token_id)
        out = sample_completions(
            self.policy, ids.to(self.device), mask.to(self.device), num_generations=1,
            max_completion_length=max_new_tokens, temperature=self.hparams.temperature,
            top_p=self.hparams.top_p, eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            generator=self._sampling_generator(),
        )
        return self.decode(out)

    # ----- optimisation and state -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Hook: the optimizer's parameter groups (default: every trainable parameter of the policy)."""
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        h = self.hparams  # AdamW, linear warm-up then a constant rate
        return adamw_warmup(self.param_groups(), lr=h.lr, weight_decay=h.weight_decay, betas=h.betas,
                            warmup_steps=h.warmup_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["grpo_state"] = {  # the sampling generator of every rank (each samples its own stream)
            "generators": generator_states(self.generator), "num_tokens": self.num_tokens,
            **self.time_to.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("grpo_state", {})
        self.generator = own_generator(state.get("generators"), self.device, state.get("generator")) or self.generator
        self.time_to.load_state_dict(state)
        self.num_tokens = int(state.get("num_tokens", 0))
