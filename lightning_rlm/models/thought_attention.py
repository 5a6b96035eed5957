"""Attention for thoughts generated in parallel at many positions: the `dense` and `diagonal` engines.

Quiet-STaR thinks at every position t of a window x[0..L-1] at once. Thought step s of position t (its
s-th token: the start marker, a sampled token, the end marker, or a teacher-forced talk token) attends to
the context x[0..t] and to the earlier steps 0..s of its own thought, never to another position's thought.
With Lq thinking positions and K steps, the two engines compute that same attention:

- `dense` (the paper's form): every step's queries [Lq] attend to one key sequence holding the context [L]
  and every thought key written so far [Lq * (s+1)], through a dense boolean mask that keeps the causal
  context and the position's own thought. Score cost per step O(Lq * (L + Lq*s)); over K steps
  O(L^2 K^2) and as much memory for the saved attention weights.
- `diagonal`: the same scores in two parts: queries against the causal context (an ordinary Lq x L block
  reusing the context's keys/values from the base pass) and queries against their own position's thought
  keys (an Lq x (s+1) band, computed per position), merged with one softmax by log-sum-exp: with
  m = max of both parts, out = (exp(S_ctx - m) V_ctx + exp(S_th - m) V_th) / (sum exp(S_ctx - m) +
  sum exp(S_th - m)). Cost O(K L^2 + L K^2).

Both are written with explicit matmuls and a float32 softmax so that the benchmark compares the algorithms,
not two different kernels; they agree to float rounding (tests: loss and gradients within 1e-5).

Model agnostic through the transformers attention interface: the engines are one registered attention
function (`ATTENTION_NAME`) that HF Llama, Qwen2, GPT-2 ... call with their own q/k/v after their own
projections and position encodings (RoPE or absolute). `use_thought_attention(lm, state)` switches a model to
it for the duration of a call and back; the model's own mask building is skipped (a custom attention has
none), and this function builds the masks above. Attention dropout is not applied inside it.

Padding is masked in both engines: `state.key_mask` [B, L] marks the window's real tokens, and a padding key
is hidden from every query, in the window's causal pass and in every thought step (the caller gives position
ids that count real tokens only). A query with no real key left (a padding token before any real one, or a
thought at such a position) keeps itself, or its own thought's steps, so no softmax row is empty.

Variable-length thoughts: before each thought forward the caller may give `state.add_steps(valid)` with valid
[N, Lq, S] bool, whether each new step is part of its thought. An invalid step (one after the thought's sampled
end) is hidden from every later step of its own thought, in both engines, so what follows the end (the end
marker, the talk tokens) sees the thought's real steps only. Step 0 (the start marker) must be valid: it keeps
every softmax row non-empty. Without `add_steps` every step is valid.

Calls, in order, inside one `use_thought_attention` block:
  1. `state.mode = "context"`: the model's forward over the window [B, L]. Causal attention; every layer's
     keys/values are kept (with their graph) as the context.
  2. `state.mode = "thought"`: forwards over thought inputs [N, Lq * S] (N = B * passes rows, S steps per
     position in this call, position-major), each appending its keys/values to the thought store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_NAME", "Engine", "ThoughtAttentionState", "use_thought_attention"]

ATTENTION_NAME = "lrlm_thought"
Engine = Literal["dense", "diagonal"]


@dataclass
class ThoughtAttentionState:
    """What the attention function needs between calls.

    engine: `dense` or `diagonal`.
    query_pos: [Lq] long, the context position t each thought row belongs to (sees context keys <= t).
    passes: thoughts per position P; thought rows are N = B * P, row n belongs to context row n // P.
    key_mask: [B, L] bool, context keys that are real tokens (None: all).
    """

    engine: Engine
    query_pos: Tensor
    passes: int = 1
    key_mask: Optional[Tensor] = None
    mode: Literal["context", "thought"] = "context"
    context: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> K, V [B, Hkv, L, Dh]
    # layer -> the thought's keys/values, one chunk per call: [N, Hkv, Lq, S_c, Dh] each (kept as chunks, never
    # concatenated, so backward holds each step's keys once instead of a growing copy per step)
    thought: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    # per thought call (the same for every layer): [N, Lq, S_c] bool, which of its steps are in their thought
    # (None: all of them); see `add_steps`
    valid: list[Optional[Tensor]] = field(default_factory=list)

    def add_steps(self, valid: Optional[Tensor]) -> None:
        """Before a thought forward: which of its S steps per row and position ([N, Lq, S] bool) belong to their
        thought (None: all). Invalid steps are hidden from the later steps of the same thought. A caller that
        uses it calls it before every thought forward of the block (the i-th call describes the i-th forward)."""
        self.valid.append(valid)

    def fork(self, passes: Optional[int] = None) -> ThoughtAttentionState:
        """Same context, no thought yet (e.g. the empty-thought baseline after the sampled thoughts)."""
        return ThoughtAttentionState(self.engine, self.query_pos, passes or self.passes, self.key_mask,
                                     "thought", self.context)


_ACTIVE: list[ThoughtAttentionState] = []


@contextmanager
def use_thought_attention(lm: nn.Module, state: ThoughtAttentionState) -> Iterator[ThoughtAttentionState]:
    """Route `lm`'s attention through the thought engines while the block runs, then restore it."""
    _register()
    config = lm.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()
        config._attn_implementation = previous


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, thought_attention_forward)
        _registered = True


def thought_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """The attention interface entry: query [N, H, T, Dh], key/value [N, Hkv, T, Dh] of the new tokens.
    Returns [N, T, H, Dh] as HF's attention functions do."""
    if not _ACTIVE:
        raise RuntimeError(f"attention {ATTENTION_NAME!r} called outside use_thought_attention()")
    state = _ACTIVE[-1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = id(module)  # one entry per attention module: works whatever the model calls its layers
    if state.mode == "context":
        state.context[layer] = (key, value)
        out = _causal_attention(query, key, value, state.key_mask, scale)
    else:
        out = _thought_attention(state, layer, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float) -> Tensor:
    """Plain causal attention of the window over itself (shared by both engines): [B, H, L, Dh]."""
    gqa = q.shape[1] != k.shape[1]
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    # padded keys are hidden; every query keeps itself so a padded row stays finite
    ok = (causal & key_mask[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=q.device)  # [B, 1, L, L]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, scale=scale, enable_gqa=gqa)


def _context_ok(state: ThoughtAttentionState, S: int, L: int, device: torch.device) -> Tensor:
    """[B or 1, Lq * S, L] bool: thought row (t, s) may see context key j iff j <= t (and j is real)."""
    ok = torch.arange(L, device=device)[None, :] <= state.query_pos[:, None]  # [Lq, L]
    ok = ok.repeat_interleave(S, dim=0)[None]  # [1, Lq * S, L]
    if state.key_mask is not None:
        ok = ok & state.key_mask[:, None, :]  # [B, Lq * S, L]
    return ok


def _thought_attention(state: ThoughtAttentionState, layer: int, q: Tensor, k: Tensor, v: Tensor,
                       scale: float) -> Tensor:
    N, H, LS, Dh = q.shape
    Hkv = k.shape[1]
    P = state.passes
    B = N // P
    Lq = state.query_pos.numel()
    S = LS // Lq
    if S * Lq != LS or B * P != N:
        raise ValueError(f"thought inputs [{N}, {LS}] do not split into {P} passes x {Lq} positions x steps")
    chunks = state.thought.setdefault(layer, [])
    # contiguous once here (HF's k/v are often transposed views), so every later reshape is a view
    chunks.append((k.reshape(N, Hkv, Lq, S, Dh).contiguous(), v.reshape(N, Hkv, Lq, S, Dh).contiguous()))
    T = sum(c[0].shape[3] for c in chunks)  # thought steps so far, this call's included
    ctx_k, ctx_v = state.context[layer]  # [B, Hkv, L, Dh]
    L = ctx_k.shape[2]
    ctx_ok = _context_ok(state, S, L, q.device)  # [B|1, Lq*S, L]
    # step s0 + s of the current call sees its own thought's steps 0 .. s0 + s
    steps = torch.arange(T - S, T, device=q.device)  # [S]
    own_ok = torch.arange(T, device=q.device)[None, :] <= steps[:, None]  # [S, T]
    given = state.valid[: len(chunks)]
    if any(v is not None for v in given):  # variable-length thoughts: steps after a thought's end are hidden
        if len(given) != len(chunks):
            raise ValueError("add_steps must describe every thought forward of the block, or none")
        step_ok = torch.cat([torch.ones(N, Lq, c[0].shape[3], dtype=torch.bool, device=q.device) if v is None
                             else v.to(q.device) for v, c in zip(given, chunks)], dim=-1)  # [N, Lq, T]
        own_ok = own_ok[None, None] & step_ok[:, :, None, :]  # [N, Lq, S, T]
    if state.engine == "dense":
        return _dense(q, chunks, ctx_k, ctx_v, ctx_ok, own_ok, scale, B, P, Lq, S)
    if state.engine == "diagonal":
        return _diagonal(q, chunks, ctx_k, ctx_v, ctx_ok, own_ok, scale, B, P, Lq, S, T)
    raise ValueError(f"unknown attention engine {state.engine!r}; expected 'dense' or 'diagonal'")


def _dense(q: Tensor, chunks: list[tuple[Tensor, Tensor]], ctx_k: Tensor, ctx_v: Tensor, ctx_ok: Tensor,
           own_ok: Tensor, scale: float, B: int, P: int, Lq: int, S: int) -> Tensor:
    """One key sequence [context ; every position's thought steps so far] and a dense mask over it, as the
    paper appends each step's keys for all positions: [Lq*S, L + Lq*T]."""
    N, H, LS, Dh = q.shape
    Hkv, L = ctx_k.shape[1], ctx_k.shape[2]
    g = H // Hkv
    expand = (B, P, Hkv, L, Dh)
    keys = torch.cat([ctx_k[:, None].expand(expand).reshape(N, Hkv, L, Dh),
                      *[kc.reshape(N, Hkv, -1, Dh) for kc, _ in chunks]], dim=2)  # [N, Hkv, L + Lq*T, Dh]
    values = torch.cat([ctx_v[:, None].expand(expand).reshape(N, Hkv, L, Dh),
                        *[vc.reshape(N, Hkv, -1, Dh) for _, vc in chunks]], dim=2)
    # thought key (t', i) is visible to row (t, s) iff t' == t and i <= its step (and, with variable-length
    # thoughts, i is inside the thought: own_ok [N, Lq, S, T] instead of [S, T])
    same = torch.eye(Lq, dtype=torch.bool, device=q.device)  # [Lq, Lq]
    per_row = own_ok.dim() == 4
    if per_row:  # one mask per thought row: [N, ...]; the context part repeats over the P thoughts of a row
        ctx_ok = ctx_ok.expand(B, LS, L).repeat_interleave(P, dim=0)  # [N, Lq*S, L]
    masks, off = [ctx_ok], 0
    for kc, _ in chunks:
        width = kc.shape[3]
        if per_row:
            own = own_ok[..., off: off + width]  # [N, Lq, S, S_c]
            block = same[None, :, None, :, None] & own[:, :, :, None, :]  # [N, Lq, S, Lq, S_c]
            masks.append(block.reshape(N, LS, Lq * width))
        else:
            own = own_ok[:, off: off + width]  # [S, S_c]
            block = same[:, None, :, None] & own[None, :, None, :]  # [Lq, S, Lq, S_c]
            masks.append(block.reshape(1, LS, Lq * width).expand(ctx_ok.shape[0], LS, Lq * width))
        off += width
    mask = torch.cat(masks, dim=-1)  # [B|1 (N per row), Lq*S, L + Lq*T]
    qg = q.view(N, Hkv, g, LS, Dh)
    scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)).float() * scale  # [N, Hkv, g, LS, L+Lq*T]
    if per_row:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    else:
        scores = scores.view(B, P, Hkv, g, LS, -1).masked_fill(~mask[:, None, None, None], float("-inf"))
    weights = scores.softmax(-1).to(values.dtype).view(N, Hkv, g, LS, -1)
    out = torch.matmul(weights, values[:, :, None])  # [N, Hkv, g, LS, Dh]
    return out.reshape(N, H, LS, Dh)


def _diagonal(q: Tensor, chunks: list[tuple[Tensor, Tensor]], ctx_k: Tensor, ctx_v: Tensor, ctx_ok: Tensor,
              own_ok: Tensor, scale: float, B: int, P: int, Lq: int, S: int, T: int) -> Tensor:
    """Causal context block [Lq*S, L] + own-thought band [Lq, S, T], merged by log-sum-exp.

    Every product is a plain batched matmul over views (no broadcast expansion), so backward keeps the
    context and each thought chunk's keys/values once, not a copy per step."""
    N, H, LS, Dh = q.shape
    Hkv, L = ctx_k.shape[1], ctx_k.shape[2]
    g = H // Hkv
    R = N * Hkv * Lq  # one band per (row, KV head, position)
    # context part: the P thoughts and g query heads of a (row, KV head) share its context keys
    qc = q.view(B, P, Hkv, g, LS, Dh).transpose(1, 2).reshape(B, Hkv, P * g * LS, Dh)
    s_ctx = (torch.matmul(qc, ctx_k.transpose(-1, -2)).float() * scale).view(B, Hkv, P, g, LS, L)
    s_ctx = s_ctx.masked_fill(~ctx_ok[:, None, None, None], float("-inf"))
    # own-thought band: per position t, its S queries against its T keys, chunk by chunk
    qt = q.view(N, Hkv, g, Lq, S, Dh).permute(0, 1, 3, 2, 4, 5).reshape(R, g * S, Dh)
    s_th = torch.cat([torch.bmm(qt, kc.reshape(R, -1, Dh).transpose(1, 2)) for kc, _ in chunks], dim=-1)
    band_ok = own_ok if own_ok.dim() == 2 else own_ok[:, None, :, None]  # [S, T] or [N, 1, Lq, 1, S, T]
    s_th = (s_th.float() * scale).view(N, Hkv, Lq, g, S, T).masked_fill(~band_ok, float("-inf"))

    def band_to_ctx(x: Tensor) -> Tensor:  # [N, Hkv, Lq, g, S, ...] -> [B, Hkv, P, g, Lq*S, ...]
        x = x.view(B, P, Hkv, Lq, g, S, *x.shape[5:]).permute(0, 2, 1, 4, 3, 5, *range(6, x.dim() + 1))
        return x.reshape(B, Hkv, P, g, LS, *x.shape[6:])

    # one softmax over both parts: a shared max, then the two partial sums
    with torch.no_grad():  # any constant works; no graph, so amax keeps no copy of the scores
        m = torch.maximum(s_ctx.amax(-1), band_to_ctx(s_th.amax(-1)))  # [B, Hkv, P, g, LS], finite
    m_band = m.view(B, Hkv, P, g, Lq, S).permute(0, 2, 1, 4, 3, 5).reshape(N, Hkv, Lq, g, S)
    e_ctx = torch.exp(s_ctx - m[..., None])  # [B, Hkv, P, g, LS, L]
    e_th = torch.exp(s_th - m_band[..., None])  # [N, Hkv, Lq, g, S, T]
    z = e_ctx.sum(-1) + band_to_ctx(e_th.sum(-1))  # [B, Hkv, P, g, LS]
    o_ctx = torch.matmul(e_ctx.to(ctx_v.dtype).view(B, Hkv, P * g * LS, L), ctx_v)  # [B, Hkv, P*g*LS, Dh]
    e_th = e_th.to(ctx_v.dtype).view(R, g * S, T)
    o_th, off = 0, 0
    for _, vc in chunks:
        width = vc.shape[3]
        o_th = o_th + torch.bmm(e_th[:, :, off: off + width], vc.reshape(R, width, Dh))  # [R, g*S, Dh]
        off += width
    o_th = band_to_ctx(o_th.view(N, Hkv, Lq, g, S, Dh))  # [B, Hkv, P, g, LS, Dh]
    out = (o_ctx.view(B, Hkv, P, g, LS, Dh) + o_th) / z[..., None].to(ctx_v.dtype)
    return out.transpose(1, 2).reshape(N, H, LS, Dh)
