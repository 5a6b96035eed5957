"""GAN-RL: a generator and a discriminator task share one model; the discriminator's belief is the reward.

One causal LM with one rsLoRA adapter serves two tasks (crumb's research note, seed 000, 02/26/2026):

* **Generator.** A prefix of a real document is rendered into a prompt (by default the seed's template: a
  system line "You act as a causal model of language.", the prefix inside ``<prefix>`` tags, the assistant
  turn opened with ``<think>``). The policy deliberates for up to ``reasoning_tokens`` (phase 1, stopped
  by EOS or the budget), ``think_close`` (``</think>``) is appended, and it writes up to
  ``completion_tokens`` of completion (phase 2, prompt + reasoning + ``</think>`` as the new left-padded
  prompt).
* **Discriminator.** LayerNorm + Linear(hidden, 2) on the adapted model's last hidden state at the last
  real token of ``prefix + completion`` (text concatenated and re-encoded, so generated and ground-truth
  completions are tokenized the same way), trained with cross-entropy to tell generated (class 0) from
  ground-truth (class 1) completions. The backbone forward goes through the same adapted model, so the
  adapter is shared by the two tasks (``discriminator_backbone="shared"``, the seed's setup), or through a
  second LoRA adapter of its own on the same frozen base weights (``"separate_adapter"``, the seed's
  "test using separate models for separate tasks"): see "Separate adapters" below.

Each step, for a batch of B (prefix, ground truth) pairs::

    reasoning [B, R], completion [B, C]  ←  two-phase sampling (no grad)
    logits_gen, logits_real [B, 2]       ←  discriminator on prefix+generated, prefix+ground truth
    d_prob [B] = softmax(logits_gen)[:, 1]           (the discriminator's belief "this is ground truth")
    reward [B]:
        "prob":            d_prob + length_weight · min(len, target) / target
        "value_threshold": (1 − d_value if d_value > t else 0) + length_weight · min(len, target) / target
                           with d_value = 1 − d_prob (the discriminator's chance of being right about a
                           generated sample, its "pass rate"), t = 1/8 by default
        len = completion tokens before EOS, target = target_length (default completion_tokens)
    advantage [B] = reward − baseline;  baseline ← ema_decay · baseline + (1 − ema_decay) · mean(reward)
                    (initialised to the first batch's mean reward; a buffer, so it is checkpointed)
    g_loss = mean_i [ −advantage_i · Σ_t logp_i,t  +  kl_coeff · Σ_t k3_i,t ] / norm
             over reasoning (incl. its EOS) and completion (incl. EOS) tokens; k3 = exp(ref−logp) − (ref−logp) − 1
             against the base model (same model, adapter disabled: no second copy);
             norm = 1 ("sum", the default: plain REINFORCE on the sequence log-prob),
                    reasoning_tokens + completion_tokens ("budget"), or each sequence's token count ("token_mean")
    d_loss = cross-entropy over the 2B discriminator inputs (mean)
    backward(g_loss + d_scale · d_loss);  Adam step on the adapter (g_lr);  Adam step on the head (d_lr)

Adapter sharing and what each update touches: the generator optimizer holds only the adapter's
parameters and the discriminator optimizer only the head's, so the generator step never changes the
head and the discriminator step never changes the adapter. With ``d_trains_adapter=True`` (the seed's
setup: one shared adapter) the discriminator loss also back-propagates into the adapter, where it is
added to the generator's gradient and applied by the adapter's optimizer at ``g_lr``; ``d_scale`` is then
the weight of the discriminator task in the shared adapter's gradient. With ``d_trains_adapter=False`` the
discriminator reads the adapted backbone under ``no_grad`` and only the head learns. Since Adam is
invariant to the scale of its gradient, ``d_scale`` reaches the head only through gradient clipping.

Separate adapters (``discriminator_backbone="separate_adapter"``): the PEFT model holds two LoRA adapters
of the same rank / alpha / rsLoRA on the same frozen base: ``default`` (the generator's: sampling, log-probs,
export, ``init_adapter``) and ``discriminator`` (fresh, B = 0). Only one is active in a forward: the
discriminator's backbone forward switches to ``discriminator`` (the generator's adapter off) and back, every
other forward runs ``default`` (the discriminator's off); the KL reference is the base with both off. The
generator optimizer holds the ``default`` adapter (``g_lr``), the discriminator optimizer its adapter and the
head (``d_lr``), so the two tasks share nothing trainable: a generator step leaves every discriminator
tensor bit-identical and vice versa, and ``d_scale`` again reaches the discriminator only through its
gradient clipping. The checkpoint carries both adapters; `lightning-rlm export` writes the generator's only.
Needs ``d_trains_adapter=True`` (with False its adapter would never learn).

Reasoning discriminator (``discriminator="reasoning"``, the seed's setup before the linear head): the
discriminator is a generation task on the same adapter (or its own, with separate adapters). For each of the
2B inputs (the B generated completions, then their B ground truths)::

    prompt      = d_prompt_template with <prefix>…</prefix> <continuation>…</continuation>
    reasoning   ← sampled after the prompt (≤ d_reasoning_tokens, stopped by EOS; no grad)
    answer      ← sampled from softmax(logits of the first tokens of d_answers = (" real", " generated") / T)
                  at the end of prompt + reasoning + think_close + d_answer_prefix
    d_value     = sigmoid(value_head(hidden state of the last prompt token)): its chance of being right
    correct     = 1 if the answer is right else 0
    d_loss      = mean[−(correct − d_value) · (Σ logp reasoning (incl. its EOS) + logp answer)]
                  + d_value_coeff · mean[(d_value − correct)²]          (REINFORCE with the value as baseline)
    generator:  d_prob = P(answer "real") on its completion;  with reward "value_threshold" (the seed's):
                (1 − d_value) if d_value > value_threshold else 0, d_value on the generated completion
                (+ the length term as above); with "prob": P(answer "real")

The value head (LayerNorm + Linear(hidden, 1), fp32) replaces the classifier head in the discriminator's
optimizer. Its statistics (:func:`~lightning_rlm.losses.discriminator.reasoning_discriminator_stats`) include
``d_reasoning_length``: the seed's question, does the discriminator stop reasoning? Ours, not the seed's: the
prompt, the two-token answer, the value read before the reasoning, the squared-error value loss, no KL on the
discriminator's tokens. Needs ``d_trains_adapter=True``.

Departures from the seed (which gives no code): the rewards are computed from the same discriminator
forward that is trained this step (before the update); the phase-1 stop token (EOS) is scored as an
action but left out of the phase-2 context, where ``think_close`` replaces it; log-probs are computed in
one forward per phase (the phase-2 forward re-reads the prompt); the EMA baseline's initial value, the
length term's exact form and the loss normalisation are our choices (the seed does not state them); the
KL is always computed (logged as ``train/kl``) even when ``kl_coeff = 0``; grad clipping is per optimizer
(adapter and head separately). Lightning counts one global step per training batch: the adapter's
optimizer steps through Lightning, the head's steps as a raw torch optimizer (two Lightning optimizer
steps would count two global steps per batch), so fp16 mixed precision with a grad scaler is refused —
use 32 or bf16.

Every training rollout is appended to ``<log_dir>/rollouts.jsonl`` unless ``write_rollouts=False``.
``training_step`` returns the rollout contract of ``lightning_rlm.callbacks.rollout`` with the ground truths as
references, so ``MauveCallback`` scores the last ``window`` completions against them. Building blocks: the
prompts (:mod:`lightning_rlm.tasks.gan_prompts`), losses and rewards (:mod:`lightning_rlm.losses.discriminator`),
sampling, judging and rollout rows (:mod:`lightning_rlm.rollout.gan`), adapter switching (``adapters.lora_switch``).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Literal, Optional

import lightning as L
import torch
from torch import Tensor, nn

from lightning_rlm.adapters import add_lora, check_lora_source, load_lora_weights, reference_logprobs
from lightning_rlm.adapters.lora_switch import (
    add_named_adapter,
    lora_grads_on,
    lora_parameters,
    using_adapter,
)
from lightning_rlm.checks import check_at_least, check_one_of, check_prompt_template
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.distributed import generator_states, own_generator
from lightning_rlm.losses import kl_penalty
from lightning_rlm.losses.discriminator import (
    RewardForm,
    discriminator_stats,
    gan_rewards,
    reasoning_discriminator_stats,
)
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.hf import load_causal_lm, load_tokenizer
from lightning_rlm.optim import adamw_warmup, grad_norm
from lightning_rlm.rollout import TextRollout, completion_logprobs
from lightning_rlm.rollout.gan import (
    GANRollout,
    Judgement,
    PhaseSampler,
    Scores,
    judge_continuations,
    left_padded_hidden,
    prediction_rows,
    rollouts_file,
    sample_phase,
    sample_two_phase,
    write_rollouts,
)
from lightning_rlm.tasks.gan_prompts import (
    D_PROMPT_TEMPLATE,
    PLAIN_D_PROMPT_TEMPLATE,
    PLAIN_PROMPT_TEMPLATE,
    SEED_PROMPT_TEMPLATE,
    answer_token_ids,
    judged_text,
    render_prompt,
)

# GANRL; the prompts, rollout types and losses it takes from shared modules stay importable from here.
__all__ = ["GANRL", "D_PROMPT_TEMPLATE", "PLAIN_D_PROMPT_TEMPLATE", "PLAIN_PROMPT_TEMPLATE", "SEED_PROMPT_TEMPLATE",
           "GANRollout", "Judgement", "Scores", "discriminator_stats", "gan_rewards"]

LossNorm = Literal["sum", "budget", "token_mean"]
DiscriminatorBackbone = Literal["shared", "separate_adapter"]
DiscriminatorKind = Literal["head", "reasoning"]
GENERATOR_ADAPTER = "default"  # PEFT's default name: what export, init_adapter and sampling use
DISCRIMINATOR_ADAPTER = "discriminator"  # only with discriminator_backbone="separate_adapter"


class GANRL(L.LightningModule):
    """GAN-RL on one causal LM with one shared rsLoRA adapter, or one per task (see the module docstring).

    Args:
        model_name_or_path: base model (HF folder, hub name, or ``lrlm:tiny-llama-tinystories``).
        dtype: load the base model in this torch dtype (e.g. ``bfloat16``); None: as saved.
        lora_rank, lora_alpha, use_rslora, lora_dropout: the shared adapter (seed: rank 64, alpha 8, rsLoRA).
        init_adapter: start the adapter from these LoRA weights instead of B = 0 (same rank and scaling): a
            PEFT adapter folder (`lightning-rlm export` without --merge) or an SFT run's checkpoint / run folder
            (SFTKLBarrier with the same lora_rank / lora_alpha / use_rslora). The KL reference stays the base
            model (adapter off), and the discriminator head starts fresh. None: a fresh adapter.
        prompt_template: the generator's prompt, with ``{text}`` for the prefix (default: the seed's, written
            by hand in ChatML as the seed has it).
        chat: render the prompt through the tokenizer's own chat template instead (replaces
            ``prompt_template``): e.g. the seed's system text, ``user_template: "<prefix>\n{text}\n</prefix>"``
            and ``assistant_prefix: "<think>\n"`` (``configs/gan_rl/smollm2_05_pile.yaml``).
        think_close: appended after the reasoning, before the completion is sampled.
        reasoning_tokens: deliberation budget (0: no reasoning phase). completion_tokens: completion budget.
        temperature, top_p, top_k: sampling (log-probs are scored at the same temperature).
        reward: ``prob`` or ``value_threshold`` (see :func:`gan_rewards`); value_threshold: its t.
        length_weight: weight of the length term ``min(len, target) / target``; target_length: default
            ``completion_tokens``.
        ema_decay: decay of the EMA reward baseline.
        loss_norm: ``sum`` (REINFORCE on the summed sequence log-prob, mean over the batch), ``budget``
            (that divided by reasoning_tokens + completion_tokens), ``token_mean`` (each sequence divided by
            its own number of generated tokens).
        kl_coeff: weight of the k3 KL to the base model (adapter disabled), summed over generated tokens.
        d_scale: weight of the discriminator loss in the backward pass.
        d_trains_adapter: the discriminator loss also trains the shared adapter (seed: True).
        discriminator_backbone: ``shared`` (the seed's: the discriminator reads the generator's adapted model)
            or ``separate_adapter`` (the discriminator reads the base through a LoRA adapter of its own, trained
            by its optimizer at ``d_lr`` with the head; the generator's adapter is off in its forward and vice
            versa). See "Separate adapters" in the module docstring.
        discriminator: ``head`` (the seed's LayerNorm + Linear classifier) or ``reasoning`` (a generation task
            trained by REINFORCE on being right, with a value head; see "Reasoning discriminator" in the
            module docstring). The ``d_*`` settings below are the reasoning discriminator's:
        d_prompt_template: its prompt, with ``{text}`` for ``<prefix>…</prefix>`` + ``<continuation>…
            </continuation>`` (default :data:`D_PROMPT_TEMPLATE`); d_chat: render it through the tokenizer's
            chat template instead (``user_template`` with ``{text}``).
        d_reasoning_tokens: its deliberation budget (0: it answers at once).
        d_answer_prefix: appended after ``think_close``; the answer is the next token, one of the first tokens of
            ``d_answers`` (real, generated).
        d_value_coeff: weight of the value head's squared error in its loss.
        g_lr, d_lr: Adam learning rates of the adapter and of the discriminator head.
        betas: Adam betas (seed: 0.95, 0.95). warmup_steps, min_lr_ratio: the linear schedule.
        max_grad_norm: gradient-norm clip per optimizer (None: off).
        write_rollouts: append every training rollout to ``<log_dir>/<rollouts_filename>``.
    """

    # Optimizes in training_step itself: the CLI refuses Trainer-side accumulation and clipping up front.
    manual_optimization = True

    def __init__(
        self,
        model_name_or_path: str = "lrlm:tiny-llama-tinystories",
        dtype: Optional[str] = None,
        lora_rank: int = 64,
        lora_alpha: float = 8.0,
        use_rslora: bool = True,
        lora_dropout: float = 0.0,
        init_adapter: Optional[str] = None,
        prompt_template: str = SEED_PROMPT_TEMPLATE,
        chat: Optional[ChatFormat] = None,
        think_close: str = "\n</think>\n",
        reasoning_tokens: int = 256,
        completion_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        reward: RewardForm = "prob",
        value_threshold: float = 0.125,
        length_weight: float = 0.5,
        target_length: Optional[int] = None,
        ema_decay: float = 0.9,
        loss_norm: LossNorm = "sum",
        kl_coeff: float = 0.05,
        d_scale: float = 1.0,
        d_trains_adapter: bool = True,
        discriminator_backbone: DiscriminatorBackbone = "shared",
        discriminator: DiscriminatorKind = "head",
        d_prompt_template: str = D_PROMPT_TEMPLATE,
        d_chat: Optional[ChatFormat] = None,
        d_reasoning_tokens: int = 256,
        d_answer_prefix: str = "\nanswer:",
        d_answers: tuple[str, str] = (" real", " generated"),
        d_value_coeff: float = 1.0,
        g_lr: float = 1e-5,
        d_lr: float = 2e-5,
        betas: tuple[float, float] = (0.95, 0.95),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        max_grad_norm: Optional[float] = 1.0,
        write_rollouts: bool = True,
        rollouts_filename: str = "rollouts.jsonl",
    ) -> None:
        super().__init__()
        check_prompt_template(prompt_template)
        if reasoning_tokens < 0 or completion_tokens < 1:
            raise ValueError(f"need reasoning_tokens >= 0 and completion_tokens >= 1, got {reasoning_tokens}, "
                             f"{completion_tokens}")
        check_one_of("reward", reward, ("prob", "value_threshold"))
        if loss_norm not in ("sum", "budget", "token_mean"):
            raise ValueError(f"loss_norm must be 'sum', 'budget' or 'token_mean', got {loss_norm!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        check_at_least(0, kl_coeff=kl_coeff, d_scale=d_scale)
        check_one_of("discriminator_backbone", discriminator_backbone, ("shared", "separate_adapter"))
        if discriminator_backbone == "separate_adapter" and not d_trains_adapter:
            raise ValueError("discriminator_backbone='separate_adapter' needs d_trains_adapter=True (its own adapter "
                             "would never learn); for a discriminator on the frozen generator use 'shared' with "
                             "d_trains_adapter=False")
        check_one_of("discriminator", discriminator, ("head", "reasoning"))
        if discriminator == "reasoning":
            check_prompt_template(d_prompt_template)
            check_at_least(0, d_reasoning_tokens=d_reasoning_tokens, d_value_coeff=d_value_coeff)
            if not d_trains_adapter:
                raise ValueError("discriminator='reasoning' needs d_trains_adapter=True: its policy is the adapter")
        check_at_least(1, target_length=target_length)
        if init_adapter is not None:  # a missing or mismatched adapter fails here, before any model is loaded
            check_lora_source(init_adapter, lora_rank, lora_alpha, use_rslora)
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.tokenizer, self.eos_token_id = load_tokenizer(model_name_or_path)  # cheap: no weights
        self.policy: Optional[nn.Module] = None  # configure_model, with the discriminator's head
        self.d_head: Optional[nn.Module] = None
        self.value_head: Optional[nn.Module] = None
        if discriminator == "reasoning":
            self.answer_prefix_ids: list[int] = self.tokenizer.encode(d_answer_prefix, add_special_tokens=False)
            self.answer_ids: list[int] = answer_token_ids(self.tokenizer, d_answers)  # [real, generated]
        self.register_buffer("baseline", torch.zeros(()))  # EMA of rewards (checkpointed with the weights)
        self.register_buffer("baseline_updates", torch.zeros((), dtype=torch.long))
        self.close_ids: list[int] = self.tokenizer.encode(think_close, add_special_tokens=False)
        self.render_prompt("x")  # a chat format the tokenizer has no template for fails here, not mid-run
        if discriminator == "reasoning":
            self.render_d_prompt("x", "y")
        self.generator: Optional[torch.Generator] = None

    def configure_model(self) -> None:
        """Load the generator, add its adapter(s) and build the discriminator's head here, not in `__init__`
        (as :meth:`GRPO.configure_model <lightning_rlm.methods.grpo.GRPO.configure_model>`: in the strategy's
        context; a no-op once done)."""
        if self.policy is not None:
            return
        h = self.hparams
        base = load_causal_lm(h.model_name_or_path, dtype=h.dtype)
        hidden = base.config.hidden_size
        self.policy = add_lora(base, h.lora_rank, h.lora_alpha, h.use_rslora, dropout=h.lora_dropout)
        if h.init_adapter is not None:  # e.g. the SFT'd adapter of the rationalization recipe (docs/rationalize.md)
            load_lora_weights(self.policy, h.init_adapter)
        if self.separate:  # same config, fresh weights (B = 0), not active
            add_named_adapter(self.policy, DISCRIMINATOR_ADAPTER, like=GENERATOR_ADAPTER)
        self.policy.train()  # from_pretrained returns eval mode; sampling and the reference switch it as needed
        if self.reasoning_discriminator:  # the value head: logit of its chance of being right
            self.value_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))  # fp32
        else:
            self.d_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))  # fp32

    # ----- helpers ------------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The decoder stack under the LM head, adapters inside (not registered twice in the state dict)."""
        inner = self.policy.get_base_model()
        return getattr(inner, inner.base_model_prefix)

    @property
    def target_length(self) -> int:
        return self.hparams.target_length or self.hparams.completion_tokens

    def render_prompt(self, prefix: str) -> str:
        return render_prompt(self.tokenizer, prefix, self.hparams.prompt_template, self.hparams.chat)

    def render_d_prompt(self, prefix: str, completion: str) -> str:
        """The reasoning discriminator's prompt for one (prefix, completion)."""
        h = self.hparams
        return render_prompt(self.tokenizer, judged_text(prefix, completion), h.d_prompt_template, h.d_chat)

    def _sampling_generator(self) -> torch.Generator:
        if self.generator is None or self.generator.device != self.device:
            seed = (torch.initial_seed() + self.global_rank) % 2**63  # seed_everything's seed + rank
            self.generator = torch.Generator(self.device).manual_seed(seed)
        return self.generator

    @property
    def reasoning_discriminator(self) -> bool:
        return self.hparams.get("discriminator", "head") == "reasoning"

    @property
    def separate(self) -> bool:
        """The discriminator has its own adapter (``discriminator_backbone="separate_adapter"``)."""
        return self.hparams.get("discriminator_backbone", "shared") == "separate_adapter"

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The generator's adapter (its optimizer's parameters); shared with the discriminator by default."""
        if self.separate:
            return lora_parameters(self.policy, GENERATOR_ADAPTER)
        return [p for p in self.policy.parameters() if p.requires_grad]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The discriminator optimizer's parameters: its head (the classifier, or the reasoning discriminator's
        value head), after its own adapter when it has one."""
        own = lora_parameters(self.policy, DISCRIMINATOR_ADAPTER) if self.separate else []
        head = self.value_head if self.reasoning_discriminator else self.d_head
        return own + list(head.parameters())

    def _discriminator_adapter(self) -> AbstractContextManager[None]:
        """Inside: the discriminator's adapter is the active one (separate adapters), else nothing changes."""
        return using_adapter(self.policy, DISCRIMINATOR_ADAPTER, GENERATOR_ADAPTER) if self.separate else nullcontext()

    def _sampler(self, greedy: bool = False) -> PhaseSampler:
        """One sampling phase ``(token prompts, budget) -> (rollout, tokens without EOS)`` with the policy at the
        sampling settings (greedy: argmax) and this rank's generator (:func:`~lightning_rlm.rollout.gan.sample_phase`)."""
        h = self.hparams
        return partial(sample_phase, self.policy, temperature=0.0 if greedy else h.temperature, top_p=h.top_p,
                       top_k=h.top_k, eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                       generator=None if greedy else self._sampling_generator, device=self.device)

    # ----- generator ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prefixes: list[str], greedy: bool = False) -> GANRollout:
        """Two-phase sampling: reasoning (stop at EOS or budget), then ``think_close``, then the completion."""
        prompts = [self.tokenizer.encode(self.render_prompt(p), add_special_tokens=False) for p in prefixes]
        return sample_two_phase(self._sampler(greedy), prefixes, prompts, self.close_ids,
                                reasoning_tokens=self.hparams.reasoning_tokens,
                                completion_tokens=self.hparams.completion_tokens, tokenizer=self.tokenizer,
                                device=self.device)

    def sequence_logprobs(self, rollout: GANRollout) -> tuple[Tensor, Tensor, Tensor]:
        """Per sequence: summed log-prob of the generated tokens (with grad), summed k3 KL to the base
        model (with grad through the policy's log-probs), and the number of generated tokens. Each ``[B]``.

        Generated tokens are the reasoning tokens (with the EOS that ended it, if any) and the completion
        tokens (with its EOS); the appended ``think_close`` tokens are not actions and are not scored.
        """
        t = self.hparams.temperature
        sums: list[tuple[Tensor, Tensor, Tensor]] = []  # per part: summed log-prob, k3, token count ([B] each)
        for part in (p for p in (rollout.reasoning, rollout.completion) if p is not None):
            mask = part.completion_mask.bool()  # [B, C]
            logp = completion_logprobs(self.policy, part, temperature=t)  # [B, C]
            ref = reference_logprobs(self.policy, None, part.input_ids, part.attention_mask,
                                     part.completion_length, temperature=t)  # [B, C]
            k3 = kl_penalty(logp, ref, "k3")  # [B, C]
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            sums.append((torch.where(mask, logp, zero).sum(-1), torch.where(mask, k3, zero).sum(-1), mask.sum(-1)))
        logp_sum, kl_sum, n_tokens = (sum(x[1:], x[0]) for x in zip(*sums))  # [B] each: reasoning + completion
        if self.separate:  # leaving the reference (adapters disabled) froze the discriminator's adapter
            lora_grads_on(self.policy)
        return logp_sum, kl_sum, n_tokens

    def generator_loss(self, seq_logp: Tensor, seq_kl: Tensor, n_tokens: Tensor, advantages: Tensor) -> Tensor:
        """REINFORCE with a KL penalty: ``mean_i[−A_i · Σ_t logp + kl_coeff · Σ_t k3] / norm`` (see loss_norm)."""
        h = self.hparams
        per_seq = -advantages.detach() * seq_logp + h.kl_coeff * seq_kl  # [B]
        if h.loss_norm == "token_mean":
            return (per_seq / n_tokens.clamp(min=1)).mean()
        loss = per_seq.mean()
        if h.loss_norm == "budget":
            loss = loss / (h.reasoning_tokens + h.completion_tokens)
        return loss

    # ----- discriminator --------------------------------------------------------------------------------------------
    def discriminator_logits(self, prefixes: list[str], completions: list[str]) -> Tensor:
        """Head logits ``[M, 2]`` on the last real token of ``prefix + completion`` (class 1 = ground truth).

        The backbone runs with the shared adapter enabled (or, with separate adapters, the discriminator's
        own instead); its gradient reaches that adapter only when ``d_trains_adapter`` (otherwise it runs under
        ``no_grad`` and only the head gets gradients).
        """
        if self.reasoning_discriminator:
            raise RuntimeError("discriminator='reasoning' has no classifier head: use judge()")
        seqs = [self.tokenizer.encode(p + c, add_special_tokens=False) for p, c in zip(prefixes, completions)]
        grad_ok = self.hparams.d_trains_adapter and torch.is_grad_enabled()
        with nullcontext() if grad_ok else torch.no_grad(), self._discriminator_adapter():
            last = left_padded_hidden(self.backbone, seqs, self.tokenizer.pad_token_id, self.device)[:, -1]  # [M, H]
        return self.d_head(last.to(self.d_head[1].weight.dtype))  # [M, 2]

    def judge(self, prefixes: list[str], completions: list[str]) -> Judgement:
        """The reasoning discriminator on M (prefix, completion) pairs: it deliberates after its prompt (up to
        ``d_reasoning_tokens``, stopped by EOS), ``think_close`` and ``d_answer_prefix`` are appended, and it
        samples its answer from the two answer tokens' softmax at the sampling temperature. The value head
        reads the last prompt token (before any reasoning). With separate adapters all of it runs on the
        discriminator's adapter. Log-probs, answer and value carry gradients when grad is enabled."""
        h = self.hparams
        prompts = [self.tokenizer.encode(self.render_d_prompt(p, c), add_special_tokens=False)
                   for p, c in zip(prefixes, completions)]
        with self._discriminator_adapter():
            return judge_continuations(
                self.policy, self.backbone, self.value_head, prompts, sample=self._sampler(),
                reasoning_tokens=h.d_reasoning_tokens, tail=self.close_ids + self.answer_prefix_ids,
                answer_ids=self.answer_ids, temperature=h.temperature, generator=self._sampling_generator(),
                tokenizer=self.tokenizer, device=self.device)

    # ----- baseline -------------------------------------------------------------------------------------------------
    def _global_mean(self, x: Tensor) -> Tensor:
        mean = x.float().mean()
        if self._trainer is not None and self.trainer.world_size > 1:
            mean = self.all_gather(mean).float().mean()
        return mean

    def current_baseline(self, rewards: Tensor) -> Tensor:
        """The baseline to subtract now: the EMA, or the batch mean before the first update."""
        return self._global_mean(rewards) if int(self.baseline_updates) == 0 else self.baseline.detach().clone()

    @torch.no_grad()
    def update_baseline(self, rewards: Tensor) -> None:
        mean = self._global_mean(rewards)
        if int(self.baseline_updates) == 0:
            self.baseline.copy_(mean)
        else:
            self.baseline.mul_(self.hparams.ema_decay).add_((1 - self.hparams.ema_decay) * mean)
        self.baseline_updates += 1

    # ----- training -------------------------------------------------------------------------------------------------
    def _score(self, rollout: GANRollout, ground_truths: list[str]) -> Scores:
        """The discriminator on the B generated completions and their B ground truths (one batch of 2B), its
        loss and statistics, and the generator's rewards."""
        if self.reasoning_discriminator:
            return self._score_reasoning(rollout, ground_truths)
        h = self.hparams
        b = len(rollout.prefixes)
        logits = self.discriminator_logits(rollout.prefixes * 2, rollout.completion_texts + list(ground_truths))
        logits_gen, logits_real = logits[:b], logits[b:]  # [B, 2] each
        d_loss, stats = discriminator_stats(logits_gen, logits_real)
        d_prob, d_prob_real = (x.detach().float().softmax(-1)[:, 1] for x in (logits_gen, logits_real))  # [B] each
        rewards = gan_rewards(d_prob, rollout.completion_lengths, form=h.reward, target_length=self.target_length,
                              length_weight=h.length_weight, threshold=h.value_threshold)  # [B]
        return Scores(d_loss, stats, d_prob, d_prob_real, rewards)

    def _score_reasoning(self, rollout: GANRollout, ground_truths: list[str]) -> Scores:
        """The reasoning discriminator judges the 2B inputs: its loss (REINFORCE on being right, the value as
        baseline), and the generator's value-threshold (or P(answer real)) reward."""
        h = self.hparams
        b = len(rollout.prefixes)
        j = self.judge(rollout.prefixes * 2, rollout.completion_texts + list(ground_truths))  # rows [2B]
        d_loss, stats = reasoning_discriminator_stats(j.said_real, j.p_real, j.reasoning_logp + j.answer_logp, j.value,
                                                      j.reasoning_lengths, h.d_value_coeff)
        rewards = gan_rewards(j.p_real[:b], rollout.completion_lengths, form=h.reward, target_length=self.target_length,
                              length_weight=h.length_weight, threshold=h.value_threshold,
                              d_value=j.value.detach()[:b])  # [B]
        return Scores(d_loss, stats, j.p_real[:b], j.p_real[b:], rewards, judgement=j)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        h = self.hparams
        step = int(self.global_step)  # before this batch's optimizer step
        prefixes, truths = list(batch["prefix"]), list(batch["completion"])
        rollout = self.generate(prefixes)
        scores = self._score(rollout, truths)
        d_loss, rewards = scores.d_loss, scores.rewards
        baseline = self.current_baseline(rewards)
        advantages = rewards - baseline  # [B]
        self.update_baseline(rewards)
        seq_logp, seq_kl, n_tokens = self.sequence_logprobs(rollout)
        g_loss = self.generator_loss(seq_logp, seq_kl, n_tokens, advantages)

        g_opt, d_opt = self.optimizers()
        g_sched, d_sched = self.lr_schedulers()
        g_opt.zero_grad()
        d_opt.zero_grad()
        self.manual_backward(g_loss + h.d_scale * d_loss)
        g_norm, d_norm = grad_norm(self.adapter_parameters()), grad_norm(self.discriminator_parameters())  # unclipped
        if h.max_grad_norm:
            self.clip_gradients(g_opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            self.clip_gradients(d_opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
        g_opt.step()  # the adapter (through Lightning: one global step per batch)
        d_opt.optimizer.step()  # the discriminator (raw optimizer, so the global step is not counted twice)
        g_sched.step()
        d_sched.step()

        with torch.no_grad():
            kl_tok = seq_kl.sum() / n_tokens.sum().clamp(min=1)
        for k, v in {**scores.stats, "reward": rewards.mean(), "baseline": baseline,
                     "reasoning_length": rollout.reasoning_lengths.float().mean(),
                     "completions/mean_length": rollout.completion_lengths.float().mean(), "kl": kl_tok,
                     "d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                     "grad_norm": g_norm,  # the generator's (TRL's name); the head's beside it
                     "grad_norm/discriminator": d_norm,  # head (+ its adapter when separate)
                     "learning_rate": g_opt.param_groups[0]["lr"],
                     "learning_rate/discriminator": d_opt.param_groups[0]["lr"]}.items():
            self.log(f"train/{k}", v, prog_bar=k in ("reward", "d_loss"), batch_size=len(prefixes))

        if h.write_rollouts and (path := rollouts_file(self._trainer, h.rollouts_filename)) is not None:
            write_rollouts(path, step=step, rank=int(self.global_rank), rollout=rollout, truths=truths, scores=scores,
                           advantages=advantages)
        return {"loss": (g_loss + h.d_scale * d_loss).detach(), "rollout": TextRollout(
            prompts=prefixes, completions=rollout.completion_texts, references=truths,
            rewards={"total": rewards.tolist(), "d_prob": scores.d_prob.tolist()},
            advantages=advantages.detach().tolist(),
        )}

    # ----- validation / generation for callbacks ---------------------------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """The generator's reasoning and completion for each held-out prefix, beside its ground truth and the
        discriminator's P(real) (`lightning-rlm predict` writes them to `predictions.jsonl`)."""
        prefixes, truths = list(batch["prefix"]), list(batch["completion"])
        rollout = self.generate(prefixes)
        return prediction_rows(rollout, truths, self._score(rollout, truths))

    def _eval_step(self, batch: dict[str, Any], split: str) -> dict[str, Any]:
        prefixes, truths = list(batch["prefix"]), list(batch["completion"])
        rollout = self.generate(prefixes)
        scores = self._score(rollout, truths)
        for k, v in {**scores.stats, "d_loss": scores.d_loss, "reward": scores.rewards.mean(),
                     "completion_length": rollout.completion_lengths.float().mean(),
                     "reasoning_length": rollout.reasoning_lengths.float().mean()}.items():
            self.log(f"{split}/{k}", v, batch_size=len(prefixes), sync_dist=True)
        return {"rollout": TextRollout(prompts=prefixes, completions=rollout.completion_texts, references=truths,
                                       rewards={"total": scores.rewards.tolist(), "d_prob": scores.d_prob.tolist()})}

    @torch.no_grad()
    def generate_text(self, prompts: list[str], max_new_tokens: Optional[int] = None) -> list[str]:
        """Completions (after reasoning) for prefixes, for ``MauveCallback``'s generation mode (``max_new_tokens``
        is ignored: the completion budget is ``completion_tokens``)."""
        return self.generate(list(prompts)).completion_texts

    # ----- optimisation and state ------------------------------------------------------------------------------------
    def downstream_lms(self) -> dict[str, tuple[nn.Module, Any]]:
        """The LM that downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): the generator
        (the policy with its LoRA on; the discriminator head is not part of it)."""
        return {"": (self.policy, self.tokenizer)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the generator (the LoRA policy, merged or as a PEFT adapter);
        the discriminator head, and its adapter when separate, stay in the checkpoint (export saves or merges
        the active adapter only, which outside the discriminator's forward is the generator's)."""
        assert self.policy.active_adapter == GENERATOR_ADAPTER
        head = "value head" if self.reasoning_discriminator else "head"
        left_out = f"discriminator {head} and adapter" if self.separate else f"discriminator {head}"
        return ExportableLM(self.policy, self.tokenizer, description=f"the generator ({left_out} left out)")

    def configure_optimizers(self):
        """Generator (its adapter) and discriminator (head, and its adapter when separate) each get AdamW (no
        weight decay) with warm-up and a linear decay."""
        h = self.hparams
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        g, d = (adamw_warmup([{"params": list(params)}], lr=lr, betas=h.betas, warmup_steps=h.warmup_steps,
                             total_steps=total, min_lr_ratio=h.min_lr_ratio, schedule="linear")
                for params, lr in ((self.adapter_parameters(), h.g_lr), (self.discriminator_parameters(), h.d_lr)))
        return [g["optimizer"], d["optimizer"]], [g["lr_scheduler"], d["lr_scheduler"]]

    def on_fit_start(self) -> None:
        precision = str(getattr(self.trainer, "precision", ""))
        if precision.startswith("16"):
            raise ValueError("GANRL steps the discriminator head's optimizer outside Lightning, which cannot "
                             "unscale fp16 gradients: use precision 32 or bf16-mixed")
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "completion_tokens", None)
        if n is not None and n != self.hparams.completion_tokens:
            warnings.warn(f"data.completion_tokens={n} differs from model.completion_tokens="
                          f"{self.hparams.completion_tokens}: ground truths and generations differ in length",
                          stacklevel=2)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the sampling generator of every rank (each samples its own stream)
        checkpoint["gan_rl_state"] = {"generators": generator_states(self.generator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gan_rl_state", {})
        self.generator = own_generator(state.get("generators"), self.device, state.get("generator")) or self.generator

