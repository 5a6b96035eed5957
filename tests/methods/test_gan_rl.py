"""GAN-RL on a tiny random Llama: discriminator loss, rewards, baseline checkpointing, what each update
touches, and a 3-step fit that writes the rollouts jsonl; the separate-adapter control (each task's step
leaves the other's tensors bit-identical, checkpoint round trip) and the reasoning discriminator (its reward,
loss and the value-threshold reward against hand computation)."""

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rlm.callbacks import MauveCallback
from lightning_rlm.data import PrefixCompletionDataModule, TextSource
from lightning_rlm.losses import judge_correct, reinforce_with_value, value_threshold_reward
from lightning_rlm.losses.discriminator import discriminator_stats, gan_rewards
from lightning_rlm.methods import GANRL
from lightning_rlm.tasks.gan_prompts import PLAIN_D_PROMPT_TEMPLATE, PLAIN_PROMPT_TEMPLATE

PREFIXES = ["Once upon a time there was a cat.", "Tom went to the park with his"]
TRUTHS = [" The cat liked milk.", " dog and they played."]


def make(tiny_llama_dir, **kw) -> GANRL:
    torch.manual_seed(0)
    args = dict(model_name_or_path=str(tiny_llama_dir), lora_rank=2, lora_alpha=8.0, reasoning_tokens=4,
                completion_tokens=6, prompt_template=PLAIN_PROMPT_TEMPLATE, g_lr=1e-2, d_lr=1e-2)
    m = GANRL(**{**args, **kw})
    m.configure_model()  # the generator and the head are created here (Lightning calls it in fit)
    return m


REASONING = dict(discriminator="reasoning", d_prompt_template=PLAIN_D_PROMPT_TEMPLATE, d_reasoning_tokens=3)


def adapter_snapshot(m: GANRL) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.adapter_parameters()]


def head_snapshot(m: GANRL) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.d_head.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def ce(logits, label):
    """Two-class cross-entropy by hand: log(1 + exp(other - correct))."""
    return math.log1p(math.exp(logits[1 - label] - logits[label]))


def test_discriminator_loss_and_accuracy_on_known_labels():
    gen = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # first called generated (right), second ground truth (wrong)
    real = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # right, wrong, right
    loss, s = discriminator_stats(gen, real)
    want = (ce([2, 0], 0) + ce([0, 2], 0) + ce([0, 3], 1) + ce([1, 0], 1) + ce([0, 1], 1)) / 5
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert s["d_acc_generated"].item() == pytest.approx(0.5)
    assert s["d_acc_real"].item() == pytest.approx(2 / 3)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  P(class 1) of logits [a, b] is sigmoid(b - a)
    assert s["d_prob_generated"].item() == pytest.approx((sig(-2) + sig(2)) / 2, rel=1e-6)


def test_both_reward_forms_match_hand_computed_values():
    d_prob = torch.tensor([0.9, 0.5, 0.05, 0.9])
    lengths = torch.tensor([32, 16, 0, 40])  # the last is over the target: the length term caps at 1
    prob = gan_rewards(d_prob, lengths, form="prob", target_length=32, length_weight=0.5)
    assert prob.tolist() == pytest.approx([0.9 + 0.5, 0.5 + 0.25, 0.05 + 0.0, 0.9 + 0.5])
    # d_value = 1 - d_prob = [0.1, 0.5, 0.95, 0.1]; reward 1 - d_value if d_value > 1/8 else 0
    vt = gan_rewards(d_prob, lengths, form="value_threshold", target_length=32, length_weight=0.5, threshold=0.125)
    assert vt.tolist() == pytest.approx([0.0 + 0.5, 0.5 + 0.25, 0.05 + 0.0, 0.0 + 0.5])
    no_len = gan_rewards(d_prob, lengths, form="value_threshold", target_length=32, length_weight=0.0)
    assert no_len.tolist() == pytest.approx([0.0, 0.5, 0.05, 0.0])


def test_each_update_touches_only_its_own_parameters(tiny_llama_dir):
    m = make(tiny_llama_dir)
    (g_opt, d_opt), _ = m.configure_optimizers()
    rollout = m.generate(PREFIXES)
    assert len(rollout.completion_texts) == 2 and rollout.completion_lengths.max() <= 6
    scores = m._score(rollout, TRUTHS)
    d_loss, rewards = scores.d_loss, scores.rewards
    seq_logp, seq_kl, n = m.sequence_logprobs(rollout)
    g_loss = m.generator_loss(seq_logp, seq_kl, n, rewards - rewards.mean() + 0.3)
    (g_loss + 10.0 * d_loss).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())
    assert all(p.grad is not None for p in m.d_head.parameters())
    adapter0, head0 = adapter_snapshot(m), head_snapshot(m)
    g_opt.step()  # the generator's step: the adapter moves, the head does not
    assert same(head_snapshot(m), head0) and not same(adapter_snapshot(m), adapter0)
    adapter1 = adapter_snapshot(m)
    d_opt.step()  # the discriminator's step: the head moves, the adapter does not
    assert same(adapter_snapshot(m), adapter1) and not same(head_snapshot(m), head0)


def test_generator_loss_has_no_gradient_on_the_head(tiny_llama_dir):
    m = make(tiny_llama_dir)
    rollout = m.generate(PREFIXES)
    seq_logp, seq_kl, n = m.sequence_logprobs(rollout)
    assert float(seq_kl.detach().abs().max()) < 1e-5  # adapter B starts at zero: policy == base
    m.generator_loss(seq_logp, seq_kl, n, torch.tensor([1.0, -1.0])).backward()
    assert all(p.grad is None for p in m.d_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())


@pytest.mark.parametrize("shared", [True, False])
def test_discriminator_trains_the_adapter_only_when_asked(tiny_llama_dir, shared):
    m = make(tiny_llama_dir, d_trains_adapter=shared)
    with torch.no_grad():  # make the adapter's B nonzero so that gradients reach A too
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    (g_opt, d_opt), _ = m.configure_optimizers()
    logits = m.discriminator_logits(PREFIXES * 2, [" a b c", " d e"] + TRUTHS)
    loss, _ = discriminator_stats(logits[:2], logits[2:])
    loss.backward()
    touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())
    assert touched == shared
    adapter0 = adapter_snapshot(m)
    g_opt.step()
    d_opt.step()
    assert same(adapter_snapshot(m), adapter0) != shared  # unchanged exactly when d_trains_adapter=False


def test_fit_writes_rollouts_and_the_baseline_survives_a_checkpoint(tmp_path, tiny_llama_dir):
    L.seed_everything(0)
    m = make(tiny_llama_dir, reward="value_threshold", kl_coeff=0.1, d_scale=3.0, ema_decay=0.5)
    dm = PrefixCompletionDataModule(source=TextSource(preset="tinystories", max_documents=60),
                                    tokenizer=str(tiny_llama_dir), completion_tokens=6, prefix_tokens=12,
                                    batch_size=2)
    mauve = MauveCallback(every_n_steps=3, window=20, num_buckets=2, min_texts=4, kmeans_num_redo=1,
                          kmeans_max_iter=20, on_validation=False)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="gan"),
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        log_every_n_steps=1, callbacks=[mauve], enable_model_summary=False)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 3  # one global step per batch despite two optimizers

    lines = (tmp_path / "gan" / "version_0" / "rollouts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 3 * 2 and sorted({r["step"] for r in rows}) == [0, 1, 2]
    for r in rows:
        assert {"step", "prefix", "reasoning", "completion", "ground_truth", "reward", "d_prob"} <= set(r)
        assert isinstance(r["completion"], str) and 0.0 <= r["d_prob"] <= 1.0
    metrics = trainer.callback_metrics
    for k in ["d_acc_generated", "d_acc_real", "d_prob_generated", "reward", "baseline", "reasoning_length",
              "completions/mean_length", "kl", "d_loss", "g_loss", "grad_norm", "grad_norm/discriminator",
              "learning_rate", "learning_rate/discriminator"]:
        assert f"train/{k}" in metrics, (k, sorted(metrics))
    assert "mauve/mauve" in metrics

    assert int(m.baseline_updates) == 3 and float(m.baseline) != 0.0
    ckpt = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(ckpt)
    again = GANRL.load_from_checkpoint(ckpt)
    assert float(again.baseline) == float(m.baseline) and int(again.baseline_updates) == 3
    assert torch.equal(again.d_head[1].weight, m.d_head[1].weight)

    # resuming restores both optimizers, the baseline and the step count, and keeps appending rollouts
    resumed = L.Trainer(max_steps=4, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="gan", version=0),
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False)
    resumed.fit(again, datamodule=dm, ckpt_path=ckpt)
    assert resumed.global_step == 4 and int(again.baseline_updates) == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "gan" / "version_0" / "rollouts.jsonl").open()]
    assert steps[-2:] == [3, 3]


# ----- separate adapters (discriminator_backbone="separate_adapter") ---------------------------------------------
def parts(m: GANRL) -> dict[str, dict[str, torch.Tensor]]:
    """The module's state split into the generator's adapter, the discriminator's tensors (its adapter and
    head) and the rest (frozen base, baseline buffers)."""
    out: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "discriminator": {}, "rest": {}}
    for k, v in m.state_dict().items():
        part = ("generator" if ".lora_" in k and ".default." in k else
                "discriminator" if k.startswith(("d_head.", "value_head.")) or (".lora_" in k and ".discriminator." in k)
                else "rest")
        out[part][k] = v.detach().clone()
    return out


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def randomize_lora_b(m: GANRL, adapter: str = "", std: float = 0.1) -> None:
    """Nonzero LoRA B (of one adapter, or all), so gradients reach A and the adapters change the forward."""
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name and f".{adapter}" in name:
                p.normal_(0, std)


def d_loss_on(m: GANRL) -> torch.Tensor:
    if m.reasoning_discriminator:  # the same inputs, judged with a fixed sampling stream
        m.generator = torch.Generator().manual_seed(1)
        rollout = m.generate(PREFIXES)
        rollout.completion_texts = [" a b c", " d e"]
        m.generator = torch.Generator().manual_seed(2)
        return m._score(rollout, TRUTHS).d_loss
    logits = m.discriminator_logits(PREFIXES * 2, [" a b c", " d e"] + TRUTHS)
    return discriminator_stats(logits[:2], logits[2:])[0]


def test_separate_adapters_each_optimizer_holds_its_own_task(tiny_llama_dir):
    m = make(tiny_llama_dir, discriminator_backbone="separate_adapter")
    assert sorted(m.policy.peft_config) == ["default", "discriminator"]
    assert m.policy.active_adapter == "default"
    state = parts(m)
    gen = {id(p) for n, p in m.named_parameters() if f"policy.{n}" in state["generator"] or n in state["generator"]}
    (g_opt, d_opt), _ = m.configure_optimizers()
    g_ids = {id(p) for g in g_opt.param_groups for p in g["params"]}
    d_ids = {id(p) for g in d_opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert g_ids == {id(named[k]) for k in state["generator"]} == gen
    assert d_ids == {id(named[k]) for k in state["discriminator"]}
    assert all(p.requires_grad for k, p in named.items() if k in state["generator"] or k in state["discriminator"])
    assert not any(p.requires_grad for k, p in named.items() if k in state["rest"])  # the base stays frozen


@pytest.mark.parametrize("kind", ["head", "reasoning"])
@pytest.mark.parametrize("backbone", ["shared", "separate_adapter"])
def test_a_generator_step_and_a_discriminator_step_touch_only_their_own_task(tiny_llama_dir, backbone, kind):
    """Separate: a generator-only step leaves every discriminator tensor bit-identical and vice versa. Shared
    (today's coupling): the discriminator's loss also moves the adapter the generator samples with."""
    separate = backbone == "separate_adapter"
    m = make(tiny_llama_dir, discriminator_backbone=backbone, **(REASONING if kind == "reasoning" else {}))
    randomize_lora_b(m)
    (g_opt, d_opt), _ = m.configure_optimizers()

    seq_logp, seq_kl, n = m.sequence_logprobs(m.generate(PREFIXES))  # generator-only step
    m.generator_loss(seq_logp, seq_kl, n, torch.tensor([1.0, -1.0])).backward()
    assert all(p.grad is None for p in m.discriminator_parameters())
    before = parts(m)
    g_opt.step()
    after = parts(m)
    assert identical(after["discriminator"], before["discriminator"]) and identical(after["rest"], before["rest"])
    assert not identical(after["generator"], before["generator"])

    g_opt.zero_grad(set_to_none=True)
    d_loss_on(m).backward()  # discriminator-only step
    generator_got_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())
    assert generator_got_grad == (not separate)
    before = parts(m)
    d_opt.step()
    if not separate:
        g_opt.step()  # the shared adapter's share of the discriminator's gradient is applied by the generator's
    after = parts(m)
    assert not identical(after["discriminator"], before["discriminator"]) and identical(after["rest"], before["rest"])
    assert identical(after["generator"], before["generator"]) == separate
    if separate:  # the discriminator's own adapter learned, not only its head
        moved = {k for k in after["discriminator"] if not torch.equal(after["discriminator"][k],
                                                                      before["discriminator"][k])}
        assert any(".discriminator." in k for k in moved) and any(k.startswith(("d_head.", "value_head."))
                                                                   for k in moved)


@pytest.mark.parametrize("kind", ["head", "reasoning"])
@pytest.mark.parametrize("backbone", ["shared", "separate_adapter"])
def test_separate_adapters_do_not_read_each_other(tiny_llama_dir, backbone, kind):
    """Separate: the discriminator's loss does not depend on the generator's adapter, nor the generator's
    log-probs on the discriminator's. Shared: the discriminator reads the generator's adapter."""
    separate = backbone == "separate_adapter"
    m = make(tiny_llama_dir, discriminator_backbone=backbone, **(REASONING if kind == "reasoning" else {}))
    randomize_lora_b(m)
    rollout = m.generate(PREFIXES)
    with torch.no_grad():
        d0, g0 = d_loss_on(m), m.sequence_logprobs(rollout)[0]
        randomize_lora_b(m, "default", std=0.5)  # change the generator
        d1, g1 = d_loss_on(m), m.sequence_logprobs(rollout)[0]
        assert torch.equal(d1, d0) == separate and not torch.equal(g1, g0)
        if separate:
            randomize_lora_b(m, "discriminator", std=0.5)  # change the discriminator
            d2, g2 = d_loss_on(m), m.sequence_logprobs(rollout)[0]
            assert torch.equal(g2, g1) and not torch.equal(d2, d1)


@pytest.mark.parametrize("kind", ["head", "reasoning"])
def test_separate_adapters_train_and_survive_a_checkpoint(tmp_path, tiny_llama_dir, kind):
    L.seed_everything(0)
    m = make(tiny_llama_dir, discriminator_backbone="separate_adapter", write_rollouts=False,
             **(REASONING if kind == "reasoning" else {}))
    start = parts(m)
    dm = PrefixCompletionDataModule(source=TextSource(preset="tinystories", max_documents=40),
                                    tokenizer=str(tiny_llama_dir), completion_tokens=6, prefix_tokens=12,
                                    batch_size=2)
    kw = dict(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
              enable_model_summary=False, logger=False)
    trainer = L.Trainer(max_steps=2, **kw)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 2
    trained = parts(m)
    moved = {k for part in ("generator", "discriminator") for k, v in trained[part].items()
             if not torch.equal(v, start[part][k])}
    for adapter in ("default", "discriminator"):  # both adapters learned (their B moved off zero)
        assert any("lora_B" in k and f".{adapter}." in k for k in moved), adapter
    assert m.policy.active_adapter == "default"

    ckpt = tmp_path / "separate.ckpt"
    trainer.save_checkpoint(ckpt)
    again = GANRL.load_from_checkpoint(ckpt)
    assert again.hparams.discriminator_backbone == "separate_adapter" and again.hparams.discriminator == kind
    loaded = parts(again)
    for part in ("generator", "discriminator", "rest"):
        assert identical(loaded[part], trained[part]), part
    assert again.policy.active_adapter == "default"
    # as another run's init_adapter the checkpoint gives its generator's adapter only (either backbone)
    for backbone in ("shared", "separate_adapter"):
        started = make(tiny_llama_dir, init_adapter=str(ckpt), discriminator_backbone=backbone)
        assert identical(parts(started)["generator"], trained["generator"])
        assert not identical(parts(started)["discriminator"], trained["discriminator"])

    resumed = L.Trainer(max_steps=3, **kw)  # both optimizers' states come back with the step count
    resumed.fit(again, datamodule=dm, ckpt_path=ckpt)
    assert resumed.global_step == 3
    g_state, d_state = (o.state_dict()["state"] for o in resumed.optimizers)
    assert len(g_state) == len(parts(again)["generator"]) and len(d_state) == len(parts(again)["discriminator"])


# ----- the reasoning discriminator (discriminator="reasoning") ----------------------------------------------------
def test_reasoning_discriminator_reward_loss_and_value_threshold_by_hand():
    # the discriminator's reward: 1 for a right answer
    said_real = torch.tensor([True, False, True, False])
    is_real = torch.tensor([False, False, True, True])
    correct = judge_correct(said_real, is_real)
    assert correct.tolist() == [0.0, 1.0, 1.0, 0.0]
    # REINFORCE with the value as baseline: advantage = correct - value
    seq_logp = torch.tensor([-2.0, -1.0, -3.0, -0.5], requires_grad=True)
    value = torch.tensor([0.2, 0.9, 0.5, 0.1], requires_grad=True)
    pg, vloss, adv = reinforce_with_value(seq_logp, value, correct)
    assert adv.tolist() == pytest.approx([-0.2, 0.1, 0.5, -0.1])
    assert pg.item() == pytest.approx((0.2 * -2.0 - 0.1 * -1.0 - 0.5 * -3.0 + 0.1 * -0.5) / 4)  # mean(-adv·logp)
    assert vloss.item() == pytest.approx((0.2**2 + 0.1**2 + 0.5**2 + 0.1**2) / 4)
    (pg + vloss).backward()
    assert seq_logp.grad.tolist() == pytest.approx([0.05, -0.025, -0.125, 0.025])  # -adv / 4
    assert value.grad.tolist() == pytest.approx([0.1, -0.05, -0.25, 0.05])  # 2 (value - correct) / 4 only
    # the seed's generator reward: (1 - d_value) if d_value > 1/8 else 0
    d_value = torch.tensor([0.1, 0.125, 0.5, 0.95, 0.2])
    assert value_threshold_reward(d_value).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.05, 0.8])
    # through gan_rewards the value overrides 1 - d_prob, and the length term is added
    d_prob = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9])
    lengths = torch.tensor([32, 16, 0, 40, 8])
    got = gan_rewards(d_prob, lengths, form="value_threshold", target_length=32, length_weight=0.5, d_value=d_value)
    assert got.tolist() == pytest.approx([0.5, 0.25, 0.5, 0.05 + 0.5, 0.8 + 0.125])
    prob = gan_rewards(d_prob, lengths, form="prob", target_length=32, length_weight=0.0, d_value=d_value)
    assert prob.tolist() == pytest.approx([0.9] * 5)  # "prob" reads P(answer real), not the value


@pytest.mark.parametrize("v", [0.6, 0.1])
def test_reasoning_discriminator_on_a_model_matches_hand_computation(tiny_llama_dir, v):
    """Every quantity of the reasoning discriminator recomputed from plain forwards of the policy: the value
    (last prompt token, before the reasoning), P(answer real), the reasoning log-probs, its reward and loss,
    and the generator's value-threshold reward."""
    m = make(tiny_llama_dir, reward="value_threshold", length_weight=0.5, d_value_coeff=0.7, **REASONING)
    randomize_lora_b(m)
    tok, h = m.tokenizer, m.hparams
    m.generator = torch.Generator().manual_seed(3)
    rollout = m.generate(PREFIXES)
    scores = m._score(rollout, TRUTHS)
    j = scores.judgement
    completions = rollout.completion_texts + TRUTHS
    policy = m.policy
    logp_by_hand, answer_logp = [], []
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(PREFIXES * 2, completions)):  # one unpadded input at a time
            prompt = tok.encode(PLAIN_D_PROMPT_TEMPLATE.replace(
                "{text}", f"<prefix>\n{p}\n</prefix>\n<continuation>\n{c}\n</continuation>"), add_special_tokens=False)
            r_mask = j.reasoning.completion_mask[i].bool()
            r_ids = j.reasoning.completion_ids[i][r_mask].tolist()  # with its EOS, if it stopped
            logits = policy(input_ids=torch.tensor([prompt + r_ids])).logits[0].float() / h.temperature
            lp = logits.log_softmax(-1)
            logp_by_hand.append(sum(lp[len(prompt) - 1 + t, r_ids[t]].item() for t in range(len(r_ids))))
            kept = [t for t in r_ids if t != m.eos_token_id]
            seq = torch.tensor([prompt + kept + m.close_ids + m.answer_prefix_ids])
            hidden = m.backbone(input_ids=seq).last_hidden_state[0]
            assert j.value[i].item() == pytest.approx(
                torch.sigmoid(m.value_head(hidden[len(prompt) - 1])).item(), abs=1e-5)
            two = (policy(input_ids=seq).logits[0, -1, m.answer_ids].float() / h.temperature).log_softmax(-1)
            assert j.p_real[i].item() == pytest.approx(two[0].exp().item(), abs=1e-5)
            answer_logp.append(two[0 if j.said_real[i] else 1].item())
    assert j.reasoning_logp.tolist() == pytest.approx(logp_by_hand, abs=1e-4)
    assert j.answer_logp.tolist() == pytest.approx(answer_logp, abs=1e-5)
    # its reward and loss: right = 1; REINFORCE with the value as baseline + 0.7 x squared error
    right = [float(bool(j.said_real[i]) == (i >= 2)) for i in range(4)]
    val = j.value.tolist()
    pg = sum(-(right[i] - val[i]) * (logp_by_hand[i] + answer_logp[i]) for i in range(4)) / 4
    vl = sum((val[i] - right[i]) ** 2 for i in range(4)) / 4
    assert scores.d_loss.item() == pytest.approx(pg + 0.7 * vl, abs=1e-4)
    assert scores.stats["d_acc_generated"].item() == pytest.approx((right[0] + right[1]) / 2)
    assert scores.stats["d_reasoning_length"].item() == pytest.approx(j.reasoning_lengths.float().mean().item())

    # the generator's reward, with the value head set to a known constant v
    with torch.no_grad():
        m.value_head[1].weight.zero_()
        m.value_head[1].bias.fill_(math.log(v / (1 - v)))
    scores = m._score(rollout, TRUTHS)
    lengths = rollout.completion_lengths.tolist()
    base = (1 - v) if v > 0.125 else 0.0
    want = [base + 0.5 * min(n, 6) / 6 for n in lengths]
    assert scores.rewards.tolist() == pytest.approx(want, abs=1e-6)
    assert scores.stats["d_value_generated"].item() == pytest.approx(v, abs=1e-6)


def test_reasoning_discriminator_fit_logs_its_reasoning_and_writes_its_judgements(tmp_path, tiny_llama_dir):
    L.seed_everything(0)
    m = make(tiny_llama_dir, reward="value_threshold", **REASONING)
    dm = PrefixCompletionDataModule(source=TextSource(preset="tinystories", max_documents=40),
                                    tokenizer=str(tiny_llama_dir), completion_tokens=6, prefix_tokens=12,
                                    batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="gan"),
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        log_every_n_steps=1, enable_model_summary=False)
    value0 = [p.detach().clone() for p in m.value_head.parameters()]
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 2
    assert not same([p.detach() for p in m.value_head.parameters()], value0)
    metrics = trainer.callback_metrics
    for k in ["d_reasoning_length", "d_reasoning_length/generated", "d_reasoning_length/real", "d_value_generated",
              "d_value_real", "d_pg_loss", "d_value_loss", "d_acc_generated", "d_prob_generated", "d_loss",
              "reward", "grad_norm/discriminator"]:
        assert f"train/{k}" in metrics, (k, sorted(metrics))
    rows = [json.loads(line) for line in (tmp_path / "gan" / "version_0" / "rollouts.jsonl").open()]
    assert len(rows) == 4
    for r in rows:
        assert r["d_answer"] in ("real", "generated") and r["d_answer_ground_truth"] in ("real", "generated")
        assert isinstance(r["d_reasoning"], str) and 0.0 < r["d_value"] < 1.0 and 0.0 < r["d_value_ground_truth"] < 1.0
        base = (1 - r["d_value"]) if r["d_value"] > 0.125 else 0.0  # the seed's reward, plus the length term
        assert base <= r["reward"] <= base + 0.5 + 1e-6


def test_bad_arguments_are_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="prompt_template"):
        GANRL(model_name_or_path=str(tiny_llama_dir), prompt_template="no placeholder")
    with pytest.raises(ValueError, match="reward must be"):
        GANRL(model_name_or_path=str(tiny_llama_dir), reward="nope")
    with pytest.raises(ValueError, match="discriminator_backbone"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator_backbone="nope")
    with pytest.raises(ValueError, match="d_trains_adapter=True"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator_backbone="separate_adapter",
              d_trains_adapter=False)
    with pytest.raises(ValueError, match="discriminator"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator="nope")
    with pytest.raises(ValueError, match="d_trains_adapter=True"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator="reasoning", d_trains_adapter=False)
    with pytest.raises(ValueError, match="two different tokens"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator="reasoning", d_answers=(" real", " really"))
    with pytest.raises(ValueError, match="prompt_template"):
        GANRL(model_name_or_path=str(tiny_llama_dir), discriminator="reasoning", d_prompt_template="no text")
