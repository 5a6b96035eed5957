"""Tests for LoRA wrapping and the reference policy (adapters disabled or a frozen copy)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlm.adapters import add_lora, frozen_copy, is_peft_model, reference_logprobs, reference_mode

VOCAB = 64


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def _batch() -> tuple[Tensor, Tensor]:
    ids = torch.tensor([[0, 0, 5, 9, 13, 20, 21], [7, 33, 2, 8, 40, 41, 42]])  # [2, T], row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def _logits(model: torch.nn.Module) -> Tensor:
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits  # [2, T, V]


def _perturb_lora(model: PeftModel) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_only_lora_params_trainable() -> None:
    model = add_lora(_base(), rank=4)
    assert is_peft_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # "all-linear" adapts attention and MLP projections but not the LM head.
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_init_matches_base_and_reference_mode_is_exact() -> None:
    base = _base()
    expected = _logits(base)
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert torch.equal(_logits(model), expected)  # B = 0 at init

    _perturb_lora(model)
    model.train()
    assert not torch.allclose(_logits(model), expected, atol=1e-3)
    with reference_mode(model) as ref:
        assert ref is model and not model.training and not torch.is_grad_enabled()
        assert torch.equal(_logits(ref), expected)
    # Adapters and training mode come back after the context.
    assert model.training
    assert not torch.allclose(_logits(model), expected, atol=1e-3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(use_rslora: bool) -> None:
    rank, alpha = 4, 8.0
    model = add_lora(_base(), rank=rank, alpha=alpha, use_rslora=use_rslora)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    assert q_proj.scaling["default"] == pytest.approx(expected)


def test_alpha_defaults_to_rank() -> None:
    model = add_lora(_base(), rank=4)
    assert model.base_model.model.model.layers[0].mlp.up_proj.scaling["default"] == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_validation(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        add_lora(_base(), rank=rank)


def test_reference_mode_rejects_plain_model() -> None:
    with pytest.raises(TypeError, match="frozen_copy"):
        with reference_mode(_base()):
            pass


def test_frozen_copy_is_independent_and_frozen() -> None:
    base = _base()
    base.train()
    ref = frozen_copy(base)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert base.training and all(p.requires_grad for p in base.parameters())
    expected = _logits(ref)
    with torch.no_grad():
        base.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(_logits(ref), expected)


def test_reference_logprobs_both_paths_agree() -> None:
    base = _base()
    ref_model = frozen_copy(base)
    policy = add_lora(base, rank=4)
    _perturb_lora(policy)
    ids, mask = _batch()
    completion_len = 3

    via_adapter = reference_logprobs(policy, None, ids, mask, completion_len)
    via_copy = reference_logprobs(policy, ref_model, ids, mask, completion_len)
    assert via_adapter.shape == (2, completion_len) and not via_adapter.requires_grad
    torch.testing.assert_close(via_adapter, via_copy, atol=1e-6, rtol=0)

    # The policy itself (adapters on) scores differently and keeps gradients.
    from lightning_rlm.rollout import completion_logprobs

    policy_logp = completion_logprobs(policy, ids, mask, completion_len)
    assert policy_logp.requires_grad
    assert not torch.allclose(policy_logp, via_adapter, atol=1e-4)

    with pytest.raises(TypeError):
        reference_logprobs(ref_model, None, ids, mask, completion_len)
