"""Sampling group rollouts from a causal LM and scoring them with per-token log-probabilities.

RL objectives (GRPO, gradient routing, GAN-RL) share two primitives: sample ``G`` completions per prompt
(:func:`sample_completions`, returning a :class:`Rollout`) and compute the log-probability of each
completion token under a policy or reference model (:func:`completion_logprobs`).

Sampling defaults to a small KV-cached decode loop rather than HF ``generate`` because ``generate``
cannot take a ``torch.Generator``: with the loop, passing ``generator`` (e.g. seeded with ``seed + rank``
under DDP) makes every draw reproducible and independent of the global RNG. For Llama-family models the
loop decodes through :class:`~lightning_rlm.models.static_cache.StaticCacheDecoder` (preallocated KV
buffers), which removes most of HF's per-token overhead at tiny-model scale.

Conventions: prompts are left-padded (so every prompt's last token sits in the last column), completions
are right-padded with ``pad_token_id`` after the first EOS, and position ids are derived from the
attention mask so that a prompt's tokens get the same positions with or without left padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_rlm.checks import check_at_least, check_one_of, check_positive
from lightning_rlm.models.decoding import position_ids_from_mask, sample_categorical
from lightning_rlm.models.static_cache import StaticCacheDecoder

__all__ = [
    "Rollout",
    "apply_repetition_penalty",
    "apply_top_k_top_p",
    "completion_logprobs",
    "completion_mask_from_eos",
    "position_ids_from_mask",
    "sample_categorical",
    "sample_completions",
]


@dataclass
class Rollout:
    """A batch of sampled completions, ``num_generations`` consecutive rows per prompt.

    Rows ``g*G .. g*G+G-1`` (``G = num_generations``) share prompt ``g``. ``C`` may be shorter than the
    requested ``max_completion_length`` when every row hit EOS early.
    """

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: Tensor  # [N, C] pad_token_id after the first EOS
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    num_generations: int
    # Known EOS ids make `is_clipped` exact; without them it falls back to "mask is full".
    eos_token_ids: tuple[int, ...] | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [N, P+C]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # [N, P+C]

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)  # [N], EOS included

    @property
    def is_clipped(self) -> Tensor:
        """[N] bool: True where the completion has no EOS (it was cut at the length limit)."""
        if self.eos_token_ids is None:
            return self.completion_lengths == self.completion_ids.shape[1]
        eos = torch.tensor(self.eos_token_ids, device=self.completion_ids.device)
        has_eos = (torch.isin(self.completion_ids, eos) & self.completion_mask.bool()).any(dim=1)
        return ~has_eos

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.num_generations

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def completion_length(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device | str) -> Rollout:
        return dataclasses.replace(
            self,
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
        )


def completion_mask_from_eos(completion_ids: Tensor, eos_ids: Tensor) -> Tensor:
    """[N, C] long mask: 1 up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(completion_ids, eos_ids).long()  # [N, C]
    # A token belongs to the completion iff no EOS occurs strictly before it.
    eos_before = is_eos.cumsum(dim=1) - is_eos  # [N, C]
    return (eos_before == 0).long()


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF-style repetition penalty on ``logits [N, V]`` for tokens flagged in ``seen [N, V]`` (bool).

    Positive logits of seen tokens are divided by ``penalty`` and negative ones multiplied by it, so
    ``penalty > 1`` always lowers their probability. Returns a new tensor.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k_top_p(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to ``-inf``. ``logits [N, V]`` -> ``[N, V]``."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [N, V]
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass of the tokens ranked above it already reaches top_p;
        # the most likely token is therefore always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _as_eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor:
    if eos_token_id is None:
        raise ValueError("eos_token_id is required (set tokenizer.eos_token_id or pass it explicitly)")
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("eos_token_id must name at least one token id")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _validate_sampling_args(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    repetition_penalty: float,
    pad_token_id: int | None,
) -> None:
    check_at_least(1, num_generations=num_generations)
    check_positive(max_completion_length=max_completion_length, repetition_penalty=repetition_penalty)
    if pad_token_id is None:
        raise ValueError("pad_token_id is required (e.g. set the tokenizer's pad token to its EOS token)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be None, 0 (disabled) or positive, got {top_k}")
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [B, P]; got {tuple(prompt_ids.shape)} "
            f"and {tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompts must contain at least one token")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError(
            "prompts must be left-padded and non-empty: prompt_mask[:, -1] must be 1 for every row "
            "(use tokenizer.padding_side = 'left')"
        )


@dataclass(frozen=True)
class _Decoding:
    """What both decoding backends take (checked by `_validate_sampling_args`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    repetition_penalty: float
    eos_ids: Tensor  # [E]
    pad_token_id: int
    use_cache: bool


@torch.no_grad()
def _decode_loop(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    decoding: _Decoding,
    generator: torch.Generator | None,
    static_cache: bool = True,
) -> Tensor:
    """Sample up to ``max_new_tokens`` per row; returns raw completion ids [N, C] (pad after EOS)."""
    d = decoding
    n = prompt_ids.shape[0]
    device = prompt_ids.device
    attn = prompt_mask.long()  # [N, P+t], grows by one column per step
    position_ids = position_ids_from_mask(attn)  # [N, P]
    # Left padding puts every prompt's last real token in the last column.
    next_pos = position_ids[:, -1:] + 1  # [N, 1]
    rows = torch.arange(n, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    tokens: list[Tensor] = []
    seen: Tensor | None = None  # [N, V] bool, tokens present in prompt + completion so far

    static = (
        StaticCacheDecoder.build(model, n, prompt_ids.shape[1] + d.max_new_tokens)
        if d.use_cache and static_cache else None
    )
    if static is not None:
        last_logits = static.step(prompt_ids, position_ids, attn)  # [N, V]
    else:
        out = model(
            input_ids=prompt_ids,
            attention_mask=attn,
            position_ids=position_ids,
            use_cache=d.use_cache,
            logits_to_keep=1,
        )
        last_logits = out.logits[:, -1, :]
    for step in range(d.max_new_tokens):
        logits = last_logits.float()  # [N, V]
        if d.repetition_penalty != 1.0:
            if seen is None:
                # scatter_add (not scatter) so duplicate ids at pad and real slots cannot clash.
                counts = torch.zeros_like(logits).scatter_add_(1, prompt_ids, prompt_mask.to(logits.dtype))
                seen = counts > 0
            logits = apply_repetition_penalty(logits, seen, d.repetition_penalty)
        if d.temperature == 0.0:
            next_tok = logits.argmax(dim=-1)  # [N]
        else:
            logits = apply_top_k_top_p(logits / d.temperature, d.top_k, d.top_p)
            probs = logits.softmax(dim=-1)  # [N, V]
            next_tok = sample_categorical(probs, generator)  # [N]
        next_tok = torch.where(finished, torch.full_like(next_tok, d.pad_token_id), next_tok)
        tokens.append(next_tok)
        finished |= torch.isin(next_tok, d.eos_ids)
        # One host sync per step to stop early; cheap next to a forward pass.
        if step == d.max_new_tokens - 1 or bool(finished.all()):
            break
        if seen is not None:
            seen[rows, next_tok] = True
        attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
        if static is not None:
            last_logits = static.step(next_tok[:, None], next_pos, attn)
        elif d.use_cache:
            out = model(
                input_ids=next_tok[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                cache=out.cache,
                use_cache=True,
            )
        else:
            full_ids = torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)  # [N, P+t]
            out = model(
                input_ids=full_ids,
                attention_mask=attn,
                position_ids=position_ids_from_mask(attn),
                use_cache=False,
                logits_to_keep=1,
            )
        if static is None:
            last_logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)  # [N, C]


@torch.no_grad()
def _hf_generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, decoding: _Decoding) -> Tensor:
    from transformers import GenerationConfig

    # Every flag explicit so the checkpoint's generation_config defaults (e.g. top_k=50) can't leak in;
    # sampling-only flags are left out when greedy because HF warns about them.
    d = decoding
    sampling = (
        dict(do_sample=True, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k or 0)
        if d.temperature > 0
        else dict(do_sample=False)
    )
    config = GenerationConfig(
        **sampling,
        repetition_penalty=d.repetition_penalty,
        max_new_tokens=d.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=d.eos_ids.tolist(),
        pad_token_id=d.pad_token_id,
        use_cache=d.use_cache,
        num_return_sequences=1,
    )
    sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    return sequences[:, prompt_ids.shape[1] :]  # [N, C]


def sample_completions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static_cache: bool = True,
    backend: Literal["loop", "hf"] = "loop",
) -> Rollout:
    """Sample ``num_generations`` completions for each left-padded prompt.

    Args:
        model: a causal LM taking ``input_ids, attention_mask, position_ids, cache, use_cache,
            logits_to_keep`` (any HF ``*ForCausalLM`` or a PEFT wrapper of one). It is put in eval mode
            while sampling and its training flag is restored afterwards.
        prompt_ids: ``[B, P]`` left-padded prompt token ids; ``prompt_mask``: ``[B, P]``.
        num_generations: completions per prompt ``G``; output rows ``g*G .. g*G+G-1`` belong to prompt ``g``.
        max_completion_length: maximum new tokens; sampling stops early once every row has hit EOS.
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p, top_k: nucleus / top-k filtering (``top_k`` ``None`` or ``0`` disables it).
        repetition_penalty: HF semantics over the (unpadded) prompt and the completion so far.
        eos_token_id: one id or several; the completion mask ends at the first of them.
        pad_token_id: written after EOS.
        generator: RNG for the draws (must live on the model's device). Only the ``"loop"`` backend takes
            it; with the same generator state, model and inputs the samples are identical.
        use_cache: reuse the KV cache between decode steps (``False`` recomputes the full prefix each step).
        static_cache: with the ``"loop"`` backend and a supported decoder (Llama, Mistral, Qwen2, bare or
            with LoRA-style adapters), decode with :class:`StaticCacheDecoder` (preallocated KV buffers, no
            HF mask/cache machinery); otherwise, or with ``False``, call the model's own forward.
        backend: ``"loop"`` (own KV-cached decode loop) or ``"hf"`` (``model.generate``; global RNG).

    Returns:
        A :class:`Rollout` with ``N = B * G`` rows and ``C <= max_completion_length`` completion columns.
    """
    _validate_sampling_args(
        prompt_ids,
        prompt_mask,
        num_generations,
        max_completion_length,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        pad_token_id,
    )
    assert pad_token_id is not None  # narrowed by validation
    eos_ids = _as_eos_tensor(eos_token_id, prompt_ids.device)
    check_one_of("backend", backend, ("loop", "hf"))
    if generator is not None:
        if backend == "hf":
            raise ValueError(
                "HF generate cannot take a torch.Generator; use backend='loop' for seeded sampling"
            )
        if generator.device.type != prompt_ids.device.type:
            raise ValueError(
                f"generator lives on {generator.device} but sampling runs on {prompt_ids.device}; "
                "create it with torch.Generator(device=...) on the model's device"
            )

    # Contiguous groups: repeat_interleave keeps each prompt's G copies adjacent.
    group_prompt_ids = prompt_ids.long().repeat_interleave(num_generations, dim=0)  # [B*G, P]
    group_prompt_mask = prompt_mask.long().repeat_interleave(num_generations, dim=0)  # [B*G, P]

    was_training = model.training
    model.eval()
    try:
        decoding = _Decoding(max_completion_length, temperature, top_p, top_k, repetition_penalty, eos_ids,
                             pad_token_id, use_cache)
        if backend == "loop":
            raw = _decode_loop(model, group_prompt_ids, group_prompt_mask, decoding, generator, static_cache)
        else:
            raw = _hf_generate(model, group_prompt_ids, group_prompt_mask, decoding)
    finally:
        model.train(was_training)

    completion_mask = completion_mask_from_eos(raw, eos_ids)  # [N, C]
    completion_ids = raw.masked_fill(completion_mask == 0, pad_token_id)  # [N, C]
    return Rollout(
        prompt_ids=group_prompt_ids,
        prompt_mask=group_prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        num_generations=num_generations,
        eos_token_ids=tuple(eos_ids.tolist()),
    )


def _selective_log_softmax(
    logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """log p(target) (and entropy) from ``logits [N, C, V]`` in fp32, ``targets [N, C]`` -> ``[N, C]``.

    The entropy is returned detached (it is logged, never differentiated). Never materializes a full
    log-softmax; low-precision logits are upcast one row at a time so the fp32
    copy stays at ``[1, C, V]`` (fp32 logits are processed in one go, as they need no copy).
    """
    chunk = logits.shape[0] if logits.dtype == torch.float32 else 1
    logps: list[Tensor] = []
    entropies: list[Tensor] = []
    for start in range(0, logits.shape[0], chunk):
        lg = logits[start : start + chunk].float()  # [n, C, V]
        if temperature != 1.0:
            lg = lg / temperature
        lse = torch.logsumexp(lg, dim=-1)  # [n, C]
        picked = lg.gather(-1, targets[start : start + chunk, :, None]).squeeze(-1)  # [n, C]
        logps.append(picked - lse)
        if return_entropy:  # a statistic, not a loss term: no graph
            with torch.no_grad():
                lg_d, lse_d = lg.detach(), lse.detach()
                probs = torch.exp(lg_d - lse_d[..., None])  # [n, C, V]
                entropies.append(lse_d - (probs * lg_d).sum(dim=-1))  # H = lse - E_p[logit]
    logp = torch.cat(logps, dim=0)
    return logp, (torch.cat(entropies, dim=0) if return_entropy else None)


# Causal LMs whose logits are exactly `lm_head(decoder(x).last_hidden_state)` (no soft-capping or scaling),
# so the log-probs can be computed from the hidden states one chunk of rows at a time.
PLAIN_LM_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CHUNKED_MIN_VOCAB = 8192  # below this the full [N, C, V] logits are small: one pass is faster


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) of a plain causal LM inside `model` (itself, PEFT or an adapter wrapper), else None."""
    inner = model
    if getattr(inner, "forwards_to_wrapped", False):
        inner = inner.model
    if hasattr(inner, "get_base_model"):  # PEFT: the LoRA layers live inside the base model's modules
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_LM_HEAD_TYPES or not hasattr(inner, "get_decoder"):
        return None
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(config, "final_logit_softcapping", None):
        return None
    return inner.get_decoder(), head


def _chunked_head_logprobs(hidden: Tensor, head: nn.Linear, targets: Tensor, temperature: float,
                           return_entropy: bool, chunk_rows: int) -> tuple[Tensor, Tensor | None]:
    """`_selective_log_softmax(head(hidden))` without keeping the logits: each chunk of rows is computed
    under activation checkpointing, so forward and backward hold one chunk's fp32 ``[n, C, V]`` at a time."""
    from torch.utils.checkpoint import checkpoint

    def chunk_logp(h: Tensor, t: Tensor) -> Tensor:
        return _selective_log_softmax(head(h), t, temperature, False)[0]

    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]  # [n, C, H], [n, C]
        if torch.is_grad_enabled() and h.requires_grad:
            logps.append(checkpoint(chunk_logp, h, t, use_reentrant=False))
        else:
            logps.append(chunk_logp(h, t))
        if return_entropy:
            with torch.no_grad():
                entropies.append(_selective_log_softmax(head(h.detach()), t, temperature, True)[1])
    return torch.cat(logps), (torch.cat(entropies) if return_entropy else None)


def completion_logprobs(
    model: nn.Module,
    inputs: Rollout | Tensor,
    attention_mask: Tensor | None = None,
    completion_len: int | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (and optionally entropies) of the last ``completion_len`` tokens under ``model``.

    Call as ``completion_logprobs(model, rollout)`` or
    ``completion_logprobs(model, input_ids [N, P+C], attention_mask [N, P+C], completion_len=C)``.
    One forward over prompt + completion (positions from the attention mask, so left padding is harmless);
    the logits at positions ``P-1 .. P+C-2`` score the completion tokens. Logits are divided by
    ``temperature`` (use the sampling temperature) and normalized in fp32.

    Gradients flow when called with grad enabled (policy); wrap in ``torch.no_grad()`` for a reference.
    Entries where the completion mask is 0 are meaningless and must be masked by the caller.

    Memory: for a plain causal LM (Llama, Mistral, Qwen2/3) with a large vocabulary (>= 8192, e.g.
    SmolLM2's 49k) the log-probs are computed from the last hidden states ``chunk_rows`` rows at a time
    (default: rows whose fp32 logits fit ~64 MB) with the LM head recomputed in backward, so no full
    ``[N, C, V]`` logits tensor is ever held; other models take one pass over ``logits_to_keep`` logits.
    Both give the same values (tests compare them); ``chunk_rows=0`` forces the one-pass path.

    Returns:
        ``logp [N, C]``, or ``(logp [N, C], entropy [N, C])`` when ``return_entropy``.
    """
    if isinstance(inputs, Rollout):
        if attention_mask is not None or completion_len is not None:
            raise ValueError("pass either a Rollout or (input_ids, attention_mask, completion_len), not both")
        input_ids, attention_mask, completion_len = (
            inputs.input_ids,
            inputs.attention_mask,
            inputs.completion_length,
        )
    else:
        if attention_mask is None or completion_len is None:
            raise ValueError("with input_ids, attention_mask and completion_len are required")
        input_ids = inputs
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    total_len = input_ids.shape[1]
    if not 0 < completion_len < total_len:
        raise ValueError(
            f"completion_len must be in [1, {total_len - 1}] for sequences of length {total_len}"
        )

    targets = input_ids[:, -completion_len:]  # [N, C]
    parts = _decoder_and_head(model) if chunk_rows != 0 else None
    if parts is not None and (chunk_rows is not None or parts[1].out_features >= CHUNKED_MIN_VOCAB):
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        hidden = hidden[:, -(completion_len + 1) : -1]  # [N, C, H]
        rows = chunk_rows or max(1, 2**24 // max(1, completion_len * head.out_features))
        logp, entropy = _chunked_head_logprobs(hidden, head, targets, temperature, return_entropy, rows)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=completion_len + 1,
        )
        # Slicing again is a no-op when the model honoured logits_to_keep, and correct when it did not.
        logits = out.logits[:, -(completion_len + 1) : -1, :]  # [N, C, V]
        logp, entropy = _selective_log_softmax(logits, targets, temperature, return_entropy)
    if return_entropy:
        assert entropy is not None
        return logp, entropy
    return logp
