"""QuietStar's seed-001 thought layout knobs (`use_residual`, `add_last_context_token`,
`increment_pos_id_for_last_context_token`, `different_eot`, the surrogate loss on the last context token): the
sequence and position ids the model feeds, built by hand; a plain forward of that sequence; both engines; thinking
generation against recomputation; the surrogate loss by hand; defaults unchanged; bad combinations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_rlm.methods import QuietStar
from lightning_rlm.models.quiet_star_lm import QuietStarLM, ThinkOutput, final_block_offsets

V, D = 48, 32
TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
KNOBS_ON = {"use_residual": True, "add_last_context_token": True, "different_eot": False}
LAYOUTS = [  # every layout the position-id option gives, with the other knobs on and off
    {},
    {"add_last_context_token": True},
    {"add_last_context_token": True, "increment_pos_id_for_last_context_token": True},
    {"use_residual": True},
    {"different_eot": False},
    KNOBS_ON,
    {**KNOBS_ON, "increment_pos_id_for_last_context_token": True},
]


def layout_id(layout: dict[str, bool]) -> str:
    return ",".join(f"{k}={v}" for k, v in layout.items()) or "defaults"


def tiny_lm(kind: str = "llama") -> torch.nn.Module:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": V, "hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 0, "bos_token_id": 0,
              "pad_token_id": 0}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def wrapped(kind: str = "llama", **layout: bool) -> QuietStarLM:
    m = QuietStarLM(tiny_lm(kind), torch.randn(D, generator=torch.Generator().manual_seed(1)), **layout)
    with torch.no_grad():  # distinct markers and a non-zero mixing weight, so every piece shows in the outputs
        m.end_param.add_(torch.randn(D, generator=torch.Generator().manual_seed(4)) / m.embedding_grad_scale)
    torch.nn.init.normal_(m.mixing_head[-1].weight, std=0.2, generator=torch.Generator().manual_seed(2))
    return m


def windows(B: int = 2, L: int = 10) -> Tensor:
    return torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(3))


# ----- the sequence and the position ids, by hand -----------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=layout_id)
def test_the_thought_sequence_and_position_ids_are_the_hand_built_ones(layout, monkeypatch):
    """Record every input the model feeds for a thought (embeddings and position ids) and compare them with the
    sequence written out by hand for x = [x_0 .. x_5], t = 1 and 3, M = 2 thought tokens, J = 3 talk tokens."""
    m = wrapped(**layout)
    x = windows(B=1, L=6)
    positions, M, J = torch.tensor([1, 3]), 2, 3
    z = torch.tensor([[[7, 8], [9, 10]]])  # [N=1, Lq=2, M]
    calls: list[tuple[Tensor, Tensor]] = []
    forward = m._forward

    def record(embeds: Tensor, position_ids: Tensor, lm=None) -> tuple[Tensor, Tensor]:
        calls.append((embeds.detach().clone(), position_ids.clone()))
        return forward(embeds, position_ids, lm)

    monkeypatch.setattr(m, "_forward", record)
    m.think(x, positions, n_ahead=M + 2, n_talk=J, thought_tokens=z)
    base, *thought_calls = calls
    assert torch.equal(base[1], torch.arange(6)[None])
    # per thinking position q, the thought inputs in order: one step per sampling call, then the final block
    fed = [torch.cat([e.view(1, 2, -1, D)[0, q] for e, _ in thought_calls]) for q in range(2)]
    fed_pos = [torch.cat([p.view(1, 2, -1)[0, q] for _, p in thought_calls]) for q in range(2)]
    emb = m.lm.get_input_embeddings()
    sot, eot = m.marker("start")[None], m.marker("end")[None]
    for q, t in enumerate(positions.tolist()):
        thought = [sot, emb(z[0, q]), eot]  # <sot> z_1 z_2 <eot> at p_t + 1 .. p_t + 4
        thought_pos = [t + 1, t + 2, t + 3, t + 4]
        if not layout:  # <eot> predicts x_{t+1}; the talk inputs x_{t+1}, x_{t+2} continue the ids
            seq, pos = [*thought, emb(x[0, t + 1: t + 3])], [*thought_pos, t + 5, t + 6]
        elif not layout.get("increment_pos_id_for_last_context_token"):  # x_t again, at its own id p_t
            seq, pos = [*thought, emb(x[0, t: t + 3])], [*thought_pos, t, t + 1, t + 2]
        else:  # x_t again, its id continuing after <eot>
            seq, pos = [*thought, emb(x[0, t: t + 3])], [*thought_pos, t + 5, t + 6, t + 7]
        assert torch.equal(fed[q], torch.cat(seq)), (layout, t)
        assert fed_pos[q].tolist() == pos, (layout, t)
    # the helper the model uses says the same (ids relative to p_t of [z_M, <eot>, ...])
    offsets = final_block_offsets(M, J, layout.get("add_last_context_token", False),
                                  layout.get("increment_pos_id_for_last_context_token", False))
    assert offsets.tolist() == [p - 3 for p in pos[M:]]


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_each_thought_equals_a_plain_forward_of_the_hand_built_sequence(layout, kind, engine):
    """The parallel thoughts equal the LM run on [x_0 .. x_t, <sot>, z, <eot>, (x_t,) talk] with the hand-written
    position ids: post-thought logits (plus the base ones with use_residual), the <eot> output, the empty thought."""
    m = wrapped(kind, **layout)
    x = windows()
    P, M, J, L = 2, 3, 3, 10
    out = m.think(x, torch.arange(L), n_ahead=M + 2, n_talk=J, passes=P, engine=engine,
                  generator=torch.Generator().manual_seed(0), null_thought=True)
    refeed, inc = layout.get("add_last_context_token", False), layout.get("increment_pos_id_for_last_context_token")
    assert (out.eot_logits is not None) == refeed
    emb = m.lm.get_input_embeddings()
    sot, eot = m.marker("start")[None], m.marker("end")[None]
    if layout.get("different_eot") is False:
        assert torch.equal(eot, sot)
    for b, p, t in [(0, 0, 0), (1, 1, 4), (1, 0, 9)]:
        n, k = b * P + p, min(J, L - t)  # k: talk targets inside the window
        for zs, m_len in ((out.thought_tokens[n, t], M), (x.new_zeros(0), 0)):  # the thought, the empty one
            talk_from = t if refeed else t + 1
            talk = emb(x[b, talk_from: t + J])
            seq = torch.cat([emb(x[b, : t + 1]), sot, emb(zs), eot, talk])[None]
            pos = list(range(t + 1)) + [t + 1 + i for i in range(m_len + 2)]
            if not refeed:
                pos += [t + m_len + 3 + j for j in range(talk.shape[0])]
            elif inc:
                pos += [t + m_len + 3 + j for j in range(talk.shape[0])]
            else:
                pos += [t + j for j in range(talk.shape[0])]
            ref = m.lm(inputs_embeds=seq, position_ids=torch.tensor([pos]), output_hidden_states=True)
            first = t + m_len + 2 + int(refeed)  # the output predicting x_{t+1}
            post = ref.logits[0, first: first + k]
            if layout.get("use_residual"):
                post = out.base_logits[b, t: t + k] + post
            if m_len:
                torch.testing.assert_close(out.post_logits[n, t, :k], post, atol=1e-5, rtol=0)
                if refeed:
                    torch.testing.assert_close(out.eot_logits[n, t], ref.logits[0, first - 1], atol=1e-5, rtol=0)
            else:
                base_h = m.lm(input_ids=x[b: b + 1], output_hidden_states=True).hidden_states[-1][0, t: t + k]
                expect, _ = m.mix(out.base_logits[b, t: t + k], base_h, post,
                                  ref.hidden_states[-1][0, first: first + k])
                torch.testing.assert_close(out.null_talk_logits[b, t, :k], expect, atol=1e-5, rtol=0)


# ----- both engines ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=layout_id)
def test_dense_and_diagonal_engines_agree_with_the_knobs_on(layout):
    m = wrapped("qwen2", **layout)
    x = windows(B=2, L=12)
    positions = torch.tensor([0, 3, 5, 6, 11])
    first = m.think(x, positions, n_ahead=5, n_talk=3, passes=2, generator=torch.Generator().manual_seed(0))
    results = {}
    for engine in ("dense", "diagonal"):
        m.zero_grad()
        out = m.think(x, positions, n_ahead=5, n_talk=3, passes=2, engine=engine, thought_tokens=first.thought_tokens,
                      null_thought=True)
        loss = (out.talk_logits.float().log_softmax(-1)[..., 7].mean() + out.thought_logprob.sum() * 0.1
                + out.base_logits.float().log_softmax(-1)[..., 5].mean() + out.null_talk_logits[..., 3].mean())
        if out.eot_logits is not None:
            loss = loss + out.eot_logits.float().log_softmax(-1)[..., 2].mean()
        loss.backward()
        results[engine] = (loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    (loss_d, grads_d), (loss_g, grads_g) = results["dense"], results["diagonal"]
    assert abs(loss_d - loss_g) <= 1e-5
    assert grads_d.keys() == grads_g.keys()
    frozen = layout.get("different_eot") is False  # one marker: end_param is frozen, <sot> gets both gradients
    assert ("end_param" in grads_d) == (not frozen) and m.end_param.requires_grad == (not frozen)
    scale = {k: m.embedding_grad_scale if k in ("start_param", "end_param") else 1.0 for k in grads_d}
    worst = max(((grads_d[k] - grads_g[k]) / scale[k]).abs().max().item() for k in grads_d)
    assert worst <= 1e-5, worst


def method(**kwargs: Any) -> QuietStar:
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_QWEN2, vocab_size=V, n_ahead=5, n_talk=3, n_passes=2, null_thought_baseline=True,
                  **kwargs)
    torch.nn.init.normal_(m.net.mixing_head[-1].weight, std=0.3, generator=torch.Generator().manual_seed(5))
    return m


def batch(B: int = 2, L: int = 16) -> dict[str, Tensor]:
    ids = torch.randint(0, V, (B, L + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


@pytest.mark.parametrize("inc", [False, True])
def test_method_loss_and_gradients_match_across_engines_with_every_knob_on(inc):
    m = method(**KNOBS_ON, increment_pos_id_for_last_context_token=inc, add_surogate_loss_to_last_context_token=True,
               last_context_loss_beta=0.5)
    b = batch()
    _, first = m.compute_losses(b, torch.Generator().manual_seed(1))
    grads = {}
    for engine in ("dense", "diagonal"):
        m.hparams.engine = engine
        m.zero_grad()
        stats, _ = m.compute_losses(b, None, thought_tokens=first.thought_tokens)
        stats["loss"].backward()
        grads[engine] = (stats, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    (sd, gd), (sg, gg) = grads["dense"], grads["diagonal"]
    for name in ("loss", "last_context_nll", "talk_nll", "policy_loss"):
        assert sd[name].item() == pytest.approx(sg[name].item(), abs=1e-5), name
    assert gd.keys() == gg.keys() and "net.end_param" not in gd  # different_eot=False: one marker
    scale = {k: m.hparams.embedding_grad_scale if k.endswith("_param") else 1.0 for k in gd}
    worst = max(((gd[k] - gg[k]) / scale[k]).abs().max().item() for k in gd)
    assert worst <= 1e-5, worst


# ----- the defaults are the layout without the knobs ------------------------------------------------------------------
OFF = {"use_residual": False, "add_last_context_token": False, "increment_pos_id_for_last_context_token": False,
       "different_eot": True, "add_surogate_loss_to_last_context_token": False, "last_context_loss_beta": 0.0}


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
def test_every_knob_off_is_the_default_run_exactly(engine):
    """A run with each knob passed at its off value equals a default-constructed one on the same seed: the same
    statistics and gradients, bit for bit (and no extra statistic)."""
    runs = []
    for kwargs in ({}, OFF):
        m = method(engine=engine, **kwargs)
        stats, out = m.compute_losses(batch(), torch.Generator().manual_seed(1))
        stats["loss"].backward()
        runs.append((stats, out, {k: p.grad for k, p in m.named_parameters()}))
    (s0, o0, g0), (s1, o1, g1) = runs
    assert s0.keys() == s1.keys() and "last_context_nll" not in s0
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert torch.equal(o0.thought_tokens, o1.thought_tokens) and torch.equal(o0.talk_logits, o1.talk_logits)
    assert o0.eot_logits is None and o1.eot_logits is None
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert g0["net.end_param"] is not None  # <eot> is its own learned vector by default


def test_model_defaults_are_the_layout_without_knobs():
    x = windows()
    runs = [wrapped("llama", **kw).think(x, torch.arange(10), n_ahead=5, n_talk=3, passes=2,
                                         generator=torch.Generator().manual_seed(0), null_thought=True)
            for kw in ({}, {k: OFF[k] for k in ("use_residual", "add_last_context_token",
                                                 "increment_pos_id_for_last_context_token", "different_eot")})]
    for name in ("base_logits", "talk_logits", "post_logits", "thought_tokens", "null_talk_logits"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


# ----- the surrogate loss, by hand ------------------------------------------------------------------------------------
def scripted_output() -> ThinkOutput:
    """B=1, L=2, one thinking position t=0 with x_0 = 1, P=2 thoughts of M=1 token, J=1, V=2; target x_1 = 0.
    The outputs at <eot> predict x_0 = 1 with p = 3/4 and 1/4."""
    talk = torch.zeros(2, 1, 1, 2)  # p(x_1) = 1/2 after both thoughts
    eot = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]]).view(2, 1, 2)
    return ThinkOutput(
        base_logits=torch.zeros(1, 2, 2), talk_logits=talk, post_logits=talk.clone(),
        mix_weight=torch.full((2, 1, 1, 1), 0.5), talk_index=torch.tensor([[0]]), talk_valid=torch.tensor([[True]]),
        thought_tokens=torch.zeros(2, 1, 1, dtype=torch.long), thought_logprob=torch.tensor([-1.0, -2.0]).view(2, 1, 1),
        thought_entropy=torch.zeros(2, 1, 1), eot_logits=eot)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_surrogate_loss_on_the_last_context_token_by_hand(beta, monkeypatch):
    m = QuietStar(model_config=TINY_QWEN2, vocab_size=V, n_ahead=3, n_talk=1, n_passes=2, add_last_context_token=True,
                  add_surogate_loss_to_last_context_token=True, last_context_loss_beta=beta)
    monkeypatch.setattr(m.net, "think", lambda *a, **k: scripted_output())
    monkeypatch.setattr(m, "thought_positions", lambda length, g, real=None: torch.tensor([0]))
    stats, _ = m.compute_losses({"input_ids": torch.tensor([[1, 0]]), "labels": torch.tensor([[0, 1]])}, None)
    last_context = -(math.log(3 / 4) + math.log(1 / 4)) / 2  # -log p(x_0 = 1) at <eot>, mean over the 2 thoughts
    assert stats["last_context_nll"].item() == pytest.approx(last_context)
    # equal rewards: advantage 0, no policy term; base NLL ln 2 at both positions, talk NLL ln 2
    assert stats["loss"].item() == pytest.approx(math.log(2) + math.log(2) + beta * last_context)


def test_surrogate_loss_is_the_nll_of_x_t_at_eot_on_a_real_model():
    m = method(add_last_context_token=True, add_surogate_loss_to_last_context_token=True, last_context_loss_beta=0.1)
    b = batch()
    stats, out = m.compute_losses(b, torch.Generator().manual_seed(1))
    positions = out.talk_index[:, 0]  # the thinking positions t
    x_t = b["input_ids"][:, positions].repeat_interleave(2, 0)  # [N, Lq]
    by_hand = -out.eot_logits.float().log_softmax(-1).gather(-1, x_t[..., None]).mean()
    assert stats["last_context_nll"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    stats["loss"].backward()  # with beta > 0 the surrogate reaches the thought markers
    assert m.net.end_param.grad is not None and m.net.end_param.grad.abs().sum() > 0


# ----- thinking generation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=layout_id)
def test_generate_with_the_knobs_equals_recomputation(layout, kind):
    """Cached, uncached-HF and recompute-everything generation agree, and each token's mixed logits are what
    `think` computes at the last position of the text so far (also with empty thoughts, n_ahead 2)."""
    m = wrapped(kind, **layout)
    prompt = windows(B=2, L=5)
    for n_ahead in (5, 2):
        runs = [m.generate(prompt, max_new_tokens=5, n_ahead=n_ahead, generator=torch.Generator().manual_seed(7),
                           return_thoughts=True, output_logits=True, **kw)
                for kw in ({}, {"static_cache": False}, {"use_cache": False})]
        for r in runs[1:]:
            assert torch.equal(r.tokens, runs[0].tokens) and torch.equal(r.thoughts, runs[0].thoughts)
            torch.testing.assert_close(r.logits, runs[0].logits, atol=1e-5, rtol=0)
        for k in (0, 2, 4):
            text = torch.cat([prompt, runs[0].tokens[:, :k]], dim=1)
            th = runs[0].thoughts[:, k][:, None]  # [B, Lq=1, M]
            out = m.think(text, torch.tensor([text.shape[1] - 1]), n_ahead=n_ahead, n_talk=1, thought_tokens=th)
            torch.testing.assert_close(out.talk_logits[:, 0, 0], runs[0].logits[:, k], atol=1e-5, rtol=0)


# ----- bad combinations -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"increment_pos_id_for_last_context_token": True},
     "increment_pos_id_for_last_context_token=True .* needs add_last_context_token=True"),
    ({"add_surogate_loss_to_last_context_token": True},
     "add_surogate_loss_to_last_context_token=True .* needs add_last_context_token=True"),
    ({"last_context_loss_beta": 0.5}, "last_context_loss_beta=0.5 .* needs add_surogate_loss_to_last_context_token"),
    ({"add_last_context_token": True, "last_context_loss_beta": 0.5},
     "last_context_loss_beta=0.5 .* needs add_surogate_loss_to_last_context_token"),
    ({"add_last_context_token": True, "add_surogate_loss_to_last_context_token": True, "last_context_loss_beta": -1},
     "last_context_loss_beta must be >= 0, got -1"),
    ({"use_reasoner": False, "use_residual": True}, "use_residual change the thoughts, but use_reasoner=False"),
    ({"use_reasoner": False, "different_eot": False}, "different_eot=False change the thoughts"),
])
def test_bad_combinations_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuietStar(model_config=TINY_QWEN2, **kwargs)


def test_the_model_refuses_a_position_option_without_the_re_fed_token():
    with pytest.raises(ValueError, match="needs add_last_context_token=True"):
        QuietStarLM(tiny_lm(), increment_pos_id_for_last_context_token=True)


def test_layout_travels_with_the_export_state():
    m = wrapped(**KNOBS_ON)
    state = m.thought_state()
    assert state["layout"] == {**KNOBS_ON, "increment_pos_id_for_last_context_token": False, "variable_len": False}
    again = QuietStarLM(tiny_lm(), None, state["embedding_grad_scale"], state["mixing"], **state["layout"])
    assert again.layout() == m.layout()


class _Chars:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + i) for i in ids)


@pytest.mark.parametrize("refeed", [False, True])
def test_logged_thoughts_show_the_re_fed_last_context_token(refeed):
    from lightning_rlm.rollout.thoughts import thought_lines

    m = wrapped(add_last_context_token=refeed)
    x = windows(B=1, L=6)
    out = m.think(x, torch.tensor([2]), n_ahead=4, n_talk=1, generator=torch.Generator().manual_seed(0))
    (line,) = thought_lines(_Chars(), {"input_ids": x, "labels": x.roll(-1, 1)}, out, 1)
    after = f"⟨/t⟩`{chr(65 + int(x[0, 2]))}` → " if refeed else "⟨/t⟩ → "
    assert after in line, line
