"""QuietStarLM on tiny random Llama / Qwen2 / GPT-2: thoughts against a plain forward, both engines, generation."""

from __future__ import annotations

import pytest
import torch

from lightning_rlm.models.quiet_star_lm import QuietStarLM

V, D = 48, 32


def tiny_lm(kind: str) -> torch.nn.Module:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
                                            bos_token_id=0, pad_token_id=0))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
                                            bos_token_id=0, pad_token_id=0))
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def wrapped(kind: str, mixing: str = "sigmoid") -> QuietStarLM:
    m = QuietStarLM(tiny_lm(kind), torch.randn(D, generator=torch.Generator().manual_seed(1)), mixing_head=mixing)
    if mixing != "off":  # a non-zero mixing weight, so the post-thought path matters in every check
        torch.nn.init.normal_(m.mixing_head[-1].weight, std=0.2, generator=torch.Generator().manual_seed(2))
    return m


def windows(B: int = 2, L: int = 10) -> torch.Tensor:
    return torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(3))


KINDS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_thought_equals_a_plain_forward_of_context_thought_and_talk(kind):
    """Position t's thought sees exactly x[0..t], its own thought and its talk tokens: the parallel result
    equals the model run on that one sequence, for logits, thought log-probs and the empty thought."""
    m = wrapped(kind)
    x = windows()
    P, M, J = 2, 3, 3
    out = m.think(x, torch.arange(10), n_ahead=M + 2, n_talk=J, passes=P,
                  generator=torch.Generator().manual_seed(0), null_thought=True)
    emb = m.lm.get_input_embeddings()
    sot, eot = m.marker("start")[None], m.marker("end")[None]
    for b, p, t in [(0, 0, 0), (1, 1, 4), (1, 0, 9)]:
        n = b * P + p
        z = out.thought_tokens[n, t]
        talk = emb(x[b, t + 1: t + J])  # the talk inputs that exist in the window
        seq = torch.cat([emb(x[b, : t + 1]), sot, emb(z), eot, talk])[None]
        ref = m.lm(inputs_embeds=seq).logits[0].float()
        k = min(J, 10 - t)  # talk targets inside the window
        torch.testing.assert_close(out.post_logits[n, t, :k].float(), ref[t + M + 2: t + M + 2 + k], atol=1e-5, rtol=0)
        logp = ref[t + 1: t + 1 + M].log_softmax(-1).gather(-1, z[:, None]).squeeze(-1)
        torch.testing.assert_close(out.thought_logprob[n, t], logp, atol=1e-5, rtol=0)
        # the mixed logits use the base prediction of the same token (position t + j)
        base = out.base_logits[b, t: t + k]
        post = out.post_logits[n, t, :k]
        w = out.mix_weight[n, t, :k]
        torch.testing.assert_close(out.talk_logits[n, t, :k], base + w * (post - base), atol=1e-6, rtol=0)
        null_seq = torch.cat([emb(x[b, : t + 1]), sot, eot, talk])[None]
        null_ref = m.lm(inputs_embeds=null_seq, output_hidden_states=True)
        null_post = null_ref.logits[0, t + 2: t + 2 + k]
        hid = null_ref.hidden_states[-1][0, t + 2: t + 2 + k]
        base_h = m.lm(input_ids=x[b: b + 1], output_hidden_states=True).hidden_states[-1][0, t: t + k]
        expect, _ = m.mix(base, base_h, null_post, hid)
        torch.testing.assert_close(out.null_talk_logits[b, t, :k], expect, atol=1e-5, rtol=0)
    assert out.talk_valid[9].tolist() == [True, False, False]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_and_diagonal_engines_give_the_same_loss_and_gradients(kind):
    m = wrapped(kind)
    x = windows(B=2, L=12)
    positions = torch.tensor([0, 3, 5, 6, 11])
    first = m.think(x, positions, n_ahead=5, n_talk=3, passes=2, generator=torch.Generator().manual_seed(0))
    results = {}
    for engine in ("dense", "diagonal"):
        m.zero_grad()
        out = m.think(x, positions, n_ahead=5, n_talk=3, passes=2, engine=engine,
                      thought_tokens=first.thought_tokens)
        loss = (out.talk_logits.float().log_softmax(-1)[..., 7].mean() + out.thought_logprob.sum() * 0.1
                + out.base_logits.float().log_softmax(-1)[..., 5].mean())
        loss.backward()
        results[engine] = (loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    (loss_d, grads_d), (loss_g, grads_g) = results["dense"], results["diagonal"]
    assert abs(loss_d - loss_g) <= 1e-5
    assert grads_d.keys() == grads_g.keys() and len(grads_d) == len(list(m.parameters()))
    # the markers are stored divided by embedding_grad_scale: compare the gradient of the vector used
    scale = {k: m.embedding_grad_scale if k in ("start_param", "end_param") else 1.0 for k in grads_d}
    worst = max(((grads_d[k] - grads_g[k]) / scale[k]).abs().max().item() for k in grads_d)
    assert worst <= 1e-5, worst
    assert any(grads_d[k].abs().sum() > 0 for k in grads_d if "start_param" in k)


def test_zero_initialised_mixing_head_starts_as_the_base_model():
    x = windows()
    m = QuietStarLM(tiny_lm("llama"), torch.randn(D), mixing_head="linear")
    out = m.think(x, torch.arange(10), n_ahead=4, n_talk=2, generator=torch.Generator().manual_seed(0))
    assert out.mix_weight.abs().max() == 0
    base = out.base_logits[:, out.talk_index]  # [B, Lq, J, V]
    torch.testing.assert_close(out.talk_logits, base, atol=0, rtol=0)
    m = QuietStarLM(tiny_lm("llama"), torch.randn(D), mixing_head="sigmoid")
    out = m.think(x, torch.arange(10), n_ahead=4, n_talk=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.mix_weight, torch.full_like(out.mix_weight, 0.01), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.talk_logits, base + 0.01 * (out.post_logits - base), atol=1e-5, rtol=0)
    off = QuietStarLM(tiny_lm("llama"), torch.randn(D), mixing_head="off")
    out = off.think(x, torch.arange(10), n_ahead=4, n_talk=2, generator=torch.Generator().manual_seed(0))
    assert out.mix_weight is None and torch.equal(out.talk_logits, out.post_logits)


def test_marker_gradient_is_scaled_and_markers_are_not_vocabulary():
    x = windows()
    grads = {}
    for scale in (1.0, 100.0):
        m = QuietStarLM(tiny_lm("llama"), torch.randn(D, generator=torch.Generator().manual_seed(1)),
                        embedding_grad_scale=scale, mixing_head="off")
        out = m.think(x, torch.arange(10), n_ahead=4, n_talk=2, generator=torch.Generator().manual_seed(0))
        out.talk_logits.float().log_softmax(-1)[..., 3].mean().backward()
        grads[scale] = m.start_param.grad
        assert m.lm.get_input_embeddings().weight.shape[0] == V  # no token was added
        assert int(out.thought_tokens.max()) < V
    torch.testing.assert_close(grads[100.0], 100 * grads[1.0], rtol=1e-4, atol=1e-9)


def generate_three_ways(m: QuietStarLM, prompt: torch.Tensor, new: int) -> list:
    """The same seeded thinking generation with the static cache, HF's dynamic cache and no cache: asserts the
    three agree (tokens, thoughts, logits) and returns them."""
    runs = [m.generate(prompt, max_new_tokens=new, n_ahead=5, generator=torch.Generator().manual_seed(7),
                       return_thoughts=True, output_logits=True, **kw)
            for kw in ({}, {"static_cache": False}, {"use_cache": False})]
    for r in runs[1:]:
        assert torch.equal(r.tokens, runs[0].tokens) and torch.equal(r.thoughts, runs[0].thoughts)
        torch.testing.assert_close(r.logits, runs[0].logits, atol=1e-5, rtol=0)
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_a_cache_equals_recomputing_the_prefix(kind):
    m = wrapped(kind)
    prompt = windows(B=2, L=5)
    runs = generate_three_ways(m, prompt, 6)
    assert runs[0].tokens.shape == (2, 6) and runs[0].thoughts.shape == (2, 6, 3)
    assert m.generate(prompt, max_new_tokens=2, n_ahead=5).thoughts is None  # hidden by default
    # each token's mixed logits are what training computes at the last position of the text so far
    for k in (0, 3):
        text = torch.cat([prompt, runs[0].tokens[:, :k]], dim=1)
        th = runs[0].thoughts[:, k][:, None]  # [B, Lq=1, M]
        out = m.think(text, torch.tensor([text.shape[1] - 1]), n_ahead=5, n_talk=1, thought_tokens=th)
        torch.testing.assert_close(out.talk_logits[:, 0, 0], runs[0].logits[:, k], atol=1e-5, rtol=0)


def test_generate_left_padding_and_eos():
    m = wrapped("llama")
    prompt = windows(B=2, L=5)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    # n_ahead 2 (empty thoughts) and greedy tokens: no random draw, so the rows can be compared alone
    padded = m.generate(prompt, mask, max_new_tokens=4, n_ahead=2, temperature=0, output_logits=True)
    alone = m.generate(prompt[1:, 2:], max_new_tokens=4, n_ahead=2, temperature=0, output_logits=True)
    torch.testing.assert_close(padded.logits[1], alone.logits[0], atol=1e-5, rtol=0)
    assert torch.equal(padded.tokens[1], alone.tokens[0])
    # an EOS ends its row: pad afterwards
    first = int(padded.tokens[0, 0])
    stopped = m.generate(prompt, mask, max_new_tokens=4, n_ahead=2, temperature=0, eos_token_id=first,
                         pad_token_id=V - 1)
    assert stopped.tokens[0, 0] == first and (stopped.tokens[0, 1:] == V - 1).all()
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(prompt, mask.flip(1), max_new_tokens=2)


def test_gpt2_positions_past_the_model_are_a_clear_error():
    m = wrapped("gpt2")
    with pytest.raises(ValueError, match="n_positions=64"):
        m.think(windows(B=1, L=60), torch.arange(60), n_ahead=8, n_talk=2)


# ----- padding ------------------------------------------------------------------------------------------------
def compare_padded_row_with_row_alone(m: QuietStarLM, side: str, engine: str, pad: int = 3, n: int = 8) -> float:
    """Row 1 of a batch is `x` padded by `pad` on `side`; returns the largest difference, over its real
    positions, between the batch's outputs and those of `x` alone (same thoughts)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, V, (1, n), generator=g)  # [1, n]
    L = n + pad
    other = torch.randint(1, V, (1, L), generator=g)
    pads = torch.zeros(1, pad, dtype=torch.long)
    row, mask_row = (torch.cat([pads, x], 1), torch.cat([pads, torch.ones_like(x)], 1)) if side == "left" else \
        (torch.cat([x, pads], 1), torch.cat([torch.ones_like(x), pads], 1))
    ids, mask = torch.cat([other, row]), torch.cat([torch.ones_like(other), mask_row])  # [2, L]
    off = pad if side == "left" else 0  # batch column of x's position 0
    P, M, J = 2, 3, 3
    th = torch.randint(1, V, (2 * P, L, M), generator=g)  # [N, Lq=L, M]
    kw = {"n_ahead": M + 2, "n_talk": J, "passes": P, "engine": engine, "null_thought": True}
    padded = m.think(ids, torch.arange(L), thought_tokens=th, attention_mask=mask, **kw)
    alone = m.think(x, torch.arange(n), thought_tokens=th[P:, off: off + n], **kw)
    real = slice(off, off + n)
    valid = alone.talk_valid[None, :, :, None]  # [1, n, J, 1]: talk targets inside x
    diffs = [
        padded.base_logits[1, real] - alone.base_logits[0],
        (padded.talk_logits[P:, real] - alone.talk_logits) * valid,
        (padded.post_logits[P:, real] - alone.post_logits) * valid,
        (padded.mix_weight[P:, real] - alone.mix_weight) * valid,
        (padded.null_talk_logits[1:, real] - alone.null_talk_logits) * valid,
        padded.thought_logprob[P:, real] - alone.thought_logprob,
    ]
    # per-token NLL of the base and of the mixed prediction after the thought (targets x[1:])
    tgt = x[0, 1:]
    nll = torch.nn.functional.cross_entropy
    diffs.append(nll(padded.base_logits[1, real][:-1], tgt, reduction="none")
                 - nll(alone.base_logits[0, :-1], tgt, reduction="none"))
    diffs.append(nll(padded.talk_logits[P:, real][:, :-1, 0].flatten(0, 1), tgt.repeat(P), reduction="none")
                 - nll(alone.talk_logits[:, :-1, 0].flatten(0, 1), tgt.repeat(P), reduction="none"))
    assert all(torch.isfinite(t).all() for t in (padded.base_logits, padded.talk_logits, padded.thought_logprob))
    return max(d.abs().max().item() for d in diffs)


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_row_gives_the_outputs_of_the_row_alone(engine, side):
    """Padding is never attended (by the window or the thoughts) and positions count real tokens: base,
    post-thought, mixed logits, thought log-probs and the empty thought at x's real positions match x alone."""
    with torch.no_grad():
        worst = compare_padded_row_with_row_alone(wrapped("llama"), side, engine)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_left_padding_is_masked_for_other_models(kind):
    with torch.no_grad():
        worst = compare_padded_row_with_row_alone(wrapped(kind), "left", "diagonal")
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
def test_no_mask_and_an_all_ones_mask_are_the_same_computation(engine):
    m = wrapped("llama")
    x = windows()
    runs = [m.think(x, torch.tensor([0, 4, 9]), n_ahead=5, n_talk=2, passes=2, engine=engine, null_thought=True,
                    generator=torch.Generator().manual_seed(0), attention_mask=mask)
            for mask in (None, torch.ones_like(x))]
    for name in ("base_logits", "talk_logits", "post_logits", "mix_weight", "thought_tokens", "thought_logprob",
                 "null_talk_logits"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


def test_thinking_causal_lm_logits_are_the_thought_mixed_ones_of_each_row_alone():
    from lightning_rlm.models.quiet_star_lm import ThinkingCausalLM

    m = wrapped("llama")
    lm = ThinkingCausalLM(m, n_ahead=2, engine="dense")  # empty thoughts: no draw, rows comparable alone
    ids = windows(B=2, L=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits  # [B, 3, V]
        for b, start in ((0, 0), (1, 3)):
            row = ids[b : b + 1, start:]
            ref = m.think(row, torch.arange(row.shape[1] - 3, row.shape[1]), n_ahead=2, n_talk=1, engine="dense")
            torch.testing.assert_close(logits[b], ref.talk_logits[0, :, 0], atol=1e-5, rtol=0)
        # and they are not the base model's (the mixing head is open)
        assert not torch.allclose(logits[0], m.lm(ids[:1]).logits[0, -3:], atol=1e-3)
    with pytest.raises(NotImplementedError):
        lm(input_ids=ids, use_cache=True)


def test_thinking_causal_lm_generate_is_seeded_greedy_thinking_and_stops_at_any_stop_id():
    from types import SimpleNamespace

    from lightning_rlm.models.quiet_star_lm import ThinkingCausalLM

    m = wrapped("llama")
    lm = ThinkingCausalLM(m, n_ahead=4, seed=5)
    prompt = windows(B=2, L=5)
    cfg = SimpleNamespace(max_new_tokens=5, eos_token_id=[V - 2, V - 3], pad_token_id=0)
    out = lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg)
    ref = m.generate(prompt, max_new_tokens=5, n_ahead=4, temperature=0, generator=torch.Generator().manual_seed(5),
                     eos_token_id=[V - 2, V - 3])
    assert torch.equal(out[:, :5], prompt) and torch.equal(out[:, 5:], ref.tokens)
    assert torch.equal(lm.generate(input_ids=prompt, generation_config=cfg), out)  # the same thoughts every call
    first = int(ref.tokens[0, 0])
    stopped = m.generate(prompt, max_new_tokens=3, n_ahead=4, temperature=0, generator=torch.Generator().manual_seed(5),
                         eos_token_id=[V - 1, first], pad_token_id=V - 4)
    assert stopped.tokens[0, 0] == first and (stopped.tokens[0, 1:] == V - 4).all()


# ----- variable-length thoughts (variable_len: the reasoner samples its own end of thought) -----------------------
def variable(kind: str, end_init_prob: float = 0.3) -> QuietStarLM:
    m = QuietStarLM(tiny_lm(kind), torch.randn(D, generator=torch.Generator().manual_seed(1)), variable_len=True,
                    end_init_prob=end_init_prob)
    g = torch.Generator().manual_seed(2)
    torch.nn.init.normal_(m.mixing_head[-1].weight, std=0.2, generator=g)
    torch.nn.init.normal_(m.end_head.weight, std=0.05, generator=g)  # p(end) depends on the state
    return m


def scripted_thoughts(N: int, Lq: int, M: int) -> torch.Tensor:
    """[N, Lq, M] thought tokens whose end (id V) falls at every step: lengths 0 .. M (M: unfinished), with
    tokens after the end that must be ignored."""
    z = torch.randint(1, V, (N, Lq, M), generator=torch.Generator().manual_seed(4))
    for n in range(N):
        for t in range(Lq):
            length = (n + t) % (M + 1)
            if length < M:
                z[n, t, length] = V
    return z


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_variable_length_thought_equals_a_plain_forward_of_its_own_tokens(kind, engine):
    """A thought of len < M tokens gives the logits and log-probs of the model run on [context, <sot>, its len
    tokens, <eot>, talk], with <eot> right after its last token: the unused steps are hidden and the ids move
    back. Its log-prob is len token choices and the end choice; steps after the end count nothing."""
    m = variable(kind)
    x = windows()
    P, M, J, L = 2, 3, 3, 10
    z = scripted_thoughts(2 * P, L, M)
    out = m.think(x, torch.arange(L), n_ahead=M + 2, n_talk=J, passes=P, engine=engine, thought_tokens=z)
    emb = m.lm.get_input_embeddings()
    sot, eot = m.marker("start")[None], m.marker("end")[None]
    lengths = (torch.arange(2 * P)[:, None] + torch.arange(L)) % (M + 1)  # [N, Lq] as scripted
    assert torch.equal(out.thought_lengths, lengths)
    assert torch.equal(out.thought_unfinished, lengths == M)
    assert torch.equal(out.thought_step_mask, torch.arange(M) <= lengths[..., None].clamp(max=M - 1))
    assert bool((out.thought_tokens == V).any()) and not bool((out.thought_tokens[~out.thought_step_mask] != V).any())
    for b, p, t in [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 4), (0, 0, 7), (1, 1, 9)]:
        n = b * P + p
        ln = int(lengths[n, t])
        zt = z[n, t, :ln]
        talk = emb(x[b, t + 1: t + J])
        seq = torch.cat([emb(x[b, : t + 1]), sot, emb(zt), eot, talk])[None]
        ref = m.lm(inputs_embeds=seq, output_hidden_states=True)
        logits, hidden = ref.logits[0], ref.hidden_states[-1][0]
        k = min(J, L - t)
        torch.testing.assert_close(out.post_logits[n, t, :k].float(), logits[t + ln + 2: t + ln + 2 + k].float(),
                                   atol=1e-5, rtol=0)
        steps = m.step_logprobs(logits[t + 1: t + 1 + M], hidden[t + 1: t + 1 + M], 1.0)  # [<= M, V + 1]
        chosen = torch.cat([zt, torch.tensor([V])])[: min(ln + 1, M)]  # the tokens, then the end (if sampled)
        expect = torch.zeros(M)
        expect[: chosen.numel()] = steps[: chosen.numel()].gather(-1, chosen[:, None]).squeeze(-1)
        torch.testing.assert_close(out.thought_logprob[n, t], expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_engines_agree_on_loss_and_gradients_with_variable_lengths(kind):
    m = variable(kind)
    x = windows(B=2, L=12)
    positions = torch.tensor([0, 3, 5, 6, 11])
    z = scripted_thoughts(4, positions.numel(), 3)
    results = {}
    for engine in ("dense", "diagonal"):
        m.zero_grad()
        out = m.think(x, positions, n_ahead=5, n_talk=3, passes=2, engine=engine, thought_tokens=z, entropy_grad=True)
        loss = (out.talk_logits.float().log_softmax(-1)[..., 7].mean() + out.thought_logprob.sum() * 0.1
                + out.thought_entropy.sum() * 0.01 + out.base_logits.float().log_softmax(-1)[..., 5].mean())
        loss.backward()
        results[engine] = (loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    (loss_d, grads_d), (loss_g, grads_g) = results["dense"], results["diagonal"]
    assert abs(loss_d - loss_g) <= 1e-5
    assert grads_d.keys() == grads_g.keys() and "end_head.weight" in grads_d
    scale = {k: m.embedding_grad_scale if k in ("start_param", "end_param") else 1.0 for k in grads_d}
    worst = max(((grads_d[k] - grads_g[k]) / scale[k]).abs().max().item() for k in grads_d)
    assert worst <= 1e-5, worst
    assert grads_d["end_head.weight"].abs().sum() > 0


def test_sampled_variable_lengths_cover_empty_to_unfinished_and_start_at_end_init_prob():
    m = QuietStarLM(tiny_lm("llama"), torch.randn(D), variable_len=True, end_init_prob=0.25)
    x = windows(B=4, L=16)
    out = m.think(x, torch.arange(16), n_ahead=6, n_talk=2, passes=2, generator=torch.Generator().manual_seed(0))
    lengths = out.thought_lengths.flatten()
    # p(end) = 0.25 at every step before training: len k has probability 0.75^k 0.25 (k < 4), unfinished 0.75^4
    assert set(lengths.tolist()) == {0, 1, 2, 3, 4}
    assert abs(out.thought_unfinished.float().mean().item() - 0.75 ** 4) < 0.1
    assert abs((lengths == 0).float().mean().item() - 0.25) < 0.1
    end_logp = out.thought_logprob[..., 0][out.thought_lengths == 0]  # the first step picked the end
    torch.testing.assert_close(end_logp, torch.full_like(end_logp, torch.tensor(0.25).log().item()))


@pytest.mark.parametrize("kind", KINDS)
def test_variable_length_generate_equals_recomputation(kind):
    m = variable(kind)
    prompt = windows(B=3, L=5)
    runs = generate_three_ways(m, prompt, 6)
    th = runs[0].thoughts  # [B, new, M], the end id V from a thought's end on
    lengths = torch.where(th == V, torch.arange(3), 3).amin(-1)
    assert {0, 3} <= set(lengths.flatten().tolist()) and len(set(lengths.flatten().tolist())) >= 3
    for k in range(6):  # each token's mixed logits: the training computation at the end of the text so far
        text = torch.cat([prompt, runs[0].tokens[:, :k]], dim=1)
        out = m.think(text, torch.tensor([text.shape[1] - 1]), n_ahead=5, n_talk=1, thought_tokens=th[:, k][:, None])
        assert torch.equal(out.thought_lengths[:, 0], lengths[:, k])
        torch.testing.assert_close(out.talk_logits[:, 0, 0], runs[0].logits[:, k], atol=1e-5, rtol=0)


def test_variable_len_travels_with_the_export_state(tmp_path):
    from lightning_rlm.models.quiet_star_lm import THOUGHTS_FILE

    m = variable("llama")
    exp = m.exportable(n_ahead=5)
    exp.model.save_pretrained(tmp_path)
    torch.save(exp.extras[THOUGHTS_FILE], tmp_path / THOUGHTS_FILE)
    again = QuietStarLM.from_export(tmp_path)
    assert again.variable_len and torch.equal(again.end_head.weight, m.end_head.weight)
    x = windows()
    a, b = (net.think(x, torch.arange(10), n_ahead=5, n_talk=2, generator=torch.Generator().manual_seed(0))
            for net in (m, again))
    assert torch.equal(a.thought_tokens, b.thought_tokens)
    torch.testing.assert_close(a.talk_logits, b.talk_logits)


# ----- a separate reasoner (a second LM samples the thoughts, the base reads them) --------------------------------
def with_reasoner(kind: str, variable_len: bool = False) -> QuietStarLM:
    import copy

    lm = tiny_lm(kind)
    reasoner = copy.deepcopy(lm)
    with torch.no_grad():  # a reasoner that differs from the base
        for p in reasoner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    m = QuietStarLM(lm, torch.randn(D, generator=torch.Generator().manual_seed(1)), variable_len=variable_len,
                    end_init_prob=0.3, reasoner=reasoner)
    g = torch.Generator().manual_seed(2)
    torch.nn.init.normal_(m.mixing_head[-1].weight, std=0.2, generator=g)
    if variable_len:
        torch.nn.init.normal_(m.end_head.weight, std=0.05, generator=g)
    return m


@pytest.mark.parametrize("variable_len", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reasoner_samples_and_the_base_reads_each_thought(kind, variable_len):
    """The thought log-probs are the reasoner's on [context, <sot>, z]; the talk logits are the base model's on
    [context, <sot>, z, <eot>, talk] (both engines)."""
    m = with_reasoner(kind, variable_len)
    x = windows()
    P, M, J, L = 2, 3, 3, 10
    z = scripted_thoughts(2 * P, L, M) if variable_len else torch.randint(1, V, (2 * P, L, M))
    emb_b, emb_r = m.lm.get_input_embeddings(), m.reasoner.get_input_embeddings()
    sot, eot = m.marker("start")[None], m.marker("end")[None]
    for engine in ("dense", "diagonal"):
        out = m.think(x, torch.arange(L), n_ahead=M + 2, n_talk=J, passes=P, engine=engine, thought_tokens=z)
        for b, p, t in [(0, 0, 0), (1, 1, 4), (1, 0, 9), (0, 1, 6)]:
            n = b * P + p
            ln = int(out.thought_lengths[n, t])
            zt = z[n, t, :ln]
            talk = x[b, t + 1: t + J]
            ref = m.lm(inputs_embeds=torch.cat([emb_b(x[b, : t + 1]), sot, emb_b(zt), eot, emb_b(talk)])[None]).logits[0]
            k = min(J, L - t)
            torch.testing.assert_close(out.post_logits[n, t, :k], ref[t + ln + 2: t + ln + 2 + k], atol=1e-5, rtol=0)
            r = m.reasoner(inputs_embeds=torch.cat([emb_r(x[b, : t + 1]), sot, emb_r(zt)])[None],
                           output_hidden_states=True)
            steps = m.step_logprobs(r.logits[0, t + 1:], r.hidden_states[-1][0, t + 1:], 1.0)
            chosen = torch.cat([zt, torch.tensor([V])])[: min(ln + 1, M)]
            expect = torch.zeros(M)
            expect[: chosen.numel()] = steps[: chosen.numel()].gather(-1, chosen[:, None]).squeeze(-1)
            torch.testing.assert_close(out.thought_logprob[n, t], expect, atol=1e-5, rtol=0)


def test_with_a_reasoner_the_policy_trains_the_reasoner_and_the_talk_loss_the_base():
    m = with_reasoner("llama", variable_len=True)
    out = m.think(windows(), torch.arange(10), n_ahead=5, n_talk=2, passes=2, generator=torch.Generator().manual_seed(0))
    policy = out.thought_logprob.sum()
    g_base = torch.autograd.grad(policy, list(m.lm.parameters()), retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_base)  # the thoughts' log-probs are the reasoner's
    g_r = torch.autograd.grad(policy, list(m.reasoner.parameters()), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in g_r)
    talk = out.talk_logits.float().log_softmax(-1)[..., 3].mean()
    g_r = torch.autograd.grad(talk, list(m.reasoner.parameters()), retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_r)  # sampled tokens carry no gradient back
    g_base = torch.autograd.grad(talk, list(m.lm.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in g_base)


@pytest.mark.parametrize("variable_len", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_a_reasoner_equals_recomputation(kind, variable_len):
    m = with_reasoner(kind, variable_len)
    prompt = windows(B=3, L=5)
    runs = generate_three_ways(m, prompt, 5)
    for k in range(5):
        text = torch.cat([prompt, runs[0].tokens[:, :k]], dim=1)
        th = runs[0].thoughts[:, k][:, None]
        out = m.think(text, torch.tensor([text.shape[1] - 1]), n_ahead=5, n_talk=1, thought_tokens=th)
        torch.testing.assert_close(out.talk_logits[:, 0, 0], runs[0].logits[:, k], atol=1e-5, rtol=0)
        # and the thoughts were the reasoner's samples: their log-prob under the reasoner is finite
        assert bool(torch.isfinite(out.thought_logprob).all())


def test_the_reasoner_travels_with_the_export(tmp_path):
    from lightning_rlm.models.quiet_star_lm import THOUGHTS_FILE

    m = with_reasoner("llama", variable_len=True)
    exp = m.exportable(n_ahead=5)
    exp.model.save_pretrained(tmp_path)
    torch.save(exp.extras[THOUGHTS_FILE], tmp_path / THOUGHTS_FILE)
    again = QuietStarLM.from_export(tmp_path)
    assert again.reasoner is not None
    a, b = (net.think(windows(), torch.arange(10), n_ahead=5, n_talk=2, generator=torch.Generator().manual_seed(0))
            for net in (m, again))
    assert torch.equal(a.thought_tokens, b.thought_tokens)
    torch.testing.assert_close(a.talk_logits, b.talk_logits)
    torch.testing.assert_close(a.thought_logprob, b.thought_logprob)


@pytest.mark.parametrize("variable_len", [False, True])
def test_generate_samples_thoughts_from_the_reasoner(variable_len):
    m = with_reasoner("llama", variable_len)
    m.reasoner.lm_head.register_forward_hook(lambda mod, inp, out: out + 100.0 * (torch.arange(V) == 7))
    gen = m.generate(windows(B=2, L=5), max_new_tokens=4, n_ahead=5, generator=torch.Generator().manual_seed(7),
                     return_thoughts=True)
    assert set(gen.thoughts.flatten().tolist()) <= {7, V} and 7 in gen.thoughts  # the reasoner's pick (or the end)
    assert not bool((gen.tokens == 7).all())  # the text itself is the base model's
