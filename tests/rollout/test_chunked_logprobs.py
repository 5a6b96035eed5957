"""Completion log-probs from hidden states, a chunk of rows at a time (large vocabularies), equal the one-pass
path: values, entropies and every gradient, for a plain Llama, PEFT LoRA and the dual-LoRA wrapper."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlm.adapters import add_lora
from lightning_rlm.rollout import completion_logprobs
from lightning_rlm.rollout.generate import _decoder_and_head

VOCAB = 9000  # above the 8192 threshold, so the default path is the chunked one


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (5, 12), generator=g)  # [N, P+C]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    mask[3, :1] = 0
    return ids, mask


def _grads(model: torch.nn.Module, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    ids, mask = _batch()
    logp, ent = completion_logprobs(model, ids, mask, 6, temperature=0.7, return_entropy=True, chunk_rows=chunk_rows)
    (logp * torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)).sum().backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("wrap", ["plain", "lora", "dual_lora"])
def test_chunked_equals_one_pass(wrap):
    from lightning_rlm.adapters.dual_lora import DualLoRAModel

    model = {"plain": _llama, "lora": lambda: add_lora(_llama(), 4, 8, False),
             "dual_lora": lambda: DualLoRAModel(_llama(), 4, 4)}[wrap]()
    assert _decoder_and_head(model) is not None
    one_logp, one_ent, one_grads = _grads(model, chunk_rows=0)
    for rows in (2, 5):
        logp, ent, grads = _grads(model, chunk_rows=rows)
        torch.testing.assert_close(logp, one_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, one_ent, atol=1e-5, rtol=1e-5)
        assert grads.keys() == one_grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], one_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_default_path_for_a_large_vocabulary_is_chunked_and_equal(monkeypatch):
    model = _llama()
    ids, mask = _batch()
    calls = []
    import lightning_rlm.rollout.generate as gen

    original = gen._chunked_head_logprobs
    monkeypatch.setattr(gen, "_chunked_head_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        auto = completion_logprobs(model, ids, mask, 6)
        one = completion_logprobs(model, ids, mask, 6, chunk_rows=0)
    assert calls == [1]
    torch.testing.assert_close(auto, one, atol=1e-5, rtol=1e-5)


def test_other_models_take_the_one_pass_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert _decoder_and_head(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))) is None
