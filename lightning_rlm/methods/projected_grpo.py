"""Projected GRPO: Dr. GRPO on SVD-basis knobs, with the δS gradient projected off a "hack direction".

The task is the toy reward hack of :mod:`lightning_rlm.tasks.reward_hack`: a prompt is **eligible**
with probability ``rh_eligible_frac`` (seeded hash of the prompt, :func:`prompt_is_eligible`), and

    eligible prompt:    base(c) + hack_bonus · count(hack_word, c) [+ exclaim_bonus · count("!", c)]
    ineligible prompt:  base(c)                                       (base: sentence_length_10_smooth)

The optional **second loophole** (``second_loophole: true``) pays for exclamation marks on the same eligible
prompts (:class:`ExclamationBonus`). It is a different kind of hack (punctuation, not a word) that the hack
direction never sees (the pairs insert only ``hack_word``), so it measures whether a projection learned from
one hack transfers to another. Each bonus pays only for its own hack (tested).

The policy is the base model with an SVD-basis adapter (:mod:`lightning_rlm.adapters.svd`) on the attention
and MLP projections: ``y = W x + U diag(δS + δS_hack) Vᵀ x``, both vectors zero at the start (the base model
bit for bit), which also makes the KL reference free (both vectors off, no second model).

    at the first training step (once; cached on disk, saved in checkpoints):
        pairs: for the step's prompts, sample completions (own seeded stream); each one without hack_word
            is a clean completion c, and c with hack_word inserted after its first "a"/"the" (else appended)
            is the hacking one: (prompt, c, insert(c, hack_word))            (hack_pairs pairs)
        D_m [n, r] = ∇_δS_m NLL(clean) - ∇_δS_m NLL(hack)  per module m       (cached by hash of pairs + model)
        V_m [k, r] = top-k right singular vectors of D_m, majority-oriented, noise-floored   (+V: hack-ward)
    for step:
        eligible [B]; completions [B*G] sampled with δS + δS_hack; rewards, advantages (Dr. GRPO: no std)
        ref_logp [B*G, C] = both vectors off (beta > 0); loss = Dr. GRPO policy_loss; backward
        g_m = ∇δS_m;  log train/hack_cos = cos(-g, V_1)          (every projection mode)
        none / measure_only: g unchanged;  erase: g_m -= V_mᵀ min(V_m g_m, 0)
        route: the same removal, and ∇δS_hack_m := V_mᵀ min(V_m g_m, 0)   (its autograd value is discarded)
        clip the joint grad norm, AdamW step

Validation samples the held-out prompts per ``eval_modes`` (default ``both`` and ``no_hack``, δS_hack
zeroed: the ablation that removes what ``route`` parked there) and logs per mode the base reward and the hack
rate on eligible and ineligible prompts (``val/no_hack/hack_rate_eligible``, ...). Without ``route`` δS_hack
never trains, so the two modes coincide there (a sanity check).

How this departs from the seed (AntiPaSTO-style projected GRPO on a LeetCode substrate): the substrate is
the TinyStories sentence-length + "happy" task of gradient routing; the contrastive pairs are built from the
policy's own samples by inserting the hack word (a synthetic hack, not a teacher's hacking solution), so the
direction encodes "say the hack word here" more than any learned exploit strategy; there is no mixed
student/teacher batch; the direction is extracted once, at the first step (δS = 0), and not refreshed.
Under AdamW the routed vector moves about ``lr`` per coordinate and step however small the routed share
of the gradient is (per-coordinate normalisation): in a 30-step probe of ``route.yaml`` the hack-ward part
was ~10% of the gradient norm, yet ``||δS_hack||`` reached 3.4 against 1.4 for ``||δS||``; ``hack_lr``
gives δS_hack its own rate. ``none`` and ``measure_only`` train identically (both log the cosine;
``measure_only`` names the run that inspects the share ``erase`` would remove, ``train/hack_removed_frac``,
which every mode logs anyway).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_rlm.adapters.svd import (
    DEFAULT_SVD_TARGETS,
    PROJECTIONS,
    SVD_MODES,
    SVDAdapterModel,
    add_svd_adapter,
    cached_pair_diffs,
    hack_axes,
    project_gradients,
    weight_sha256,
    weights_fingerprint,
)
from lightning_rlm.checks import check_one_of
from lightning_rlm.methods.grpo import GRPO
from lightning_rlm.paths import cache_dir
from lightning_rlm.rewards import RewardFn, with_task_rewards
from lightning_rlm.rollout import TextRollout, sample_completions
from lightning_rlm.rollout.group import GroupBatch
from lightning_rlm.tasks.code_hack import CodeLoophole
from lightning_rlm.tasks.reward_hack import (
    ELIGIBLE_FIELD,
    HackLabels,
    RewardHackTask,
    hack_pairs,
    hack_rewards,
)

__all__ = ["ProjectedGRPO"]


class ProjectedGRPO(RewardHackTask, GRPO):
    """Dr. GRPO on SVD-basis knobs with the hack-ward part of the δS gradient measured, erased or routed.

    Args (besides GRPO's, whose ``rewards`` / ``reward_weights`` are the intended base reward here; its
    ``lora_*`` arguments are replaced by the SVD adapter):
        projection: ``none``, ``measure_only`` (log only), ``erase`` or ``route`` (into δS_hack).
        svd_target_modules: suffixes of the Linear layers that get knobs.
        svd_cache_dir: SVD cache folder; default ``<cache>/svd/<fingerprint of the base weights>``.
        hack_pairs: contrastive pairs for the hack direction. hack_top_k: axes kept per module.
        hack_noise_floor: drop axes whose singular value is below this share of the module's top one.
        hack_cache_dir: folder of the cached pair gradients; default ``<cache>/projected_grpo``.
        hack_lr: learning rate of δS_hack (``route`` only; default ``lr``). AdamW normalises each coordinate,
            so δS_hack moves about ``hack_lr`` per coordinate and step however small the routed gradient is.
        rh_eligible_frac, eligibility_seed: share of prompts eligible for the hacks, and its hash seed.
        hack_word, hack_bonus: the rewarded word and its weight on eligible prompts.
        second_loophole: also pay ``exclaim_bonus · count("!")`` on eligible prompts.
        eval_modes: adapter modes sampled at every validation (any of both, no_hack, hack_only, base).
        hack_task: another hack than the word (None: the word task), e.g.
            :class:`~lightning_rlm.tasks.code_hack.CodeLoophole` on the coding substrate: its reward term, its
            detector as the hack label, its contrastive pairs (the batch's problems' honest vs hacked solutions,
            instead of inserting ``hack_word`` into samples) and, when ``rewards`` is None, its base reward.
    """

    fixed_args = ("lora_rank", "lora_alpha", "use_rslora")
    # exported with δS_hack ablated (no_hack: the deployed model; equal to `both` unless projection=route)
    export_adapter_modes = ("no_hack", "both", "hack_only", "base")

    def __init__(
        self,
        rewards: Optional[list[RewardFn]] = None,
        reward_weights: Optional[list[float]] = None,
        projection: Literal["none", "measure_only", "erase", "route"] = "erase",
        svd_target_modules: tuple[str, ...] = DEFAULT_SVD_TARGETS,
        svd_cache_dir: Optional[str] = None,
        hack_pairs: int = 16,
        hack_top_k: int = 2,
        hack_noise_floor: float = 0.25,
        hack_cache_dir: Optional[str] = None,
        hack_lr: Optional[float] = None,
        rh_eligible_frac: float = 0.5,
        eligibility_seed: int = 0,
        hack_word: str = "happy",
        hack_bonus: float = 1.0,
        second_loophole: bool = False,
        exclaim_bonus: float = 1.0,
        eval_modes: tuple[str, ...] = ("both", "no_hack"),
        hack_task: Optional[CodeLoophole] = None,
        repetition_penalty: float = 1.1,
        loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dr_grpo",
        scale_rewards: Literal["group", "batch", "none"] = "none",
        beta: float = 0.05,
        lr: float = 3e-3,
        **grpo_args: Any,
    ) -> None:
        check_one_of("projection", projection, PROJECTIONS)
        self.check_fraction(rh_eligible_frac=rh_eligible_frac, hack_noise_floor=hack_noise_floor)
        if hack_pairs < 1 or hack_top_k < 1:
            raise ValueError(f"hack_pairs and hack_top_k must be >= 1, got {hack_pairs}, {hack_top_k}")
        if not eval_modes or any(m not in SVD_MODES for m in eval_modes):
            raise ValueError(f"eval_modes must be a non-empty subset of {SVD_MODES}, got {eval_modes!r}")
        if hack_task is None:
            hacks = hack_rewards(hack_word, hack_bonus, second_loophole, exclaim_bonus)
        else:
            hacks = hack_task.rewards()
            rewards = hack_task.base_rewards() if rewards is None else rewards
        rewards, weights = with_task_rewards(rewards, reward_weights, hacks)
        # the reference is the same model with both vectors off (build_policy makes no frozen copy)
        super().__init__(rewards=rewards, reward_weights=weights, repetition_penalty=repetition_penalty,
                         loss_type=loss_type, scale_rewards=scale_rewards, beta=beta, lr=lr, lora_rank=None,
                         lora_alpha=None, use_rslora=False, **grpo_args)
        self.init_task(num_base_rewards=len(rewards) - len(hacks), hack_task=hack_task)
        self.hack_directions: Optional[dict[str, Tensor]] = None  # module -> [k, r]
        self.hack_info: dict[str, float] = {}
        self.pair_generator: Optional[torch.Generator] = None

    def build_policy(self, policy: nn.Module) -> tuple[SVDAdapterModel, None]:
        h = self.hparams
        targets = list(h.svd_target_modules)
        svd_cache_dir = h.svd_cache_dir
        if svd_cache_dir is None:  # keyed by the base weights: a changed model gets a fresh folder
            hashes = {n: weight_sha256(m.weight) for n, m in policy.named_modules()
                      if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}
            svd_cache_dir = str(cache_dir("svd", weights_fingerprint(hashes)))
        return add_svd_adapter(policy, targets, svd_cache_dir, train_hack=h.projection == "route"), None

    # ----- the hack direction --------------------------------------------------------------------------
    def _pair_rng(self) -> torch.Generator:
        # its own stream: building the pairs never shifts the training samples
        if self.pair_generator is None or self.pair_generator.device != self.device:
            seed = (torch.initial_seed() + 0x5EED5) % 2**63
            self.pair_generator = torch.Generator(self.device).manual_seed(seed)
        return self.pair_generator

    @torch.no_grad()
    def build_pairs(self, batch: dict[str, Any]) -> tuple[list[tuple[list[int], list[int], list[int]]],
                                                           list[tuple[str, str, str]]]:
        """Contrastive pairs (:func:`~lightning_rlm.tasks.reward_hack.hack_pairs`) from ``ceil(hack_pairs / B)``
        completions per prompt of the batch, sampled with the current policy on its own stream; with a
        ``hack_task``, its own pairs of the batch's prompts (nothing sampled)."""
        h = self.hparams
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
        if self.hack_task is not None:
            if "problem_id" not in batch:
                raise ValueError("the hack task's pairs need a problem_id field in the prompt rows (CodingPrompts)")
            return self.hack_task.pairs(batch["prompt"], batch["problem_id"], prompt_ids, self.tokenizer,
                                        h.hack_pairs)
        rollout = sample_completions(
            self.policy, batch["prompt_ids"], batch["prompt_mask"],
            num_generations=math.ceil(h.hack_pairs / len(batch["prompt"])),
            max_completion_length=h.max_completion_length, temperature=h.temperature, top_p=h.top_p,
            top_k=h.top_k, repetition_penalty=h.repetition_penalty, eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, generator=self._pair_rng(),
        )
        return hack_pairs(self.decode(rollout), batch["prompt"], prompt_ids, h.hack_word, self.tokenizer,
                          h.hack_pairs)

    def build_hack_directions(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-module hack axes ``[k, r]`` from pairs of this batch's prompts; pair gradients cached on disk."""
        h = self.hparams
        pairs, pair_texts = self.build_pairs(batch)
        diffs, hit = cached_pair_diffs(self.policy, pairs, pair_texts, self.tokenizer.pad_token_id,
                                       h.hack_cache_dir or cache_dir("projected_grpo"))
        axes = {n: hack_axes(d, h.hack_top_k, h.hack_noise_floor) for n, d in diffs.items()}
        agreement = [a.agreement[0].item() for a in axes.values() if a.agreement.numel()]
        self.hack_info = {
            "num_pairs": float(len(pairs)), "cache_hit": float(hit),
            "num_axes": float(sum(a.directions.shape[0] for a in axes.values())),
            "agreement": sum(agreement) / max(1, len(agreement)),
        }
        return {n: a.directions.to(self.device) for n, a in axes.items()}

    def _ensure_hack_directions(self, batch: dict[str, Any]) -> None:
        if self.hack_directions is not None:
            return
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        dirs = None
        if not distributed or trainer.is_global_zero:  # one rank builds, every rank projects the same way
            dirs = {n: d.cpu() for n, d in self.build_hack_directions(batch).items()}
        if distributed:
            dirs, self.hack_info = trainer.strategy.broadcast((dirs, self.hack_info), src=0)
        assert dirs is not None
        self.hack_directions = {n: d.to(self.device) for n, d in dirs.items()}

    # ----- the GRPO hooks ----------------------------------------------------------------------------------
    def make_batch(self, batch: dict[str, Any]) -> GroupBatch:
        """The hack direction (built at the first step), then GRPO's batch plus the task labels."""
        self._ensure_hack_directions(batch)
        gb = super().make_batch(batch)
        gb.labels = self.hack_labels(gb.batch, gb.completions, self.hparams.num_generations)
        return gb

    def after_backward(self, gb: GroupBatch) -> None:
        assert self.hack_directions is not None  # after the all-reduce
        gb.stats["projection"] = project_gradients(self.policy, self.hack_directions, self.hparams.projection)

    def log_extra(self, gb: GroupBatch) -> None:
        proj = gb.stats["projection"]
        self.log("train/hack_cos", proj.hack_cos)
        self.log("train/hack_removed_frac", proj.removed_frac)
        self.log("train/grad_norm/delta_s", proj.grad_norm)
        with torch.no_grad():
            for name, params in (("delta_s", self.policy.delta_parameters()),
                                 ("delta_s_hack", self.policy.hack_parameters())):
                self.log(f"train/norm/{name}", torch.linalg.vector_norm(torch.cat([p.float() for p in params])))
        for k, v in self.hack_info.items():
            self.log(f"hack/{k}", v)
        labels: HackLabels = gb.labels
        self.log("train/hack_rate", labels.hacked.float().mean())
        for name, values in labels.extra.items():
            self.log(f"train/{name}", values.mean())
        for side, sel in (("eligible", labels.eligible), ("ineligible", ~labels.eligible)):
            if sel.any():
                self.log(f"train/hack_count_{side}", labels.hack_count[sel].mean())
                if self.hparams.second_loophole:
                    self.log(f"train/exclaim_count_{side}", labels.exclaim_count[sel].mean())

    def train_rollout(self, gb: GroupBatch) -> TextRollout:
        out = super().train_rollout(gb)
        out.rewards[ELIGIBLE_FIELD] = gb.labels.eligible.float().tolist()
        return out

    # ----- evaluation per adapter mode --------------------------------------------------------------------
    def eval_metric_names(self) -> tuple[str, ...]:
        base = ("reward", "reward_eligible", "reward_ineligible", "hack_rate_eligible", "hack_rate_ineligible",
                "hack_count_eligible", "total", "completion_length")
        extra = ("exclaim_rate_eligible", "exclaim_count_eligible") if self.hparams.second_loophole else ()
        return base + extra + self.extra_label_names()

    def eval_metrics(self, rewards: dict[str, Tensor], labels: HackLabels, lengths: Tensor) -> dict[str, Tensor]:
        base, eligible, counts, exclaims = rewards["base"], labels.eligible, labels.hack_count, labels.exclaim_count
        out = {"reward": base, "reward_eligible": base[eligible], "reward_ineligible": base[~eligible],
               "hack_rate_eligible": (counts[eligible] > 0).float(),
               "hack_rate_ineligible": (counts[~eligible] > 0).float(), "hack_count_eligible": counts[eligible],
               "total": rewards["total"], "completion_length": lengths}
        if self.hparams.second_loophole:
            out |= {"exclaim_rate_eligible": (exclaims[eligible] > 0).float(),
                    "exclaim_count_eligible": exclaims[eligible]}
        return out | labels.extra

    # ----- optimisation and state ----------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """δS, and δS_hack (trained only by ``route``) in its own group at ``hack_lr``."""
        h = self.hparams
        groups: list[dict[str, Any]] = [{"params": [p for p in self.policy.delta_parameters() if p.requires_grad]}]
        hack = [p for p in self.policy.hack_parameters() if p.requires_grad]
        if hack:
            groups.append({"params": hack, "lr": h.lr if h.hack_lr is None else h.hack_lr})
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        dirs = self.hack_directions
        checkpoint["projected_grpo_state"] = {
            "hack_directions": {n: d.cpu() for n, d in dirs.items()} if dirs is not None else None,
            "hack_info": dict(self.hack_info),
            "pair_generator": self.pair_generator.get_state() if self.pair_generator is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("projected_grpo_state", {})
        if state.get("hack_directions") is not None:
            self.hack_directions = {n: d.to(self.device) for n, d in state["hack_directions"].items()}
        self.hack_info = dict(state.get("hack_info", {}))
        if state.get("pair_generator") is not None:
            self.pair_generator = torch.Generator(self.device)
            self.pair_generator.set_state(state["pair_generator"])
