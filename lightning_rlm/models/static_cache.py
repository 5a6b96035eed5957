"""A lean static-KV-cache forward for Llama-family decoders, used by the sampling loop.

At the sizes RL research runs on a CPU (a few million parameters), a decode step of HF's ``LlamaModel``
spends most of its time outside the matmuls: building the 4-D causal mask, growing ``DynamicCache`` by
concatenation, output dataclasses and hooks. :class:`StaticCacheDecoder` runs the same layers, calling the
model's own submodules (``q_proj``, ``mlp``, norms, ``rotary_emb``...) so LoRA, dual-LoRA or any adapter
that replaces a ``Linear`` keeps working, but with keys and values written into preallocated buffers and
a boolean key mask instead of HF's mask machinery. Its logits equal HF's to float tolerance (tests check
prefill and every decode step against the full HF forward).

Supported: HF ``llama``, ``mistral`` (no sliding window within the sequence) and ``qwen2`` (no sliding
window) causal LMs, bare or behind a wrapper that only forwards calls (PEFT LoRA, :class:`DualLoRAModel`,
or any module with ``forwards_to_wrapped = True`` and the wrapped model in ``.model``). Anything else
(another architecture, non-LoRA PEFT) makes :meth:`StaticCacheDecoder.build` return ``None`` and the
sampling loop falls back to HF's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StaticCacheDecoder"]

_SUPPORTED = {"llama", "mistral", "qwen2"}


def _unwrap(model: nn.Module) -> nn.Module | None:
    """The HF ``*ForCausalLM`` inside pass-through wrappers, or None if a wrapper may change the forward."""
    for _ in range(8):
        config = getattr(model, "config", None)
        if getattr(model, "forwards_to_wrapped", False):
            model = model.model
            continue
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            # Only LoRA-style PEFT models replace Linear layers and leave the forward alone.
            types = {str(getattr(c, "peft_type", "")) for c in model.peft_config.values()}
            if not types <= {"LORA", "PeftType.LORA"}:
                return None
            model = model.get_base_model()
            continue
        if config is not None and getattr(config, "model_type", None) in _SUPPORTED:
            return model
        return None
    return None


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    """HF's Llama/Qwen2 RMSNorm as one fused op in fp32 (its own forward is seven small ops); any other
    norm, or lower precision (where HF upcasts in a specific order), goes through the module itself."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None or x.dtype != torch.float32 or not type(module).__name__.endswith("RMSNorm"):
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, eps)


class StaticCacheDecoder:
    """Prefill and one-token decode steps over preallocated KV buffers for ``N`` rows and ``max_len`` slots.

    ``step(input_ids [N, T], position_ids [N, T], key_mask [N, S])`` appends the ``T`` new tokens' keys and
    values at slots ``S-T .. S-1`` (``S`` = tokens so far, ``key_mask`` marks real ones) and returns the
    last position's logits ``[N, V]``.
    """

    def __init__(self, lm: nn.Module, n: int, max_len: int) -> None:
        config = lm.config
        self.lm = lm
        self.core = lm.model
        self.layers = list(self.core.layers)
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        param = next(lm.parameters())
        shape = (n, self.n_kv, max_len, self.head_dim)
        self.keys = [param.new_zeros(shape) for _ in self.layers]  # L x [N, Hkv, S_max, Dh]
        self.values = [param.new_zeros(shape) for _ in self.layers]
        self.max_len = max_len

    @classmethod
    def build(cls, model: nn.Module, n: int, max_len: int) -> StaticCacheDecoder | None:
        lm = _unwrap(model)
        if lm is None:
            return None
        config = lm.config
        window = getattr(config, "sliding_window", None)
        if window is not None and (getattr(config, "use_sliding_window", True) and window < max_len):
            return None
        core = getattr(lm, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if core is None or not all(hasattr(core, a) for a in needed) or not hasattr(lm, "lm_head"):
            return None
        attn = core.layers[0].self_attn
        if any(hasattr(attn, a) for a in ("q_norm", "k_norm")):  # qk-norm variants: not this code path
            return None
        return cls(lm, n, max_len)

    def _attend_one(self, q: Tensor, keys: Tensor, values: Tensor, keys_ok: Tensor, scale: float) -> Tensor:
        """Attention of one query per row, written out: for a single query the fused CPU kernel's setup
        costs more than the math. Query heads are grouped per KV head, so GQA needs no repeated keys."""
        n, group = q.shape[0], self.n_heads // self.n_kv
        qg = q.reshape(n, self.n_kv, group, self.head_dim)  # [N, Hkv, g, Dh]
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [N, Hkv, g, S]
        scores = scores.masked_fill(~keys_ok, float("-inf"))  # keys_ok [N, 1, 1, S]
        out = torch.matmul(scores.softmax(dim=-1), values)  # [N, Hkv, g, Dh]
        return out.reshape(n, self.n_heads, 1, self.head_dim)

    @torch.no_grad()
    def step(self, input_ids: Tensor | None, position_ids: Tensor, key_mask: Tensor,
             inputs_embeds: Tensor | None = None, return_hidden: bool = False,
             n_last: int = 1) -> Tensor | tuple[Tensor, Tensor]:
        """``inputs_embeds [N, T, D]`` replaces ``input_ids`` (e.g. learned thought markers); with
        ``return_hidden`` also the final-norm hidden state ``[N, D]``; ``n_last > 1`` returns the last
        ``n_last`` positions (``[N, n_last, V]``, ``[N, n_last, D]``). Slots past ``key_mask``'s length are
        free: a shorter mask next time rolls the cache back."""
        h = self.core.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [N, T, D]
        n, t = h.shape[:2]
        s = key_mask.shape[1]
        if s > self.max_len:
            raise ValueError(f"sequence of {s} tokens exceeds the cache's {self.max_len} slots")
        cos, sin = self.core.rotary_emb(h, position_ids)  # [N, T, Dh]
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, T, Dh]
        keys_ok = key_mask.bool()[:, None, None, :]  # [N, 1, 1, S]
        if t > 1:
            # Causal within the new tokens; every query also sees itself so fully padded rows stay finite.
            q_pos = torch.arange(s - t, s, device=h.device)[:, None]  # [T, 1]
            k_pos = torch.arange(s, device=h.device)[None, :]  # [1, S]
            mask = (keys_ok & (k_pos <= q_pos)) | (k_pos == q_pos)  # [N, 1, T, S]
        else:
            mask = keys_ok
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)  # [N, T, D]
            q = attn.q_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # [N, H, T, Dh]
            k = attn.k_proj(x).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)  # [N, Hkv, T, Dh]
            v = attn.v_proj(x).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.keys[i][:, :, s - t : s] = k
            self.values[i][:, :, s - t : s] = v
            keys, values = self.keys[i][:, :, :s], self.values[i][:, :, :s]  # [N, Hkv, S, Dh]
            if t == 1:
                out = self._attend_one(q, keys, values, keys_ok, getattr(attn, "scaling", self.head_dim ** -0.5))
            else:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask,
                    scale=getattr(attn, "scaling", None), enable_gqa=self.n_kv != self.n_heads,
                )  # [N, H, T, Dh]
            h = h + attn.o_proj(out.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim))
            h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        hidden = _rms_norm(self.core.norm, h[:, -1] if n_last == 1 else h[:, -n_last:])  # [N, D] / [N, n, D]
        logits = self.lm.lm_head(hidden)  # [N, V] / [N, n, V]
        return (logits, hidden) if return_hidden else logits
