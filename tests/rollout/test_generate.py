"""Tests for group sampling (`sample_completions`) and completion scoring (`completion_logprobs`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlm.rollout import (
    Rollout,
    apply_repetition_penalty,
    apply_top_k_top_p,
    completion_logprobs,
    completion_mask_from_eos,
    sample_completions,
)

VOCAB = 64
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _left_pad(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)  # [B, P]
    mask = torch.zeros_like(ids)  # [B, P]
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


PROMPTS = [[5, 9, 13, 2, 40], [7, 33], [11, 12, 20, 21]]


def _sample(model: nn.Module, **overrides: object) -> Rollout:
    ids, mask = _left_pad(PROMPTS)
    kwargs: dict = dict(
        num_generations=4,
        max_completion_length=12,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    kwargs.update(overrides)
    return sample_completions(model, ids, mask, **kwargs)


class ScheduledEOS(nn.Module):
    """Wraps a model so row i emits EOS exactly at completion step ``eos_step[i]`` and never otherwise."""

    def __init__(self, inner: nn.Module, prompt_len: int, eos_step: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.prompt_len = prompt_len
        self.eos_step = torch.tensor(eos_step)

    def forward(self, **kwargs: object) -> object:
        out = self.inner(**kwargs)
        step = kwargs["attention_mask"].shape[1] - self.prompt_len  # type: ignore[union-attr]
        logits = out.logits.clone()  # [N, 1, V]
        logits[:, -1, EOS] = torch.where(self.eos_step == step, 1e4, float("-inf"))
        out.logits = logits
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_mask_padding_and_clipping(model: LlamaForCausalLM, use_cache: bool) -> None:
    ids, mask = _left_pad([[5, 9, 13], [7, 33]])
    max_len = 6
    # Rows (2 prompts x 3 generations): EOS at steps 0, 2, 5 (the last slot) and never (clipped).
    eos_step = [0, 2, 5, 99, 3, 99]
    wrapped = ScheduledEOS(model, prompt_len=ids.shape[1], eos_step=eos_step)
    r = sample_completions(
        wrapped,
        ids,
        mask,
        num_generations=3,
        max_completion_length=max_len,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1),
        use_cache=use_cache,
    )
    assert r.completion_ids.shape == (6, max_len)
    for i, k in enumerate(eos_step):
        length = min(k + 1, max_len)
        assert r.completion_mask[i].tolist() == [1] * length + [0] * (max_len - length)
        if k < max_len:
            assert r.completion_ids[i, k] == EOS
            assert (r.completion_ids[i, k + 1 :] == PAD).all()
        else:
            assert (r.completion_ids[i] != EOS).all()
    assert r.completion_lengths.tolist() == [1, 3, 6, 6, 4, 6]
    assert r.is_clipped.tolist() == [False, False, False, True, False, True]
    # Without EOS ids the fallback treats a full mask as clipped (EOS in the last slot included).
    r.eos_token_ids = None
    assert r.is_clipped.tolist() == [False, False, True, True, False, True]


def test_stops_early_when_all_rows_finish(model: LlamaForCausalLM) -> None:
    ids, mask = _left_pad([[5, 9, 13]])
    wrapped = ScheduledEOS(model, prompt_len=3, eos_step=[1, 2])
    r = sample_completions(
        wrapped,
        ids,
        mask,
        num_generations=2,
        max_completion_length=10,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    assert r.completion_ids.shape == (2, 3)
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert not r.is_clipped.any()


def test_completion_mask_from_eos_multiple_eos() -> None:
    ids = torch.tensor([[4, 1, 5, 1], [4, 4, 4, 4], [1, 4, 4, 4]])  # [3, 4]
    mask = completion_mask_from_eos(ids, torch.tensor([1]))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_grouping_and_rollout_helpers(model: LlamaForCausalLM) -> None:
    ids, mask = _left_pad(PROMPTS)
    r = _sample(model)
    g = r.num_generations
    assert r.prompt_ids.shape == (len(PROMPTS) * g, ids.shape[1]) and r.num_prompts == len(PROMPTS)
    for p in range(len(PROMPTS)):
        rows = slice(p * g, (p + 1) * g)
        assert (r.prompt_ids[rows] == ids[p]).all() and (r.prompt_mask[rows] == mask[p]).all()
    assert torch.equal(r.input_ids, torch.cat([r.prompt_ids, r.completion_ids], dim=1))
    assert torch.equal(r.attention_mask, torch.cat([r.prompt_mask, r.completion_mask], dim=1))
    moved = r.to("cpu")
    assert torch.equal(moved.completion_ids, r.completion_ids) and moved.num_generations == g


def test_generator_reproducibility(model: LlamaForCausalLM) -> None:
    a = _sample(model, generator=torch.Generator().manual_seed(123))
    b = _sample(model, generator=torch.Generator().manual_seed(123))
    c = _sample(model, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # Within a group, samples differ (the model is random and the vocabulary is 64 tokens).
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_restores_training_mode(model: LlamaForCausalLM) -> None:
    model.train()
    try:
        _sample(model, max_completion_length=2)
        assert model.training
    finally:
        model.eval()


def test_greedy_left_padding_matches_unpadded_and_hf(model: LlamaForCausalLM) -> None:
    batched = _sample(model, temperature=0.0, generator=None, num_generations=1, repetition_penalty=1.3)
    hf = _sample(
        model, temperature=0.0, generator=None, num_generations=1, repetition_penalty=1.3, backend="hf"
    )
    assert torch.equal(batched.completion_ids, hf.completion_ids)
    for i, prompt in enumerate(PROMPTS):
        ids, mask = _left_pad([prompt])
        alone = sample_completions(
            model,
            ids,
            mask,
            num_generations=1,
            max_completion_length=12,
            temperature=0.0,
            repetition_penalty=1.3,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        n = alone.completion_ids.shape[1]
        assert torch.equal(batched.completion_ids[i, :n], alone.completion_ids[0])


def test_hf_backend_builds_valid_rollout(model: LlamaForCausalLM) -> None:
    torch.manual_seed(0)
    r = _sample(model, generator=None, backend="hf", top_k=10, top_p=0.9)
    assert r.completion_ids.shape[0] == len(PROMPTS) * 4 and r.completion_ids.shape[1] <= 12
    assert torch.equal(r.completion_mask, completion_mask_from_eos(r.completion_ids, torch.tensor([EOS])))
    with pytest.raises(ValueError, match="Generator"):
        _sample(model, backend="hf")


def test_logprobs_left_padding_invariance(model: LlamaForCausalLM) -> None:
    r = _sample(model)
    batched = completion_logprobs(model, r)  # [N, C]
    g = r.num_generations
    for p, prompt in enumerate(PROMPTS):
        ids, mask = _left_pad([prompt])
        rows = slice(p * g, (p + 1) * g)
        alone_ids = torch.cat([ids.expand(g, -1), r.completion_ids[rows]], dim=1)
        alone_mask = torch.cat([mask.expand(g, -1), r.completion_mask[rows]], dim=1)
        alone = completion_logprobs(model, alone_ids, alone_mask, r.completion_length)
        valid = r.completion_mask[rows].bool()
        torch.testing.assert_close(batched[rows][valid], alone[valid], atol=1e-5, rtol=0)


def test_logprobs_and_entropy_match_naive(model: LlamaForCausalLM) -> None:
    r = _sample(model, max_completion_length=6)
    temperature = 0.7
    logp, entropy = completion_logprobs(model, r, temperature=temperature, return_entropy=True)
    assert logp.shape == entropy.shape == r.completion_ids.shape
    for i in range(r.prompt_ids.shape[0]):
        prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
        for j in range(int(r.completion_lengths[i])):
            prefix = torch.cat([prompt, r.completion_ids[i, :j]])[None]  # [1, L], no padding at all
            with torch.no_grad():
                logits = model(input_ids=prefix).logits[0, -1] / temperature  # [V]
            ref = torch.log_softmax(logits, dim=-1)
            assert logp[i, j].item() == pytest.approx(ref[r.completion_ids[i, j]].item(), abs=1e-5)
            ref_entropy = -(ref.exp() * ref).sum()
            assert entropy[i, j].item() == pytest.approx(ref_entropy.item(), abs=1e-5)


def test_logprobs_gradients_and_bf16_path(model: LlamaForCausalLM) -> None:
    r = _sample(model, max_completion_length=4)
    logp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_length)
    assert logp.requires_grad
    (logp * r.completion_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    model.zero_grad(set_to_none=True)
    # Low-precision logits take the row-chunked fp32 path; it must agree with the fp32 path.
    from lightning_rlm.rollout.generate import _selective_log_softmax

    logits = torch.randn(3, 5, VOCAB)
    targets = torch.randint(0, VOCAB, (3, 5))
    full, _ = _selective_log_softmax(logits, targets, 1.0, False)
    chunked, _ = _selective_log_softmax(logits.double(), targets, 1.0, False)
    torch.testing.assert_close(full, chunked.float())


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])  # [2, V=4]
    seen = torch.tensor([[True, True, False, False], [False, True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 0.5, -4.0, 0.0]]
    before, after = logits.softmax(-1), out.softmax(-1)
    assert (after[seen] < before[seen]).all() and (after[~seen] > before[~seen]).all()
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_top_k_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # [1, 4]
    assert torch.isinf(apply_top_k_top_p(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # Nucleus 0.7: 0.5 < 0.7 so the 0.3 token is needed too; the rest is dropped.
    assert torch.isinf(apply_top_k_top_p(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(apply_top_k_top_p(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    assert torch.equal(apply_top_k_top_p(logits), logits)


def test_top_k_one_is_greedy(model: LlamaForCausalLM) -> None:
    greedy = _sample(model, temperature=0.0, num_generations=1)
    top1 = _sample(model, top_k=1, num_generations=1)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_generations": 0}, "num_generations"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"eos_token_id": None}, "eos_token_id"),
        ({"pad_token_id": None}, "pad_token_id"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_validation_errors(model: LlamaForCausalLM, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sample(model, **overrides)


def test_rejects_right_padding(model: LlamaForCausalLM) -> None:
    ids = torch.tensor([[5, 6, PAD]])
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample_completions(
            model, ids, mask, num_generations=2, max_completion_length=3, eos_token_id=EOS, pad_token_id=PAD
        )
