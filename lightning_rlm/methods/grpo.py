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
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Optional

import lightning as L
import torch
from torch import Tensor

from lightning_rlm.adapters import add_lora, frozen_copy, reference_logprobs
from lightning_rlm.callbacks.checkpointing import own_rank_state, rank_states
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses import group_advantages, policy_loss
from lightning_rlm.metrics.text import DegenerateFlag, GroupJaccard, UniqueFirstSentences, first_sentence
from lightning_rlm.models.hf import load_policy
from lightning_rlm.rewards import SentenceLength, reward_name
from lightning_rlm.rollout import Rollout, completion_logprobs, sample_completions

RewardFn = Callable[..., list]


def default_rewards() -> list[RewardFn]:
    return [SentenceLength(n=10, mode="smooth")]


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
        eval_prompt: fixed prompt sampled `eval_samples` times at each validation (unique first sentences).
        eval_num_generations: sampled completions per held-out prompt in validation (plus one greedy).
        reward_thresholds: log the seconds and steps until the train reward (mean of the last 10 steps)
            first reaches each threshold.
    """

    # Optimizes in training_step itself: the CLI refuses Trainer-side accumulation and clipping up front.
    manual_optimization = True

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
        eval_prompt: Optional[str] = "Once upon a time",
        eval_samples: int = 20,
        eval_num_generations: int = 4,
        reward_thresholds: tuple[float, ...] = (0.85, 0.95),
    ) -> None:
        super().__init__()
        # validate everything cheap before loading a model
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages are relative to the group), got {num_generations}")
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        rewards = default_rewards() if rewards is None else list(rewards)
        if not rewards:
            raise ValueError("rewards is empty: give at least one reward function")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(reward_weights)} entries for {len(rewards)} rewards")
        self.save_hyperparameters(ignore=["rewards"])
        self.automatic_optimization = False
        self.rewards = rewards
        self.reward_names = [reward_name(r) for r in rewards]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(rewards)

        policy, self.tokenizer, self.eos_token_id = load_policy(model_name_or_path)
        # reference: adapters off (LoRA) or a frozen copy (full FT), only when the KL term is used
        self.ref_model = frozen_copy(policy) if (lora_rank is None and beta > 0) else None
        self.policy = add_lora(policy, lora_rank, lora_alpha, use_rslora) if lora_rank else policy
        self.generator: Optional[torch.Generator] = None
        self.recent_rewards: deque[float] = deque(maxlen=10)
        self.threshold_hits: dict[str, float] = {}
        self._fit_start_time: Optional[float] = None
        self._elapsed_before_resume = 0.0

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

    # ----- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        G = h.num_generations
        t0 = time.perf_counter()
        rollout = self.rollout(batch, G)
        t_gen = time.perf_counter() - t0
        completions = self.decode(rollout)
        rewards = self.score(batch, completions, G)
        advantages = group_advantages(rewards["total"], G, h.scale_rewards)  # [N]
        mask = rollout.completion_mask  # [N, C]

        ref_logp = None
        if h.beta > 0:
            ref_logp = reference_logprobs(self.policy, self.ref_model, rollout.input_ids, rollout.attention_mask,
                                          rollout.completion_length, temperature=h.temperature)  # [N, C]
        old_logp = None
        if h.num_iterations > 1:  # the sampling policy, fixed across the inner iterations
            with torch.no_grad():
                old_logp = completion_logprobs(self.policy, rollout, temperature=h.temperature)

        opt = self.optimizers()
        sched = self.lr_schedulers()
        for _ in range(h.num_iterations):
            logp, entropy = completion_logprobs(self.policy, rollout, temperature=h.temperature,
                                                return_entropy=True)  # [N, C] each
            loss, stats = policy_loss(
                logp, old_logp, advantages, mask, loss_type=h.loss_type, epsilon=h.epsilon,
                epsilon_high=h.epsilon_high, beta=h.beta, ref_logp=ref_logp, kl_estimator=h.kl_estimator,
                max_completion_length=h.max_completion_length,
            )
            opt.zero_grad()
            self.manual_backward(loss)
            if h.max_grad_norm:
                self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            sched.step()

        self._log_train(rewards, stats, entropy.detach(), rollout, completions, loss, t_gen,
                        time.perf_counter() - t0)
        return {"loss": loss.detach(), "rollout": {
            "prompts": [p for p in batch["prompt"] for _ in range(G)], "completions": completions,
            "references": None, "rewards": {k: v.tolist() for k, v in rewards.items()},
            "advantages": advantages.tolist(), "group_size": G,
        }}

    def _log_train(self, rewards, stats, entropy, rollout, completions, loss, t_gen, t_step) -> None:
        mask = rollout.completion_mask.bool()
        for name, values in rewards.items():
            self.log(f"train/reward/{name}", values.mean(), prog_bar=name == "total")
            self.log(f"train/reward_std/{name}", values.std())
        self.log("train/loss", loss.detach())
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k == "kl")
        self.log("train/entropy", entropy[mask].mean() if mask.any() else torch.tensor(0.0))
        self.log("train/completion_length", rollout.completion_lengths.float().mean())
        self.log("train/clipped_fraction", rollout.is_clipped.float().mean())
        ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, mask)]
        self.log("train/jaccard", GroupJaccard(rollout.num_generations)(ids))
        self.log("train/degenerate", DegenerateFlag(min_sentences=2.0)(completions))
        self.log("time/generation_s", t_gen)
        self.log("time/step_s", t_step)
        self._track_thresholds(rewards["total"].mean().item())

    def _track_thresholds(self, reward: float) -> None:
        self.recent_rewards.append(reward)
        mean = sum(self.recent_rewards) / len(self.recent_rewards)
        elapsed = self._elapsed_before_resume + (time.perf_counter() - (self._fit_start_time or time.perf_counter()))
        for t in self.hparams.reward_thresholds:
            key = f"{t:g}"
            if key not in self.threshold_hits and len(self.recent_rewards) == self.recent_rewards.maxlen and mean >= t:
                self.threshold_hits[key] = elapsed
                self.log(f"time_to/{key}_s", elapsed)
                self.log(f"time_to/{key}_steps", float(self.global_step))

    def on_train_start(self) -> None:
        self._fit_start_time = time.perf_counter()

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
        return {"rollout": {"prompts": [p for p in batch["prompt"] for _ in range(G)], "completions": texts,
                            "references": None, "rewards": {k: v.tolist() for k, v in rewards.items()},
                            "advantages": None, "group_size": G}}

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
    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / h.warmup_steps) if h.warmup_steps else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        elapsed = self._elapsed_before_resume + (time.perf_counter() - (self._fit_start_time or time.perf_counter()))
        checkpoint["grpo_state"] = {  # the sampling generator of every rank (each samples its own stream)
            "generators": rank_states(self.generator.get_state() if self.generator is not None else None),
            "recent_rewards": list(self.recent_rewards), "threshold_hits": dict(self.threshold_hits),
            "elapsed_s": elapsed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("grpo_state", {})
        generator = own_rank_state(state["generators"]) if state.get("generators") else state.get("generator")
        if generator is not None:
            self.generator = torch.Generator(self.device)
            self.generator.set_state(generator)
        self.recent_rewards = deque(state.get("recent_rewards", []), maxlen=10)
        self.threshold_hits = dict(state.get("threshold_hits", {}))
        self._elapsed_before_resume = float(state.get("elapsed_s", 0.0))
