"""Quiet-STaR around any Hugging Face causal LM: parallel thoughts for training, thinking generation.

`QuietStarLM` wraps an `AutoModelForCausalLM` without touching its modeling code. It owns three things:
learned start/end-of-thought embeddings (initialised from the embedding of a text such as "---", with a
gradient/step multiplier) and a mixing head. The markers are not vocabulary entries, so they can never be
sampled as thought tokens or generated as text.

Training (`think`), for thinking positions t (rows of `positions`) and P thoughts per position:

    inputs per thought:  <sot> z_1 .. z_M <eot> x_{t+1} .. x_{t+J-1}      at positions t+1, t+2, ...
    outputs used:        z_1 .. z_M sampled (tempered),  then predictions of x_{t+1} .. x_{t+J}

M = n_ahead - 2 sampled tokens (n_ahead counts both markers, as in the paper), J = n_talk teacher-forced
talk tokens. Sampling steps run one forward each over all positions; the end marker and the talk tokens
are known once the last thought token is, so they run as one forward of J + 1 steps per position. All of
it attends through `thought_attention` (`dense` or `diagonal`, same numbers).

Padding: with `attention_mask` [B, L] (1 real, 0 padding; left or right) padding is masked: no real token
and no thought attends to a padding token, and position ids count real tokens only (`position_ids_from_mask`;
a thought at t continues from t's position id). A row's outputs at its real positions are then those of the
row alone; outputs at padding positions are finite and meaningless. Without a mask (or all ones) nothing
changes.

Thought layout knobs (seed 001's notebook names; the defaults, all off but `different_eot`, which is on because
the markers were always two vectors, are the layout above bit for bit; they are attributes of the model, so
`think`, `generate`, `ThinkingCausalLM` and the export all follow them):

    use_residual             the post-thought logits are a residual on the base model's: post(t, j) :=
                             base(t + j) + post(t, j) (for a bias-free LM head, the head of h_base + h_post: a
                             residual connection around the thought), before mixing and everywhere post is used
    add_last_context_token   after <eot> the last context token x_t is fed again and predicts x_{t+1}:
                             <sot> z_1 .. z_M <eot> x_t x_{t+1} .. x_{t+J-1}, outputs at x_t .. x_{t+J-1}
                             (the output at <eot> is returned as `eot_logits`: its prediction of x_t)
    increment_pos_id_for_last_context_token
                             (with add_last_context_token) the position ids of the re-fed x_t and the talk
                             tokens after it: off, their own ids p_t, p_t + 1, ... (the thought is a side
                             branch at p_t + 1 .. p_t + M + 2 and the text resumes where it was); on, they
                             continue after <eot>: p_t + M + 3, p_t + M + 4, ...
    different_eot            True (default, as before): <eot> is its own learned vector; False: one learned
                             marker is both <sot> and <eot> (`end_param` is then frozen and unused)
    variable_len             the reasoner ends its own thought: at every sampling step it picks a token or the end
                             of thought (id V, one past the vocabulary), so a thought has 0 .. M tokens (M =
                             n_ahead - 2 = the notebook's max_reasoning_len; one that reaches M is "unfinished").
                             p(end) = sigmoid(a), a = `end_head`(hidden) (a linear head starting at weight 0 and
                             p(end) = `end_init_prob`), and p(token) = (1 - p(end)) softmax(logits / temperature):
                             the temperature tempers the tokens, not the decision to stop. After the end, <eot> and
                             the talk tokens follow the thought's last real token (positions as if the thought had
                             been len tokens long), and the unused steps are hidden from them in both attention
                             engines (`ThoughtAttentionState.add_steps`) and in generation (their cache slots are
                             masked), so a thought of len tokens gives what a plain forward of the sequence with
                             those len tokens gives.

Position ids of one thought at t (p_t the position id of x_t; `final_block_offsets` has the last part):

    <sot>  z_1 .. z_M        <eot>      [x_t]                  x_{t+1} .. x_{t+J-1}
    p_t+1  p_t+2 .. p_t+M+1  p_t+M+2    -                      p_t+M+3 .. p_t+M+J+1      (default)
                                        p_t                    p_t+1 .. p_t+J-1          (add_last_context_token)
                                        p_t+M+3                p_t+M+4 .. p_t+M+J+2      (... + increment_pos_id)

A separate reasoner (`reasoner`: a second causal LM of the same width, e.g. a copy of the base; seed 001's
base/reasoner split): the reasoner samples the thoughts, with its own pass over the context and its own
attention; the base model then reads the sampled thought (one teacher-forced forward of <sot> z_1 .. z_{M-1},
then the final block as above) and makes the talk predictions. The policy gradient trains the reasoner, the
talk NLL the base (whose weights the method may freeze); the markers and the mixing head are shared. Without
it (None) the LM thinks with its own weights, as in the paper.

Mixing: talk logits = base + w * (post - base) with w from an MLP over [h_base(t+j), h_post(t, j)] whose
last layer starts at zero weights, so training starts as the base model: `linear` w is the raw output
(exactly 0 at first, unbounded: w < 0 extrapolates away from the thought), `sigmoid` w = sigmoid(raw),
kept in (0, 1), with the bias starting at logit(0.01) (1% thought at first). Mixing logits linearly equals
mixing log-probabilities (they differ by a per-row constant).

Generation (`generate`): per new token, with a KV cache, fork at the current length, decode the thought
(start marker, M sampled tokens, end marker), mix the post-thought logits with the base logits, sample the
token, roll the cache back to the fork and append the token. The appended token and the next thought's start
marker share one forward, the last thought token and the end marker another: M + 1 forwards per token. Llama/Mistral/Qwen2 use the preallocated
`StaticCacheDecoder` (roll back = reuse the slots), others HF's `DynamicCache` (`crop`); `use_cache=False`
recomputes the whole prefix for every forward (the benchmark's baseline).

Export (`lightning-rlm export`): the LM is saved as a Hugging Face folder and everything else, the markers,
the mixing head and the layout knobs (`thought_state`), as `quiet_star.pt` (`THOUGHTS_FILE`) beside it; `QuietStarLM.from_export`
rebuilds the model from the folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rlm.models.decoding import position_ids_from_mask, sample_categorical
from lightning_rlm.models.exportable import ExportableLM
from lightning_rlm.models.static_cache import StaticCacheDecoder
from lightning_rlm.models.thought_attention import Engine, ThoughtAttentionState, use_thought_attention

__all__ = ["LAYOUT_KNOBS", "MixingHead", "QuietStarLM", "ThinkOutput", "ThinkingCausalLM", "ThinkingGeneration",
           "check_thought_layout", "final_block_offsets", "marker_ids", "thinking_positions"]

# seed 001's thought layout knobs: QuietStarLM's arguments and the methods' hyperparameters of the same names
LAYOUT_KNOBS = ("use_residual", "add_last_context_token", "increment_pos_id_for_last_context_token", "different_eot",
                "variable_len")

MixingHead = Literal["sigmoid", "linear", "off"]
THOUGHTS_FILE = "quiet_star.pt"  # beside an exported LM: the markers and the mixing head (`thought_state`)


@dataclass
class ThinkOutput:
    """What `QuietStarLM.think` returns. B windows of L tokens, Lq thinking positions, N = B * P rows."""

    base_logits: Tensor  # [B, L, V] the base model's next-token logits
    talk_logits: Tensor  # [N, Lq, J, V] mixed logits predicting x_{t+1+j} after the thought
    post_logits: Tensor  # [N, Lq, J, V] post-thought logits before mixing (base + post with use_residual)
    mix_weight: Optional[Tensor]  # [N, Lq, J, 1] (None without mixing head)
    talk_index: Tensor  # [Lq, J] long, t + j: the base position predicting the same token (clamped)
    talk_valid: Tensor  # [Lq, J] bool, t + j < L: the target exists in the window
    thought_tokens: Tensor  # [N, Lq, M] long
    thought_logprob: Tensor  # [N, Lq, M] log pi(z_i | ...) of the tempered policy, with graph
    thought_entropy: Tensor  # [N, Lq, M] entropy of each sampling step (no graph)
    null_talk_logits: Optional[Tensor] = None  # [B, Lq, J, V] mixed, after an empty thought (no graph)
    null_post_logits: Optional[Tensor] = None  # [B, Lq, J, V] the same before mixing
    eot_logits: Optional[Tensor] = None  # [N, Lq, V] add_last_context_token: the output at <eot>, predicting x_t
    # variable_len: a thought is z_1 .. z_len (len <= M); its sampling steps are 0 .. min(len, M - 1) (the last
    # one picked the end of thought, id V, unless the thought is unfinished). Fixed length: len = M, all steps.
    thought_lengths: Optional[Tensor] = None  # [N, Lq] long
    thought_step_mask: Optional[Tensor] = None  # [N, Lq, M] bool: the step was sampled (in thought_logprob)
    thought_unfinished: Optional[Tensor] = None  # [N, Lq] bool: reached M tokens without sampling the end

    def __post_init__(self) -> None:  # fixed-length thoughts by default: every thought M tokens, every step sampled
        N, Lq, M = self.thought_tokens.shape
        dev = self.thought_tokens.device
        if self.thought_lengths is None:
            self.thought_lengths = torch.full((N, Lq), M, dtype=torch.long, device=dev)
        if self.thought_step_mask is None:
            self.thought_step_mask = torch.ones(N, Lq, M, dtype=torch.bool, device=dev)
        if self.thought_unfinished is None:
            self.thought_unfinished = torch.zeros(N, Lq, dtype=torch.bool, device=dev)


@dataclass
class ThinkingGeneration:
    tokens: Tensor  # [B, new] generated ids (pad after EOS)
    thoughts: Optional[Tensor] = None  # [B, new, M] the thought before each token (variable_len: the end id V
    #                                    from the thought's end on)
    logits: Optional[Tensor] = None  # [B, new, V] the mixed logits each token was sampled from


class QuietStarLM(nn.Module):
    """A causal LM plus learned thought markers and a mixing head.

    Args:
        lm: any HF causal LM (`AutoModelForCausalLM`); its attention must go through the transformers
            attention interface (Llama, Qwen2, Mistral, GPT-2 and most current models do).
        init_embedding: [D] initial value of both markers (e.g. the mean embedding of "---").
        embedding_grad_scale: the markers are stored divided by this and used multiplied by it, so their
            gradient, and their Adam step, is this many times larger (the paper's x100).
        mixing_head: the mixing weight: `sigmoid` (in (0, 1), starts at 0.01), `linear` (raw, starts at
            exactly 0), or `off` (the post-thought logits alone).
        use_residual, add_last_context_token, increment_pos_id_for_last_context_token, different_eot: the
            thought layout knobs of seed 001 (module docstring); the defaults are the layout without them.
        variable_len: the reasoner samples its own end of thought (module docstring); `end_init_prob` is p(end)
            at every step before training.
        reasoner: a second causal LM (same vocabulary and width) that samples the thoughts (module docstring);
            None: the LM itself thinks.
    """

    def __init__(self, lm: nn.Module, init_embedding: Optional[Tensor] = None, embedding_grad_scale: float = 100.0,
                 mixing_head: MixingHead = "sigmoid", *, use_residual: bool = False,
                 add_last_context_token: bool = False, increment_pos_id_for_last_context_token: bool = False,
                 different_eot: bool = True, variable_len: bool = False, end_init_prob: float = 0.1,
                 reasoner: Optional[nn.Module] = None) -> None:
        super().__init__()
        if embedding_grad_scale <= 0:
            raise ValueError(f"embedding_grad_scale must be > 0, got {embedding_grad_scale}")
        if increment_pos_id_for_last_context_token and not add_last_context_token:
            raise ValueError("increment_pos_id_for_last_context_token=True sets the position id of the re-fed last "
                             "context token: it needs add_last_context_token=True")
        self.use_residual = bool(use_residual)
        self.add_last_context_token = bool(add_last_context_token)
        self.increment_pos_id_for_last_context_token = bool(increment_pos_id_for_last_context_token)
        self.different_eot = bool(different_eot)
        self.variable_len = bool(variable_len)
        self.lm = lm
        d = lm.get_input_embeddings().weight.shape[1]
        if reasoner is not None and reasoner.get_input_embeddings().weight.shape != lm.get_input_embeddings().weight.shape:
            raise ValueError(f"the reasoner's embedding {tuple(reasoner.get_input_embeddings().weight.shape)} must match "
                             f"the base model's {tuple(lm.get_input_embeddings().weight.shape)} (same vocabulary and "
                             "width: the markers and the thought tokens are shared)")
        self.reasoner = reasoner
        init = torch.zeros(d) if init_embedding is None else init_embedding.detach().float().reshape(d)
        self.embedding_grad_scale = embedding_grad_scale
        self.start_param = nn.Parameter(init / embedding_grad_scale)
        # different_eot=False: <eot> is the <sot> vector; end_param stays (checkpoints keep one layout), frozen
        self.end_param = nn.Parameter(init.clone() / embedding_grad_scale, requires_grad=self.different_eot)
        if mixing_head not in ("sigmoid", "linear", "off"):
            raise ValueError(f"mixing_head must be 'sigmoid', 'linear' or 'off', got {mixing_head!r}")
        self.mixing = mixing_head
        self.mixing_head: Optional[nn.Sequential] = None
        if mixing_head != "off":
            self.mixing_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, 1))
            nn.init.zeros_(self.mixing_head[-1].weight)  # the same weight for every token at first
            start = math.log(0.01 / 0.99) if mixing_head == "sigmoid" else 0.0  # w = 0.01 or exactly 0
            nn.init.constant_(self.mixing_head[-1].bias, start)
        self.end_head: Optional[nn.Linear] = None  # variable_len: the logit a of p(end of thought) = sigmoid(a)
        if self.variable_len:
            if not 0.0 < end_init_prob < 1.0:
                raise ValueError(f"end_init_prob must be in (0, 1), got {end_init_prob}")
            self.end_head = nn.Linear(d, 1)
            nn.init.zeros_(self.end_head.weight)  # p(end) = end_init_prob at every step at first
            nn.init.constant_(self.end_head.bias, math.log(end_init_prob / (1 - end_init_prob)))

    @classmethod
    def around(cls, lm: nn.Module, tokenizer: Any, init_text: str, embedding_grad_scale: float = 100.0,
               mixing_head: MixingHead = "sigmoid", reasoner: Optional[nn.Module] = None, **layout: Any) -> QuietStarLM:
        """`lm` wrapped and set to training mode (`from_pretrained` returns eval mode; Lightning keeps submodule
        modes as found), both markers starting at the mean input embedding of `init_text` as `tokenizer`
        encodes it (`marker_ids`): a Hugging Face tokenizer (no special tokens), or a DataModule's tokenizer
        (`lightning_rlm.data`: a text it cannot encode is a clear error); None: zeros (a checkpoint's weights replace them). `layout`: the
        thought layout knobs (`use_residual`, `add_last_context_token`, ...) and `end_init_prob`; `reasoner`: a
        separate reasoner (also set to training mode)."""
        init = None
        if tokenizer is not None:
            embedding = lm.get_input_embeddings().weight  # [V, D]
            ids = marker_ids(tokenizer, init_text, embedding.shape[0])
            init = embedding[torch.tensor(ids)].detach().float().mean(0)  # [D]
        lm.train()
        if reasoner is not None:
            reasoner.train()
        return cls(lm, init, embedding_grad_scale, mixing_head, reasoner=reasoner, **layout)

    # ----- pieces ---------------------------------------------------------------------------------------
    def marker(self, which: Literal["start", "end"]) -> Tensor:
        p = self.end_param if which == "end" and self.different_eot else self.start_param
        dtype = self.lm.get_input_embeddings().weight.dtype
        return (p * self.embedding_grad_scale).to(dtype)  # [D]

    def embed(self, ids: Tensor, lm: Optional[nn.Module] = None) -> Tensor:
        return (lm or self.lm).get_input_embeddings()(ids)

    def _forward(self, embeds: Tensor, position_ids: Tensor, lm: Optional[nn.Module] = None) -> tuple[Tensor, Tensor]:
        """The LM (or `lm`, e.g. the reasoner) over embeddings [N, T, D] → logits [N, T, V], final hidden states
        [N, T, D]."""
        out = (lm or self.lm)(inputs_embeds=embeds, position_ids=position_ids, output_hidden_states=True,
                              use_cache=False)
        return out.logits, out.hidden_states[-1]

    def mix(self, base_logits: Tensor, base_hidden: Tensor, post_logits: Tensor, post_hidden: Tensor,
            ) -> tuple[Tensor, Optional[Tensor]]:
        """Mixed logits and the weight; base tensors broadcast against the post ones ([..., V], [..., D])."""
        if self.mixing_head is None:
            return post_logits, None
        w = self.mixing_head(torch.cat([base_hidden.expand_as(post_hidden), post_hidden], dim=-1))  # [..., 1]
        if self.mixing == "sigmoid":
            w = torch.sigmoid(w)
        return base_logits + w * (post_logits - base_logits), w

    def step_logprobs(self, logits: Tensor, hidden: Tensor, temperature: float) -> Tensor:
        """log pi over a thought's next step, float32: [..., V] (the tempered tokens), or with variable_len
        [..., V + 1], the last entry the end of thought (module docstring). logits [..., V], hidden [..., D]."""
        logp = (logits.float() / temperature).log_softmax(-1)
        if self.end_head is None:
            return logp
        a = self.end_head(hidden).float()  # [..., 1]
        return torch.cat([logp + F.logsigmoid(-a), F.logsigmoid(a)], dim=-1)

    def layout(self) -> dict[str, bool]:
        """The thought layout knobs (constructor arguments of the same names)."""
        return {"use_residual": self.use_residual, "add_last_context_token": self.add_last_context_token,
                "increment_pos_id_for_last_context_token": self.increment_pos_id_for_last_context_token,
                "different_eot": self.different_eot, "variable_len": self.variable_len}

    # ----- export ---------------------------------------------------------------------------------------
    def thought_state(self) -> dict[str, Any]:
        """What is not part of the LM, on the CPU: the markers as stored (``start_param``, ``end_param``; used
        multiplied by ``embedding_grad_scale``, see `marker`), the mixing kind, the mixing head's weights and
        the thought layout knobs (``layout``), with variable_len the end-of-thought head (``end_head``), and a
        separate reasoner's config and weights (``reasoner``)."""
        head = self.mixing_head
        return {"start_param": self.start_param.detach().cpu().clone(),
                "end_param": self.end_param.detach().cpu().clone(),
                "embedding_grad_scale": float(self.embedding_grad_scale), "mixing": self.mixing,
                "layout": self.layout(),
                "mixing_head": None if head is None else {k: v.detach().cpu().clone()
                                                          for k, v in head.state_dict().items()},
                "end_head": None if self.end_head is None else {k: v.detach().cpu().clone()
                                                                for k, v in self.end_head.state_dict().items()},
                "reasoner": None if self.reasoner is None else {  # its architecture is the LM's (a copy)
                    "config": self.reasoner.config.to_dict(),
                    "state_dict": {k: v.detach().cpu().clone() for k, v in self.reasoner.state_dict().items()}}}

    def exportable(self, tokenizer: Any = None, **thinking: Any) -> ExportableLM:
        """What `lightning-rlm export` writes: the LM (the base path, no thoughts) with `tokenizer` (None: the
        run's), and beside it `THOUGHTS_FILE`: `thought_state` plus the thinking settings `thinking` (e.g.
        n_ahead, n_talk, engine, thought_temperature) under "thinking"; `from_export` reads it back."""
        extras = {THOUGHTS_FILE: {**self.thought_state(), "thinking": thinking}}
        return ExportableLM(self.lm, tokenizer, extras=extras,
                            description=f"the LM (base path); thought markers and mixing head in {THOUGHTS_FILE}")

    @classmethod
    def from_export(cls, directory: str | os.PathLike, **from_pretrained_kwargs: Any) -> QuietStarLM:
        """The model of an exported folder: the LM (`AutoModelForCausalLM.from_pretrained(directory, ...)`) and
        the markers and mixing head of its `quiet_star.pt`."""
        from transformers import AutoModelForCausalLM

        state = torch.load(Path(directory) / THOUGHTS_FILE, map_location="cpu", weights_only=True)
        lm = AutoModelForCausalLM.from_pretrained(str(directory), **from_pretrained_kwargs)
        reasoner = None
        if state.get("reasoner") is not None:  # a second LM of the saved config, with its saved weights
            from transformers import AutoConfig

            saved = dict(state["reasoner"]["config"])
            config = AutoConfig.for_model(saved.pop("model_type"), **saved)
            reasoner = AutoModelForCausalLM.from_config(config)
            reasoner.load_state_dict(state["reasoner"]["state_dict"])
            reasoner.to(device=lm.device, dtype=lm.dtype)
        net = cls(lm, None, state["embedding_grad_scale"], state["mixing"], reasoner=reasoner,
                  **state.get("layout", {}))
        with torch.no_grad():
            net.start_param.copy_(state["start_param"])
            net.end_param.copy_(state["end_param"])
        if net.mixing_head is not None:
            net.mixing_head.load_state_dict(state["mixing_head"])
        if net.end_head is not None:
            net.end_head.load_state_dict(state["end_head"])
        return net.to(lm.device)

    def check_positions(self, length: int) -> None:
        """Absolute position embeddings (GPT-2) end at the model's size: say so before any forward."""
        limit = getattr(self.lm.config, "n_positions", None)
        if getattr(self.lm.config, "model_type", None) == "gpt2" and limit is not None and length > limit:
            raise ValueError(f"window + thought needs {length} positions but the model has n_positions={limit}; "
                             "shorten block_size, n_ahead or n_talk")

    # ----- training forward -----------------------------------------------------------------------------
    def plain_logits(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The LM alone, no thoughts: next-token logits [B, L, V] of input_ids [B, L]; with `attention_mask`
        [B, L] padding is masked and position ids count real tokens, as in `think`."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask,
                                                    "position_ids": position_ids_from_mask(attention_mask)}
        return self.lm(input_ids=input_ids, **kwargs).logits

    def think(self, input_ids: Tensor, positions: Tensor, n_ahead: int, n_talk: int, passes: int = 1,
              engine: Engine = "diagonal", temperature: float = 1.0, generator: Optional[torch.Generator] = None,
              thought_tokens: Optional[Tensor] = None, null_thought: bool = False,
              attention_mask: Optional[Tensor] = None, entropy_grad: bool = False) -> ThinkOutput:
        """Thoughts at `positions` [Lq] of windows `input_ids` [B, L]; see the module docstring.

        `thought_tokens` [B * passes, Lq, n_ahead - 2] replaces sampling (tests use it to run both engines
        on the same thoughts; with variable_len the end id V ends a thought, and what follows it is ignored).
        `null_thought` also scores an empty thought (<sot><eot>) without a graph. `entropy_grad`: the thought
        entropies keep their graph (for an entropy bonus).
        `attention_mask` [B, L] (1 real, 0 padding, left or right): padding is never attended, by the window
        or by the thoughts, and position ids count real tokens only, so a row's outputs at its real positions
        do not depend on its padding. Outputs at padding positions are finite but meaningless (the caller
        gives them no weight). None, or all ones, is the unpadded computation.
        """
        if n_ahead < 2 or n_talk < 1 or passes < 1:
            raise ValueError(f"need n_ahead >= 2 (it counts both markers), n_talk >= 1, passes >= 1; "
                             f"got {n_ahead}, {n_talk}, {passes}")
        B, L = input_ids.shape
        M, J, P = n_ahead - 2, n_talk, passes
        N, Lq = B * P, positions.numel()
        self.check_positions(L + n_ahead + n_talk)
        dev = input_ids.device
        positions = positions.to(dev)
        key_mask: Optional[Tensor] = None  # [B, L] bool, None: every token is real
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, L)}")
            attention_mask = attention_mask.to(dev)
            if not bool(attention_mask.all()):  # all ones: the unpadded (is_causal) path, bit for bit
                key_mask = attention_mask.bool()
        if key_mask is None:
            base_pos = torch.arange(L, device=dev)[None].expand(B, L)  # [B, L]
        else:
            base_pos = position_ids_from_mask(key_mask)  # [B, L] real tokens counted, padding not
        # the position id of each thinking position t, per thought row: the thought continues from it
        think_pos = base_pos[:, positions].repeat_interleave(P, dim=0)  # [N, Lq]
        state = ThoughtAttentionState(engine, positions, P, key_mask)
        variable = self.variable_len and M > 0
        with use_thought_attention(self.lm, state):
            base_logits, base_hidden = self._forward(self.embed(input_ids), base_pos)
            state.mode = "thought"
            start = self.marker("start").expand(N, Lq, -1)  # [N, Lq, D]
            if self.reasoner is None:  # the LM thinks: the sampling steps are its own thought steps
                th = self._sample(self.lm, state, start, think_pos, M, temperature, generator, thought_tokens,
                                  entropy_grad)
                last = th["last"]
            else:  # the reasoner samples in its own attention; then the base reads <sot> z_1 .. z_{M-1}
                rstate = ThoughtAttentionState(engine, positions, P, key_mask)
                with use_thought_attention(self.reasoner, rstate):
                    self._forward(self.embed(input_ids, self.reasoner), base_pos, self.reasoner)  # its context
                    rstate.mode = "thought"
                    th = self._sample(self.reasoner, rstate, start, think_pos, M, temperature, generator,
                                      thought_tokens, entropy_grad)
                if M:
                    V = self.lm.get_input_embeddings().weight.shape[0]
                    toks = torch.stack(th["toks"], -1).clamp(max=V - 1)  # [N, Lq, M]
                    if variable:
                        state.add_steps(torch.stack(th["sampled"], -1))  # step i is in the thought iff sampled
                    inputs = torch.cat([start[:, :, None], self.embed(toks[..., :-1])], dim=2)  # [N, Lq, M, D]
                    pos = think_pos[:, :, None] + 1 + torch.arange(M, device=dev)  # [N, Lq, M]
                    self._forward(inputs.reshape(N, Lq * M, -1), pos.reshape(N, -1))
                    last = self.embed(toks[..., -1])  # [N, Lq, D] z_M
                else:
                    last = start
            toks, logps, ents, sampled = th["toks"], th["logps"], th["ents"], th["sampled"]
            ended, lengths = th["ended"], th["lengths"]
            if variable:  # the final block: its first step (z_M) is in the thought only if it never ended
                S = J + 1 + int(self.add_last_context_token)
                rest = torch.ones(N, Lq, S - 1, dtype=torch.bool, device=dev)
                state.add_steps(torch.cat([~ended[..., None], rest], dim=-1))  # [N, Lq, S]
            post_logits, post_hidden, eot_logits = self._final_block(input_ids, positions, think_pos, last, M, J, P,
                                                                     lengths if variable else None)
            null_logits = None
            if null_thought:
                with torch.no_grad(), use_thought_attention(self.lm, state.fork(passes=1)):
                    start = self.marker("start").expand(B, Lq, -1)
                    null_post, null_hidden, _ = self._final_block(input_ids, positions, think_pos[::P], start, 0,
                                                                  J, 1)
        # the base prediction of x_{t+1+j} comes from position t + j
        talk_index = positions[:, None] + torch.arange(J, device=dev)  # [Lq, J]
        talk_valid = talk_index < L
        talk_index = talk_index.clamp(max=L - 1)
        base_l = base_logits[:, talk_index][:, None]  # [B, 1, Lq, J, V]
        base_h = base_hidden[:, talk_index][:, None]
        V = post_logits.shape[-1]
        if self.use_residual:  # the thought's prediction is a residual on the base one
            post_logits = (base_l + post_logits.view(B, P, Lq, J, V)).view(N, Lq, J, V)
            if null_thought:
                null_post = base_l[:, 0] + null_post
        talk, w = self.mix(base_l, base_h, post_logits.view(B, P, Lq, J, V), post_hidden.view(B, P, Lq, J, -1))
        if null_thought:
            null_logits, _ = self.mix(base_l[:, 0], base_h[:, 0], null_post, null_hidden)
            null_logits = null_logits.detach()
        empty = input_ids.new_zeros(N, Lq, 0)
        return ThinkOutput(
            base_logits=base_logits, talk_logits=talk.reshape(N, Lq, J, V), post_logits=post_logits,
            mix_weight=None if w is None else w.reshape(N, Lq, J, 1), talk_index=talk_index,
            talk_valid=talk_valid,
            thought_tokens=torch.stack(toks, -1) if toks else empty,
            thought_logprob=torch.stack(logps, -1) if logps else empty.float(),
            thought_entropy=torch.stack(ents, -1) if ents else empty.float(),
            null_talk_logits=null_logits, null_post_logits=null_post.detach() if null_thought else None,
            eot_logits=eot_logits, thought_lengths=lengths,
            thought_step_mask=torch.stack(sampled, -1) if sampled else empty.bool(),
            thought_unfinished=~ended if variable else torch.zeros_like(ended),
        )

    def _sample(self, lm: nn.Module, state: ThoughtAttentionState, start: Tensor, think_pos: Tensor, M: int,
                temperature: float, generator: Optional[torch.Generator], thought_tokens: Optional[Tensor],
                entropy_grad: bool) -> dict[str, Any]:
        """The M sampling steps of every thought with `lm` (the LM itself or the reasoner) inside its thought
        attention `state`: step i feeds <sot> (i = 0) or z_i at think_pos + 1 + i and picks z_{i+1} (or, with
        variable_len, the end of thought, id V). Returns per step lists of [N, Lq] tensors: "toks" (V from a
        thought's end on), "logps" (log pi of the pick, 0 after the end), "ents" (entropy, 0 after the end),
        "sampled" (bool: the step was taken); "lengths" [N, Lq], "ended" [N, Lq] (the end was sampled), and
        "last", the embedding [N, Lq, D] of z_M (the final block's first input; <sot> when M = 0)."""
        N, Lq, _ = start.shape
        dev = start.device
        variable = self.variable_len and M > 0
        V = lm.get_input_embeddings().weight.shape[0]
        cur = start
        ended = torch.zeros(N, Lq, dtype=torch.bool, device=dev)  # the thought ended before this step
        lengths = torch.full((N, Lq), M, dtype=torch.long, device=dev)
        toks, logps, ents, sampled = [], [], [], []
        for i in range(M):
            if variable:  # step i's input (<sot>, or z_i) is in its thought unless the thought has ended
                state.add_steps(~ended[..., None])  # [N, Lq, 1]
            logits, hidden = self._forward(cur, think_pos + 1 + i, lm)  # [N, Lq, V]
            logp = self.step_logprobs(logits, hidden, temperature)  # [N, Lq, V (+1)]
            if thought_tokens is None:
                tok = sample_categorical(logp.detach().exp().reshape(N * Lq, -1), generator).view(N, Lq)
            else:
                tok = thought_tokens[:, :, i].to(dev)
            step_logp = logp.gather(-1, tok[..., None]).squeeze(-1)  # [N, Lq]
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = -(logp.exp() * logp).sum(-1)  # [N, Lq]
            active = ~ended
            if variable:  # steps after the end are not sampled: no log-prob, no entropy, token V
                stop = active & (tok == V)
                lengths = torch.where(stop, i, lengths)
                step_logp = torch.where(active, step_logp, torch.zeros_like(step_logp))
                ent = torch.where(active, ent, torch.zeros_like(ent))
                tok = torch.where(active & ~stop, tok, torch.full_like(tok, V))
                ended = ended | stop
            toks.append(tok)
            logps.append(step_logp)
            ents.append(ent)
            sampled.append(active)
            cur = self.embed(tok.clamp(max=V - 1) if variable else tok, lm)  # after the end: any token, hidden
        return {"toks": toks, "logps": logps, "ents": ents, "sampled": sampled, "lengths": lengths, "ended": ended,
                "last": cur}

    def _final_block(self, input_ids: Tensor, positions: Tensor, think_pos: Tensor, last: Tensor, M: int, J: int,
                     P: int, lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """One forward of [last thought input, <eot>, x_{t+1} .. x_{t+J-1}] per position, with
        add_last_context_token [last thought input, <eot>, x_t, x_{t+1} .. x_{t+J-1}]; `think_pos` [N, Lq] is the
        position id of each row's t, the block's ids are think_pos + `final_block_offsets`. Returns the outputs
        predicting the J talk targets: logits [N, Lq, J, V], hidden [N, Lq, J, D]; and with
        add_last_context_token the logits at <eot> [N, Lq, V] (its prediction of x_t; else None). `lengths`
        [N, Lq] (variable_len): each thought's length; <eot> and every id after the thought move back by M - len."""
        B, L = input_ids.shape
        N, Lq, D = last.shape
        dev = input_ids.device
        R = int(self.add_last_context_token)  # 1: x_t is fed again after <eot>
        S = J + 1 + R  # block steps
        talk_at = (positions[:, None] + torch.arange(1 - R, J, device=dev)).clamp(max=L - 1)  # [Lq, J-1+R]
        talk = self.embed(input_ids[:, talk_at]).repeat_interleave(P, dim=0)  # [N, Lq, J-1+R, D]
        end = self.marker("end").expand(N, Lq, 1, D)
        block = torch.cat([last[:, :, None], end, talk], dim=2)  # [N, Lq, S, D]
        offsets = final_block_offsets(M, J, self.add_last_context_token,
                                      self.increment_pos_id_for_last_context_token).to(dev)  # [S]
        pos = think_pos[:, :, None] + offsets  # [N, Lq, S]
        if lengths is not None:  # a thought of len < M tokens: <eot> at p_t + len + 2, and on from there
            pos = pos + (offsets > M + 1) * (lengths - M)[:, :, None]
        logits, hidden = self._forward(block.reshape(N, Lq * S, D), pos.reshape(N, -1))
        logits = logits.view(N, Lq, S, -1)
        hidden = hidden.view(N, Lq, S, -1)
        eot_logits = logits[:, :, 1] if R else None  # [N, Lq, V]
        return logits[:, :, 1 + R:], hidden[:, :, 1 + R:], eot_logits

    # ----- thinking generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
                 n_ahead: int = 8, temperature: float = 1.0, thought_temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None,
                 eos_token_id: Optional[int | list[int]] = None, pad_token_id: int = 0, return_thoughts: bool = False, output_logits: bool = False,
                 use_cache: bool = True, static_cache: bool = True) -> ThinkingGeneration:
        """Think before every token. `input_ids` [B, T0] left-padded (`attention_mask` marks real tokens).

        temperature 0 picks the most likely token (thoughts are still sampled at `thought_temperature`).
        Thoughts are hidden unless `return_thoughts`; rows stop at `eos_token_id` (an id or a list of stop ids;
        pad after it). The thought layout knobs apply as in `think` (with add_last_context_token the last token
        of the text so far goes in again after <eot>, and the token is sampled from its output).
        """
        if n_ahead < 2 or max_new_tokens < 1 or temperature < 0 or thought_temperature <= 0:
            raise ValueError(f"need n_ahead >= 2, max_new_tokens >= 1, temperature >= 0, thought_temperature > 0; "
                             f"got {n_ahead}, {max_new_tokens}, {temperature}, {thought_temperature}")
        B, T0 = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if not bool(mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every row")
        M = n_ahead - 2
        V = self.lm.get_input_embeddings().weight.shape[0]  # variable_len: the end-of-thought id
        self.check_positions(T0 + max_new_tokens + n_ahead)
        stops = None if eos_token_id is None else torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
        decoder = _make_decoder(self.lm, B, T0 + max_new_tokens + n_ahead + 1, use_cache, static_cache)
        pos = position_ids_from_mask(mask)  # [B, T0]
        base_l, base_h = decoder.prefill(input_ids, pos, mask)
        sampler = decoder  # the decoder the thoughts are sampled from: the LM's, or the reasoner's own
        if self.reasoner is not None:
            sampler = _make_decoder(self.reasoner, B, T0 + max_new_tokens + n_ahead + 1, use_cache, static_cache)
            sampler.prefill(input_ids, pos, mask)
        lm_t = self.lm if self.reasoner is None else self.reasoner
        next_pos = pos[:, -1] + 1  # [B] position of the next token; its thought starts one later
        last_tok = input_ids[:, -1]  # [B] the last token of the text so far (left padding: always real)
        # [3] add_last_context_token: offsets (from next_pos) of [last thought input, <eot>, the re-fed token]
        refeed = final_block_offsets(M, 1, True, self.increment_pos_id_for_last_context_token).to(input_ids.device) - 1
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        start, end = self.marker("start").expand(B, 1, -1), self.marker("end").expand(B, 1, -1)  # [B, 1, D]
        arange = torch.arange(3, device=input_ids.device)
        tokens, thoughts, all_logits = [], [], []
        tok: Optional[Tensor] = None  # the token sampled last, not yet in the cache
        for _ in range(max_new_tokens):
            # <sot> goes in with the token just sampled (one forward for both), at the token's position + 1
            if tok is None:
                logits, hidden = decoder.extend(start, next_pos[:, None])
            else:
                chunk = torch.cat([self.embed(tok)[:, None], start], dim=1)  # [B, 2, D]
                out_l, out_h = decoder.extend(chunk, (next_pos - 1)[:, None] + arange[:2], n_last=2)
                base_l, base_h, logits, hidden = out_l[:, 0], out_h[:, 0], out_l[:, 1], out_h[:, 1]
            fork = decoder.length - 1  # the thought's first slot: rolled back after the thought
            if sampler is not decoder:  # the reasoner reads the token and <sot> too, and samples from there
                chunk = start if tok is None else torch.cat([self.embed(tok, self.reasoner)[:, None], start], dim=1)
                logits, hidden = sampler.extend(chunk, (next_pos - chunk.shape[1] + 1)[:, None] + arange[:chunk.shape[1]])
            sampler_fork = sampler.length - 1
            zs = []
            ended = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # variable_len: the thought ended
            length = torch.full((B,), M, dtype=torch.long, device=input_ids.device)
            for i in range(M):
                if self.end_head is None:
                    z = sample_categorical((logits.float() / thought_temperature).softmax(-1), generator)  # [B]
                else:  # a token or the end of thought (id V); after the end the row's slots are masked
                    z = sample_categorical(self.step_logprobs(logits, hidden, thought_temperature).exp(), generator)
                    stop = ~ended & (z == V)
                    length = torch.where(stop, i, length)
                    ended = ended | stop
                    z = torch.where(ended, torch.full_like(z, V), z)
                zs.append(z)
                if i < M - 1:
                    logits, hidden = sampler.extend(self.embed(z.clamp(max=V - 1), lm_t)[:, None],
                                                    (next_pos + 1 + i)[:, None], valid=~ended[:, None])
            if sampler is not decoder:  # the base reads z_1 .. z_{M-1} (after its <sot>) in one forward
                sampler.rollback(sampler_fork)
                if M > 1:
                    zs_in = torch.stack(zs[:-1], 1)  # [B, M-1]
                    valid = zs_in != V  # [B, M-1] z_i is in the thought (the end id runs to its last step)
                    decoder.extend(self.embed(zs_in.clamp(max=V - 1)), (next_pos + 1)[:, None] + torch.arange(
                        M - 1, device=input_ids.device), valid=valid)
            # variable_len: <eot> (and the re-fed token's incremented id) move back by M - length, and the slot
            # of the last thought token is masked when the thought ended before it
            back = (length - M)[:, None]  # [B, 1] (0 for fixed-length thoughts)
            if self.add_last_context_token:  # [last thought token, <eot>, last context token] in one forward
                block = torch.cat([end, self.embed(last_tok)[:, None]], dim=1)  # [B, 2, D]
                block_pos = next_pos[:, None] + refeed[1:] + (refeed[1:] > M) * back  # [B, 2]
                valid = None
                if M:
                    block = torch.cat([self.embed(zs[-1].clamp(max=V - 1))[:, None], block], dim=1)  # [B, 3, D]
                    block_pos = next_pos[:, None] + refeed + (refeed > M) * back
                    valid = torch.cat([~ended[:, None], ended.new_ones(B, 2)], dim=1)
                post_l, post_h = decoder.extend(block, block_pos, valid=valid)
            elif M:  # the last thought token and <eot> in one forward
                block = torch.cat([self.embed(zs[-1].clamp(max=V - 1))[:, None], end], dim=1)
                block_pos = (next_pos + M)[:, None] + arange[:2] + torch.cat([torch.zeros_like(back), back], dim=1)
                post_l, post_h = decoder.extend(block, block_pos, valid=torch.cat([~ended[:, None],
                                                                                  ended.new_ones(B, 1)], dim=1))
            else:
                post_l, post_h = decoder.extend(end, (next_pos + 1)[:, None])
            decoder.rollback(fork)
            if self.use_residual:
                post_l = base_l + post_l
            mixed, _ = self.mix(base_l, base_h, post_l, post_h)  # [B, V]
            mixed = mixed.float()
            if temperature == 0:
                tok = mixed.argmax(-1)
            else:
                tok = sample_categorical((mixed / temperature).softmax(-1), generator)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            last_tok = tok
            tokens.append(tok)
            thoughts.append(torch.stack(zs, -1) if zs else tok.new_zeros(B, 0))
            all_logits.append(mixed)
            next_pos = next_pos + 1
            if stops is not None:
                finished = finished | torch.isin(tok, stops)
                if bool(finished.all()):
                    break
        return ThinkingGeneration(
            tokens=torch.stack(tokens, 1),
            thoughts=torch.stack(thoughts, 1) if return_thoughts else None,
            logits=torch.stack(all_logits, 1) if output_logits else None,
        )


def check_thought_layout(*, use_reasoner: bool, use_residual: bool, add_last_context_token: bool,
                         increment_pos_id_for_last_context_token: bool, different_eot: bool,
                         add_surogate_loss_to_last_context_token: bool, last_context_loss_beta: float,
                         variable_len: bool = False) -> None:
    """The combinations of seed 001's thought layout knobs that mean something; a ValueError names the value
    and what it needs otherwise (the CLI prints it as a one-line error)."""
    if increment_pos_id_for_last_context_token and not add_last_context_token:
        raise ValueError("increment_pos_id_for_last_context_token=True sets the position id of the re-fed last "
                         "context token: it needs add_last_context_token=True")
    if add_surogate_loss_to_last_context_token and not add_last_context_token:
        raise ValueError("add_surogate_loss_to_last_context_token=True is a loss on the re-fed last context token: "
                         "it needs add_last_context_token=True")
    if last_context_loss_beta < 0:
        raise ValueError(f"last_context_loss_beta must be >= 0, got {last_context_loss_beta}")
    if last_context_loss_beta != 0 and not add_surogate_loss_to_last_context_token:
        raise ValueError(f"last_context_loss_beta={last_context_loss_beta} weights the surrogate loss on the last "
                         "context token: it needs add_surogate_loss_to_last_context_token=True (and "
                         "add_last_context_token=True), or last_context_loss_beta=0")
    if not use_reasoner:
        on = [name for name, value in (("use_residual", use_residual), ("add_last_context_token", add_last_context_token),
                                       ("different_eot=False", not different_eot),
                                       ("variable_len", variable_len)) if value]
        if on:
            raise ValueError(f"{', '.join(on)} change the thoughts, but use_reasoner=False trains without thoughts: "
                             "expected use_reasoner=True or the defaults")


def final_block_offsets(M: int, J: int, add_last_context_token: bool = False,
                        increment_pos_id_for_last_context_token: bool = False) -> Tensor:
    """Position ids, relative to the thinking position's own id p_t, of the last forward of a thought:
    [last thought input (z_M, or <sot> when M = 0), <eot>, (re-fed x_t,) x_{t+1} .. x_{t+J-1}] (long, on the CPU).
    The thought before it is at 1 (<sot>), 2 .. M + 1 (z_1 .. z_M); see the module docstring.

    >>> final_block_offsets(2, 3).tolist()  # z_2, <eot>, x_{t+1}, x_{t+2}
    [3, 4, 5, 6]
    >>> final_block_offsets(2, 3, True).tolist()  # z_2, <eot>, x_t, x_{t+1}, x_{t+2}: the text's own ids
    [3, 4, 0, 1, 2]
    >>> final_block_offsets(2, 3, True, True).tolist()  # ... continuing after <eot>
    [3, 4, 5, 6, 7]
    """
    if increment_pos_id_for_last_context_token and not add_last_context_token:
        raise ValueError("increment_pos_id_for_last_context_token needs add_last_context_token")
    thought = torch.tensor([M + 1, M + 2])  # the last thought input and <eot>
    if not add_last_context_token:
        return torch.cat([thought, M + 3 + torch.arange(J - 1)])
    if increment_pos_id_for_last_context_token:
        return torch.cat([thought, M + 3 + torch.arange(J)])
    return torch.cat([thought, torch.arange(J)])


# ----- what the training method feeds the model: marker start values, thinking positions --------------------
def marker_ids(tokenizer: Any, text: str, vocab_size: int) -> list[int]:
    """The token ids of `text` (the markers' start text, the paper's "---") as `tokenizer` encodes it: a Hugging
    Face tokenizer (no special tokens) or a DataModule's (`lightning_rlm.data`). A text it cannot encode
    (nothing, or only its unknown token) is a clear error naming it, and so is an id outside `vocab_size`."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        ids, unk_id = tokenizer.encode(text, add_special_tokens=False), tokenizer.unk_token_id
    else:
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:  # e.g. a char vocabulary without '-'
            raise ValueError(f"thought_init_text {text!r} cannot be encoded by the DataModule's tokenizer "
                             f"({e}); set model.init_args.thought_init_text to a text it can encode") from None
        unk_id = getattr(getattr(tokenizer, "hf", None), "unk_token_id", None)
    if not ids or (unk_id is not None and all(i == unk_id for i in ids)):
        raise ValueError(f"thought_init_text {text!r} encodes to no known token with this tokenizer "
                         f"(ids {ids}); set model.init_args.thought_init_text to a text it can encode")
    if max(ids) >= vocab_size:
        raise ValueError(f"thought_init_text {text!r} has token id {max(ids)} outside the model's vocab "
                         f"{vocab_size}: the tokenizer does not belong to this model")
    return ids


def thinking_positions(length: int, every: int = 1, count: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, real: Optional[Tensor] = None) -> Tensor:
    """[Lq] positions to think at in a window of `length` tokens, on the CPU: 0, every, 2 * every, ..., and of
    those `count` drawn with `generator` (sorted; None: all). `real` [length] bool: the columns that hold a
    real token in some row of the batch; the others (padding in every row) are never picked, unless no
    column is real (then every weight is 0 anyway).

    >>> thinking_positions(10, 2, real=torch.arange(10) >= 3).tolist()
    [4, 6, 8]
    """
    pos = torch.arange(0, length, every)
    if real is not None:
        keep = real.cpu()[pos]
        if bool(keep.any()):
            pos = pos[keep]
    if count is not None and count < pos.numel():
        pick = torch.randperm(pos.numel(), generator=generator, device=generator.device if generator else None)
        pos = pos[pick[:count].cpu()].sort().values
    return pos


class ThinkingCausalLM(nn.Module):
    """A :class:`QuietStarLM` behind the two calls of a Hugging Face causal LM that downstream evaluation makes
    (:mod:`lightning_rlm.tasks.evaluate`), so tasks score the model *with* thoughts:

    * ``generate(input_ids, attention_mask, generation_config)``: :meth:`QuietStarLM.generate`, a thought
      before every token, the token picked greedily from the mixed logits (thoughts sampled at
      `thought_temperature` from a generator seeded with `seed` at every call), stopping at the config's EOS
      ids; returns ``[B, P + new]`` like HF;
    * ``forward(input_ids, attention_mask, logits_to_keep=k).logits``: ``[B, k, V]`` thought-mixed next-token
      logits at the last k positions (one thought each, n_talk = 1), so a choice's log-likelihood is taken
      under the thinking model. No KV cache (``use_cache=True`` raises NotImplementedError, and evaluation
      scores one full row per choice).
    """

    def __init__(self, net: QuietStarLM, n_ahead: int, engine: Engine = "diagonal",
                 thought_temperature: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.net = net
        self.n_ahead, self.engine, self.thought_temperature, self.seed = n_ahead, engine, thought_temperature, seed
        self.train(net.training)  # evaluation restores this flag afterwards: keep the wrapped model's

    @property
    def generation_config(self) -> Any:
        return getattr(self.net.lm, "generation_config", None)

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device).manual_seed(self.seed)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, logits_to_keep: int = 0,
                use_cache: bool = False, **_: Any) -> SimpleNamespace:
        if use_cache:
            raise NotImplementedError("ThinkingCausalLM keeps no KV cache")
        L = input_ids.shape[1]
        keep = logits_to_keep or L
        positions = torch.arange(L - keep, L, device=input_ids.device)  # [k]
        out = self.net.think(input_ids, positions, self.n_ahead, n_talk=1, engine=self.engine,
                             temperature=self.thought_temperature, generator=self._generator(input_ids.device),
                             attention_mask=attention_mask)
        return SimpleNamespace(logits=out.talk_logits[:, :, 0])  # [B, k, V] mixed, after each thought

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, generation_config: Any = None,
                 **_: Any) -> Tensor:
        cfg = generation_config
        gen = self.net.generate(input_ids, attention_mask, max_new_tokens=cfg.max_new_tokens, n_ahead=self.n_ahead,
                                temperature=0.0, thought_temperature=self.thought_temperature,
                                generator=self._generator(input_ids.device), eos_token_id=cfg.eos_token_id,
                                pad_token_id=cfg.pad_token_id)
        return torch.cat([input_ids, gen.tokens], dim=1)  # [B, P + new]


# ----- decoders for generation: prefill, extend by embeddings, roll back -------------------------------------
class _StaticDecoder:
    """`StaticCacheDecoder` slots: rolling back is forgetting slots (the next write reuses them)."""

    def __init__(self, static: StaticCacheDecoder) -> None:
        self.static = static
        self.mask: Optional[Tensor] = None  # [B, S] real-token mask of the slots in use

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def prefill(self, ids: Tensor, pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        self.mask = mask
        return self.static.step(ids, pos, mask, return_hidden=True)

    def extend(self, embeds: Tensor, pos: Tensor, n_last: int = 1, valid: Optional[Tensor] = None,
               ) -> tuple[Tensor, Tensor]:
        """Append `embeds` [B, T, D] at position ids `pos` [B, T]; `valid` [B, T] bool: slots later inputs may
        see (None: all; a masked slot is a variable-length thought's unused step)."""
        new = self.mask.new_ones(embeds.shape[0], embeds.shape[1]) if valid is None else valid.to(self.mask.dtype)
        self.mask = torch.cat([self.mask, new], dim=1)
        return self.static.step(None, pos, self.mask, inputs_embeds=embeds, return_hidden=True, n_last=n_last)

    def rollback(self, length: int) -> None:
        self.mask = self.mask[:, :length]


class _HFDecoder:
    """HF `DynamicCache` (any model) with `crop` for roll back; or, without a cache, the whole sequence
    recomputed on every call (the baseline that `generate(use_cache=False)` measures)."""

    def __init__(self, lm: nn.Module, use_cache: bool) -> None:
        self.lm = lm
        self.use_cache = use_cache
        self.cache = None
        self.embeds: Optional[Tensor] = None  # without a cache: every input so far [B, S, D]
        self.pos: Optional[Tensor] = None
        self.mask: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def _run(self, embeds: Tensor, pos: Tensor, n_last: int = 1) -> tuple[Tensor, Tensor]:
        out = self.lm(inputs_embeds=embeds, position_ids=pos, attention_mask=self.mask, cache=self.cache,
                      use_cache=self.use_cache, output_hidden_states=True, logits_to_keep=n_last)
        if n_last == 1:
            return out.logits[:, -1], out.hidden_states[-1][:, -1]
        return out.logits[:, -n_last:], out.hidden_states[-1][:, -n_last:]

    def prefill(self, ids: Tensor, pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        from transformers import DynamicCache

        embeds = self.lm.get_input_embeddings()(ids)
        self.mask = mask
        if self.use_cache:
            self.cache = DynamicCache(config=self.lm.config)
            return self._run(embeds, pos)
        self.embeds, self.pos = embeds, pos
        return self._run(embeds, pos)

    def extend(self, embeds: Tensor, pos: Tensor, n_last: int = 1, valid: Optional[Tensor] = None,
               ) -> tuple[Tensor, Tensor]:
        new = self.mask.new_ones(embeds.shape[0], embeds.shape[1]) if valid is None else valid.to(self.mask.dtype)
        self.mask = torch.cat([self.mask, new], dim=1)
        if self.use_cache:
            return self._run(embeds, pos, n_last)
        self.embeds = torch.cat([self.embeds, embeds], dim=1)
        self.pos = torch.cat([self.pos, pos], dim=1)
        return self._run(self.embeds, self.pos, n_last)

    def rollback(self, length: int) -> None:
        self.mask = self.mask[:, :length]
        if self.use_cache:
            remove = self.cache.get_seq_length() - length
            if remove:
                self.cache.crop(-remove)  # a negative count removes that many (every transformers version)
        else:
            self.embeds, self.pos = self.embeds[:, :length], self.pos[:, :length]


def _make_decoder(lm: nn.Module, rows: int, max_len: int, use_cache: bool, static_cache: bool):
    if use_cache and static_cache:
        static = StaticCacheDecoder.build(lm, rows, max_len)
        if static is not None:
            return _StaticDecoder(static)
    return _HFDecoder(lm, use_cache)
