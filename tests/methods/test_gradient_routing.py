"""Gradient routing on the tiny random Llama: exact per-sample routing, ablations, detector, end to end."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from lightning_rlm.adapters import add_lora
from lightning_rlm.adapters.dual_lora import DualLoRAModel, add_dual_lora
from lightning_rlm.cli import RLMCLI
from lightning_rlm.data.collate import pad_left
from lightning_rlm.losses import policy_loss
from lightning_rlm.methods import GradientRouting
from lightning_rlm.models.hf import load_causal_lm
from lightning_rlm.rollout import completion_logprobs
from lightning_rlm.tasks.reward_hack import ELIGIBLE_FIELD, prompt_is_eligible

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C = 5  # completion tokens scored


def perturbed(model: DualLoRAModel, seed: int = 0) -> DualLoRAModel:
    """B starts at zero (no gradient to A); random B makes every adapter parameter matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.dual_layers():
            for branch in (layer.retain, layer.forget):
                branch.B.copy_(torch.randn(branch.B.shape, generator=g) * 0.1)
    return model


def dual(tiny_llama_dir: Path, retain_rank: int = 4, forget_rank: int = 2) -> DualLoRAModel:
    torch.manual_seed(0)
    model = add_dual_lora(load_causal_lm(str(tiny_llama_dir)), retain_rank, forget_rank, retain_alpha=8.0,
                          forget_alpha=2.0)
    return perturbed(model)


def inputs(n: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, 512, (n, 9), generator=torch.Generator().manual_seed(1))  # [N, P+C]
    return ids, torch.ones_like(ids)


def summed_grpo_loss(model: DualLoRAModel, ids: Tensor, mask: Tensor, flagged: Tensor | None) -> Tensor:
    """GRPO loss (surrogate + beta·KL to the base) summed over samples; the forward routed by flagged."""
    n = ids.shape[0]
    with torch.no_grad(), model.base():
        ref = completion_logprobs(model, ids, mask, C)  # [N, C]
    with model.route(flagged) if flagged is not None else nullcontext():
        logp = completion_logprobs(model, ids, mask, C)  # [N, C]
    adv = torch.linspace(-1.0, 1.0, n)  # [N]
    loss, _ = policy_loss(logp, None, adv, mask[:, -C:], beta=0.05, ref_logp=ref)
    return loss * n  # "grpo" averages over samples: undo it so the loss is a per-sample sum


def grads(model: DualLoRAModel, loss: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def split(g: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    return ([v for k, v in g.items() if ".retain." in k], [v for k, v in g.items() if ".forget." in k])


def test_flagged_sample_updates_only_forget_clean_sample_both(tiny_llama_dir):
    model = dual(tiny_llama_dir)
    ids, mask = inputs(1)
    retain, forget = split(grads(model, summed_grpo_loss(model, ids, mask, torch.tensor([True]))))
    assert retain and forget
    # exact zeros, and present (not None): every parameter stays in the graph, as DDP needs
    assert all(torch.count_nonzero(g) == 0 for g in retain)
    assert all(torch.count_nonzero(g) > 0 for g in forget)
    retain, forget = split(grads(model, summed_grpo_loss(model, ids, mask, torch.tensor([False]))))
    assert all(torch.count_nonzero(g) > 0 for g in retain + forget)


def test_mixed_batch_equals_the_two_halves_summed(tiny_llama_dir):
    model = dual(tiny_llama_dir)
    ids, mask = inputs(4)
    flagged = torch.tensor([True, False, True, False])
    mixed = grads(model, summed_grpo_loss(model, ids, mask, flagged))
    # the same rows and advantages, run as two separate batches: all-flagged and all-clean
    f, c = flagged.nonzero().squeeze(1), (~flagged).nonzero().squeeze(1)

    def half(rows: Tensor, flag: bool) -> dict[str, Tensor]:
        with torch.no_grad(), model.base():
            ref = completion_logprobs(model, ids[rows], mask[rows], C)
        with model.route(torch.full((len(rows),), flag)):
            logp = completion_logprobs(model, ids[rows], mask[rows], C)
        adv = torch.linspace(-1.0, 1.0, 4)[rows]
        loss, _ = policy_loss(logp, None, adv, mask[rows][:, -C:], beta=0.05, ref_logp=ref)
        return grads(model, loss * len(rows))

    flagged_half, clean_half = half(f, True), half(c, False)
    for name, g in mixed.items():
        torch.testing.assert_close(g, flagged_half[name] + clean_half[name], atol=1e-6, rtol=0)
    assert all(torch.count_nonzero(g) == 0 for g in split(flagged_half)[0])


def test_routing_does_not_change_values(tiny_llama_dir):
    model = dual(tiny_llama_dir)
    ids, mask = inputs(3)
    plain = model(input_ids=ids, attention_mask=mask).logits
    with model.route(torch.tensor([True, False, True])):
        routed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, routed)
    with pytest.raises(ValueError, match="batch of 3"), model.route(torch.tensor([True])):
        model(input_ids=ids, attention_mask=mask)


def test_ablations_match_models_that_never_had_the_other_adapter(tiny_llama_dir):
    model = dual(tiny_llama_dir, retain_rank=4, forget_rank=2)
    ids, mask = inputs(2)

    def peft_with(branch: str, rank: int, alpha: float):
        peft = add_lora(load_causal_lm(str(tiny_llama_dir)), rank=rank, alpha=alpha)
        with torch.no_grad():
            for name in model.target_names:
                ours = getattr(model.model.get_submodule(name), branch)
                theirs = peft.base_model.model.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(ours.A)
                theirs.lora_B["default"].weight.copy_(ours.B)
        return peft.eval()

    with torch.no_grad():
        retain_ref = peft_with("retain", 4, 8.0)(input_ids=ids, attention_mask=mask).logits
        forget_ref = peft_with("forget", 2, 2.0)(input_ids=ids, attention_mask=mask).logits
        base_ref = load_causal_lm(str(tiny_llama_dir))(input_ids=ids, attention_mask=mask).logits
        with model.retain_only():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, retain_ref,
                                       atol=1e-6, rtol=0)
        with model.forget_only():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, forget_ref,
                                       atol=1e-6, rtol=0)
        with model.base():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_ref)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, retain_ref)  # both on
    # with grad on, the ablated adapter still joins the graph (zero gradient) and outputs are unchanged
    with model.retain_only():
        out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.detach(), retain_ref, atol=1e-6, rtol=0)
    retain, forget = split(grads(model, out.square().mean()))
    assert all(torch.count_nonzero(g) == 0 for g in forget)
    assert all(torch.count_nonzero(g) > 0 for g in retain)


def make_method(tiny_llama_dir: Path, **kw) -> GradientRouting:
    torch.manual_seed(0)
    kw = dict(num_generations=4, max_completion_length=6, retain_rank=2, forget_rank=2, eval_prompt=None) | kw
    m = GradientRouting(model_name_or_path=str(tiny_llama_dir), **kw)
    m.configure_model()
    perturbed(m.policy)
    # the random model never writes "happy": count every completion as a hack on eligible prompts
    m.hack_counter = lambda prompts, completions, **_: [1.0] * len(completions)
    return m


def prompt_batch(m: GradientRouting, prompts: list[str]) -> dict:
    ids, mask = pad_left([m.tokenizer.encode(p) for p in prompts], m.tokenizer.pad_token_id)
    return {"prompt": prompts, "prompt_ids": ids, "prompt_mask": mask}


def step_grads(m: GradientRouting, batch: dict) -> tuple[dict[str, Tensor], Tensor]:
    torch.manual_seed(0)  # the sampling generator is seeded from the global seed on first use
    gb = m.make_batch(batch)
    with m.loss_context(gb):
        loss, _, _ = m.loss(gb)
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.policy.named_parameters() if p.requires_grad}, gb.labels.flagged


def test_routing_frac_zero_is_the_unrouted_baseline(tiny_llama_dir):
    common = dict(rh_eligible_frac=1.0, beta=0.05)
    baseline = make_method(tiny_llama_dir, routing=False, **common)
    no_frac = make_method(tiny_llama_dir, routing=True, routing_frac=0.0, **common)
    full = make_method(tiny_llama_dir, routing=True, routing_frac=1.0, **common)
    batch = prompt_batch(baseline, ["Once upon a time", "The dog ran"])
    g_base, flagged_base = step_grads(baseline, batch)
    g_zero, flagged_zero = step_grads(no_frac, batch)
    g_full, flagged_full = step_grads(full, batch)
    assert flagged_base.all() and not flagged_zero.any() and flagged_full.all()  # all 8 completions hack
    assert all(torch.equal(g_base[k], g_zero[k]) for k in g_base)
    retain, forget = split(g_full)
    assert all(torch.count_nonzero(g) == 0 for g in retain)
    assert any(torch.count_nonzero(g) > 0 for g in forget)
    assert baseline.hparams.beta == 0.05 and baseline.ref_model is None  # our hparams; no frozen copy


def test_eligibility_is_seeded_per_prompt(tiny_llama_dir):
    prompts = [f"prompt number {i}" for i in range(2000)]
    a = [prompt_is_eligible(p, 0.3, seed=0) for p in prompts]
    assert a == [prompt_is_eligible(p, 0.3, seed=0) for p in prompts]
    assert abs(sum(a) / len(a) - 0.3) < 0.04
    assert a != [prompt_is_eligible(p, 0.3, seed=1) for p in prompts]
    m = make_method(tiny_llama_dir, rh_eligible_frac=0.3)
    batch = m.prepare_batch({"prompt": prompts[:50]})
    assert batch[ELIGIBLE_FIELD] == a[:50]
    assert m.prepare_batch({"prompt": ["x", "y"], ELIGIBLE_FIELD: [1, 0]})[ELIGIBLE_FIELD] == [True, False]
    # the detector: routing_frac of true hacks, label_noise_frac of clean ones, from its own seeded stream
    m = make_method(tiny_llama_dir, routing_frac=0.2, label_noise_frac=0.1)
    hacked = torch.arange(20000) % 2 == 0
    flags = m.detect(hacked)
    assert abs(flags[hacked].float().mean() - 0.2) < 0.02 and abs(flags[~hacked].float().mean() - 0.1) < 0.02
    again = make_method(tiny_llama_dir, routing_frac=0.2, label_noise_frac=0.1)
    assert torch.equal(flags, again.detect(hacked))


def test_bad_fractions_are_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="routing_frac must be in"):
        GradientRouting(model_name_or_path=str(tiny_llama_dir), routing_frac=1.5)
    with pytest.raises(ValueError, match="eval_modes"):
        GradientRouting(model_name_or_path=str(tiny_llama_dir), eval_modes=("both", "nope"))


def test_end_to_end_logs_every_eval_mode(tmp_path, tiny_llama_dir):
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "gradient_routing/routing_r32.yaml"),
        "--model.init_args.model_name_or_path", str(tiny_llama_dir),
        "--data.init_args.tokenizer", str(tiny_llama_dir),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=4", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
        "--model.init_args.max_completion_length=8", "--model.init_args.num_generations=2",
        "--model.init_args.eval_num_generations=2", "--model.init_args.eval_samples=2",
        "--model.init_args.retain_rank=2", "--model.init_args.forget_rank=2",
    ])
    assert cli.trainer.global_step == 2
    ea = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    metrics = ("reward", "reward_eligible", "reward_ineligible", "happy_eligible", "happy_ineligible")
    expected = {f"val/{mode}/{m}" for mode in ("both", "retain_only", "forget_only", "base") for m in metrics}
    expected |= {"train/grad_norm/retain", "train/grad_norm/forget", "train/flagged_frac", "train/hack_rate",
                 "train/rewards/base/mean", "train/rewards/happy_bonus/mean", "train/kl"}
    assert expected <= tags, sorted(expected - tags)
