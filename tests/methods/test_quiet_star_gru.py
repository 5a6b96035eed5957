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


# ----- seed 001's knobs ----------------------------------------------------------------------------------------
def talk_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of logits [B, T, K, V] -> [B, T, K]."""
    idx = labels[..., None, None].expand(*logits.shape[:3], 1)
    return logits.log_softmax(-1).gather(-1, idx)[..., 0]


def test_null_logits_are_the_empty_thought_prediction():
    torch.manual_seed(0)
    m = tiny(combine="mix_sigmoid", n_talk=2)
    ids = window()["input_ids"]
    out = m.net(ids, trice_samples=2, max_reasoning_len=4, n_talk=2, null_thought=True)
    assert out.null_logits.shape == (2, 2, 6, V) and not out.null_logits.requires_grad
    m.net.policy_head = ScriptedPolicy([V])  # every sampled thought is empty: end of thought first
    empty = m.net(ids, trice_samples=2, max_reasoning_len=4, n_talk=2)
    assert empty.thoughts.lengths.eq(0).all()
    for k in range(2):
        assert torch.allclose(empty.logits[..., k, :], out.null_logits, atol=1e-6)
    assert m.net(ids, trice_samples=2, max_reasoning_len=4).null_logits is None  # off by default


@pytest.mark.parametrize("K", [1, 3])
def test_null_thought_baseline_matches_a_hand_loop(K):
    torch.manual_seed(0)
    m = tiny(trice_samples=K, null_thought_baseline=True, length_penalty=0.05)
    plain = tiny(trice_samples=K, length_penalty=0.05)
    plain.load_state_dict(m.state_dict())
    batch = window()
    torch.manual_seed(1)
    stats = m.compute_losses(batch)
    torch.manual_seed(1)
    plain_stats = plain.compute_losses(batch)
    torch.manual_seed(1)  # the same thoughts again (the null thought samples nothing)
    out = m(batch["input_ids"], reasoner_grad=True)
    reward = (talk_logp(out.logits[0], batch["labels"]) - 0.05 * out.thoughts.lengths).detach()  # [B, T, K]
    m.net.policy_head = ScriptedPolicy([V])  # the empty thought, decoded by think() itself
    r_null = talk_logp(m(batch["input_ids"]).logits[0], batch["labels"])[..., 0].detach()  # [B, T]
    B, T = reward.shape[:2]
    adv = torch.zeros(B, T, K)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                others = sum(float(reward[b, t, i]) for i in range(K) if i != k)
                adv[b, t, k] = float(reward[b, t, k]) - (others + float(r_null[b, t])) / K
    expected = -(adv * out.thoughts.logprob.detach()).mean()
    assert torch.allclose(stats["policy_loss"], expected, atol=1e-5)
    assert torch.allclose(stats["null_reward"], r_null.mean(), atol=1e-6)
    assert torch.equal(plain_stats["nll"], stats["nll"])  # same thoughts, same predictions
    assert not torch.allclose(plain_stats["policy_loss"], stats["policy_loss"])  # only the baseline differs


def test_train_nll_num_trains_on_the_first_thoughts_only():
    torch.manual_seed(0)
    m = tiny(trice_samples=3, policy_loss_beta=0.0)
    batch = window()
    torch.manual_seed(1)
    logp = talk_logp(m(batch["input_ids"]).logits[0], batch["labels"])  # [B, T, 3]
    for n, expected in ((None, -logp.mean()), (1, -logp[..., 0].mean()), (2, -logp[..., :2].mean()),
                        (3, -logp.mean())):
        m.hparams.train_nll_num = n
        torch.manual_seed(1)
        stats = m.compute_losses(batch)
        assert torch.allclose(stats["loss"], expected, atol=1e-6), n
        assert torch.allclose(stats["nll"], -logp.mean(), atol=1e-6)  # the logged NLL is over all K
        assert ("nll_trained" in stats) == (n is not None)
    # the gradient is the first thought's alone: same as a hand loss on k = 0
    m.hparams.train_nll_num = 1
    torch.manual_seed(1)
    m.compute_losses(batch)["loss"].backward()
    got = [p.grad.clone() for p in m.net.lm_head.parameters()]
    m.zero_grad()
    torch.manual_seed(1)
    (-talk_logp(m(batch["input_ids"]).logits[0], batch["labels"])[..., 0].mean()).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, m.net.lm_head.parameters()))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="train_nll_num"):
            tiny(trice_samples=3, train_nll_num=bad)


def test_neuter_dropout_base_drops_the_base_state_in_training_only():
    torch.manual_seed(0)
    q = QuietStarGRU(vocab_size=V, use_reasoner=False, base_lm_hidden_dim=8, neuter_dropout_base=0.5)
    batch = window()
    torch.manual_seed(3)
    loss = q.compute_losses(batch)["loss"]
    net = q.net
    h = net.gru("base")(net.embed("base")(batch["input_ids"]))[-1]  # [B, T, H]
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(h, 0.5, training=True)
    assert dropped.eq(0).any()
    expected = torch.nn.functional.cross_entropy(net.lm_head(dropped).reshape(-1, V), batch["labels"].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)
    q.eval()  # evaluation: the whole base state
    plain = torch.nn.functional.cross_entropy(net.lm_head(h).reshape(-1, V), batch["labels"].reshape(-1))
    assert torch.allclose(q.compute_losses(batch)["loss"], plain, atol=1e-6)
    # with thoughts: evaluation equals the undropped model, training differs
    torch.manual_seed(0)
    m = tiny(neuter_dropout_base=0.875)
    m0 = tiny()
    m0.load_state_dict(m.state_dict())
    m.eval(), m0.eval()
    evaluated = []
    for model in (m, m0):
        torch.manual_seed(5)
        evaluated.append(model.compute_losses(batch)["nll"])
    assert torch.equal(*evaluated)
    m.train(), m0.train()
    torch.manual_seed(5)
    train_nll = m.compute_losses(batch)["nll_base"]
    torch.manual_seed(5)
    assert not torch.allclose(train_nll, m0.compute_losses(batch)["nll_base"])
    with pytest.raises(ValueError, match="base_dropout"):
        tiny(neuter_dropout_base=1.0)
    with pytest.raises(ValueError, match="base LM"):
        tiny(neuter_dropout_base=0.5, use_base_lm=False)


def test_parameter_groups_give_the_optimizer_the_set_rates():
    torch.manual_seed(0)
    groups = {"base": {"lr": 1e-3}, "reasoner": {"lr": 1e-4, "weight_decay": 0.5}, "heads": {"weight_decay": 0.0}}
    m = tiny(lr=3e-3, weight_decay=0.1, parameter_groups=groups, combine="concat")
    opt = m.configure_optimizers()["optimizer"]
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert sorted(where) == sorted(id(p) for p in m.parameters())  # every parameter exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    net = m.net

    def setting(p: torch.nn.Parameter) -> tuple[float, float]:
        return where[id(p)]["lr"], where[id(p)]["weight_decay"]

    assert setting(net.gru("base").layers[0].weight_hh_l0) == (1e-3, 0.1)
    assert setting(net.gru("base").layers[0].bias_hh_l0) == (1e-3, 0.0)  # vectors never decayed
    assert setting(net.embed("base").weight) == (1e-3, 0.1)
    assert setting(net.gru("reasoner").layers[0].weight_ih_l0) == (1e-4, 0.5)
    assert setting(net.policy_head.weight) == (1e-4, 0.5)
    assert setting(net.policy_head.bias) == (1e-4, 0.0)
    assert setting(net.gru("interpreter").layers[0].weight_ih_l0) == (3e-3, 0.1)  # not named: the defaults
    assert setting(net.lm_head.weight) == (3e-3, 0.0)
    assert setting(net.concat_mlp[0].weight) == (3e-3, 0.0)
    # one AdamW step moves a parameter by lr (Adam's first step is lr * sign(grad), no decay on vectors)
    b = net.policy_head.bias
    before = b.detach().clone()
    m.compute_losses(window())["loss"].backward()
    opt.step()
    moved = (b.detach() - before).abs()
    assert torch.allclose(moved[b.grad != 0], torch.tensor(1e-4), rtol=1e-3)
    # shared modules follow the first of base, interpreter, reasoner; conflicting settings are an error
    same = {"base_lm_hidden_dim": 8, "reasoner_hidden_dim": 8, "interpreter_hidden_dim": 8}
    m = tiny(weight_groups="AAAA", parameter_groups={"reasoner": {"lr": 1e-4}}, **same)
    roles = m.net.parameter_roles()
    assert roles["interpreter"] == [] and len(roles["reasoner"]) == 2  # the policy head only
    opt = m.configure_optimizers()["optimizer"]
    assert {g["name"]: g["lr"] for g in opt.param_groups}["reasoner"] == 1e-4
    with pytest.raises(ValueError, match="share"):
        tiny(weight_groups="AAAA", parameter_groups={"base": {"lr": 1e-3}, "interpreter": {"lr": 1e-4}},
             **same).configure_optimizers()
    with pytest.raises(ValueError, match="parameter_groups role"):
        tiny(parameter_groups={"mixer": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="setting"):
        tiny(parameter_groups={"base": {"momentum": 0.9}})


@pytest.mark.parametrize("mode", ["clip", "tanh"])
def test_reward_bound_keeps_advantages_within_the_bound(mode):
    torch.manual_seed(0)
    bound = 0.05
    m = tiny(reward_bound=bound, reward_bound_mode=mode)
    batch = window()
    torch.manual_seed(1)
    stats = m.compute_losses(batch)
    torch.manual_seed(1)
    out = m(batch["input_ids"], reasoner_grad=True)
    reward = talk_logp(out.logits[0], batch["labels"]).detach()
    raw = reward - leave_one_out_baseline(reward)
    adv = raw.clamp(-bound, bound) if mode == "clip" else bound * torch.tanh(raw / bound)
    assert adv.abs().max() <= bound and raw.abs().max() > bound  # the bound was active: the check can fail
    assert torch.allclose(stats["frac_bounded"], (raw.abs() > bound).float().mean())
    assert torch.allclose(stats["policy_loss"], -(adv * out.thoughts.logprob.detach()).mean(), atol=1e-6)
    # the gradient the reasoner gets is the one of the bounded advantages
    (-(adv * out.thoughts.logprob).mean()).backward()
    expected = [p.grad.clone() for p in m.net.reasoner_only_parameters()]
    m.zero_grad()
    m.hparams.nll_loss_beta = 0.0  # the policy loss alone (no entropy bonus)
    torch.manual_seed(1)
    m.compute_losses(batch)["loss"].backward()
    for e, p in zip(expected, m.net.reasoner_only_parameters()):
        assert torch.allclose(e, p.grad, atol=1e-6)
    with pytest.raises(ValueError, match="reward_bound"):
        tiny(reward_bound=0.0)


def test_detach_interpreter_gives_the_interpreter_no_gradient():
    grads, losses = {}, {}
    for detach in (False, True):
        torch.manual_seed(0)
        m = tiny(detach_interpreter=detach)  # ABCD: the interpreter's GRU and embedding are its own
        torch.manual_seed(1)
        stats = m.compute_losses(window())
        losses[detach] = stats["loss"].detach()
        stats["loss"].backward()  # NLL (talk) + policy loss
        interp = m.net.role_parameters("interpreter")
        grads[detach] = [p.grad for p in interp]
        assert any(p.grad is not None and p.grad.any() for p in m.net.reasoner_only_parameters())
        assert m.net.proj.weight.grad.any() and m.net.lm_head.weight.grad.any()
    assert all(g is None or not g.any() for g in grads[True])
    assert all(g is not None and g.any() for g in grads[False])
    assert torch.equal(losses[False], losses[True])  # only the gradient changes


class StepPolicy(nn.Module):
    """Step 0: uniform over the V vocab tokens in even rows, over tokens 0 and 1 in odd rows (the end of
    thought impossible); step 1: the end of thought."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(h.size(0), V + 1)
        if self.calls == 0:
            logits[:, V] = -1e4
            logits[1::2, 2:] = -1e4
        else:
            logits[:, :V] = -1e4
        self.calls += 1
        return logits


def test_thought_entropy_max_is_the_largest_step_entropy():
    torch.manual_seed(0)
    m = tiny(log_thought_entropy_max=True, policy_loss_beta=0.0)
    m.net.policy_head = StepPolicy()
    stats = m.compute_losses(window())
    # step 0 has entropy log V (even rows) or log 2 (odd rows); step 1 (the end of thought) has ~0
    high, low = torch.log(torch.tensor(float(V))), torch.log(torch.tensor(2.0))
    assert torch.allclose(stats["thought_entropy_max"], high, atol=1e-5)
    assert torch.allclose(stats["thought_entropy"], (high + low) / 4, atol=1e-5)  # mean over all 2 x N steps
    assert "thought_entropy_max" not in tiny().compute_losses(window())  # off by default
    assert tiny(max_reasoning_len=0, log_thought_entropy_max=True).compute_losses(window())[
        "thought_entropy_max"] == 0.0
