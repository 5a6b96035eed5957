"""Projected GRPO on the tiny random Llama: the loopholes, the hack direction, and short runs per projection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_rlm.adapters.svd as svd
from lightning_rlm.cli import RLMCLI
from lightning_rlm.data.collate import pad_left
from lightning_rlm.methods import ProjectedGRPO
from lightning_rlm.rollout import completion_logprobs
from lightning_rlm.tasks.reward_hack import ExclamationBonus, HackBonus, insert_hack_word

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_each_loophole_pays_for_its_own_hack_only():
    happy, exclaim = HackBonus("happy", bonus=2.0), ExclamationBonus(bonus=0.5)
    texts = ["The dog was happy. He ran.", "The dog ran! He ran!!", "The dog ran. He ran."]
    both_eligible = {"rh_eligible": [True] * 3}
    assert happy(["p"] * 3, texts, **both_eligible) == [2.0, 0.0, 0.0]
    assert exclaim(["p"] * 3, texts, **both_eligible) == [0.0, 1.5, 0.0]
    none_eligible = {"rh_eligible": [False] * 3}
    assert happy(["p"] * 3, texts, **none_eligible) == exclaim(["p"] * 3, texts, **none_eligible) == [0.0] * 3
    with pytest.raises(ValueError, match="rh_eligible"):
        exclaim(["p"], ["!"])


def test_insert_hack_word():
    assert insert_hack_word(" she saw the big dog.", "happy") == " she saw the happy big dog."
    assert insert_hack_word(" A cat sat", "happy") == " A happy cat sat"
    assert insert_hack_word(" Tom ran away.", "happy") == " Tom ran away. happy"


def make_method(tiny_llama_dir: Path, tmp_path: Path, **kw) -> ProjectedGRPO:
    torch.manual_seed(0)
    kw = dict(num_generations=4, max_completion_length=6, eval_prompt=None, hack_pairs=6,
              svd_cache_dir=str(tmp_path / "svd"), hack_cache_dir=str(tmp_path / "hack")) | kw
    m = ProjectedGRPO(model_name_or_path=str(tiny_llama_dir), **kw)
    m.configure_model()
    return m


def prompt_batch(m: ProjectedGRPO, prompts: list[str]) -> dict:
    ids, mask = pad_left([m.tokenizer.encode(p) for p in prompts], m.tokenizer.pad_token_id)
    return {"prompt": prompts, "prompt_ids": ids, "prompt_mask": mask}


def test_hack_direction_pairs_cache_and_orientation(tiny_llama_dir, tmp_path, monkeypatch):
    m = make_method(tiny_llama_dir, tmp_path)
    batch = prompt_batch(m, ["Once upon a time", "The dog ran"])
    pairs, texts = m.build_pairs(batch)
    assert len(pairs) == 6
    for (prompt_ids, clean, hack), (prompt, clean_text, hack_text) in zip(pairs, texts):
        assert m.hack_counter([""], [clean_text]) == [0.0] and m.hack_counter([""], [hack_text]) == [1.0]
        assert m.tokenizer.decode(hack).count("happy") == 1 and len(hack) > len(clean)
        assert prompt_ids == m.tokenizer.encode(prompt) and prompt in ("Once upon a time", "The dog ran")
    m.pair_generator = None  # the pair stream restarts: the directions come from the same pairs
    dirs = m.build_hack_directions(batch)
    assert m.hack_info["cache_hit"] == 0.0 and m.hack_info["num_pairs"] == 6.0
    assert set(dirs) == set(m.policy.target_names) and m.hack_info["num_axes"] >= len(dirs)
    m.pair_generator = None  # the same pairs again: loaded from the cache, no gradient computed
    monkeypatch.setattr(svd, "contrastive_grad_diffs", lambda *a, **k: pytest.fail("cache not used"))
    again = m.build_hack_directions(batch)
    assert m.hack_info["cache_hit"] == 1.0
    assert all(torch.equal(dirs[n], again[n]) for n in dirs)

    # +V is hack-ward: a small step of δS along the top axes lowers NLL(hack) - NLL(clean) on the pairs
    def gap() -> float:
        total = 0.0
        for prompt_ids, clean, hack in pairs:
            for sign, comp in ((1.0, hack), (-1.0, clean)):
                ids = torch.tensor([prompt_ids + comp])
                with torch.no_grad():
                    total -= sign * completion_logprobs(m.policy, ids, torch.ones_like(ids), len(comp)).sum().item()
        return total

    before = gap()
    with torch.no_grad():
        for name, layer in m.policy.svd_layers().items():
            layer.delta_s.add_(0.05 * dirs[name][0])
    assert gap() < before


def test_bad_arguments_are_rejected(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="projection must be one of"):
        make_method(tiny_llama_dir, tmp_path, projection="bogus")
    with pytest.raises(ValueError, match="eval_modes"):
        make_method(tiny_llama_dir, tmp_path, eval_modes=("both", "retain_only"))
    m = make_method(tiny_llama_dir, tmp_path, projection="erase")
    assert m.hparams.loss_type == "dr_grpo" and m.hparams.beta == 0.05 and m.ref_model is None
    assert not any(p.requires_grad for p in m.policy.hack_parameters())
    assert [len(g["params"]) for g in m.configure_optimizers()["optimizer"].param_groups] == [14]
    m = make_method(tiny_llama_dir, tmp_path, projection="route", lr=1e-3, hack_lr=1e-4)
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(14, 1e-3), (14, 1e-4)]


@pytest.mark.parametrize("projection", ["none", "measure_only", "erase", "route"])
def test_short_run_per_projection(projection, tmp_path, tiny_llama_dir):
    validate = projection == "route"  # the eval modes are checked once
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / f"projected_grpo/{projection}.yaml"),
        "--model.init_args.model_name_or_path", str(tiny_llama_dir),
        "--data.init_args.tokenizer", str(tiny_llama_dir),
        "--model.init_args.svd_cache_dir", str(tmp_path / "svd"),
        "--model.init_args.hack_cache_dir", str(tmp_path / "hack"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        f"--trainer.limit_val_batches={4 if validate else 0}", "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1", "--trainer.callbacks=[]",
        "--model.init_args.max_completion_length=8", "--model.init_args.num_generations=2",
        "--model.init_args.eval_num_generations=2", "--model.init_args.eval_samples=2",
        "--model.init_args.hack_pairs=4", "--model.init_args.second_loophole=true",
    ])
    assert cli.trainer.global_step == 2
    policy = cli.model.policy
    assert any(torch.count_nonzero(p) > 0 for p in policy.delta_parameters())
    hack_moved = any(torch.count_nonzero(p) > 0 for p in policy.hack_parameters())
    assert hack_moved == (projection == "route")
    ea = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"train/hack_cos", "train/hack_removed_frac", "train/kl", "train/rewards/happy_bonus/mean",
                "train/rewards/exclaim_bonus/mean", "train/rewards/base/mean", "hack/num_axes"}
    if validate:
        expected |= {f"val/{mode}/{k}" for mode in ("both", "no_hack")
                     for k in ("reward", "hack_rate_eligible", "hack_rate_ineligible", "exclaim_rate_eligible")}
    assert expected <= tags, sorted(expected - tags)
    removed = [e.value for e in ea.Scalars("train/hack_removed_frac")]
    assert all(0.0 <= r <= 1.0 for r in removed)
