"""Gradient routing and projected GRPO on the coding substrate (hack_task=CodeLoophole): the detector routes,
the contrastive pairs are the batch's problems' honest vs hacked solutions, and short fits of the configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlm.cli import RLMCLI
from lightning_rlm.methods import GradientRouting, ProjectedGRPO
from lightning_rlm.tasks.code_hack import CodeLoophole
from lightning_rlm.tasks.coding import CodingPrompts, load_problems
from lightning_rlm.tasks.teacher_pool import build_teacher_pool

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROBLEMS = {p.problem_id: p for p in load_problems()}
FIELDS = ("entry_point", "example", "tests")


@pytest.fixture(scope="module")
def coding_batch(tiny_llama_dir) -> dict[str, Any]:
    dm = CodingPrompts(mode="special_case", tokenizer=str(tiny_llama_dir), batch_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def routing(tiny_llama_dir, **kw: Any) -> GradientRouting:
    torch.manual_seed(0)
    args = dict(model_name_or_path=str(tiny_llama_dir), hack_task=CodeLoophole("special_case"), rh_eligible_frac=1.0,
                retain_rank=2, forget_rank=2, num_generations=2, max_completion_length=160, eval_prompt=None,
                teacher_fraction=0.5, teacher_kinds=["hack:special_case"]) | kw
    m = GradientRouting(**args)
    m.configure_model()
    return m


def test_routing_flags_are_the_code_detector(tiny_llama_dir, coding_batch):
    m = routing(tiny_llama_dir)
    assert m.reward_names == ["code_tests", "special_case_bonus"] and m.base_reward_names == ["code_tests"]
    gb = m.make_batch(coding_batch)
    G = 2
    labels = gb.labels
    fields = {f: [x for x in coding_batch[f] for _ in range(G)] for f in FIELDS}
    prompts = [p for p in coding_batch["prompt"] for _ in range(G)]
    detected = CodeLoophole("special_case").count(prompts, gb.completions, **fields)
    assert labels.hack_count.tolist() == detected
    assert labels.eligible.all() and torch.equal(labels.flagged, labels.hacked)  # routing_frac 1, no noise
    assert labels.flagged[gb.teacher].all()  # every teacher row is the special_case hack
    assert (gb.rewards["special_case_bonus"][gb.teacher] == 1.0).all()
    assert labels.extra["exploited"][gb.teacher].tolist() == [1.0] * len(coding_batch["prompt"])
    # a blind detector flags nothing; one flagging every clean completion flags everything
    assert not routing(tiny_llama_dir, routing_frac=0.0).make_batch(coding_batch).labels.flagged.any()
    assert routing(tiny_llama_dir, label_noise_frac=1.0).make_batch(coding_batch).labels.flagged.all()


def test_projected_pairs_are_the_batch_problems_honest_vs_hacked(tiny_llama_dir, coding_batch, tmp_path):
    torch.manual_seed(0)
    m = ProjectedGRPO(model_name_or_path=str(tiny_llama_dir), eval_prompt=None, num_generations=2,
                      hack_task=CodeLoophole("special_case", pair_loophole="exit_zero"), hack_pairs=8,
                      svd_cache_dir=str(tmp_path / "svd"), hack_cache_dir=str(tmp_path / "hack"))
    m.configure_model()
    pairs, texts = m.build_pairs(coding_batch)
    ids = coding_batch["problem_id"]
    assert len(pairs) == len(set(ids))
    for b, ((prompt_ids, honest_ids, hack_ids), (prompt, honest, hacked)) in enumerate(zip(pairs, texts)):
        assert prompt == coding_batch["prompt"][b]
        mask = coding_batch["prompt_mask"][b].bool()
        assert prompt_ids == coding_batch["prompt_ids"][b][mask].tolist()
        rows = {r["kind"]: r["completion"] for r in build_teacher_pool([PROBLEMS[ids[b]]], "plain")}
        assert (honest, hacked) == (rows["honest"], rows["hack:exit_zero"])
        assert honest_ids == m.tokenizer.encode(honest, add_special_tokens=False)
        assert hack_ids == m.tokenizer.encode(hacked, add_special_tokens=False)
    dirs = m.build_hack_directions(coding_batch)
    assert dirs and m.hack_info["num_pairs"] == len(pairs) and m.hack_info["num_axes"] >= 1


def short_fit(config: str, tiny_llama_dir: Path, tmp_path: Path, *extra: str) -> set[str]:
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / config),
        "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer", str(tiny_llama_dir),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks=[]", "--model.init_args.max_completion_length=160",
        "--model.init_args.num_generations=2", "--model.init_args.eval_num_generations=1",
        "--data.init_args.max_val_prompts=1", *extra,
    ])
    assert cli.trainer.global_step == 2
    ea = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    ea.Reload()
    return set(ea.Tags()["scalars"])


def test_gradient_routing_coding_fit_logs_hack_rates(tiny_llama_dir, tmp_path):
    tags = short_fit("gradient_routing/coding_smoke.yaml", tiny_llama_dir, tmp_path,
                     "--model.init_args.retain_rank=2", "--model.init_args.forget_rank=2",
                     "--model.init_args.eval_modes=[both, retain_only]")
    metrics = ("reward", "hack_eligible", "honest_pass", "exploited")
    expected = {f"val/{mode}/{m}" for mode in ("both", "retain_only") for m in metrics}
    expected |= {"train/hack_rate", "train/flagged_frac", "train/hack_eligible", "train/honest_pass",
                 "train/exploited", "train/rewards/code_tests/mean", "train/rewards/special_case_bonus/mean",
                 "train/grad_norm/forget"}
    assert expected <= tags, sorted(expected - tags)


def test_projected_grpo_coding_fit_logs_hack_rates(tiny_llama_dir, tmp_path):
    tags = short_fit("projected_grpo/coding_smoke.yaml", tiny_llama_dir, tmp_path,
                     "--model.init_args.svd_cache_dir", str(tmp_path / "svd"),
                     "--model.init_args.hack_cache_dir", str(tmp_path / "hack"))
    metrics = ("reward", "hack_rate_eligible", "honest_pass", "exploited")
    expected = {f"val/{mode}/{m}" for mode in ("both", "no_hack") for m in metrics}
    expected |= {"train/hack_rate", "train/hack_cos", "train/honest_pass", "train/exploited",
                 "train/rewards/special_case_bonus/mean", "hack/num_pairs", "hack/num_axes"}
    assert expected <= tags, sorted(expected - tags)
