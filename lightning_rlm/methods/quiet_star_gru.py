"""Quiet-STaR on GRU language models, with the reasoner trained by a TRICE-style policy gradient.

The network (`lightning_rlm.models.quiet_star_gru`): at every position t a reasoner GRU samples a thought
z (LM tokens, ended by an end-of-thought token, at most `max_reasoning_len` tokens), an interpreter GRU
reads it into a vector v, and a head predicts x_{t+1} from the base LM's state h_t and v.

Objective, for every position t and each of K = `trice_samples` thoughts z_k:

    nll_k    = -log p(x_{t+1} | z_k, x_{<=t})
    r_k      = sum_{j < n_talk} log p(x_{t+1+j} | z_k, x_{<=t+j})
               - length_penalty * |z_k| - punish_unfinished * [z_k hit max_reasoning_len]
    A_k      = r_k - mean_{i != k} r_i                      (leave-one-out baseline)
               (null_thought_baseline: r_k - (sum_{i != k} r_i + r_null) / K, r_null the empty thought's reward)
               (reward_bound b: A_k clipped to [-b, b], or b * tanh(A_k / b))
    loss     = nll_loss_beta * mean(nll)              (train_nll_num n: the mean over thoughts k < n only)
               + policy_loss_beta * ( -mean(A_k * log pi(z_k | x_{<=t})) - entropy_coef * mean token entropy )

The NLL trains the base LM, the interpreter and the heads; only the policy term (REINFORCE, reward
detached) trains the reasoner, whose samples are discrete. With `policy_loss_beta=0` the thoughts are
still sampled and used but the reasoner's graph is never built, so reasoner-only parameters get no
gradient.

Departures from the papers:
- Quiet-STaR (Zelikman et al., 2024) thinks with the LM itself after every token, mixes the pre- and
  post-thought logits with a learned head and uses the mean reward of the other thoughts as baseline.
  Here the three roles are GRUs that may or may not share weights (`weight_groups`), thoughts have a
  variable length, the heads are the GRU experiments' (residual, concat, mix, sigmoid mix with a held
  start value), and "talk" tokens are predicted from the base state at t+j with the thought vector at t
  rather than by continuing the thought.
- TRICE (Phan et al., 2023) fits rationales by MCMC-EM with a control variate built from the other
  chains' likelihoods. We keep only its leave-one-out control variate across K samples per position,
  on a log-likelihood reward, with plain samples from the policy (no MCMC, no rejection of old
  rationales).

Logs: train/val NLL with thoughts (`nll`, also `loss`), the base path alone (`nll_base`), the gap, the
policy loss, mean reward, fraction of empty and unfinished thoughts, mean thought length, token
entropy (and its max with `log_thought_entropy_max`), the mixing weight, the empty thought's reward
(`null_reward`, with `null_thought_baseline`), the fraction of bounded advantages (`frac_bounded`, with
`reward_bound`); every `sample_every_n_steps` a TensorBoard text of context -> thought -> next token.

The knobs of seed 001 added to the GRU experiments (`null_thought_baseline`, `train_nll_num`,
`neuter_dropout_base`, `parameter_groups`, `reward_bound`, `detach_interpreter`,
`log_thought_entropy_max`) all default to off, which is the method as it was before them.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F

from lightning_rlm.checks import check_fraction, check_one_of, check_positive
from lightning_rlm.logging_utils import log_text
from lightning_rlm.losses.quiet_star import bound_advantage, reinforce_advantage, talk_targets, token_logprobs
from lightning_rlm.methods.token_window import TokenWindowSteps, VocabFromData
from lightning_rlm.models.quiet_star_gru import GROUP_ROLES, Combine, QuietStarGRUNet, QuietStarOutput
from lightning_rlm.optim import adamw_warmup, check_group_settings, role_param_groups
from lightning_rlm.rollout.thoughts import gru_thought_lines


class QuietStarGRU(VocabFromData, TokenWindowSteps, L.LightningModule):
    """Quiet-STaR with a base LM, a reasoner and an interpreter GRU, trained with NLL + TRICE REINFORCE.

    Architecture (see `QuietStarGRUNet`):
        vocab_size: set from the DataModule's tokenizer when None.
        embed_dim: token embedding width (None: each role's hidden size).
        base_lm_hidden_dim, reasoner_hidden_dim, interpreter_hidden_dim: GRU widths.
        num_layers: GRU layers of every role.
        weight_groups: 4 letters over (embedding, base GRU, reasoner GRU, interpreter GRU); equal letters
            share one module ("AAAA": one model, "ABCD": all separate).
        share_lm_head: one output head for the base and thought paths (`concat` always has one).
        combine: `residual`, `concat`, `mix` (learned unsquashed weight, 0 at init) or `mix_sigmoid`.
        gate_start, gate_warmup_steps: mix_sigmoid only: the gate is held near `gate_start` at first, an EMA
            that reaches the learned gate at step gate_warmup_steps (`QuietStarGRUNet.gate_hold`).
        linear_lm_head: linear output heads (else a 2-layer MLP).
        use_reasoner: False: the plain base LM (the NLL baseline through the same code).
        use_base_lm: False: predict from the thought vector alone.
        pretrained_base, pretrained_reasoner: `.ckpt` of a GRU `LanguageModel` to start the base LM and/or
            the reasoner from (loaded at the start of fit, not when resuming).
        neuter_dropout_base: dropout probability on the base LM's state where it enters the heads, in
            training only (0: off). Seed 001's `neuter_dropout_base` (tried 0.2, 0.5, 0.875) "to simulate a
            weak model which would always use the reasoner"; the notebook does not say where its dropout
            sits, here it is on the base state h_t (all n_talk heads, `nll_base` and the null thought see
            the same mask), with the usual 1/(1-p) scaling and nothing at evaluation.
        detach_interpreter: the thought vector enters the heads detached: no NLL (talk) or policy loss
            reaches the interpreter through it, so it stays at its initialisation while the heads learn
            to read it. Seed 001's "try just detaching the gradient from the interpreter" (is the gain
            from the interpreter's input at all?). A GRU/embedding that `weight_groups` shares with the
            base LM or the reasoner still learns through that role.
    Thoughts:
        max_reasoning_len: thought tokens at most (0: empty thoughts, same parameters, no reasoning).
        variable_len: the reasoner may end a thought early (else every thought has max_reasoning_len tokens).
        trice_samples: thoughts per position (K, >= 2 for the leave-one-out baseline, unless
            null_thought_baseline).
        thought_temperature: sampling temperature of the reasoner (log-probs are of the tempered policy).
        n_talk: reward = log-likelihood of the next n_talk tokens.
    Objective:
        nll_loss_beta: weight of the NLL with thoughts.
        policy_loss_beta: weight of the reasoner objective (policy loss and entropy bonus; 0: untrained).
        punish_unfinished: reward penalty for a thought that hits max_reasoning_len without ending.
        length_penalty: reward penalty per thought token.
        entropy_encouragement_coef: bonus on the reasoner's mean token entropy.
        null_thought_baseline: the empty thought's reward joins every thought's leave-one-out baseline,
            b_k = (sum_{i != k} r_i + r_null) / K, as in `QuietStar` (seed 001: "test out always including
            the null prompt baseline ... will bias the gradient, but perhaps it will reduce the variance").
            r_null is the reward of the thought that is just the end-of-thought token (what an empty sampled
            thought gets), scored by the same heads, no gradient. With K = 1 it is the whole baseline.
        train_nll_num: how many of the K thoughts per position the NLL loss averages over, the first n
            (thoughts are i.i.d., so any n); None: all K. Seed 001's `train_nll_num` (1, 2, 4 with
            trice_samples=4: "try training the NLL head less?"). The policy loss still uses all K
            and the logged `nll` is still the mean over all K; `nll_trained` logs the trained part.
        reward_bound: bound b > 0 on the advantage A_k (reward minus baseline, not the raw reward: see
            `bound_advantage`) that multiplies log pi(z_k); None: unbounded. Seed 001: "I should clip the
            gradient or bound the reward ... bound of +/- 0.1".
        reward_bound_mode: `clip` (clamp to [-b, b]) or `tanh` (b * tanh(A / b): smooth, ~A near 0).
    Optimisation and logging: as `LanguageModel` (AdamW, warmup + constant/cosine); `sample_every_n_steps`
        logs `sample_positions` thoughts of the current batch as TensorBoard text (0: never).
        parameter_groups: per-role AdamW settings, {role: {"lr": ..., "weight_decay": ...}} with roles
            `base`, `reasoner`, `interpreter` and `heads` (`QuietStarGRUNet.parameter_roles`; the groups:
            `lightning_rlm.optim.role_param_groups`). None: one lr and weight decay for all, as before.
            Seed 001 records only `parameter_groups=1`, tried "to fix the model performance degrading as
            reasoner/interpreter increases in size", not its groups or rates.
        log_thought_entropy_max: also log `thought_entropy_max`, the largest per-step entropy of the
            reasoner's policy over the batch's sampled thought steps (seed 001: "I need to fix the mean
            reasoning entropy calculation. Maybe look at max instead.").
    """

    exact_vocab = True  # the end-of-thought id is vocab_size

    def __init__(
        self,
        vocab_size: Optional[int] = None,
        embed_dim: Optional[int] = None,
        base_lm_hidden_dim: int = 32,
        reasoner_hidden_dim: int = 128,
        interpreter_hidden_dim: int = 128,
        num_layers: int = 1,
        weight_groups: str = "ABCD",
        share_lm_head: bool = True,
        combine: Combine = "residual",
        gate_start: Optional[float] = None,
        gate_warmup_steps: int = 0,
        linear_lm_head: bool = True,
        use_reasoner: bool = True,
        use_base_lm: bool = True,
        pretrained_base: Optional[str] = None,
        pretrained_reasoner: Optional[str] = None,
        neuter_dropout_base: float = 0.0,
        detach_interpreter: bool = False,
        max_reasoning_len: int = 8,
        variable_len: bool = True,
        trice_samples: int = 4,
        thought_temperature: float = 1.0,
        n_talk: int = 1,
        nll_loss_beta: float = 1.0,
        policy_loss_beta: float = 1.0,
        punish_unfinished: float = 0.0,
        length_penalty: float = 0.0,
        entropy_encouragement_coef: float = 0.0,
        null_thought_baseline: bool = False,
        train_nll_num: Optional[int] = None,
        reward_bound: Optional[float] = None,
        reward_bound_mode: Literal["clip", "tanh"] = "clip",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        sample_every_n_steps: int = 100,
        sample_positions: int = 4,
        parameter_groups: Optional[dict[str, dict[str, float]]] = None,
        log_thought_entropy_max: bool = False,
    ) -> None:
        super().__init__()
        check_positive(lr=lr, reward_bound=reward_bound)
        check_one_of("reward_bound_mode", reward_bound_mode, ("clip", "tanh"))
        if train_nll_num is not None and not 1 <= train_nll_num <= trice_samples:
            raise ValueError(f"train_nll_num must be in [1, trice_samples={trice_samples}], got {train_nll_num}")
        check_group_settings(parameter_groups, GROUP_ROLES)
        if max_reasoning_len < 0 or trice_samples < 1 or n_talk < 1 or thought_temperature <= 0:
            raise ValueError(f"need max_reasoning_len >= 0, trice_samples >= 1, n_talk >= 1 and "
                             f"thought_temperature > 0; got {max_reasoning_len}, {trice_samples}, {n_talk}, "
                             f"{thought_temperature}")
        check_fraction(gate_start=gate_start)
        self.save_hyperparameters()
        self.net: Optional[QuietStarGRUNet] = None
        if vocab_size is not None:
            self._build(vocab_size)
        else:  # check the architecture now (weight_groups, sizes), not after loading the data
            self.make_net(2)

    # ----- model -----------------------------------------------------------------------------------------
    def make_net(self, vocab_size: int) -> QuietStarGRUNet:
        h = self.hparams
        return QuietStarGRUNet(
            vocab_size, embed_dim=h.embed_dim, base_lm_hidden_dim=h.base_lm_hidden_dim,
            reasoner_hidden_dim=h.reasoner_hidden_dim, interpreter_hidden_dim=h.interpreter_hidden_dim,
            num_layers=h.num_layers, weight_groups=h.weight_groups, share_lm_head=h.share_lm_head,
            combine=h.combine, linear_lm_head=h.linear_lm_head, use_reasoner=h.use_reasoner,
            use_base_lm=h.use_base_lm, base_dropout=h.neuter_dropout_base, detach_interpreter=h.detach_interpreter,
        )

    def configure_model(self) -> None:
        """Create the network (after `setup`, in the strategy's context; idempotent) and, at the start of a fit,
        load the pretrained base LM / reasoner into it."""
        self.build_from_data()  # exact vocab: the end-of-thought id is vocab_size
        trainer = self._trainer  # a resumed run has its weights already
        if trainer is not None and trainer.state.fn == "fit" and trainer.ckpt_path is None:
            for role, path in (("base", self.hparams.pretrained_base), ("reasoner", self.hparams.pretrained_reasoner)):
                if path:
                    self.load_pretrained(path, role)

    def load_pretrained(self, path: str, role: Literal["base", "reasoner"]) -> None:
        """Start the base LM or the reasoner from a GRU `LanguageModel` checkpoint (`.ckpt`)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.net.load_gru_lm(ckpt.get("state_dict", ckpt), role)

    def forward(self, input_ids: torch.Tensor, reasoner_grad: bool = False) -> QuietStarOutput:
        h = self.hparams
        return self.net(
            input_ids, trice_samples=h.trice_samples, max_reasoning_len=h.max_reasoning_len,
            variable_len=h.variable_len, temperature=h.thought_temperature, reasoner_grad=reasoner_grad,
            n_talk=h.n_talk, gate_hold=self.net.gate_hold(self.global_step, h.gate_start, h.gate_warmup_steps),
            gate_start=h.gate_start or 0.5,
            null_thought=h.null_thought_baseline and h.use_reasoner,
        )

    # ----- objective -----------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss and detached statistics for one batch of windows {"input_ids", "labels"} [B, T]."""
        h = self.hparams
        ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
        reasoner_grad = (self.training and h.use_reasoner and h.policy_loss_beta != 0
                         and h.max_reasoning_len > 0)
        out = self(ids, reasoner_grad=reasoner_grad)
        J, B, T, K, V = out.logits.shape
        shifted, in_window = talk_targets(labels, J)  # [J, B, T] x_{t+1+j}; [J, 1, T, 1] inside the window
        token_logp = token_logprobs(out.logits, shifted[..., None].expand(J, B, T, K))  # [J, B, T, K]
        nll = -token_logp[0].mean()
        stats: dict[str, torch.Tensor] = {"nll": nll.detach()}
        nll_trained = nll
        if h.train_nll_num is not None:  # seed 001: only the first n of the K thoughts train through the NLL
            nll_trained = -token_logp[0, ..., : h.train_nll_num].mean()
            stats["nll_trained"] = nll_trained.detach()
        if out.base_logits is not None:
            nll_base = F.cross_entropy(out.base_logits.detach().float().reshape(-1, V), labels.reshape(-1))
            stats["nll_base"] = nll_base
            stats["gap"] = nll.detach() - nll_base
        loss = h.nll_loss_beta * nll_trained
        th = out.thoughts
        if th is not None:
            reward = (token_logp * in_window).sum(0).detach()  # [B, T, K]
            reward = reward - h.length_penalty * th.lengths - h.punish_unfinished * th.unfinished.float()
            null_reward = None  # [B, T, 1]: the empty thought's reward (no length, never unfinished)
            if out.null_logits is not None:
                null_logp = token_logprobs(out.null_logits, shifted)  # [J, B, T]
                null_reward = (null_logp * in_window[..., 0]).sum(0)[..., None].detach()
                stats["null_reward"] = null_reward.mean()
            advantage = reinforce_advantage(reward, null_reward)  # [B, T, K]
            if h.reward_bound is not None:
                advantage, stats["frac_bounded"] = bound_advantage(advantage, h.reward_bound, h.reward_bound_mode)
            policy_loss = -(advantage * th.logprob).mean()
            entropy = th.mean_entropy()  # over sampled thought steps
            if reasoner_grad:
                loss = loss + h.policy_loss_beta * (policy_loss - h.entropy_encouragement_coef * entropy)
            stats.update(policy_loss=policy_loss.detach(), reward=reward.mean(), advantage_std=advantage.std(),
                         **th.stats(), thought_entropy=entropy.detach())
            if h.log_thought_entropy_max:
                stats["thought_entropy_max"] = th.entropy_max.max()
        if out.mix_weight is not None:
            stats["mix_weight"] = out.mix_weight.detach().mean()
        stats["loss"] = loss
        return stats

    # ----- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        if h.parameter_groups is None:  # one lr and weight decay for every parameter
            return super().configure_optimizers()
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        self.net.check_shared_settings(h.parameter_groups)  # per role, see `QuietStarGRUNet.parameter_roles`
        groups = role_param_groups(self.net.parameter_roles(), h.parameter_groups, h.lr, h.weight_decay)
        return adamw_warmup(groups, lr=h.lr, weight_decay=h.weight_decay, betas=h.betas,
                            warmup_steps=h.warmup_steps, total_steps=total, min_lr_ratio=h.min_lr_ratio,
                            schedule=h.lr_schedule)

    # ----- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        stats = self.compute_losses(batch)
        for name, value in stats.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name in ("loss", "thought_len"))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return stats["loss"]

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_throughput(batch)
        every = self.hparams.sample_every_n_steps
        if every and self.trainer.global_step % every == 0:
            self.log_thoughts(batch)

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        stats = self.compute_losses(batch)
        stats["loss"] = stats["nll"]  # `loss` is the NLL everywhere in evaluation, comparable across methods
        for name, value in stats.items():
            self.log(f"{split}/{name}", value, prog_bar=name == "nll", sync_dist=True)
        if getattr(self.tokenizer, "is_char", False):
            self.log(f"{split}/bits_per_char", stats["nll"] / math.log(2), sync_dist=True)
        return stats["nll"]

    # ----- samples ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_thoughts(self, batch: dict[str, torch.Tensor]) -> None:
        """`sample_positions` thoughts of the batch's first window (an eval-mode forward) as TensorBoard text."""
        if not self.trainer.is_global_zero or self.tokenizer is None:
            return
        ids, labels = batch["input_ids"][0], batch["labels"][0]  # [T]
        was_training = self.training
        self.eval()
        out = self(ids[None])  # B = 1
        self.train(was_training)
        lines = gru_thought_lines(self.tokenizer, ids, labels, out, self.hparams.sample_positions)
        log_text(self, "thoughts", "  \n".join(lines))  # two trailing spaces keep markdown line breaks
