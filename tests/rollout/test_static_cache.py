"""StaticCacheDecoder: logits equal HF's full forward at prefill and at every decode step, with and without
adapters; unsupported models fall back to HF's forward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lightning_rlm.adapters.dual_lora import DualLoRAModel
from lightning_rlm.adapters.lora import add_lora
from lightning_rlm.models.static_cache import StaticCacheDecoder
from lightning_rlm.rollout import position_ids_from_mask, sample_completions

VOCAB, PAD, EOS = 64, 0, 1


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(config).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 33, 2, 8, 3], [0, 0, 0, 11, 12]])  # [N, P] left-padded
    mask = (torch.arange(5)[None, :] >= torch.tensor([[2], [0], [3]])).long()  # [N, P]
    return ids, mask


def _check_against_hf(model: torch.nn.Module, steps: int = 6) -> None:
    ids, mask = _prompts()
    n, p = ids.shape
    dec = StaticCacheDecoder.build(model, n, p + steps)
    assert dec is not None
    pos = position_ids_from_mask(mask)
    logits = dec.step(ids, pos, mask)  # [N, V]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-5)
        tok = torch.randint(2, VOCAB, (n, 1), generator=g)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        logits = dec.step(tok, position_ids_from_mask(mask)[:, -1:], mask)


def test_llama_logits_match_hf_at_prefill_and_every_step() -> None:
    _check_against_hf(_llama())


def test_qwen2_logits_match_hf() -> None:
    _check_against_hf(_qwen2())


def test_peft_lora_adapter_is_applied() -> None:
    model = add_lora(_llama(), rank=4)
    with torch.no_grad():  # non-zero B so the adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    _check_against_hf(model)


def test_dual_lora_adapters_and_ablation_are_applied() -> None:
    model = DualLoRAModel(_llama(), retain_rank=2, forget_rank=2)
    with torch.no_grad():
        for p in model.forget_parameters() + model.retain_parameters():
            p.normal_(0, 0.5)
    _check_against_hf(model)
    with model.retain_only():
        _check_against_hf(model)


def test_unsupported_model_falls_back_to_hf_forward() -> None:
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert StaticCacheDecoder.build(gpt2, 2, 16) is None
    ids, mask = _prompts()
    out = sample_completions(gpt2, ids, mask, num_generations=2, max_completion_length=4, eos_token_id=EOS,
                             pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert out.completion_ids.shape[0] == 6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_with_static_cache_matches_hf_cache(temperature: float) -> None:
    """Same generator state, same draws: the static path only changes how the forward is computed."""
    model = _llama()
    ids, mask = _prompts()

    def run(static: bool):
        return sample_completions(model, ids, mask, num_generations=3, max_completion_length=10,
                                  temperature=temperature, repetition_penalty=1.1, eos_token_id=EOS,
                                  pad_token_id=PAD, generator=torch.Generator().manual_seed(3),
                                  static_cache=static)

    a, b = run(True), run(False)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
