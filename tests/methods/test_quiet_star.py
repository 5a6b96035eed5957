"""QuietStar (HF models): the loss by hand, engine equivalence of the method's loss, CLI runs with both engines."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_rlm.cli import RLMCLI
from lightning_rlm.losses import leave_one_out_baseline
from lightning_rlm.methods import QuietStar
from lightning_rlm.models.quiet_star_lm import ThinkOutput

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def test_leave_one_out_baseline_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0]])  # [positions=1, thoughts=3]
    assert leave_one_out_baseline(r).flatten().tolist() == [2.5, 2.0, 1.5]
    # the empty thought's reward (0) joins the other thoughts: (others + null) / P
    torch.testing.assert_close(leave_one_out_baseline(r, torch.zeros(1, 1)).flatten(), torch.tensor([5 / 3, 4 / 3, 1.0]))
    assert leave_one_out_baseline(r[:, :1]).flatten().tolist() == [0.0]  # one thought, no null: plain REINFORCE
    assert leave_one_out_baseline(r[:, :1], torch.tensor([[0.5]])).flatten().tolist() == [0.5]


def scripted_output() -> ThinkOutput:
    """B=1, L=2, one thinking position (t=0), P=2 thoughts of M=1 token, J=1, V=2; target x_1 = 1."""
    talk = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]).view(2, 1, 1, 2)  # p(1) = 3/4 and 1/2
    post = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]]).view(2, 1, 1, 2)  # before mixing: 1/2 and 3/4
    return ThinkOutput(
        base_logits=torch.zeros(1, 2, 2), talk_logits=talk, post_logits=post, mix_weight=torch.full((2, 1, 1, 1), 0.5),
        talk_index=torch.tensor([[0]]), talk_valid=torch.tensor([[True]]),
        thought_tokens=torch.zeros(2, 1, 1, dtype=torch.long), thought_logprob=torch.tensor([-1.0, -2.0]).view(2, 1, 1),
        thought_entropy=torch.zeros(2, 1, 1))


@pytest.mark.parametrize(("clamp", "reward_logits", "post_beta", "train_nll_num"),
                         [(False, "mixed", 0.0, None), (True, "mixed", 0.0, None), (False, "post", 0.5, None),
                          (False, "mixed", 0.0, 1)])
def test_losses_by_hand(clamp, reward_logits, post_beta, train_nll_num, tiny_llama_dir, monkeypatch):
    m = QuietStar(model_name_or_path=str(tiny_llama_dir), n_ahead=3, n_talk=1, n_passes=2, think_positions=1,
                  clamp_negative_advantage=clamp, reward_logits=reward_logits, base_loss_beta=1.0,
                  talk_loss_beta=1.0, policy_loss_beta=1.0, post_loss_beta=post_beta, train_nll_num=train_nll_num)
    m.configure_model()
    monkeypatch.setattr(m.net, "think", lambda *a, **k: scripted_output())
    monkeypatch.setattr(m, "thought_positions", lambda length, g, real=None: torch.tensor([0]))
    batch = {"input_ids": torch.tensor([[5, 1]]), "labels": torch.tensor([[1, 0]])}
    stats, _ = m.compute_losses(batch, None)
    r0, r1 = math.log(3 / 4), math.log(1 / 2)  # log p_mix of the target after thoughts 0 and 1
    nll_thought = -(r0 + r1) / 2  # the logged NLL with thoughts: every thought
    talk_nll = nll_thought if train_nll_num is None else -r0  # the trained one; train_nll_num 1: the first only
    if reward_logits == "post":  # the unmixed predictions score the thoughts the other way round
        r0, r1 = r1, r0
    a0, a1 = r0 - r1, r1 - r0  # leave-one-out with two thoughts
    if clamp:
        a1 = 0.0
    policy = -(a0 * -1.0 + a1 * -2.0) / 2
    assert stats["talk_nll"].item() == pytest.approx(talk_nll)
    assert stats["policy_loss"].item() == pytest.approx(policy)
    post_nll = -(math.log(1 / 2) + math.log(3 / 4)) / 2
    assert stats["loss"].item() == pytest.approx(math.log(2) + talk_nll + policy + post_beta * post_nll)
    assert stats["nll_base"].item() == pytest.approx(math.log(2))
    assert stats["nll_thought"].item() == pytest.approx(nll_thought)
    assert stats["gap"].item() == pytest.approx(nll_thought - math.log(2))
    assert stats["nll"].item() == pytest.approx((math.log(2) + nll_thought) / 2)  # mixed at t=0, base at t=1
    assert stats["mix_weight"].item() == pytest.approx(0.5)
    assert stats["reward"].item() == pytest.approx((r0 + r1) / 2)
    assert stats["nll_post"].item() == pytest.approx(-(math.log(1 / 2) + math.log(3 / 4)) / 2)
    assert "gap_easy" in stats and "gap_hard" not in stats  # ln 2 < 1 nat: an easy token


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_method_loss_and_gradients_match_across_engines(model_type, tiny_llama_dir):
    from lightning_rlm.data import build_tokenizer

    torch.manual_seed(0)
    config = {**TINY_QWEN2, "model_type": model_type}
    tok = build_tokenizer(str(tiny_llama_dir))
    ids = torch.randint(0, tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    m = QuietStar(model_config=config, vocab_size=tok.vocab_size, n_ahead=5, n_talk=3, n_passes=2,
                  null_thought_baseline=True)
    torch.nn.init.normal_(m.net.mixing_head[-1].weight, std=0.3)  # let the thoughts reach the loss
    _, first = m.compute_losses(batch, torch.Generator().manual_seed(1))
    grads = {}
    for engine in ("dense", "diagonal"):
        m.hparams.engine = engine
        m.zero_grad()
        stats, _ = m.compute_losses(batch, None, thought_tokens=first.thought_tokens)
        stats["loss"].backward()
        grads[engine] = (stats["loss"].item(), {k: p.grad.clone() for k, p in m.named_parameters()})
    assert grads["dense"][0] == pytest.approx(grads["diagonal"][0], abs=1e-5)

    def per_embedding(k: str) -> float:  # markers are stored / 100: compare the gradient of the used vector
        return m.hparams.embedding_grad_scale if k.endswith(("start_param", "end_param")) else 1.0

    worst = max(((grads["dense"][1][k] - grads["diagonal"][1][k]) / per_embedding(k)).abs().max().item()
                for k in grads["dense"][1])
    assert worst <= 1e-5, worst
    assert all(grads["dense"][1][k].abs().sum() > 0 for k in ("net.start_param", "net.end_param"))


def cli(tmp_path: Path, tiny_llama_dir: Path, *extra: str) -> RLMCLI:
    return RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "quiet_star/llama_tinystories.yaml"),
        f"--model.init_args.model_name_or_path={tiny_llama_dir}", f"--data.init_args.tokenizer={tiny_llama_dir}",
        "--data.init_args.block_size=24", "--data.init_args.batch_size=2", "--model.init_args.think_positions=8",
        "--model.init_args.sample_every_n_steps=2", "--model.init_args.sample_tokens=4",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra,
    ])


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
def test_fast_dev_run_on_tinystories(engine, tmp_path, tiny_llama_dir):
    c = cli(tmp_path, tiny_llama_dir, f"--model.init_args.engine={engine}", "--trainer.fast_dev_run=true")
    assert c.trainer.global_step == 1
    assert torch.isfinite(c.trainer.callback_metrics["train/loss"])


def test_cli_fit_logs_base_and_post_thought_nll_mixing_weight_and_thoughts(tmp_path, tiny_llama_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = cli(tmp_path, tiny_llama_dir, "--trainer.max_steps=3", "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1")
    assert c.trainer.global_step == 3
    events = EventAccumulator(c.trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/nll_base", "train/nll_thought", "train/gap", "train/mix_weight", "train/policy_loss",
                "train/reward", "train/thought_entropy", "val/nll", "val/nll_base", "val/nll_thought", "val/gap",
                "val/mix_weight", "val/loss"):
        assert tag in scalars, (tag, sorted(scalars))
    texts = events.Tags()["tensors"]
    assert any("thoughts" in t for t in texts) and any("samples" in t for t in texts), texts
    # the mixing head learns: its weight leaves 0 after a few steps
    assert events.Scalars("train/mix_weight")[-1].value != 0.0
    last = next(Path(tmp_path).rglob("last.ckpt"))
    loaded = QuietStar.load_from_checkpoint(last)
    for (name, p), q in zip(c.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


def test_random_model_from_config_on_shakespeare_chars(tmp_path):
    c = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "quiet_star/qwen2_shakespeare_char.yaml"), "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--data.init_args.block_size=16",
        "--data.init_args.batch_size=2", "--model.init_args.think_positions=4", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert c.trainer.global_step == 2
    assert c.model.hparams.vocab_size == c.datamodule.tokenizer.vocab_size
    # the checkpoint rebuilds without the data (vocab size saved)
    loaded = QuietStar.load_from_checkpoint(next(Path(tmp_path).rglob("last.ckpt")))
    assert torch.equal(loaded.net.start_param, c.model.net.start_param)


def test_bad_arguments_fail_at_construction(tiny_llama_dir):
    with pytest.raises(ValueError, match="exactly one of"):
        QuietStar()
    with pytest.raises(ValueError, match="n_ahead >= 2"):
        QuietStar(model_name_or_path=str(tiny_llama_dir), n_ahead=1)
    with pytest.raises(ValueError, match="thought_init_text '' encodes to no known token"):
        QuietStar(model_name_or_path=str(tiny_llama_dir), thought_init_text="")
    with pytest.raises(ValueError, match="model_type"):
        QuietStar(model_config={"hidden_size": 8})
    with pytest.raises(ValueError, match=r"train_nll_num must be in \[1, n_passes=2\]"):
        QuietStar(model_name_or_path=str(tiny_llama_dir), n_passes=2, train_nll_num=3)


# ----- padded batches ------------------------------------------------------------------------------------------
TINY_LLAMA = {**TINY_QWEN2, "model_type": "llama"}


def padded_rows(seqs: list[torch.Tensor], sides: list[str], width: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """Windows input = seq[:-1], labels = seq[1:], each padded to `width` on its side (labels there: pad)."""
    ids, labels, mask = [], [], []
    for s, side in zip(seqs, sides):
        n = s.numel() - 1
        fill = torch.full((width - n,), pad)
        real = torch.ones(n, dtype=torch.long)
        cat = (lambda a, b: torch.cat([b, a])) if side == "left" else (lambda a, b: torch.cat([a, b]))
        ids.append(cat(s[:-1], fill))
        labels.append(cat(s[1:], fill))
        mask.append(cat(real, torch.zeros_like(fill)))
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels), "attention_mask": torch.stack(mask)}


def test_nll_base_on_a_padded_batch_is_the_mean_nll_over_real_labels():
    """Reference by hand: a plain HF forward of each row's real tokens alone, its NLL summed over its real
    labels (a -100 label skipped), divided by the number of real labels of the batch."""
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=4, n_talk=2, n_passes=2, think_positions=5)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 64, (n + 1,), generator=g) for n in (12, 7, 9)]
    batch = padded_rows(seqs, ["left", "left", "right"], width=12)
    batch["labels"][0, 4] = -100  # an ignored label inside a real row
    stats, out = m.compute_losses(batch, torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    with torch.no_grad():
        for b, s in enumerate(seqs):
            x, y = s[:-1], s[1:].clone()
            if b == 0:
                y[4] = -100
            logits = m.net.lm(input_ids=x[None]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            count += int((y != -100).sum())
    assert count == 11 + 7 + 9
    assert stats["nll_base"].item() == pytest.approx(total / count, abs=1e-5)
    # the unmasked mean over every position (what it was) is a different number
    V = out.base_logits.shape[-1]
    lab = batch["labels"].clamp(min=0)
    everything = torch.nn.functional.cross_entropy(out.base_logits.reshape(-1, V), lab.reshape(-1)).item()
    assert abs(everything - total / count) > 1e-2
    assert all(torch.isfinite(v) for v in stats.values())


def test_thinking_positions_skip_columns_that_are_padding_in_every_row():
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, think_every=2)
    real = torch.tensor([False] * 3 + [True] * 7)
    assert m.thought_positions(10, None, real).tolist() == [4, 6, 8]
    assert m.thought_positions(10, None).tolist() == [0, 2, 4, 6, 8]
    m.hparams.think_positions = 2
    for seed in range(5):
        picked = m.thought_positions(10, torch.Generator().manual_seed(seed), real)
        assert len(picked) == 2 and all(int(t) in (4, 6, 8) for t in picked)


@pytest.mark.parametrize("engine", ["dense", "diagonal"])
def test_method_losses_and_gradients_do_not_depend_on_padding(engine):
    """The same two rows, left-padded to width 10 and to width 13: every loss, statistic and gradient is the
    same (columns padded in every row are not thought at, so the thoughts line up column for column)."""
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=4, n_talk=3, n_passes=2, engine=engine,
                  null_thought_baseline=True)
    torch.nn.init.normal_(m.net.mixing_head[-1].weight, std=0.3)  # let the thoughts reach the loss
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 64, (n + 1,), generator=g) for n in (10, 6)]
    narrow, wide = padded_rows(seqs, ["left", "left"], 10), padded_rows(seqs, ["left", "left"], 13)
    _, first = m.compute_losses(narrow, torch.Generator().manual_seed(1))
    results = []
    for batch in (narrow, wide):
        m.zero_grad()
        stats, out = m.compute_losses(batch, None, thought_tokens=first.thought_tokens)
        stats["loss"].backward()
        results.append(({k: v.item() for k, v in stats.items()},
                        {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    (s0, g0), (s1, g1) = results
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s1[k] == pytest.approx(s0[k], abs=1e-5), k
    assert g0.keys() == g1.keys()
    # the markers are stored divided by embedding_grad_scale (x100 gradient): compare the gradient of the vector used
    scale = {k: m.net.embedding_grad_scale if k.endswith(("start_param", "end_param")) else 1.0 for k in g0}
    worst = max(((g0[k] - g1[k]) / scale[k]).abs().max().item() for k in g0)
    assert worst <= 1e-5, worst


# ----- seed 001's knobs on the transformer version ------------------------------------------------------------
def test_without_the_reasoner_the_loss_is_the_lm_baselines():
    """use_reasoner: false trains the plain LM: its loss equals the LM baseline's (LanguageModel.nll: mean
    next-token cross-entropy) on the same weights and batch, and gradients reach only the LM."""
    from lightning_rlm.methods import LanguageModel

    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, use_reasoner=False)
    x = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    stats, out = m.compute_losses(batch, torch.Generator().manual_seed(1))
    assert out is None and set(stats) == {"loss", "nll", "nll_base"}
    lm = m.net.lm
    baseline = LanguageModel(network=lambda v: _Logits(lm), vocab_size=64)
    assert stats["loss"].item() == pytest.approx(baseline.nll(batch).item(), abs=1e-6)
    stats["loss"].backward()
    assert all(p.grad is None for n, p in m.net.named_parameters() if not n.startswith("lm."))


class _Logits(torch.nn.Module):
    """An HF causal LM as the LM baseline's network (input_ids -> logits)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def test_talk_gate_passes_no_gradient_for_thoughts_worse_than_the_null_thought():
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=4, n_talk=2, n_passes=2, think_positions=4,
                  null_thought_baseline=True, talk_gate=True, policy_loss_beta=0.0, base_loss_beta=0.0)
    x = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    stats, out = m.compute_losses(batch, torch.Generator().manual_seed(1))
    # recompute each thought's reward and the null thought's by hand from the model's outputs
    B, P, Lq, J = 2, 2, 4, 2
    tgt = batch["labels"][:, out.talk_index]  # [B, Lq, J]
    valid = out.talk_valid[None].expand(B, Lq, J).float()

    def logp(logits: torch.Tensor, rows: int) -> torch.Tensor:
        lp = torch.log_softmax(logits.float(), -1).view(B, rows, Lq, J, -1)
        return lp.gather(-1, tgt[:, None, ..., None].expand(B, rows, Lq, J, 1))[..., 0]

    reward = (logp(out.talk_logits, P) * valid[:, None]).sum(-1).detach()  # [B, P, Lq]
    null = (logp(out.null_talk_logits, 1) * valid[:, None]).sum(-1)  # [B, 1, Lq]
    open_ = reward > null
    assert 0 < open_.float().mean() < 1  # some thoughts beat the null thought, some do not
    assert stats["talk_gate_open"].item() == pytest.approx(open_.float().mean().item())
    # the talk loss is the mean over targets of the open thoughts only: each closed thought's targets add 0
    lp = logp(out.talk_logits, P)
    expected = -(lp * valid[:, None] * open_[..., None]).sum() / (valid.sum() * P)
    assert stats["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    # and no gradient flows through a closed thought's talk logits
    grads = torch.autograd.grad(stats["loss"], out.talk_logits, retain_graph=True)[0].view(B, P, Lq, J, -1)
    assert grads[~open_].abs().max() == 0 and grads[open_].abs().max() > 0


def test_interest_and_max_entropy_metrics():
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=4, n_talk=1, n_passes=2, think_positions=6,
                  interest_percentile=0.5)
    x = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    stats, out = m.compute_losses(batch, torch.Generator().manual_seed(1))
    assert stats["thought_entropy_max"].item() == pytest.approx(out.thought_entropy.max().item())
    assert stats["thought_entropy_max"] >= stats["thought_entropy"]
    # tokens of interest: the thinking positions whose base NLL is at or above the median
    V = out.base_logits.shape[-1]
    base = torch.nn.functional.cross_entropy(out.base_logits.reshape(-1, V), batch["labels"].reshape(-1),
                                             reduction="none").view(2, -1)
    positions = out.talk_index[:, 0]
    at = base[:, positions]  # [B, Lq]
    hard = at >= torch.quantile(at.flatten(), 0.5)
    assert stats["nll_base_interest"].item() == pytest.approx(at[hard].mean().item(), abs=1e-5)
    assert stats["nll_base_interest"] >= stats["nll_base_at_thought"]


def test_talk_gate_needs_the_null_thought():
    with pytest.raises(ValueError, match="null_thought_baseline"):
        QuietStar(model_config=TINY_LLAMA, vocab_size=64, talk_gate=True)


# ----- variable-length thoughts ---------------------------------------------------------------------------------
def scripted_variable_output() -> ThinkOutput:
    """B=1, L=2, one thinking position (t=0), P=2 thoughts of at most M=2 tokens, J=1, V=2; target x_1 = 1.
    Thought 0 is empty (its first step picked the end), thought 1 used both tokens without ending."""
    out = scripted_output()
    out.thought_tokens = torch.tensor([[[2, 2]], [[1, 0]]])  # the end id V=2 from thought 0's end on
    out.thought_logprob = torch.tensor([[[-1.0, 0.0]], [[-0.5, -0.7]]])  # log pi of the sampled steps, 0 after
    out.thought_entropy = torch.tensor([[[1.0, 0.0]], [[2.0, 4.0]]])
    out.thought_lengths = torch.tensor([[0], [2]])
    out.thought_step_mask = torch.tensor([[[True, False]], [[True, True]]])
    out.thought_unfinished = torch.tensor([[False], [True]])
    return out


def test_variable_length_reward_penalties_entropy_bonus_and_stats_by_hand(tiny_llama_dir, monkeypatch):
    m = QuietStar(model_name_or_path=str(tiny_llama_dir), n_ahead=4, n_talk=1, n_passes=2, think_positions=1,
                  variable_len=True, length_penalty=0.1, punish_unfinished=0.3, entropy_encouragement_coef=0.5)
    m.configure_model()
    monkeypatch.setattr(m.net, "think", lambda *a, **k: scripted_variable_output())
    monkeypatch.setattr(m, "thought_positions", lambda length, g, real=None: torch.tensor([0]))
    batch = {"input_ids": torch.tensor([[5, 1]]), "labels": torch.tensor([[1, 0]])}
    stats, _ = m.compute_losses(batch, None)
    r0 = math.log(3 / 4) - 0.1 * 0  # the empty thought: no length, finished
    r1 = math.log(1 / 2) - 0.1 * 2 - 0.3  # two tokens, unfinished
    a0, a1 = r0 - r1, r1 - r0
    policy = -(a0 * -1.0 + a1 * (-0.5 - 0.7)) / 2  # log pi of a thought: its sampled steps only
    entropy = (1.0 + 2.0 + 4.0) / 3  # mean over the three sampled steps
    talk_nll = -(math.log(3 / 4) + math.log(1 / 2)) / 2
    assert stats["reward"].item() == pytest.approx((r0 + r1) / 2)
    assert stats["policy_loss"].item() == pytest.approx(policy)
    assert stats["loss"].item() == pytest.approx(math.log(2) + talk_nll + policy - 0.5 * entropy)
    assert stats["thought_entropy"].item() == pytest.approx((1.0 + 3.0) / 2)  # per thought, then over thoughts
    assert stats["thought_entropy_max"].item() == pytest.approx(4.0)
    assert stats["thought_len"].item() == pytest.approx(1.0)
    assert stats["frac_empty"].item() == pytest.approx(0.5) and stats["frac_unfinished"].item() == pytest.approx(0.5)
    # the base NLL of x_1 is ln 2 < 1 nat: both thoughts are in the easy bucket
    assert stats["frac_empty_easy"].item() == pytest.approx(0.5) and stats["thought_len_easy"].item() == 1.0
    assert "frac_empty_hard" not in stats


def test_the_entropy_bonus_reaches_the_policy_through_a_real_model():
    torch.manual_seed(0)
    x = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    runs = {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=5, n_talk=2, n_passes=2, think_positions=4,
                      variable_len=True, end_init_prob=0.3, entropy_encouragement_coef=coef)
        stats, out = m.compute_losses(batch, torch.Generator().manual_seed(1))
        stats["loss"].backward()
        runs[coef] = (stats, m.net.end_head.weight.grad.clone())
    (s0, g0), (s1, g1) = runs[0.0], runs[0.5]
    steps = out.thought_step_mask
    entropy = out.thought_entropy[steps].mean()  # over the sampled steps of every thought (all positions real)
    assert s1["loss"].item() == pytest.approx(s0["loss"].item() - 0.5 * entropy.item(), abs=1e-5)
    assert not torch.allclose(g0, g1)  # the bonus's gradient reaches the end-of-thought head
    assert 0 < s0["frac_empty"].item() < 1 and 0 < s0["thought_len"].item() < 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"length_penalty": 0.1}, "need variable_len=True"),
    ({"punish_unfinished": 1.0}, "need variable_len=True"),
    ({"variable_len": True, "n_ahead": 2}, "n_ahead >= 3"),
    ({"variable_len": True, "use_reasoner": False}, "variable_len change the thoughts"),
    ({"variable_len": True, "end_init_prob": 1.0}, "end_init_prob must be in"),
])
def test_variable_length_settings_that_mean_nothing_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuietStar(model_config=TINY_LLAMA, vocab_size=64, **kwargs)


def test_a_separate_reasoner_on_a_frozen_base():
    """separate_reasoner: a copy of the base samples the thoughts; train_base: false leaves the base's weights
    without gradient while the reasoner (policy loss), the markers and the mixing head train."""
    torch.manual_seed(0)
    m = QuietStar(model_config=TINY_LLAMA, vocab_size=64, n_ahead=5, n_talk=2, n_passes=2, think_positions=4,
                  separate_reasoner=True, train_base=False, variable_len=True, end_init_prob=0.3)
    net = m.net
    assert net.reasoner is not None and net.reasoner is not net.lm
    assert all(torch.equal(a, b) for a, b in zip(net.lm.state_dict().values(), net.reasoner.state_dict().values()))
    torch.nn.init.normal_(net.mixing_head[-1].weight, std=0.3)
    x = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(3))
    stats, _ = m.compute_losses({"input_ids": x[:, :-1], "labels": x[:, 1:]}, torch.Generator().manual_seed(1))
    stats["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in net.lm.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in net.reasoner.parameters())
    assert net.start_param.grad.abs().max() > 0 and net.mixing_head[-1].weight.grad.abs().max() > 0
    assert {id(p) for p in net.lm.parameters()}.isdisjoint({id(p) for g in m.configure_optimizers()["optimizer"]
                                                            .param_groups for p in g["params"]})


def test_separate_reasoner_needs_thoughts():
    with pytest.raises(ValueError, match="separate_reasoner"):
        QuietStar(model_config=TINY_LLAMA, vocab_size=64, separate_reasoner=True, use_reasoner=False)
