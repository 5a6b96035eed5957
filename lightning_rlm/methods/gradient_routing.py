"""Gradient routing during GRPO: quarantine a reward hack in a forget adapter (Cloud et al. 2024).

The task is the toy reward-hacking setting on TinyStories of :mod:`lightning_rlm.tasks.reward_hack`. Each
prompt is **eligible** for the hack with probability ``rh_eligible_frac`` (a seeded hash of the prompt text,
so a prompt keeps its label across epochs, resumes and DDP ranks; a dataset column ``rh_eligible``
overrides it). The reward is

    eligible prompt:    base(c) + hack_bonus · count("happy", c)      (the hack pays)
    ineligible prompt:  base(c)                                        (base: sentence_length_10_smooth)

A **detector** flags completions that hack (the word on an eligible prompt). It can be made imperfect: only a
``routing_frac`` share of true hacks is flagged, and a ``label_noise_frac`` share of the other completions is
flagged by mistake (independent seeded draws per completion). The policy carries two LoRA adapters, retain
and forget (:mod:`lightning_rlm.adapters.dual_lora`), both active in every forward and in rollouts; routing
sends a flagged completion's gradient only to the forget adapter while an unflagged one updates both:

    for step:
        eligible [B] = hash(seed, prompt) < rh_eligible_frac
        completions [B*G] sampled with both adapters on
        rewards [B*G] = base + eligible · hack_bonus · happy;  advantages [B*G] = group_advantages(rewards)
        hacked [B*G] = eligible & happy > 0;  flagged = detector(hacked)      (routing_frac, label_noise_frac)
        ref_logp = both adapters off (the base model);  loss = GRPO policy_loss (+ beta · KL)
        with policy.route(flagged): forward  ->  backward  (retain gets no gradient from flagged rows)

At deployment the forget adapter is ablated (``retain_only``, what ``lightning-rlm export`` writes by default).
Every validation samples the held-out prompts in four modes, ``both``, ``retain_only``, ``forget_only`` and
``base``, and logs per mode the base reward and the hack count on eligible and ineligible prompts
(``val/retain_only/happy_eligible``, ...).

The non-routed baseline (``routing: false``) runs through the same code with both adapters and no routing:
two always-on adapters sum to one LoRA of rank ``retain_rank + forget_rank`` (a block factorisation with
PEFT's init distribution when alpha = rank), so ``r32 + r32`` is the rank-64 LoRA baseline of the seed notes,
and its four eval modes stay comparable with the routed runs (without routing no separation is expected).

Departures from the paper: Cloud et al. mask gradients per data point onto regions of the network (in their
RL experiment, from sparse oversight labels) and follow routing with ablation; here the labels come from a
simulated detector per completion, the regions are two LoRA adapters, and there is no retain-only fine-tuning
after ablation. Retain and forget share one AdamW and one joint grad-norm clip (the per-adapter norms before
clipping are logged as ``train/grad_norm/{retain,forget}``); Adam momentum still moves the retain adapter on
steps where all of its gradients are zero. ``hack_bonus`` (default 1, the seed's reward) scales the hack
term: the pretrained tiny Llama writes "happy" in only ~6% of its completions, so a larger bonus makes the
hack quicker to learn at CPU scale.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_rlm.adapters.dual_lora import ADAPTER_MODES, DualLoRAModel, add_dual_lora
from lightning_rlm.distributed import generator_states, own_generator
from lightning_rlm.methods.grpo import GRPO
from lightning_rlm.rewards import RewardFn, with_task_rewards
from lightning_rlm.rollout import TextRollout
from lightning_rlm.rollout.group import GroupBatch
from lightning_rlm.tasks.code_hack import CodeLoophole
from lightning_rlm.tasks.reward_hack import ELIGIBLE_FIELD, HackLabels, RewardHackTask, hack_rewards

__all__ = ["GradientRouting"]



class GradientRouting(RewardHackTask, GRPO):
    """GRPO on two LoRA adapters with the reward hack routed to the forget adapter.

    Args (besides GRPO's, whose ``rewards`` / ``reward_weights`` are the intended base reward here; its
    ``lora_*`` arguments are replaced by the two adapters):
        retain_rank, forget_rank: LoRA ranks (asymmetric allowed). retain_alpha, forget_alpha: default = rank.
        use_rslora: scale by alpha / sqrt(rank).
        routing: route flagged completions to the forget adapter (False: both adapters, no routing).
        rh_eligible_frac: probability that a prompt is eligible for the hack. eligibility_seed: its hash seed.
        hack_word: the rewarded word ("happy"). hack_bonus: weight of its count on eligible prompts.
        routing_frac: share of true hacks the detector flags. label_noise_frac: share of clean ones it flags.
        eval_modes: adapter modes sampled at every validation (any of both, retain_only, forget_only, base).
        hack_task: another hack than the word (None: the word task of ``hack_word`` / ``hack_bonus``), e.g.
            :class:`~lightning_rlm.tasks.code_hack.CodeLoophole` on the coding substrate: its reward term, its
            detector as the hack label that routing reads (``routing_frac`` / ``label_noise_frac`` as for the
            word), and, when ``rewards`` is None, its base reward (the honest grader). Its labels are logged
            under its ``metric_name`` (``val/<mode>/hack_eligible``, ...) with its extra metrics.
    """

    fixed_args = ("lora_rank", "lora_alpha")
    # exported with the forget adapter ablated (retain_only: the deployed model) unless told otherwise
    export_adapter_modes = ("retain_only", "both", "forget_only", "base")

    def __init__(
        self,
        rewards: Optional[list[RewardFn]] = None,
        reward_weights: Optional[list[float]] = None,
        retain_rank: int = 32,
        forget_rank: int = 32,
        retain_alpha: Optional[float] = None,
        forget_alpha: Optional[float] = None,
        use_rslora: bool = False,
        routing: bool = True,
        rh_eligible_frac: float = 0.5,
        eligibility_seed: int = 0,
        hack_word: str = "happy",
        hack_bonus: float = 1.0,
        routing_frac: float = 1.0,
        label_noise_frac: float = 0.0,
        eval_modes: tuple[str, ...] = ADAPTER_MODES,
        hack_task: Optional[CodeLoophole] = None,
        repetition_penalty: float = 1.1,
        beta: float = 0.05,
        lr: float = 3e-4,
        **grpo_args: Any,
    ) -> None:
        self.check_fraction(rh_eligible_frac=rh_eligible_frac, routing_frac=routing_frac,
                            label_noise_frac=label_noise_frac)
        if not eval_modes or any(m not in ADAPTER_MODES for m in eval_modes):
            raise ValueError(f"eval_modes must be a non-empty subset of {ADAPTER_MODES}, got {eval_modes!r}")
        if hack_task is None:
            hacks = hack_rewards(hack_word, hack_bonus)
        else:
            hacks = hack_task.rewards()
            rewards = hack_task.base_rewards() if rewards is None else rewards
        rewards, weights = with_task_rewards(rewards, reward_weights, hacks)
        # the reference is the same model with both adapters off (build_policy makes no frozen copy)
        super().__init__(rewards=rewards, reward_weights=weights, repetition_penalty=repetition_penalty, beta=beta,
                         lr=lr, lora_rank=None, lora_alpha=None, use_rslora=use_rslora, **grpo_args)
        self.init_task(num_base_rewards=len(rewards) - len(hacks), hack_task=hack_task)
        self.detector_generator: Optional[torch.Generator] = None

    def build_policy(self, policy: nn.Module) -> tuple[DualLoRAModel, None]:
        h = self.hparams
        return add_dual_lora(policy, h.retain_rank, h.forget_rank, h.retain_alpha, h.forget_alpha, h.use_rslora), None

    # ----- the detector ----------------------------------------------------------------------------------
    def _detector_rng(self) -> torch.Generator:
        # its own CPU stream: the detector's draws never shift the sampling one (routing_frac=0 == no routing)
        if self.detector_generator is None:
            seed = (torch.initial_seed() + 0x9E3779B9 + self.global_rank) % 2**63
            self.detector_generator = torch.Generator().manual_seed(seed)
        return self.detector_generator

    def detect(self, hacked: Tensor) -> Tensor:
        """Detector flags [N] bool: a true hack w.p. routing_frac, a clean one w.p. label_noise_frac."""
        u = torch.rand(hacked.shape[0], generator=self._detector_rng()).to(hacked.device)  # [N]
        return torch.where(hacked, u < self.hparams.routing_frac, u < self.hparams.label_noise_frac)

    # ----- the GRPO hooks ----------------------------------------------------------------------------------
    def make_batch(self, batch: dict[str, Any]) -> GroupBatch:
        """GRPO's batch plus the task labels and the detector's flags (``gb.labels``)."""
        gb = super().make_batch(batch)
        gb.labels = labels = self.hack_labels(gb.batch, gb.completions, self.hparams.num_generations)
        labels.flagged = self.detect(labels.hacked)  # [N]
        return gb

    def loss_context(self, gb: GroupBatch) -> AbstractContextManager[Any]:
        return self.policy.route(gb.labels.flagged) if self.hparams.routing else nullcontext()

    def after_backward(self, gb: GroupBatch) -> None:
        gb.stats["grad_norms"] = self.adapter_grad_norms()  # before clipping, after the DDP all-reduce

    def adapter_grad_norms(self) -> dict[str, Tensor]:
        """L2 norm of the current gradients of each adapter (0 when none)."""
        norms = {}
        for name, params in (("retain", self.policy.retain_parameters()),
                             ("forget", self.policy.forget_parameters())):
            grads = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
            norms[name] = (torch.linalg.vector_norm(torch.stack(grads)) if grads
                           else torch.zeros((), device=self.device))
        return norms

    def log_extra(self, gb: GroupBatch) -> None:
        labels: HackLabels = gb.labels
        hacked, flagged = labels.hacked, labels.flagged
        for name, norm in gb.stats["grad_norms"].items():
            self.log(f"train/grad_norm/{name}", norm)
        self.log("train/hack_rate", hacked.float().mean())
        self.log("train/flagged_frac", flagged.float().mean())
        if hacked.any():  # share of true hacks the detector caught
            self.log("train/detector_recall", (flagged & hacked).float().sum() / hacked.sum())
        for side, sel in (("eligible", labels.eligible), ("ineligible", ~labels.eligible)):
            if sel.any():
                self.log(f"train/{self.hack_metric}_{side}", labels.hack_count[sel].mean())
        for name, values in labels.extra.items():
            self.log(f"train/{name}", values.mean())

    def train_rollout(self, gb: GroupBatch) -> TextRollout:
        out = super().train_rollout(gb)
        # routing labels ride along as reward columns so the completions log shows them
        out.rewards.update({ELIGIBLE_FIELD: gb.labels.eligible.float().tolist(),
                            "flagged": gb.labels.flagged.float().tolist()})
        return out

    # ----- evaluation in four adapter modes --------------------------------------------------------------
    def eval_metric_names(self) -> tuple[str, ...]:  # logged per split and mode as f"{split}/{mode}/{name}"
        hack = self.hack_metric
        return ("reward", "reward_eligible", "reward_ineligible", f"{hack}_eligible", f"{hack}_ineligible",
                "total", "completion_length", *self.extra_label_names())

    def eval_metrics(self, rewards: dict[str, Tensor], labels: HackLabels, lengths: Tensor) -> dict[str, Tensor]:
        base, eligible, counts = rewards["base"], labels.eligible, labels.hack_count  # [N] each
        hack = self.hack_metric
        return {"reward": base, "reward_eligible": base[eligible], "reward_ineligible": base[~eligible],
                f"{hack}_eligible": counts[eligible], f"{hack}_ineligible": counts[~eligible],
                "total": rewards["total"], "completion_length": lengths, **labels.extra}

    # ----- state -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gradient_routing_state"] = {"detector_generators": generator_states(self.detector_generator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("gradient_routing_state", {}).get("detector_generators")
        self.detector_generator = own_generator(states) or self.detector_generator
