"""Quiet-STaR on GRUs: a base LM, a reasoner that samples discrete thoughts, an interpreter that reads them.

At every position t of a window:

1. the **base LM** GRU reads x_{<=t} and gives a state h_t [Hb];
2. the **reasoner** GRU reads x_{<=t} too, then samples a thought z_1 .. z_n (token ids of the LM's vocab,
   ended by an extra end-of-thought id `vocab_size`, at most `max_reasoning_len` tokens; a thought that
   reaches the limit gets the end-of-thought token appended without sampling it);
3. the **interpreter** GRU reads x_{<=t}, then z_1 .. z_n and the end-of-thought token; its last state is
   the thought vector v_t [Hi];
4. a head predicts x_{t+1} from h_t and v_t (`combine`).

All positions and all `trice_samples` thoughts per position are decoded together: rows are (b, t, k), so
a thought is a loop over thought steps only, one batched GRU step per step. When the reasoner and the
interpreter share their GRU and embedding their states coincide and are stepped once.

`weight_groups` is a four-letter code over (token embedding, base GRU, reasoner GRU, interpreter GRU).
GRU roles with equal letters are one `StackedGRU` (their hidden sizes must match). A role whose letter
equals the embedding's letter reads the common token embedding; the other roles each get their own
table. "AAAA" is one model that reads, thinks and interprets; "ABCD" has three separate models with
their own embeddings; "BAAA" shares the GRU but gives each role its own embedding.

Departures from Quiet-STaR (Zelikman et al., 2024), which thinks with one transformer in parallel over
positions: here three GRUs with separate hidden sizes can play the roles, the thought has no
start-of-thought token (the reasoner's own head decides the first token from the context state), the
interpreter state replaces "the LM's hidden state after the thought", and the combining heads are the
GRU experiments' (residual logit sum, concatenation MLP, unsquashed or sigmoid mixing weight) rather
than the paper's mixing head over two LM passes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from lightning_rlm.models.decoding import sample_categorical

ROLES = ("base", "reasoner", "interpreter")
GROUP_ROLES = (*ROLES, "heads")  # the keys of `parameter_roles` (and of a method's `parameter_groups`)
Combine = Literal["residual", "concat", "mix", "mix_sigmoid"]


class StackedGRU(nn.Module):
    """Single-layer GRUs stacked. Unlike one multi-layer `nn.GRU` it returns every layer's state at every
    position (a thought continues from the context state at any t) and can step all rows by one token."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layers = nn.ModuleList(
            nn.GRU(input_size if i == 0 else hidden_size, hidden_size, batch_first=True) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, E] -> the states of every layer after every position [n_layers, B, T, H]."""
        states = []
        for layer in self.layers:
            x, _ = layer(x)  # [B, T, H]
            states.append(x)
        return torch.stack(states)

    def step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One token for every row: x [N, E], h [n_layers, N, H] -> [n_layers, N, H]."""
        new = []
        for layer, h_l in zip(self.layers, h):
            # the cell op on the layer's own weights: same numbers as nn.GRU, less overhead per call
            x = torch.gru_cell(x, h_l, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
            new.append(x)
        return torch.stack(new)


def make_head(hidden: int, out: int, linear: bool) -> nn.Module:
    """hidden -> out logits: linear, or an MLP shaped like `GRULanguageModel`'s (so checkpoints load)."""
    if linear:
        return nn.Linear(hidden, out)
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out))


@dataclass
class Thoughts:
    """Sampled thoughts, one row per (b, t, k). Tensors are [N] unless noted."""

    tokens: torch.Tensor  # [N, L] thought ids, end-of-thought id after the end
    lengths: torch.Tensor  # tokens before the end of thought (0: empty thought)
    unfinished: torch.Tensor  # bool: reached max_reasoning_len without sampling the end of thought
    logprob: torch.Tensor  # sum of log pi(z_j) over sampled tokens (a graph only when the reasoner trains)
    entropy: torch.Tensor  # sum of the policy's entropy over sampled steps
    n_sampled: torch.Tensor  # sampled steps (thought tokens plus a sampled end of thought)
    vector: torch.Tensor  # [N, Hi] interpreter state after reading the thought
    entropy_max: torch.Tensor  # largest policy entropy over sampled steps, detached (0 when none sampled)

    def mean_entropy(self) -> torch.Tensor:
        """The policy's entropy averaged over every sampled step of every thought (with `entropy`'s graph)."""
        return self.entropy.sum() / self.n_sampled.sum().clamp(min=1)

    def stats(self) -> dict[str, torch.Tensor]:
        """The thoughts' shape: mean length `thought_len`, fractions `frac_empty` and `frac_unfinished`."""
        return {"thought_len": self.lengths.float().mean(), "frac_empty": (self.lengths == 0).float().mean(),
                "frac_unfinished": self.unfinished.float().mean()}


@dataclass
class QuietStarOutput:
    logits: torch.Tensor  # [J, B, T, K, V]: x_{t+1+j} given the thought at t, j < n_talk (K = 1 without thoughts)
    base_logits: Optional[torch.Tensor]  # [B, T, V]: the base path alone (None without a base LM)
    mix_weight: Optional[torch.Tensor]  # [B, T, K] for the mix heads
    thoughts: Optional[Thoughts]  # None without a reasoner
    null_logits: Optional[torch.Tensor] = None  # [J, B, T, V]: after the empty thought, no graph (null_thought)


class QuietStarGRUNet(nn.Module):
    """Base LM + reasoner + interpreter GRUs and the heads that combine them.

    Args:
        vocab_size: LM vocabulary; thoughts use one more id (`vocab_size` = end of thought).
        embed_dim: token embedding width (None: each role's hidden size).
        base_lm_hidden_dim, reasoner_hidden_dim, interpreter_hidden_dim: GRU widths per role.
        num_layers: stacked GRU layers of every role.
        weight_groups: four letters over (embedding, base, reasoner, interpreter); equal letters share.
        share_lm_head: the base path and the thought path use one output head (`concat` always has one).
        combine: `residual` (logits of the base state plus logits of the projected thought vector: with a
            shared linear head, the vector added to the base state), `concat` (an MLP over [h; v], then the
            head), `mix` ((1-w) base + w thought logits, w from an MLP over [h; v], unsquashed, zero at
            init) or `mix_sigmoid` (w = sigmoid, optionally held near a start value by the method).
        linear_lm_head: linear heads (else hidden -> hidden -> GELU -> out).
        use_reasoner: False builds only the base LM (the NLL baseline).
        use_base_lm: False predicts from the thought vector alone.
        base_dropout: dropout on the base LM's state before every head (training only; 0: none). Seed 001's
            `neuter_dropout_base`: weakens the base path so that the thought path has to carry more.
        detach_interpreter: the thought vector enters the heads detached, so no loss reaches the
            interpreter through it (a GRU or embedding shared with another role still learns from that
            role's path).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: Optional[int] = None,
        base_lm_hidden_dim: int = 32,
        reasoner_hidden_dim: int = 128,
        interpreter_hidden_dim: int = 128,
        num_layers: int = 1,
        weight_groups: str = "ABCD",
        share_lm_head: bool = True,
        combine: Combine = "residual",
        linear_lm_head: bool = True,
        use_reasoner: bool = True,
        use_base_lm: bool = True,
        base_dropout: float = 0.0,
        detach_interpreter: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or num_layers < 1:
            raise ValueError(f"vocab_size and num_layers must be >= 1, got {vocab_size}, {num_layers}")
        if not 0.0 <= base_dropout < 1.0:
            raise ValueError(f"base_dropout must be in [0, 1), got {base_dropout}")
        if base_dropout > 0 and not use_base_lm:
            raise ValueError("base_dropout > 0 needs the base LM (use_base_lm=True)")
        if not (use_reasoner or use_base_lm):
            raise ValueError("use_reasoner=False and use_base_lm=False leave no model to predict with")
        if combine not in ("residual", "concat", "mix", "mix_sigmoid"):
            raise ValueError(f"combine must be residual, concat, mix or mix_sigmoid, got {combine!r}")
        code = weight_groups
        if len(code) != 4 or not code.isalpha() or not code.isupper():
            raise ValueError(f"weight_groups must be 4 capital letters (embedding, base, reasoner, interpreter), "
                             f"got {code!r}")
        self.vocab_size, self.eot_id = vocab_size, vocab_size
        self.use_reasoner, self.use_base_lm, self.combine = use_reasoner, use_base_lm, combine
        self.base_dropout, self.detach_interpreter = base_dropout, detach_interpreter
        self.weight_groups = code
        self.roles = [r for r in ROLES if (r == "base" and use_base_lm) or (r != "base" and use_reasoner)]
        hidden = {"base": base_lm_hidden_dim, "reasoner": reasoner_hidden_dim, "interpreter": interpreter_hidden_dim}
        dim_name = {"base": "base_lm_hidden_dim", "reasoner": "reasoner_hidden_dim",
                    "interpreter": "interpreter_hidden_dim"}
        emb_dim = {r: embed_dim or hidden[r] for r in self.roles}

        def check_equal(roles: list[str], sizes: dict[str, int], what: str, fix: str) -> None:
            if len({sizes[r] for r in roles}) > 1:
                given = ", ".join(f"{dim_name[r]}={hidden[r]}" for r in roles)
                raise ValueError(f"weight_groups={code!r} shares one {what} between {' and '.join(roles)} but "
                                 f"their sizes differ ({given}); {fix}")

        # GRUs: one module per letter among the roles in use
        self.gru_key = {r: code[1 + ROLES.index(r)] for r in self.roles}
        self.grus = nn.ModuleDict()
        for letter in dict.fromkeys(self.gru_key.values()):
            members = [r for r in self.roles if self.gru_key[r] == letter]
            check_equal(members, hidden, "GRU", "use different letters or equal hidden sizes")
            check_equal(members, emb_dim, "GRU", "set embed_dim")
            self.grus[letter] = StackedGRU(emb_dim[members[0]], hidden[members[0]], num_layers)
        # embeddings: the common table for roles with the embedding's letter, a private one for the others
        self.embed_key = {r: "shared" if self.gru_key[r] == code[0] else r for r in self.roles}
        sharing = [r for r in self.roles if self.embed_key[r] == "shared"]
        check_equal(sharing, emb_dim, "token embedding", "set embed_dim")
        self.embeds = nn.ModuleDict()
        for r in self.roles:  # vocab_size + 1 rows: thoughts read the end-of-thought id too
            if self.embed_key[r] not in self.embeds:
                self.embeds[self.embed_key[r]] = nn.Embedding(vocab_size + 1, emb_dim[r])

        # heads: only those the chosen combination uses, so that no parameter is dead weight
        hb, hi = base_lm_hidden_dim, interpreter_hidden_dim
        self.share_lm_head = use_base_lm and (share_lm_head or combine == "concat")  # concat: one head anyway
        if use_base_lm:
            self.lm_head = make_head(hb, vocab_size, linear_lm_head)  # the base path
        if use_reasoner:
            self.policy_head = make_head(reasoner_hidden_dim, vocab_size + 1, linear_lm_head)  # thought tokens
            model_dim = hb if use_base_lm else hi
            if not self.share_lm_head:
                self.thought_lm_head = make_head(model_dim, vocab_size, linear_lm_head)
            if use_base_lm and combine == "concat":
                self.concat_mlp = nn.Sequential(nn.Linear(hb + hi, hb), nn.GELU(), nn.Linear(hb, hb))
            else:  # the thought vector in the head's input space
                self.proj = nn.Linear(hi, model_dim) if use_base_lm else nn.Identity()
            if use_base_lm and combine in ("mix", "mix_sigmoid"):
                self.mix_head = nn.Sequential(nn.Linear(hb + hi, hb), nn.GELU(), nn.Linear(hb, 1))
                # w = 0 (mix) or 0.5 (mix_sigmoid) at init; for `mix` training starts as the base LM
                nn.init.zeros_(self.mix_head[2].weight)
                nn.init.zeros_(self.mix_head[2].bias)

    # ----- modules per role ---------------------------------------------------------------------------------
    def gru(self, role: str) -> StackedGRU:
        return self.grus[self.gru_key[role]]

    def embed(self, role: str) -> nn.Embedding:
        return self.embeds[self.embed_key[role]]

    @property
    def thought_head(self) -> nn.Module:
        """Output head of the thought path (the base LM's head when shared)."""
        return self.lm_head if self.share_lm_head else self.thought_lm_head

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        mods = [self.gru(role), self.embed(role)] + ([self.policy_head] if role == "reasoner" else [])
        return [p for m in mods for p in m.parameters()]

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter once, by role: `base`, `interpreter`, `reasoner` (their embeddings and GRUs; the
        reasoner's policy head) and `heads` (everything else: LM heads, projection, concat / mix MLPs). A
        module that `weight_groups` shares goes to the first of its roles in the order base, interpreter,
        reasoner (with AAAA the reasoner keeps only its policy head, as in `reasoner_only_parameters`), so
        roles that share one must not be given different optimiser settings (`check_shared_settings`)."""
        seen: set[int] = set()
        out: dict[str, list[nn.Parameter]] = {}
        for role in ("base", "interpreter", "reasoner"):
            params = self.role_parameters(role) if role in self.roles else []
            out[role] = [p for p in dict.fromkeys(params) if id(p) not in seen]
            seen |= {id(p) for p in out[role]}
        out["heads"] = [p for p in self.parameters() if id(p) not in seen]
        return out

    def roles_sharing(self, p: nn.Parameter) -> list[str]:
        """The roles whose embedding, GRU or policy head hold parameter p (empty for the heads)."""
        return [r for r in self.roles if any(q is p for q in self.role_parameters(r))]

    def check_shared_settings(self, parameter_groups: dict[str, dict[str, float]]) -> None:
        """Per-role optimiser settings {role: {setting: value}} must agree for the roles that share a module:
        a shared module has one set of settings (it goes to the first of its roles, see `parameter_roles`)."""
        roles = self.parameter_roles()
        for p in roles["base"] + roles["interpreter"]:
            named = {r: parameter_groups[r] for r in self.roles_sharing(p) if r in parameter_groups}
            if len({tuple(sorted(s.items())) for s in named.values()}) > 1:
                raise ValueError(f"parameter_groups gives different settings to {' and '.join(named)}, which share "
                                 f"modules (weight_groups={self.weight_groups!r}); give them the same or name one")

    def reasoner_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that only the reasoner uses (they learn from the policy loss alone)."""
        others = {id(p) for r in self.roles if r != "reasoner" for p in self.role_parameters(r)}
        others |= {id(p) for n, p in self.named_parameters() if not n.startswith(("grus.", "embeds.", "policy_head."))}
        return [p for p in self.role_parameters("reasoner") if id(p) not in others]

    # ----- forward ------------------------------------------------------------------------------------------
    def context_states(self, input_ids: torch.Tensor, reasoner_grad: bool = True) -> dict[str, torch.Tensor]:
        """Every role's states over the window, [n_layers, B, T, H]; computed once per (embedding, GRU)."""
        cache: dict[tuple[str, str], torch.Tensor] = {}
        out = {}
        for r in self.roles:
            key = (self.embed_key[r], self.gru_key[r])
            if key not in cache:
                users = [u for u in self.roles if (self.embed_key[u], self.gru_key[u]) == key]
                # a reasoner-only pass builds no graph unless the policy loss trains it
                grad = reasoner_grad or users != ["reasoner"]
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    cache[key] = self.gru(r)(self.embed(r)(input_ids))
            out[r] = cache[key]
        return out

    def think(self, r0: torch.Tensor, i0: torch.Tensor, max_len: int, variable_len: bool = True,
              temperature: float = 1.0, reasoner_grad: bool = False) -> Thoughts:
        """Sample one thought per row and read it with the interpreter.

        r0: reasoner context states [n_layers, N, Hr]; i0: interpreter context states [n_layers, N, Hi].
        A loop over thought steps; every step advances all N rows (finished rows keep their state).
        """
        n_rows, dev, eot = r0.size(1), r0.device, self.eot_id
        shared = (self.embed_key["reasoner"], self.gru_key["reasoner"]) == (
            self.embed_key["interpreter"], self.gru_key["interpreter"])
        policy_grad = reasoner_grad and torch.is_grad_enabled()
        r = r0 if policy_grad else r0.detach()
        i = i0
        tokens = torch.full((n_rows, max_len), eot, dtype=torch.long, device=dev)  # [N, L]
        lengths = torch.zeros(n_rows, dtype=torch.long, device=dev)
        n_sampled = torch.zeros(n_rows, dtype=torch.long, device=dev)
        unfinished = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        logprob = torch.zeros(n_rows, device=dev)
        entropy = torch.zeros(n_rows, device=dev)
        entropy_max = torch.zeros(n_rows, device=dev)
        done = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        for j in range(max_len + 1):
            active = ~done  # [N] rows still inside their thought
            if j < max_len:
                with torch.set_grad_enabled(policy_grad):
                    logits = self.policy_head(r[-1] if policy_grad else r[-1].detach()).float()  # [N, V+1]
                    logits = logits / temperature
                    if not variable_len:  # fixed-length thoughts: the end of thought cannot be sampled
                        # a large finite value, not -inf, keeps p * log p at 0 in the entropy
                        logits = logits.masked_fill(torch.arange(eot + 1, device=dev) == eot, -1e9)
                    logp_all = torch.log_softmax(logits, -1)  # [N, V+1]
                y = sample_categorical(logp_all.detach().exp())  # [N]
                y = torch.where(active, y, eot)
                with torch.set_grad_enabled(policy_grad):
                    logprob = logprob + logp_all.gather(1, y[:, None]).squeeze(1) * active
                    step_entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
                    entropy = entropy + step_entropy * active
                entropy_max = torch.where(active, torch.maximum(entropy_max, step_entropy.detach()), entropy_max)
                n_sampled += active
                ended = active & (y == eot)
                thinking = active & ~ended
                tokens[:, j] = torch.where(thinking, y, eot)
                lengths += thinking
            else:  # the limit: append the end of thought to every unfinished thought, unsampled
                y = torch.full_like(lengths, eot)
                ended = active
                unfinished = active if max_len > 0 else unfinished
            # the interpreter reads this token (the end of thought included); done rows keep their state
            i = torch.where(active[None, :, None], self.gru("interpreter").step(self.embed("interpreter")(y), i), i)
            if shared:
                r = i
            elif j + 1 < max_len:  # the reasoner reads its token only if it samples another one
                with torch.set_grad_enabled(policy_grad):
                    keep_going = thinking[None, :, None]
                    r = torch.where(keep_going, self.gru("reasoner").step(self.embed("reasoner")(y), r), r)
            done = done | ended
            if bool(done.all()):
                break
        return Thoughts(tokens=tokens, lengths=lengths, unfinished=unfinished, logprob=logprob, entropy=entropy,
                        n_sampled=n_sampled, vector=i[-1], entropy_max=entropy_max)

    def gate_hold(self, step: int, gate_start: Optional[float], warmup_steps: int) -> float:
        """Weight b^s of `gate_start` in the `mix_sigmoid` gate at training step s (see `combine_heads`), an
        EMA from the start value to the learned gate: w = b^s * gate_start + (1 - b^s) * sigmoid(a) with
        b = 0.01^(1 / warmup_steps); 0 (w = sigmoid(a)) from warmup_steps on, without a start value, or for
        another `combine`."""
        if self.combine != "mix_sigmoid" or gate_start is None or step >= warmup_steps:
            return 0.0
        return 0.01 ** (step / warmup_steps)

    def combine_heads(self, h: Optional[torch.Tensor], v: torch.Tensor, gate_hold: float = 0.0,
                      gate_start: float = 0.5) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of the next token from the base state h [..., Hb] (None without a base LM) and the thought
        vector v [..., Hi]; returns (logits [..., V], mixing weight [...] or None).

        `gate_hold` in [0, 1] weighs `gate_start` against the learned sigmoid gate (mix_sigmoid only).
        """
        if h is None:
            return self.thought_head(self.proj(v)), None
        if self.combine == "residual":
            return self.lm_head(h) + self.thought_head(self.proj(v)), None
        if self.combine == "concat":
            return self.thought_head(self.concat_mlp(torch.cat([h, v], -1))), None
        a = self.mix_head(torch.cat([h, v], -1)).squeeze(-1)  # [...]
        w = a if self.combine == "mix" else gate_hold * gate_start + (1 - gate_hold) * torch.sigmoid(a)
        base, thought = self.lm_head(h), self.thought_head(self.proj(v))  # [..., V]
        return base + w[..., None] * (thought - base), w

    def base_only_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The base path alone [B, T, V]: the thought's contribution removed (concat: a zero thought vector)."""
        if self.use_reasoner and self.combine == "concat":
            zeros = h.new_zeros(*h.shape[:-1], self.concat_mlp[0].in_features - h.size(-1))
            return self.thought_head(self.concat_mlp(torch.cat([h, zeros], -1)))
        return self.lm_head(h)

    def empty_thought_vector(self, i0: torch.Tensor) -> torch.Tensor:
        """The interpreter's vector for the empty thought (it reads the end of thought only), as `think` makes
        it for a thought whose first sampled token is the end of thought: i0 [n_layers, N, Hi] -> [N, Hi]."""
        y = torch.full((i0.size(1),), self.eot_id, dtype=torch.long, device=i0.device)
        return self.gru("interpreter").step(self.embed("interpreter")(y), i0)[-1]

    def talk_logits(self, h: Optional[torch.Tensor], v: torch.Tensor, n_talk: int, gate_hold: float,
                    gate_start: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [J, B, T, K, V] of x_{t+1+j}, j < n_talk, from the base states h [B, T, Hb] (or None) and
        the thought vectors v [B, T, K, Hi]; and the mixing weight [B, T, K] of j = 0 (mix heads) or None."""
        B, T, K = v.shape[:3]
        logits, mix_weight = [], None
        for j in range(n_talk):
            # the thought at t also conditions x_{t+1+j}, read by the base state at t+j (clamped; the
            # method masks targets past the window)
            hj = None
            if h is not None:
                idx = torch.arange(T, device=v.device).add(j).clamp(max=T - 1)
                hj = h[:, idx, None].expand(B, T, K, h.size(-1))  # [B, T, K, Hb]
            lj, wj = self.combine_heads(hj, v, gate_hold, gate_start)  # [B, T, K, V]
            logits.append(lj)
            mix_weight = wj if j == 0 else mix_weight
        return torch.stack(logits), mix_weight

    def forward(self, input_ids: torch.Tensor, trice_samples: int = 1, max_reasoning_len: int = 0,
                variable_len: bool = True, temperature: float = 1.0, reasoner_grad: bool = False,
                n_talk: int = 1, gate_hold: float = 0.0, gate_start: float = 0.5,
                null_thought: bool = False) -> QuietStarOutput:
        """input_ids [B, T] -> logits for x_{t+1+j}, j < n_talk, with `trice_samples` thoughts at every t.

        `null_thought`: also the logits after the empty thought (`null_logits`, computed without a graph: they
        only score a baseline)."""
        B, T = input_ids.shape
        states = self.context_states(input_ids, reasoner_grad)
        h = states["base"][-1] if self.use_base_lm else None  # [B, T, Hb]
        if h is not None and self.base_dropout > 0:  # seed 001's neuter_dropout_base: a weaker base path
            h = nn.functional.dropout(h, self.base_dropout, self.training)
        base_logits = self.base_only_logits(h) if h is not None else None  # [B, T, V]
        if not self.use_reasoner:
            return QuietStarOutput(base_logits[None, :, :, None], base_logits, None, None)
        K = trice_samples
        # rows ordered (b, t, k): the K thoughts of one position are neighbours
        r0 = states["reasoner"].flatten(1, 2).repeat_interleave(K, dim=1)  # [n, B*T*K, Hr]
        i0 = states["interpreter"].flatten(1, 2).repeat_interleave(K, dim=1)  # [n, B*T*K, Hi]
        thoughts = self.think(r0, i0, max_reasoning_len, variable_len, temperature, reasoner_grad)
        v = thoughts.vector.view(B, T, K, -1)  # [B, T, K, Hi]
        if self.detach_interpreter:  # no loss reaches the interpreter through its thought vector
            v = v.detach()
        logits, mix_weight = self.talk_logits(h, v, n_talk, gate_hold, gate_start)
        null_logits = None
        if null_thought:
            with torch.no_grad():  # one empty thought per position, read from the same context states
                v0 = self.empty_thought_vector(states["interpreter"].flatten(1, 2)).view(B, T, 1, -1)
                null_logits = self.talk_logits(h, v0, n_talk, gate_hold, gate_start)[0][..., 0, :]  # [J, B, T, V]
        return QuietStarOutput(logits, base_logits, mix_weight, _reshape_thoughts(thoughts, B, T, K), null_logits)

    # ----- pretrained GRU LMs -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_gru_lm(self, state_dict: dict[str, torch.Tensor], role: Literal["base", "reasoner"]) -> None:
        """Copy a `LanguageModel` + `GRULanguageModel` state dict (`net.embed`, `net.gru`, `net.head`) into the
        base LM (embedding, GRU, lm_head) or the reasoner (embedding, GRU, policy head: the end-of-thought
        row keeps its initialisation). Shapes must match; a mismatch is a ValueError."""
        if role not in self.roles:
            raise ValueError(f"cannot load a pretrained {role}: the model has no {role} "
                             f"(use_base_lm={self.use_base_lm}, use_reasoner={self.use_reasoner})")
        sd = {k.removeprefix("net."): v for k, v in state_dict.items()}
        if "embed.weight" not in sd:
            raise ValueError(f"not a GRU LanguageModel state dict (no net.embed.weight; keys: {sorted(sd)[:6]})")

        def copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
            # embeddings and the policy head have one more row (end of thought) than the LM vocab
            extra_row = dst.shape[0] == self.vocab_size + 1 and src.shape[0] == self.vocab_size
            rows = dst.shape[0] - 1 if extra_row else dst.shape[0]
            if src.shape[1:] != dst.shape[1:] or src.shape[0] != rows:
                raise ValueError(f"pretrained {role}: {what} has shape {tuple(src.shape)}, the model needs "
                                 f"{tuple(dst.shape)} (check the vocab, embed_dim, hidden sizes and num_layers)")
            dst[:rows].copy_(src)

        copy(self.embed(role).weight, sd["embed.weight"], "embed.weight")
        layers = self.gru(role).layers
        n_src = len({k for k in sd if k.startswith("gru.weight_ih_l")})
        if n_src != len(layers):
            raise ValueError(f"pretrained {role}: the checkpoint GRU has {n_src} layers, the model {len(layers)}")
        for k, layer in enumerate(layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                copy(getattr(layer, f"{name}_l0"), sd[f"gru.{name}_l{k}"], f"gru.{name}_l{k}")
        head = self.lm_head if role == "base" else self.policy_head
        src_keys = sorted(k.removeprefix("head.") for k in sd if k.startswith("head."))
        dst_keys = sorted(head.state_dict())
        if src_keys != dst_keys:
            raise ValueError(f"pretrained {role}: head parameters {src_keys} do not match the model's {dst_keys} "
                             "(linear_lm_head must match the checkpoint's head)")
        for name, p in head.state_dict(keep_vars=True).items():
            copy(p, sd[f"head.{name}"], f"head.{name}")


def _reshape_thoughts(t: Thoughts, B: int, T: int, K: int) -> Thoughts:
    """Rows (b, t, k) -> [B, T, K, ...]."""
    def shape(x: torch.Tensor) -> torch.Tensor:
        return x.view(B, T, K, *x.shape[1:])

    return Thoughts(shape(t.tokens), shape(t.lengths), shape(t.unfinished), shape(t.logprob), shape(t.entropy),
                    shape(t.n_sampled), shape(t.vector), shape(t.entropy_max))
