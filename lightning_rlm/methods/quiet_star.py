"""Quiet-STaR on any Hugging Face causal LM: think before every token, learn which thoughts help.

Zelikman et al. (2024). For windows x[0..L-1] and thinking positions t (every position, a stride, or a
random sample), `QuietStarLM.think` samples P thoughts z of n_ahead - 2 tokens between learned
<sot>/<eot> markers, then predicts the next J = n_talk true tokens after each thought and mixes those
logits with the base model's through the mixing head. Objective, per position t and thought k:

    talk_nll  = mean_{k, j <= J, t + j < L} -log p_mix(x_{t+1+j} | x_{<=t}, z_k, x_{t+1..t+j})
                (train_nll_num n: the mean over thoughts k < n only; seed 001's knob)
    r_k       = sum_j log p_mix(x_{t+1+j} | ...)    (reward, detached; p_post with reward_logits: post)
    b_k       = mean_{i != k} r_i       (leave-one-out; with null_thought_baseline the empty thought's
                                          reward joins the others: b_k = (sum_{i != k} r_i + r_null) / P)
    A_k       = r_k - b_k    (clamped at 0 with clamp_negative_advantage)
    loss      = base_loss_beta * NLL_base + talk_loss_beta * talk_nll
                - policy_loss_beta * mean(A_k * log pi(z_k)) [+ post_loss_beta * talk NLL of p_post]

With `talk_gate` (seed 001's "update p(y | z, x) only when the thought beats the null thought") a thought's talk
targets count in talk_nll only when r_k > r_null; `use_reasoner: false` is the plain LM through the same code
(loss = base_loss_beta * NLL_base).

Departures from the paper: the mixing head's last layer starts at zero weights, so training starts as (or,
with `sigmoid`, within 1% of) the base model; the baseline is leave-one-out (the paper averages over all
thoughts, itself included, which scales the advantage by (P-1)/P); talk tokens after the end marker run as
one forward per position instead of one per token; <sot>/<eot> are learned vectors outside the vocabulary
instead of added tokens, so nothing needs masking when sampling; the optional empty-thought baseline is the
seed's "always including the null prompt baseline". Attention: `engine: dense` is the paper's mask over
every position's thought, `diagonal` the context block + own-thought band (see
`lightning_rlm/models/thought_attention.py`); both give the same loss and gradients.

Seed 001's thought layout knobs (notebook names, `lightning_rlm.models.quiet_star_lm`, docs/quiet_star.md; off
by default = the objective above bit for bit): `use_residual` (post logits := base + post), `add_last_context_token`
(x_t re-fed after <eot> predicts x_{t+1}), `increment_pos_id_for_last_context_token`, `different_eot` (on: two
markers, as before), and `add_surogate_loss_to_last_context_token`: `loss += last_context_loss_beta *
mean -log p_post(x_t | x_{<=t}, <sot> z <eot>)`, the output at <eot> (logged as `last_context_nll`).

Padded batches: a batch may carry `attention_mask` [B, L] (1 real, 0 padding, left or right; missing means
all real, as LMWindow's windows are). Padding is masked in the model (`QuietStarLM.think`), thinking
positions are columns that hold a real token in some row (`thinking_positions`), and every mean above and
in the logs is over real label positions only (mask 1 and label not -100; `weighted_mean`): a thought at a
row's padding has weight 0 everywhere (loss, reward, baseline, stats).

Logs (train/ and val/): `nll` (the model's own next-token NLL, comparable with the LM baselines' `loss`),
`nll_base` (the base path alone), `nll_thought`, `nll_base_at_thought`, `gap` (< 0: thoughts help),
`gap_easy|medium|hard` (edges `gap_buckets`), `nll_interest` / `nll_base_interest` (`interest_percentile`),
all defined at `lightning_rlm.losses.quiet_star.next_token_metrics`; `nll_post` (the post-thought prediction
alone, before mixing), `talk_nll`, `reward`, `advantage_std`, `policy_loss`, `mix_weight`, `thought_entropy`
and `thought_entropy_max`, `talk_gate_open`, `null_reward`; with `variable_len` `thought_len`, `frac_empty`,
`frac_unfinished` and per base-NLL bucket `frac_empty_<bucket>`, `thought_len_<bucket>` (`thought_length_stats`);
TensorBoard text `thoughts` and `samples` (`lightning_rlm.rollout.thoughts`).

Variable-length thoughts and a separate reasoner (seed 001; `QuietStarLM`'s `variable_len` and `reasoner`): with
`variable_len` the reasoner also picks the end of thought, r_k -= length_penalty * |z_k| + punish_unfinished *
[z_k reached n_ahead - 2 tokens], log pi(z_k) sums the sampled steps only, and loss -= policy_loss_beta *
entropy_encouragement_coef * (mean entropy of the sampled steps); with `separate_reasoner` a copy of the LM
samples the thoughts and the policy term trains it, while the talk NLL trains the base (frozen with
`train_base: false`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning as L
import torch

from lightning_rlm.checks import check_at_least, check_one_of, check_positive
from lightning_rlm.distributed import generator_states, own_generator
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses.quiet_star import (
    last_context_nll,
    next_token_metrics,
    reinforce_advantage,
    talk_logprobs,
    talk_nll,
    talk_reward,
    thought_entropy_stats,
    thought_length_stats,
    thought_means,
    token_logprobs,
    weighted_mean,
)
from lightning_rlm.methods.token_window import TokenWindowSteps, VocabFromData
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.quiet_star_lm import (
    LAYOUT_KNOBS,
    MixingHead,
    QuietStarLM,
    ThinkingCausalLM,
    ThinkOutput,
    check_thought_layout,
    marker_ids,
    thinking_positions,
)
from lightning_rlm.models.thought_attention import Engine
from lightning_rlm.rollout.thoughts import thinking_continuations, thinking_sample, thought_lines


class QuietStar(VocabFromData, TokenWindowSteps, L.LightningModule):
    """Quiet-STaR around an HF causal LM.

    Model (one of):
        model_name_or_path: a pretrained model folder / hub name (`lrlm:tiny-llama-tinystories` is the
            base model built here); its tokenizer must be the DataModule's.
        model_config: a config dict with `model_type` (llama, qwen2, gpt2, ...) for a random model whose
            vocab is the DataModule tokenizer's (`vocab_size` is filled in and saved with checkpoints).
    Thoughts:
        engine: `diagonal` (context block + own-thought band) or `dense` (the paper's mask).
        n_ahead: thought length counting <sot> and <eot> (n_ahead - 2 sampled tokens; 2 = empty thoughts).
        n_talk: true tokens predicted after each thought (the reward's horizon).
        n_passes: thoughts per position (>= 2 for the leave-one-out baseline, unless null_thought_baseline).
        think_every: think at positions 0, k, 2k, ... (1: every position).
        think_positions: think at this many positions sampled per batch among those (None: all of them).
        thought_temperature: sampling temperature of thoughts (log-probs are of the tempered policy).
        thought_init_text: text whose mean embedding starts <sot> and <eot> (the paper's "---").
        embedding_grad_scale: <sot>/<eot> gradient and step multiplier (the paper's 100).
        mixing_head: the weight mixing base and post-thought logits: `sigmoid` (in (0, 1), starts at 0.01),
            `linear` (unbounded, starts at exactly 0), `off` (post-thought logits alone).
    Objective:
        base_loss_beta, talk_loss_beta, policy_loss_beta: weights of base NLL, talk NLL, REINFORCE.
        post_loss_beta: weight of the talk NLL of the post-thought logits alone (0 in the paper; trains the
            model to predict after thinking even while the mixing weight is small).
        clamp_negative_advantage: only thoughts better than their baseline are reinforced.
        null_thought_baseline: count the empty thought's reward in every baseline (seed 001).
        reward_logits: score thoughts by the `mixed` prediction (the paper) or the `post`-thought one alone
            (keeps a signal for the thoughts when the mixing weight is near 0).
        gap_buckets: base-NLL edges (nats) of the easy / medium / hard buckets of the logged gap.
        use_reasoner: False trains the plain LM through the same code path (no thoughts: the loss is the base
            NLL, equal to the LM baseline's on the same batch); seed 001's `use_reasoner` control.
        train_nll_num: how many of the P thoughts per position the talk NLL averages over, the first n
            (thoughts are i.i.d.); None: all P. Seed 001's `train_nll_num` with `trice_samples` (here `n_passes`)
            and `nll_loss_beta` (here `talk_loss_beta`); the policy loss still scores all P.
        talk_gate: update p(y | z, x) only where the thought beats the null thought (seed 001): the talk loss
            of a (thought, position) counts only when its reward exceeds the empty thought's; needs
            `null_thought_baseline` (the empty thought is scored anyway for it).
        interest_percentile: the logged `nll_interest` / `nll_base_interest` are over thinking positions whose
            base NLL is at least this percentile of the batch's (the seed's "tokens of interest").
    Variable-length thoughts (seed 001's, as the GRU version has them; off: every thought has n_ahead - 2 tokens):
        variable_len: the reasoner samples its own end of thought, so a thought has 0 .. n_ahead - 2 tokens (the
            notebook's max_reasoning_len = n_ahead - 2); `end_init_prob` is p(end) at every step at first.
        length_penalty: reward penalty per thought token; punish_unfinished: reward penalty for a thought that
            reaches n_ahead - 2 tokens without ending (both need variable_len).
        entropy_encouragement_coef: loss -= policy_loss_beta * coef * the mean entropy of the sampled thought steps.
    Separate reasoner (seed 001's base/reasoner split):
        separate_reasoner: a second LM, a copy of the base at build time (the pretrained weights, or the same
            random init), samples the thoughts with its own weights and attention; the base reads them and makes
            the talk predictions (`QuietStarLM`'s `reasoner`). The policy loss trains the reasoner, the talk NLL
            the base.
        train_base: False freezes the base LM's weights (the reasoner, markers, mixing head and end-of-thought
            head still train): the notebook's frozen pretrained base.
    Thought layout (seed 001's knobs, module docstring): use_residual, add_last_context_token,
        increment_pos_id_for_last_context_token (re-fed x_t at p_t + M + 3 instead of p_t; needs the re-feed),
        different_eot, add_surogate_loss_to_last_context_token (needs the re-feed) weighted by last_context_loss_beta.
    Optimisation: AdamW (no decay on vectors), warmup then constant or cosine.
    Samples: every `sample_every_n_steps` the thoughts at `sample_positions` positions of the batch; at each
        validation a thinking generation of `sample_tokens` tokens from `sample_prompt` (0 / None: off).
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        vocab_size: Optional[int] = None,
        engine: Engine = "diagonal",
        n_ahead: int = 8,
        n_talk: int = 4,
        n_passes: int = 2,
        think_every: int = 1,
        think_positions: Optional[int] = None,
        thought_temperature: float = 1.0,
        thought_init_text: str = "---",
        embedding_grad_scale: float = 100.0,
        mixing_head: MixingHead = "sigmoid",
        base_loss_beta: float = 1.0,
        talk_loss_beta: float = 1.0,
        policy_loss_beta: float = 1.0,
        post_loss_beta: float = 0.0,
        train_nll_num: Optional[int] = None,
        clamp_negative_advantage: bool = False,
        null_thought_baseline: bool = False,
        reward_logits: Literal["mixed", "post"] = "mixed",
        gap_buckets: tuple[float, float] = (1.0, 3.0),
        use_reasoner: bool = True,
        talk_gate: bool = False,
        interest_percentile: float = 0.9,
        use_residual: bool = False,
        add_last_context_token: bool = False,
        increment_pos_id_for_last_context_token: bool = False,
        different_eot: bool = True,
        add_surogate_loss_to_last_context_token: bool = False,
        last_context_loss_beta: float = 0.0,
        variable_len: bool = False,
        end_init_prob: float = 0.1,
        length_penalty: float = 0.0,
        punish_unfinished: float = 0.0,
        entropy_encouragement_coef: float = 0.0,
        separate_reasoner: bool = False,
        train_base: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        sample_every_n_steps: int = 100,
        sample_positions: int = 4,
        sample_prompt: Optional[str] = "Once upon a time",
        sample_tokens: int = 24,
    ) -> None:
        super().__init__()
        if (model_name_or_path is None) == (model_config is None):
            raise ValueError("QuietStar needs exactly one of model_name_or_path or model_config")
        check_one_of("reward_logits", reward_logits, ("mixed", "post"))
        check_one_of("engine", engine, ("dense", "diagonal"))
        if n_ahead < 2 or n_talk < 1 or n_passes < 1 or think_every < 1:
            raise ValueError(f"need n_ahead >= 2 (it counts <sot> and <eot>), n_talk >= 1, n_passes >= 1, "
                             f"think_every >= 1; got {n_ahead}, {n_talk}, {n_passes}, {think_every}")
        check_at_least(1, think_positions=think_positions)  # None: all
        check_positive(thought_temperature=thought_temperature, lr=lr)
        if not gap_buckets[0] < gap_buckets[1]:
            raise ValueError(f"gap_buckets must be two increasing edges, got {gap_buckets}")
        if train_nll_num is not None and not 1 <= train_nll_num <= n_passes:
            raise ValueError(f"train_nll_num must be in [1, n_passes={n_passes}] (the notebook's trice_samples), "
                             f"got {train_nll_num}")
        if talk_gate and not null_thought_baseline:
            raise ValueError("talk_gate compares each thought with the null thought: set null_thought_baseline: true")
        if not 0.0 <= interest_percentile < 1.0:
            raise ValueError(f"interest_percentile must be in [0, 1), got {interest_percentile}")
        check_thought_layout(use_reasoner=use_reasoner, last_context_loss_beta=last_context_loss_beta,
                             add_surogate_loss_to_last_context_token=add_surogate_loss_to_last_context_token,
                             use_residual=use_residual, add_last_context_token=add_last_context_token,
                             increment_pos_id_for_last_context_token=increment_pos_id_for_last_context_token,
                             different_eot=different_eot, variable_len=variable_len)
        if variable_len and n_ahead < 3:
            raise ValueError(f"variable_len samples where a thought ends: it needs n_ahead >= 3 (at least one thought "
                             f"token), got n_ahead={n_ahead}")
        if not variable_len and (length_penalty != 0 or punish_unfinished != 0):
            raise ValueError(f"length_penalty={length_penalty} and punish_unfinished={punish_unfinished} score a "
                             "thought's own length: they need variable_len=True (fixed-length thoughts all have "
                             "n_ahead - 2 tokens)")
        if not 0.0 < end_init_prob < 1.0:
            raise ValueError(f"end_init_prob must be in (0, 1), got {end_init_prob}")
        if separate_reasoner and not use_reasoner:
            raise ValueError("separate_reasoner=True samples thoughts with a second LM, but use_reasoner=False trains "
                             "without thoughts: expected use_reasoner=True or separate_reasoner=False")
        self.save_hyperparameters()
        self.net: Optional[QuietStarLM] = None
        self.hf_tokenizer = None
        if model_name_or_path is not None:  # the weights are loaded in `configure_model`
            from transformers import AutoConfig

            from lightning_rlm.models.base_model import resolve_model_path
            from lightning_rlm.models.hf import load_tokenizer

            self.hf_tokenizer, _ = load_tokenizer(model_name_or_path)
            config = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path))
            marker_ids(self.hf_tokenizer, thought_init_text, config.vocab_size)  # a bad start text fails now
            self.hparams.vocab_size = config.vocab_size  # the DataModule's tokenizer must fit in it
        elif vocab_size is not None:  # a checkpoint: the markers' start value is overwritten by its weights
            self._build(vocab_size)
        else:
            from lightning_rlm.models.hf import config_from_dict

            config_from_dict(model_config)  # a bad config fails now, not after the data is read
        self.generator: Optional[torch.Generator] = None

    # ----- model --------------------------------------------------------------------------------------------
    def make_net(self, vocab_size: int) -> QuietStarLM:
        """A random model from `model_config`; its markers start from the DataModule tokenizer's encoding of
        thought_init_text (zeros without a tokenizer: a checkpoint's weights replace them)."""
        from transformers import AutoModelForCausalLM

        from lightning_rlm.models.hf import config_from_dict

        h = self.hparams
        lm = AutoModelForCausalLM.from_config(config_from_dict(h.model_config, vocab_size))
        return self._thinking(lm, self.tokenizer)

    def _thinking(self, lm: torch.nn.Module, tokenizer: Any) -> QuietStarLM:
        """`lm` with the thinking parts around it: markers from `tokenizer`'s thought_init_text, the layout knobs,
        a separate reasoner (a copy of `lm`) and a frozen base as the hyperparameters say."""
        import copy

        h = self.hparams
        reasoner = copy.deepcopy(lm) if h.separate_reasoner else None
        if not h.train_base:
            lm.requires_grad_(False)
        return QuietStarLM.around(lm, tokenizer, h.thought_init_text, h.embedding_grad_scale, h.mixing_head,
                                  reasoner=reasoner, end_init_prob=h.end_init_prob, **self.layout())

    def layout(self) -> dict[str, bool]:
        """The thought layout knobs the model is built with (`QuietStarLM`'s arguments of the same names)."""
        return {k: self.hparams[k] for k in LAYOUT_KNOBS}

    def downstream_lms(self) -> dict[str, tuple[torch.nn.Module, Any]]:
        """What downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): ``base``, the base
        path without thoughts, and ``thoughts``, the thinking model (a thought before every generated token;
        thought-mixed likelihoods of each answer)."""
        h, tok = self.hparams, self.hf_tokenizer if self.hf_tokenizer is not None else self.tokenizer
        thinking = ThinkingCausalLM(self.net, h.n_ahead, h.engine, h.thought_temperature)
        return {"base": (self.net.lm, tok), "thoughts": (thinking, tok)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the LM (base path) and beside it `quiet_star.pt`, the markers, the
        mixing head and the thinking settings (`QuietStarLM.exportable`; `QuietStarLM.from_export` rebuilds the
        thinking model). The tokenizer is the run's when the model was built from a config (the DataModule's)."""
        h = self.hparams
        return self.net.exportable(self.hf_tokenizer, n_ahead=h.n_ahead, n_talk=h.n_talk, engine=h.engine,
                                   thought_temperature=h.thought_temperature)

    def configure_model(self) -> None:
        """Create the network (Lightning calls this after `setup`, in the strategy's context, and in
        `load_from_checkpoint`; idempotent): the pretrained LM of `model_name_or_path` with the thinking parts
        around it, or a random one from `model_config` sized to the DataModule's tokenizer; a built network is
        checked against that tokenizer. Code that uses `net` outside a Trainer calls it first."""
        h = self.hparams
        if self.net is None and h.model_name_or_path is not None:
            from lightning_rlm.models.hf import load_causal_lm

            self.net = self._thinking(load_causal_lm(h.model_name_or_path), self.hf_tokenizer)
        self.build_from_data()

    def _generator(self) -> torch.Generator:
        if self.generator is None or self.generator.device != self.device:
            seed = (torch.initial_seed() + self.global_rank) % 2**63  # seed_everything's seed + rank
            self.generator = torch.Generator(self.device).manual_seed(seed)
        return self.generator

    def thought_positions(self, length: int, generator: Optional[torch.Generator],
                          real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[Lq] positions to think at in a window of `length` tokens (`thinking_positions`: every think_every-th,
        think_positions of them drawn; never a column that is padding in every row, `real` [length] bool)."""
        h = self.hparams
        return thinking_positions(length, h.think_every, h.think_positions, generator, real).to(self.device)

    # ----- objective ------------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, torch.Tensor], generator: Optional[torch.Generator],
                       thought_tokens: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], ThinkOutput]:
        """Loss and detached statistics for windows {"input_ids", "labels"} [B, L] and, for padded batches,
        "attention_mask" [B, L] (1 real, 0 padding; missing: all real). `thought_tokens`
        [B * n_passes, Lq, n_ahead - 2] replaces sampling (tests run both engines on the same thoughts).
        Padding: see the module docstring; a thought counts where its position's label does, a talk target
        where its own label does too."""
        h = self.hparams
        ids, labels = batch["input_ids"], batch["labels"]  # [B, L]
        B, L_ = ids.shape
        P, J = h.n_passes, h.n_talk
        attention_mask = batch.get("attention_mask")  # [B, L] or None
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        label_ok = real & (labels != -100)  # [B, L] the positions every mean is over
        if not h.use_reasoner:  # the plain LM through the same code: its next-token NLL over real labels
            logits = self.net.plain_logits(ids, attention_mask)  # [B, L, V]
            nll = weighted_mean(-token_logprobs(logits, labels), label_ok.float())  # -token_logprobs: 0 at -100
            return {"loss": h.base_loss_beta * nll, "nll": nll.detach(), "nll_base": nll.detach()}, None
        positions = self.thought_positions(L_, generator, None if attention_mask is None else real.any(0))
        entropy_bonus = h.entropy_encouragement_coef != 0 and h.policy_loss_beta != 0 and h.n_ahead > 2
        out = self.net.think(ids, positions, h.n_ahead, J, P, h.engine, h.thought_temperature, generator,
                             thought_tokens=thought_tokens, null_thought=h.null_thought_baseline,
                             attention_mask=attention_mask, entropy_grad=entropy_bonus)
        Lq = positions.numel()
        base_tok_nll = -token_logprobs(out.base_logits, labels)  # [B, L] (0 at -100)
        lw = label_ok.to(base_tok_nll.dtype)  # [B, L]
        pos_w = lw[:, positions]  # [B, Lq] thoughts at real label positions
        thought_w = pos_w[:, None].expand(B, P, Lq)  # [B, P, Lq]
        targets = labels[:, out.talk_index]  # [B, Lq, J]
        # a talk target counts if it is inside the window and it and its thought's position are real labels
        valid = out.talk_valid[None] & label_ok[:, out.talk_index] & label_ok[:, positions, None]  # [B, Lq, J]
        valid = valid.float()
        logp = talk_logprobs(out.talk_logits, targets)  # [B, P, Lq, J]
        with torch.set_grad_enabled(h.post_loss_beta != 0 and torch.is_grad_enabled()):
            post_logp = talk_logprobs(out.post_logits, targets)  # the thought's own prediction, before mixing
        mixed = h.reward_logits == "mixed"
        reward = talk_reward(logp if mixed else post_logp, valid)  # [B, P, Lq]
        null_reward = None  # [B, 1, Lq] the empty thought's
        if out.null_talk_logits is not None:
            null_reward = talk_reward(talk_logprobs(out.null_talk_logits if mixed else out.null_post_logits,
                                                    targets), valid)
        beats_null = (reward > null_reward).float() if h.talk_gate else None  # [B, P, Lq] (likelihood alone)
        lengths = out.thought_lengths.view(B, P, Lq)  # [B, P, Lq] tokens per thought
        unfinished = out.thought_unfinished.view(B, P, Lq)
        if h.variable_len:  # the thought's own cost (the empty thought's: none)
            reward = reward - h.length_penalty * lengths - h.punish_unfinished * unfinished.float()
        n = P if h.train_nll_num is None else h.train_nll_num  # the first n thoughts train the talk NLL
        talk = talk_nll(logp[:, :n], valid, None if beats_null is None else beats_null[:, :n])  # gated: 0
        post_nll = talk_nll(post_logp, valid)
        # the baseline compares the P thoughts of one (row, position); a padding position's thoughts all have
        # reward 0, so they never reach a real position's baseline
        advantage = reinforce_advantage(reward, null_reward, dim=1)  # [B, P, Lq]
        if h.clamp_negative_advantage:
            advantage = advantage.clamp(min=0)
        thought_logp = out.thought_logprob.view(B, P, Lq, -1).sum(-1)  # [B, P, Lq]
        policy_loss = -weighted_mean(advantage * thought_logp, thought_w)
        base_nll = weighted_mean(base_tok_nll, lw)
        loss = h.base_loss_beta * base_nll + h.talk_loss_beta * talk
        if h.post_loss_beta != 0:
            loss = loss + h.post_loss_beta * post_nll
        steps = out.thought_step_mask.view(B, P, Lq, -1)  # [B, P, Lq, M] the sampled steps
        step_w = steps.float() * thought_w[..., None]
        entropy = weighted_mean(out.thought_entropy.view(B, P, Lq, -1), step_w)  # with graph when entropy_bonus
        if h.n_ahead > 2 and h.policy_loss_beta != 0:
            loss = loss + h.policy_loss_beta * (policy_loss - h.entropy_encouragement_coef * entropy)
        last_context = None
        if h.add_surogate_loss_to_last_context_token:  # the output at <eot> predicting x_t
            last_context = last_context_nll(out.eot_logits, ids[:, positions], thought_w)
            if h.last_context_loss_beta != 0:
                loss = loss + h.last_context_loss_beta * last_context

        with torch.no_grad():
            adv_real = advantage[thought_w.bool()]
            mix = None if out.mix_weight is None else out.mix_weight.view(B, P, Lq, J).mean(-1)  # [B, P, Lq]
            stats = {  # nll: the model's own next-token NLL (mixed where it thinks, base elsewhere), gap, ...
                "loss": loss, "nll_base": base_nll.detach(),
                **next_token_metrics(base_tok_nll, lw, positions, -logp[..., 0].mean(1),  # mean over passes
                                     h.gap_buckets, h.interest_percentile),
                "talk_nll": talk.detach(), "post_nll": post_nll.detach(), "policy_loss": policy_loss.detach(),
                "advantage_std": adv_real.std() if adv_real.numel() > 1 else adv_real.sum(),
                **thought_means(thought_w, nll_post=-post_logp[..., 0], reward=reward, mix_weight=mix,
                                talk_gate_open=beats_null),  # mix_weight: mean over the J talk steps
                **thought_entropy_stats(out.thought_entropy.view(B, P, Lq, -1).detach(), thought_w, steps),
            }
            if h.variable_len:  # how long, and where (by the base NLL of the token to predict), it thinks
                stats.update(thought_length_stats(lengths, unfinished, thought_w, base_tok_nll[:, positions],
                                                  h.gap_buckets))
            if null_reward is not None:
                stats["null_reward"] = weighted_mean(null_reward[:, 0], pos_w)
            if last_context is not None:
                stats["last_context_nll"] = last_context.detach()
        return stats, out

    # ----- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        stats, out = self.compute_losses(batch, self._generator())
        for name, value in stats.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name in ("loss", "gap"))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        every = self.hparams.sample_every_n_steps
        if every and self.global_step % every == 0:
            if out is not None:  # (use_reasoner: false has no thoughts)
                self.log_thoughts(batch, out)
        return stats["loss"]

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_throughput(batch)

    def on_validation_epoch_start(self) -> None:
        # the same thoughts for the same weights at every validation (and the training stream untouched)
        self._eval_generator = torch.Generator(self.device).manual_seed(1234 + self.global_rank)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        stats, _ = self.compute_losses(batch, self._eval_generator)
        stats["loss"] = stats["nll"]  # evaluation `loss` is the NLL, comparable across methods
        for name, value in stats.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("nll", "gap"), sync_dist=True)
        return stats["nll"]

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log_sample()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["quiet_star_state"] = {  # each rank samples its own thoughts
            "generators": generator_states(self.generator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("quiet_star_state", {}).get("generators")
        self.generator = own_generator(states, self.device) or self.generator

    # ----- samples ----------------------------------------------------------------------------------------
    def _text_tokenizer(self) -> Any:
        return self.tokenizer if self.tokenizer is not None else self.hf_tokenizer

    def log_thoughts(self, batch: dict[str, torch.Tensor], out: ThinkOutput) -> None:
        """TensorBoard text `thoughts`: context → thought → prediction at `sample_positions` positions of row 0."""
        if self.trainer.is_global_zero and self.hparams.sample_positions:
            lines = thought_lines(self._text_tokenizer(), batch, out, self.hparams.sample_positions)
            if lines:  # none when row 0 is all padding
                log_text(self, "thoughts", "  \n".join(lines))

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """A thinking continuation (`sample_tokens` tokens, a thought before each) of the first quarter of each
        window, with the thoughts shown per token; `lightning-rlm predict` writes them to `predictions.jsonl`."""
        h = self.hparams
        ids = batch["input_ids"]
        prompt = ids[:, : max(1, ids.shape[1] // 4)]  # [B, T0] (windows are unpadded)
        gen = torch.Generator(self.device).manual_seed(batch_idx)  # the same thoughts on every predict run
        return thinking_continuations(self.net, self._text_tokenizer(), prompt, h.sample_tokens or 24, h.n_ahead,
                                      h.thought_temperature, gen)

    def log_sample(self) -> None:
        """TensorBoard text `samples`: a thinking generation of `sample_tokens` tokens from `sample_prompt`."""
        h = self.hparams
        if self.trainer.is_global_zero and h.sample_prompt and h.sample_tokens:
            log_text(self, "samples", thinking_sample(self.net, self._text_tokenizer(), h.sample_prompt,
                                                      h.sample_tokens, h.n_ahead, h.thought_temperature, self.device))
