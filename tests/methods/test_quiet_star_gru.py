"""QuietStarGRU: thought decoding, the TRICE baseline, detaching, the NLL baseline, weight groups, a CLI run."""

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_rlm.cli import RLMCLI
from lightning_rlm.losses import leave_one_out_baseline
from lightning_rlm.methods import LanguageModel, QuietStarGRU
from lightning_rlm.models import GRULanguageModel
from lightning_rlm.models.quiet_star_gru import QuietStarGRUNet
from lightning_rlm.rollout import sample_categorical

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 11  # vocab; the end-of-thought id is V


def tiny(**kwargs) -> QuietStarGRU:
    kwargs = {"vocab_size": V, "base_lm_hidden_dim": 8, "reasoner_hidden_dim": 12, "interpreter_hidden_dim": 10,
              "max_reasoning_len": 4, "trice_samples": 3, **kwargs}
    return QuietStarGRU(**kwargs)


def window(B: int = 2, T: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    x = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


class ScriptedPolicy(nn.Module):
    """Stands in for the reasoner's head: at thought step j, all mass on script[j]."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script, self.calls = script, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.full((h.size(0), V + 1), -1e4)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits  # [N, V+1]


# ----- thought decoding --------------------------------------------------------------------------------------
def test_thought_ends_at_the_end_of_thought_token_and_the_interpreter_reads_exactly_it():
    torch.manual_seed(0)
    m = tiny()
    m.net.policy_head = ScriptedPolicy([5, 7, V])  # two tokens then the end of thought
    batch = window()
    out = m(batch["input_ids"])
    th = out.thoughts
    assert th.lengths.eq(2).all() and not th.unfinished.any()
    assert th.n_sampled.eq(3).all()  # the end of thought was sampled, so it has a log-prob
    assert th.tokens[..., :2].tolist() == [[[[5, 7]] * 3] * 6] * 2
    assert th.tokens[..., 2:].eq(V).all()
    assert m.net.policy_head.calls == 3  # the loop stopped once every row had ended
    # the thought vector is the interpreter GRU run over the context, then 5, 7, end of thought
    net = m.net
    ids = batch["input_ids"]
    gru, emb = net.gru("interpreter"), net.embed("interpreter")
    h = gru(emb(ids))  # [n, B, T, Hi]
    b, t = 1, 4
    state = h[:, b, t][:, None]  # [n, 1, Hi]
    for tok in (5, 7, V):
        state = gru.step(emb(torch.tensor([tok])), state)
    assert torch.allclose(th.vector[b, t, 0], state[-1, 0], atol=1e-6)


@pytest.mark.parametrize("variable_len", [True, False])
def test_thought_stops_at_max_reasoning_len(variable_len):
    torch.manual_seed(0)
    m = tiny(max_reasoning_len=3, variable_len=variable_len)
    with torch.no_grad():  # the end of thought is never likely; with variable_len=False it is impossible
        m.net.policy_head.bias[V] = -30.0
    th = m(window()["input_ids"]).thoughts
    assert th.lengths.eq(3).all() and th.unfinished.all()
    assert th.tokens.shape[-1] == 3 and th.tokens.lt(V).all()
    assert th.n_sampled.eq(3).all()  # the appended end of thought is not sampled


def test_always_ending_gives_empty_thoughts_and_zero_length_gives_no_reasoning():
    torch.manual_seed(0)
    m = tiny()
    with torch.no_grad():
        m.net.policy_head.bias[V] = 30.0
    stats = m.compute_losses(window())
    assert stats["frac_empty"] == 1.0 and stats["thought_len"] == 0.0 and stats["frac_unfinished"] == 0.0
    m0 = tiny(max_reasoning_len=0)
    stats = m0.compute_losses(window())
    assert stats["frac_empty"] == 1.0 and stats["frac_unfinished"] == 0.0 and stats["thought_entropy"] == 0.0


def test_sampling_never_draws_a_zero_probability_id():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.2, 0.3, 0.5, 0.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    ids = sample_categorical(probs).view(2000, 3)
    freq = torch.stack([torch.bincount(ids[:, i], minlength=4) for i in range(3)]).float() / 2000
    assert torch.allclose(freq, probs[:3], atol=0.04)
    assert freq[:, 3].eq(0).all() and freq[0, 0] == 0 and freq[1, 0] == freq[1, 1] == 0


# ----- objective -----------------------------------------------------------------------------------------------
def test_leave_one_out_baseline_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0], [0.0, -3.0, 3.0]])
    expected = torch.tensor([[(2 + 4) / 2, (1 + 4) / 2, (1 + 2) / 2], [0.0, 1.5, -1.5]])
    assert torch.allclose(leave_one_out_baseline(r), expected)
    assert torch.equal(leave_one_out_baseline(torch.tensor([[2.0]])), torch.zeros(1, 1))
    adv = r - leave_one_out_baseline(r)  # with K samples the advantages sum to 0 per position
    assert torch.allclose(adv.sum(-1), torch.zeros(2))


def test_policy_loss_uses_the_leave_one_out_advantage():
    torch.manual_seed(0)
    m = tiny(trice_samples=2, length_penalty=0.1)
    batch = window()
    torch.manual_seed(1)
    stats = m.compute_losses(batch)
    torch.manual_seed(1)  # same thoughts again
    out = m(batch["input_ids"], reasoner_grad=True)
    logp = out.logits[0].log_softmax(-1).gather(-1, batch["labels"][..., None, None].expand(2, 6, 2, 1))[..., 0]
    reward = logp - 0.1 * out.thoughts.lengths  # [B, T, 2]
    adv = torch.stack([reward[..., 0] - reward[..., 1], reward[..., 1] - reward[..., 0]], -1)
    assert torch.allclose(stats["policy_loss"], -(adv * out.thoughts.logprob).mean().detach(), atol=1e-5)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.5])
def test_policy_loss_beta_zero_gives_the_reasoner_no_gradient(entropy_coef):
    torch.manual_seed(0)
    grads = {}
    for beta in (0.0, 1.0):
        m = tiny(policy_loss_beta=beta, entropy_encouragement_coef=entropy_coef)
        m.compute_losses(window())["loss"].backward()
        reasoner = m.net.reasoner_only_parameters()
        assert len(reasoner) == 4 + 1 + 2  # reasoner GRU, its embedding, the policy head
        grads[beta] = [p.grad for p in reasoner]
        # the interpreter still learns from the NLL, through thoughts it did not choose
        assert all(p.grad is not None for p in m.net.role_parameters("interpreter"))
    assert all(g is None or not g.any() for g in grads[0.0])
    assert any(g is not None and g.any() for g in grads[1.0])  # the check can fail


def test_without_reasoner_the_loss_is_the_language_model_loss(tmp_path):
    torch.manual_seed(0)
    lm = LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=6, hidden_size=8, num_layers=2),
                       vocab_size=V)
    q = QuietStarGRU(vocab_size=V, use_reasoner=False, embed_dim=6, base_lm_hidden_dim=8, num_layers=2)
    batch = window(B=3, T=7)
    assert not torch.allclose(q.compute_losses(batch)["loss"], lm.nll(batch))
    ckpt = tmp_path / "lm.ckpt"
    torch.save({"state_dict": lm.state_dict()}, ckpt)
    q.load_pretrained(str(ckpt), "base")
    assert torch.allclose(q.compute_losses(batch)["loss"], lm.nll(batch), atol=1e-6)
    wrong = QuietStarGRU(vocab_size=V, use_reasoner=False, base_lm_hidden_dim=16, num_layers=2)
    with pytest.raises(ValueError, match="shape"):
        wrong.load_pretrained(str(ckpt), "base")


@pytest.mark.parametrize("kwargs", [
    {"combine": "residual"}, {"combine": "concat"}, {"combine": "mix"}, {"combine": "mix_sigmoid"},
    {"share_lm_head": False, "linear_lm_head": False}, {"use_base_lm": False}, {"num_layers": 2, "n_talk": 2},
], ids=str)
def test_every_parameter_learns(kwargs):
    torch.manual_seed(0)
    m = tiny(**kwargs)
    if kwargs.get("combine", "").startswith("mix"):  # as after one step: the zero-init output layer has moved
        with torch.no_grad():  # (at init, w = 0 blocks the thought path and the zero weight the hidden layer)
            m.net.mix_head[2].weight.normal_(0, 0.1)
            m.net.mix_head[2].bias.fill_(0.5)
    m.compute_losses(window())["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_pretrained_reasoner_keeps_its_end_of_thought_row():
    torch.manual_seed(0)
    lm = LanguageModel(network=lambda v: GRULanguageModel(v, embed_dim=6, hidden_size=12, num_layers=1),
                       vocab_size=V)
    q = tiny(embed_dim=6)
    eot_row = q.net.policy_head.weight[V].clone()
    q.net.load_gru_lm(lm.state_dict(), "reasoner")
    assert torch.equal(q.net.policy_head.weight[:V], lm.net.head.weight)
    assert torch.equal(q.net.policy_head.weight[V], eot_row)
    assert torch.equal(q.net.embed("reasoner").weight[:V], lm.net.embed.weight)
    assert torch.equal(q.net.gru("reasoner").layers[0].weight_hh_l0, lm.net.gru.weight_hh_l0)
    with pytest.raises(ValueError, match="head"):
        tiny(embed_dim=6, linear_lm_head=False).net.load_gru_lm(lm.state_dict(), "reasoner")


def test_mix_starts_as_the_base_lm_and_the_sigmoid_gate_is_held():
    torch.manual_seed(0)
    stats = tiny(combine="mix").compute_losses(window())
    assert stats["mix_weight"] == 0.0 and torch.allclose(stats["nll"], stats["nll_base"])
    held = tiny(combine="mix_sigmoid", gate_start=0.6, gate_warmup_steps=50).compute_losses(window())
    assert torch.allclose(held["mix_weight"], torch.tensor(0.6))


# ----- weight groups -------------------------------------------------------------------------------------------
def test_weight_groups_share_modules():
    same = {"base_lm_hidden_dim": 8, "reasoner_hidden_dim": 8, "interpreter_hidden_dim": 8}
    net = QuietStarGRUNet(V, weight_groups="AAAA", **same)
    assert net.gru("base") is net.gru("reasoner") is net.gru("interpreter")
    assert net.embed("base").weight is net.embed("reasoner").weight is net.embed("interpreter").weight
    w = net.gru("base").layers[0].weight_hh_l0
    assert net.gru("interpreter").layers[0].weight_hh_l0 is w
    assert len(net.reasoner_only_parameters()) == 2  # only the policy head is the reasoner's own
    net = QuietStarGRUNet(V, weight_groups="ABCD", **same)
    assert len({id(net.gru(r)) for r in ("base", "reasoner", "interpreter")}) == 3
    assert len({id(net.embed(r)) for r in ("base", "reasoner", "interpreter")}) == 3
    net = QuietStarGRUNet(V, weight_groups="BAAA", **same)  # one GRU, an embedding per role
    assert net.gru("base") is net.gru("interpreter") and net.embed("base") is not net.embed("interpreter")
    net = QuietStarGRUNet(V, weight_groups="AABA", **same)
    assert net.gru("base") is net.gru("interpreter") and net.gru("reasoner") is not net.gru("base")
    assert net.embed("base") is net.embed("interpreter") and net.embed("reasoner") is not net.embed("base")
    # shared and separate models give the same losses' shapes and train
    stats = QuietStarGRU(vocab_size=V, weight_groups="AAAA", max_reasoning_len=2, trice_samples=2,
                         **same).compute_losses(window())
    stats["loss"].backward()


def test_weight_groups_reject_impossible_sharing():
    with pytest.raises(ValueError, match=r"'AAAA'.*base_lm_hidden_dim=32, reasoner_hidden_dim=128"):
        QuietStarGRU(weight_groups="AAAA", base_lm_hidden_dim=32, reasoner_hidden_dim=128)  # at construction
    with pytest.raises(ValueError, match="ABCC"):
        QuietStarGRUNet(V, weight_groups="ABCC", reasoner_hidden_dim=16, interpreter_hidden_dim=24)
    with pytest.raises(ValueError, match="4 capital letters"):
        QuietStarGRUNet(V, weight_groups="ABC")
    QuietStarGRUNet(V, weight_groups="ABCC", reasoner_hidden_dim=16, interpreter_hidden_dim=16)  # fine


# ----- end to end ----------------------------------------------------------------------------------------------
def test_cli_fit_logs_policy_loss_and_thought_stats(tmp_path, shared_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_sizes = [f"--model.init_args.{k}={v}" for k, v in dict(
        base_lm_hidden_dim=8, reasoner_hidden_dim=8, interpreter_hidden_dim=8, max_reasoning_len=3,
        trice_samples=2, sample_every_n_steps=2).items()]
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "quiet_star_gru/reasoner_32.yaml"), *tiny_sizes,
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.init_args.block_size=16", "--data.init_args.batch_size=2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert cli.trainer.global_step == 3
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/policy_loss", "train/thought_len", "train/frac_empty", "train/thought_entropy",
                "train/nll", "val/nll", "val/nll_base", "val/gap", "val/frac_empty", "val/thought_len"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(events.Scalars("train/policy_loss")) == 3
    assert any("thoughts" in t for t in events.Tags()["tensors"])  # the context -> thought -> token text
    # the checkpoint rebuilds without the data (vocab size saved) and holds the trained weights
    last = next(Path(tmp_path).rglob("last.ckpt"))
    loaded = QuietStarGRU.load_from_checkpoint(last)
    for (name, p), q in zip(cli.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
