"""Quiet-STaR on any Hugging Face causal LM: think before every token, learn which thoughts help.

Zelikman et al. (2024). For windows x[0..L-1] and thinking positions t (every position, a stride, or a
random sample), `QuietStarLM.think` samples P thoughts z of n_ahead - 2 tokens between learned
<sot>/<eot> markers, then predicts the next J = n_talk true tokens after each thought and mixes those
logits with the base model's through the mixing head. Objective, per position t and thought k:

    talk_nll  = mean_{k, j <= J, t + j < L} -log p_mix(x_{t+1+j} | x_{<=t}, z_k, x_{t+1..t+j})
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

Padded batches: a batch may carry `attention_mask` [B, L] (1 real, 0 padding, left or right; missing means
all real, as LMWindow's windows are). Padding is masked in the model (never attended, position ids count
real tokens), and every mean above and in the logs is over real label positions only (mask 1 and label
not -100), mask-weighted: sum(x * m) / sum(m). Thinking positions are columns shared by the batch, drawn
among those holding a real token in some row; a thought at a row's padding has weight 0 everywhere (loss,
reward, baseline, stats).

Logs (train/ and val/): `nll` (the model's next-token NLL: mixed at thinking positions, base elsewhere;
comparable with the LM baselines' `loss`), `nll_base` (the base path alone, all real positions),
`nll_thought` and `nll_base_at_thought` (next token at thinking positions with and without the thought),
`nll_post` (the post-thought prediction alone, before mixing),
`gap` (their difference; < 0 means thoughts help) and `gap_easy|medium|hard` (by the base NLL of that
token, edges `gap_buckets`), `talk_nll`, `reward`, `advantage_std`, `policy_loss`, `mix_weight`,
`thought_entropy` and `thought_entropy_max`, `nll_interest` / `nll_base_interest` (at the thinking positions
whose base NLL is in the top `1 - interest_percentile` of the batch), `talk_gate_open`; TensorBoard text `thoughts` (context → thought → prediction) and `samples` (a thinking
generation with its thoughts shown).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F

from lightning_rlm.checks import check_at_least, check_one_of, check_positive
from lightning_rlm.distributed import generator_states, own_generator
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses import leave_one_out_baseline
from lightning_rlm.methods.token_window import TokenWindowSteps, VocabFromData
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.quiet_star_lm import (
    THOUGHTS_FILE,
    MixingHead,
    QuietStarLM,
    ThinkingCausalLM,
    ThinkOutput,
)
from lightning_rlm.models.thought_attention import Engine


def marker_init(lm: torch.nn.Module, ids: list[int], text: str, unk_id: Optional[int] = None) -> torch.Tensor:
    """Mean input embedding of `text`'s tokens: the start value of <sot>/<eot>. A tokenizer that cannot
    encode the text (nothing, or only its unknown token) is a clear error naming it."""
    if not ids or (unk_id is not None and all(i == unk_id for i in ids)):
        raise ValueError(f"thought_init_text {text!r} encodes to no known token with this tokenizer "
                         f"(ids {ids}); set model.init_args.thought_init_text to a text it can encode")
    weight = lm.get_input_embeddings().weight
    if max(ids) >= weight.shape[0]:
        raise ValueError(f"thought_init_text {text!r} has token id {max(ids)} outside the model's vocab "
                         f"{weight.shape[0]}: the tokenizer does not belong to this model")
    return weight[torch.tensor(ids)].detach().float().mean(0)


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
        talk_gate: update p(y | z, x) only where the thought beats the null thought (seed 001): the talk loss
            of a (thought, position) counts only when its reward exceeds the empty thought's; needs
            `null_thought_baseline` (the empty thought is scored anyway for it).
        interest_percentile: the logged `nll_interest` / `nll_base_interest` are over thinking positions whose
            base NLL is at least this percentile of the batch's (the seed's "tokens of interest").
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
        clamp_negative_advantage: bool = False,
        null_thought_baseline: bool = False,
        reward_logits: Literal["mixed", "post"] = "mixed",
        gap_buckets: tuple[float, float] = (1.0, 3.0),
        use_reasoner: bool = True,
        talk_gate: bool = False,
        interest_percentile: float = 0.9,
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
        if talk_gate and not null_thought_baseline:
            raise ValueError("talk_gate compares each thought with the null thought: set null_thought_baseline: true")
        if not 0.0 <= interest_percentile < 1.0:
            raise ValueError(f"interest_percentile must be in [0, 1), got {interest_percentile}")
        self.save_hyperparameters()
        self.net: Optional[QuietStarLM] = None
        self.hf_tokenizer = None
        if model_name_or_path is not None:
            from lightning_rlm.models.hf import load_policy

            lm, self.hf_tokenizer, _ = load_policy(model_name_or_path)
            self.net = self._wrap(lm, self.hf_tokenizer.encode(thought_init_text, add_special_tokens=False),
                                  self.hf_tokenizer.unk_token_id)
            self.hparams.vocab_size = lm.config.vocab_size  # the DataModule's tokenizer must fit in it
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

        lm = AutoModelForCausalLM.from_config(config_from_dict(self.hparams.model_config, vocab_size))
        tok, text = self.tokenizer, self.hparams.thought_init_text
        if tok is None:
            return self._wrap(lm, None, None)
        try:
            ids = tok.encode(text)
        except ValueError as e:  # e.g. a char vocabulary without '-'
            raise ValueError(f"thought_init_text {text!r} cannot be encoded by the DataModule's tokenizer "
                             f"({e}); set model.init_args.thought_init_text to a text it can encode") from None
        return self._wrap(lm, ids, getattr(getattr(tok, "hf", None), "unk_token_id", None))

    def _wrap(self, lm: torch.nn.Module, init_ids: Optional[list[int]], unk_id: Optional[int]) -> QuietStarLM:
        h = self.hparams
        init = marker_init(lm, init_ids, h.thought_init_text, unk_id) if init_ids is not None else None
        lm.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
        return QuietStarLM(lm, init, h.embedding_grad_scale, h.mixing_head)

    def downstream_lms(self) -> dict[str, tuple[torch.nn.Module, Any]]:
        """What downstream evaluation scores (:mod:`lightning_rlm.callbacks.downstream`): ``base``, the base
        path without thoughts, and ``thoughts``, the thinking model (a thought before every generated token;
        thought-mixed likelihoods of each answer)."""
        h, tok = self.hparams, self.hf_tokenizer if self.hf_tokenizer is not None else self.tokenizer
        thinking = ThinkingCausalLM(self.net, h.n_ahead, h.engine, h.thought_temperature)
        return {"base": (self.net.lm, tok), "thoughts": (thinking, tok)}

    def exportable_lm(self, adapter_mode: Optional[str] = None) -> ExportableLM:
        """What `lightning-rlm export` writes: the LM with its trained weights (the base path, no thoughts), and
        beside it `quiet_star.pt`: the thought markers, the mixing head and the thinking settings
        (`QuietStarLM.from_export` rebuilds the thinking model). The tokenizer is the run's when the model
        was built from a config (the DataModule's)."""
        h = self.hparams
        extras = {THOUGHTS_FILE: {**self.net.thought_state(), "thinking": {
            "n_ahead": h.n_ahead, "n_talk": h.n_talk, "engine": h.engine,
            "thought_temperature": h.thought_temperature}}}
        return ExportableLM(self.net.lm, self.hf_tokenizer, extras=extras,
                            description=f"the LM (base path); thought markers and mixing head in {THOUGHTS_FILE}")

    def setup(self, stage: str) -> None:
        self.build_from_data()  # a random model gets the tokenizer's vocab; a built one is checked against it

    def _generator(self) -> torch.Generator:
        if self.generator is None or self.generator.device != self.device:
            seed = (torch.initial_seed() + self.global_rank) % 2**63  # seed_everything's seed + rank
            self.generator = torch.Generator(self.device).manual_seed(seed)
        return self.generator

    def thought_positions(self, length: int, generator: Optional[torch.Generator],
                          real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[Lq] positions to think at in a window of `length` tokens. `real` [length] bool: the columns that
        hold a real token in some row of the batch; the others (padding in every row) are never picked."""
        h = self.hparams
        pos = torch.arange(0, length, h.think_every)
        if real is not None:
            keep = real.cpu()[pos]
            if bool(keep.any()):  # a batch of padding only: think anywhere, every weight is 0 anyway
                pos = pos[keep]
        if h.think_positions is not None and h.think_positions < pos.numel():
            pick = torch.randperm(pos.numel(), generator=generator, device=generator.device if generator else None)
            pos = pos[pick[: h.think_positions].cpu()].sort().values
        return pos.to(self.device)

    # ----- objective ------------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, torch.Tensor], generator: Optional[torch.Generator],
                       thought_tokens: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], ThinkOutput]:
        """Loss and detached statistics for windows {"input_ids", "labels"} [B, L] and, for padded batches,
        "attention_mask" [B, L] (1 real, 0 padding; missing: all real). `thought_tokens`
        [B * n_passes, Lq, n_ahead - 2] replaces sampling (tests run both engines on the same thoughts).

        Padding is masked (see `QuietStarLM.think`) and every mean is over real label positions only: a label
        counts where the attention mask is 1 and the label is not -100; a thought counts where its position's
        label does, a talk target where its own label does too."""
        h = self.hparams
        ids, labels = batch["input_ids"], batch["labels"]  # [B, L]
        B, L_ = ids.shape
        P, J = h.n_passes, h.n_talk
        attention_mask = batch.get("attention_mask")  # [B, L] or None
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        label_ok = real & (labels != -100)  # [B, L] the positions every mean is over
        if not h.use_reasoner:
            return self.plain_lm_losses(ids, labels, attention_mask, label_ok)
        positions = self.thought_positions(L_, generator, None if attention_mask is None else real.any(0))
        out = self.net.think(ids, positions, h.n_ahead, J, P, h.engine, h.thought_temperature, generator,
                             thought_tokens=thought_tokens, null_thought=h.null_thought_baseline,
                             attention_mask=attention_mask)
        V = out.base_logits.shape[-1]
        Lq = positions.numel()
        base_tok_nll = F.cross_entropy(out.base_logits.float().reshape(-1, V), labels.reshape(-1),
                                       reduction="none").view(B, L_)  # [B, L] (0 at -100)
        lw = label_ok.to(base_tok_nll.dtype)  # [B, L]
        pos_w = lw[:, positions]  # [B, Lq] thoughts at real label positions
        targets = labels[:, out.talk_index]  # [B, Lq, J]
        # a talk target counts if it is inside the window and it and its thought's position are real labels
        valid = out.talk_valid[None] & label_ok[:, out.talk_index] & label_ok[:, positions, None]  # [B, Lq, J]
        valid = valid.float()
        n_talk = (valid.sum() * P).clamp(min=1)
        thought_w = pos_w[:, None].expand(B, P, Lq)  # [B, P, Lq]
        n_thought = thought_w.sum().clamp(min=1)
        n_pos = pos_w.sum().clamp(min=1)

        def talk_logp(logits: torch.Tensor, rows: int) -> torch.Tensor:  # logits [B*rows, Lq, J, V]
            tgt = targets.repeat_interleave(rows, 0)
            return -F.cross_entropy(logits.float().reshape(-1, V), tgt.reshape(-1),
                                    reduction="none").view(B, rows, Lq, J)

        def over_thoughts(x: torch.Tensor) -> torch.Tensor:  # [B, P, Lq] -> mean over real thoughts
            return (x * thought_w).sum() / n_thought

        logp = talk_logp(out.talk_logits, P)  # [B, P, Lq, J]
        talk_w = valid[:, None].expand(B, P, Lq, J)  # [B, P, Lq, J] which talk targets train p(y | z, x)
        with torch.set_grad_enabled(h.post_loss_beta != 0 and torch.is_grad_enabled()):
            post_logp = talk_logp(out.post_logits, P)  # the thought's own prediction, before mixing
        mixed = h.reward_logits == "mixed"
        reward = ((logp if mixed else post_logp) * valid[:, None]).sum(-1).detach()  # [B, P, Lq]
        post_nll = -(post_logp * valid[:, None]).sum() / n_talk
        null_reward = None  # [B, Lq, 1]
        if out.null_talk_logits is not None:
            null_logp = talk_logp(out.null_talk_logits if mixed else out.null_post_logits, 1)  # [B, 1, Lq, J]
            null_reward = (null_logp * valid[:, None]).sum(-1).transpose(1, 2)
        beats_null = None  # [B, P, Lq] the thought's reward exceeds the empty thought's
        if h.talk_gate:
            beats_null = (reward > null_reward.transpose(1, 2)).float()
            talk_w = talk_w * beats_null[..., None]
        talk_nll = -(logp * talk_w).sum() / n_talk  # gated targets count as 0, the denominator stays all targets
        # the baseline compares the P thoughts of one (row, position): put them on the last dim; a padding
        # position's thoughts all have reward 0, so they never reach a real position's baseline
        advantage = reward - leave_one_out_baseline(reward.transpose(1, 2), null_reward).transpose(1, 2)
        if h.clamp_negative_advantage:
            advantage = advantage.clamp(min=0)
        thought_logp = out.thought_logprob.view(B, P, Lq, -1).sum(-1)  # [B, P, Lq]
        policy_loss = -over_thoughts(advantage * thought_logp)
        base_nll = (base_tok_nll * lw).sum() / lw.sum().clamp(min=1)
        loss = h.base_loss_beta * base_nll + h.talk_loss_beta * talk_nll
        if h.post_loss_beta != 0:
            loss = loss + h.post_loss_beta * post_nll
        if h.n_ahead > 2 and h.policy_loss_beta != 0:
            loss = loss + h.policy_loss_beta * policy_loss

        with torch.no_grad():
            nll_thought = -logp[..., 0].mean(1)  # [B, Lq] next token after the thought, mean over passes
            nll_base_at = base_tok_nll[:, positions]  # [B, Lq]
            gap = nll_thought - nll_base_at
            # the model's own next-token NLL: mixed where it thinks, base elsewhere (real labels only)
            nll = (((base_tok_nll * lw).sum() - (nll_base_at * pos_w).sum() + (nll_thought * pos_w).sum())
                   / lw.sum().clamp(min=1))
            sel_ok = pos_w.bool()  # [B, Lq]
            adv_real = advantage[thought_w.bool()]
            entropy = out.thought_entropy.view(B, P, Lq, -1)  # [B, P, Lq, M]
            stats = {
                "loss": loss, "nll": nll, "nll_base": base_nll.detach(),
                "nll_thought": (nll_thought * pos_w).sum() / n_pos,
                "nll_base_at_thought": (nll_base_at * pos_w).sum() / n_pos, "gap": (gap * pos_w).sum() / n_pos,
                "talk_nll": talk_nll.detach(), "nll_post": over_thoughts(-post_logp[..., 0]),
                "post_nll": post_nll.detach(), "reward": over_thoughts(reward),
                "advantage_std": adv_real.std() if adv_real.numel() > 1 else adv_real.sum(),
                "policy_loss": policy_loss.detach(),
                "thought_entropy": over_thoughts(entropy.mean(-1)) if entropy.numel()
                else torch.zeros((), device=self.device),
            }
            lo, hi = h.gap_buckets
            for name, sel in (("easy", nll_base_at < lo), ("medium", (nll_base_at >= lo) & (nll_base_at < hi)),
                              ("hard", nll_base_at >= hi)):
                sel = sel & sel_ok
                if bool(sel.any()):
                    stats[f"gap_{name}"] = gap[sel].mean()
            if out.mix_weight is not None:  # [N, Lq, J, 1]: mean over the real thoughts' J talk steps
                stats["mix_weight"] = over_thoughts(out.mix_weight.view(B, P, Lq, J).mean(-1))
            if null_reward is not None:
                stats["null_reward"] = (null_reward[..., 0] * pos_w).sum() / n_pos
            if beats_null is not None:
                stats["talk_gate_open"] = over_thoughts(beats_null)
            if entropy.numel():
                stats["thought_entropy_max"] = entropy.amax(-1)[thought_w.bool()].max()
            if bool(sel_ok.any()):  # tokens of interest: the hardest thinking positions for the base model
                cut = torch.quantile(nll_base_at[sel_ok].float(), h.interest_percentile)
                hard = sel_ok & (nll_base_at >= cut)
                stats["nll_interest"] = nll_thought[hard].mean()
                stats["nll_base_interest"] = nll_base_at[hard].mean()
        return stats, out

    def plain_lm_losses(self, ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        label_ok: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        """`use_reasoner: false`: the base LM's next-token NLL over real labels, nothing else."""
        from lightning_rlm.models.decoding import position_ids_from_mask

        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask,
                                                    "position_ids": position_ids_from_mask(attention_mask)}
        logits = self.net.lm(input_ids=ids, **kwargs).logits  # [B, L, V]
        tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        w = label_ok.to(tok.dtype)
        nll = (tok * w).sum() / w.sum().clamp(min=1)
        return {"loss": self.hparams.base_loss_beta * nll, "nll": nll.detach(), "nll_base": nll.detach()}, None

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
    def _decode(self, ids: list[int]) -> str:
        tok = self.tokenizer if self.tokenizer is not None else self.hf_tokenizer
        return tok.decode(ids).replace("\n", "⏎").replace("`", "'")

    @torch.no_grad()
    def thought_lines(self, batch: dict[str, torch.Tensor], out: ThinkOutput, n: int,
                      context_tokens: int = 12) -> list[str]:
        """`context → ⟨thought⟩ → prediction (true, p base → p mixed)` for n thinking positions of row 0 (its
        real tokens only when the batch has an attention mask)."""
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[0].bool()
        positions = out.talk_index[:, 0].tolist()
        qs = [q for q, t in enumerate(positions) if bool(real[t])]
        if not qs:
            return []
        picks = [qs[i] for i in torch.linspace(0, len(qs) - 1, min(n, len(qs))).long().unique().tolist()]
        lines = []
        for q in picks:
            t = positions[q]
            true = int(labels[t])
            p_base = out.base_logits[0, t].float().softmax(-1)[true].item()
            mixed = out.talk_logits[0, q, 0].float().softmax(-1)  # pass 0 of row 0
            thought = self._decode(out.thought_tokens[0, q].tolist())
            context = ids[: t + 1][real[: t + 1]][-context_tokens:]
            lines.append(f"`{self._decode(context.tolist())}` → ⟨t⟩`{thought}`⟨/t⟩"
                         f" → **`{self._decode([int(mixed.argmax())])}`** (true `{self._decode([true])}`, "
                         f"p {p_base:.2f} → {mixed[true].item():.2f})")
        return lines

    def log_thoughts(self, batch: dict[str, torch.Tensor], out: ThinkOutput) -> None:
        if self.trainer.is_global_zero and self.hparams.sample_positions:
            lines = self.thought_lines(batch, out, self.hparams.sample_positions)
            if lines:  # none when row 0 is all padding
                log_text(self, "thoughts", "  \n".join(lines))

    @torch.no_grad()
    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """A thinking continuation (`sample_tokens` tokens, a thought before each) of the first quarter of each
        window, with the thoughts shown per token; `lightning-rlm predict` writes them to `predictions.jsonl`."""
        h = self.hparams
        ids = batch["input_ids"]
        prompt = ids[:, : max(1, ids.shape[1] // 4)]  # [B, T0] (windows are unpadded)
        gen = torch.Generator(self.device).manual_seed(batch_idx)  # the same thoughts on every predict run
        res = self.net.generate(prompt, max_new_tokens=h.sample_tokens or 24, n_ahead=h.n_ahead,
                                thought_temperature=h.thought_temperature, generator=gen, return_thoughts=True)
        return [{"prompt": self._decode(p.tolist()), "completion": self._decode(t.tolist()),
                 "thoughts": [self._decode(z.tolist()) for z in zs]}
                for p, t, zs in zip(prompt, res.tokens, res.thoughts)]

    def sample_text(self, prompt: str, max_new_tokens: int) -> str:
        """A thinking generation from `prompt`, each token preceded by its thought as ⟨…⟩."""
        tok = self.tokenizer if self.tokenizer is not None else self.hf_tokenizer
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        gen = torch.Generator(self.device).manual_seed(0)
        res = self.net.generate(ids, max_new_tokens=max_new_tokens, n_ahead=self.hparams.n_ahead,
                                thought_temperature=self.hparams.thought_temperature, generator=gen,
                                return_thoughts=True)
        parts = [f"**{self._decode(ids[0].tolist())}**"]
        for i, t in enumerate(res.tokens[0].tolist()):
            parts.append(f"⟨{self._decode(res.thoughts[0, i].tolist())}⟩{self._decode([t])}")
        return "".join(parts)

    def log_sample(self) -> None:
        h = self.hparams
        if self.trainer.is_global_zero and h.sample_prompt and h.sample_tokens:
            log_text(self, "samples", self.sample_text(h.sample_prompt, h.sample_tokens))
