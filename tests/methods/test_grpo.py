"""GRPO end to end on a tiny random Llama (fast), and the learning test on the pretrained one (slow)."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlm.cli import RLMCLI
from lightning_rlm.methods import GRPO

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fit(tmp_path, model_dir, *extra: str, config: str = "grpo/sentence_length_10_smooth.yaml"):
    return RLMCLI(args=[
        "fit", "--config", str(CONFIGS / config),
        "--model.init_args.model_name_or_path", str(model_dir),
        "--data.init_args.tokenizer", str(model_dir),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--model.init_args.max_completion_length=12", "--model.init_args.num_generations=4",
        "--model.init_args.eval_samples=4", *extra,
    ])


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(next(log_dir.rglob("events.out.tfevents*")).parent))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


# TRL GRPOTrainer's names (README, "Logged names"), as this framework logs them under train/
TRL_NAMES = ["train/reward", "train/reward_std", "train/rewards/sentence_length_10_smooth/mean",
             "train/rewards/sentence_length_10_smooth/std", "train/frac_reward_zero_std", "train/kl", "train/entropy",
             "train/completions/mean_length", "train/completions/min_length", "train/completions/max_length",
             "train/completions/clipped_ratio", "train/clip_ratio/region_mean", "train/clip_ratio/low_mean",
             "train/clip_ratio/high_mean", "train/num_tokens", "train/learning_rate", "train/grad_norm"]


def test_grpo_full_ft_runs_and_logs(tmp_path, tiny_llama_dir):
    cli = fit(tmp_path, tiny_llama_dir, "--trainer.max_steps=3", "--trainer.val_check_interval=3",
              "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1")
    assert cli.trainer.global_step == 3
    logged = scalars(tmp_path / "runs")
    for tag in [*TRL_NAMES, "train/jaccard", "train/degenerate", "train/loss", "train/ratio_mean", "time/tokens_per_s",
                "val/reward/total", "val/greedy_reward/total", "val/unique_first_sentences"]:
        assert tag in logged, (tag, sorted(logged))
    # TRL's reward_std is the mean within-group std; num_tokens grows by prompt + completion tokens each step
    tokens = [v for _, v in logged["train/num_tokens"]]
    assert len(tokens) == 3 and tokens[0] > 0 and tokens[1] > tokens[0] and tokens[2] > tokens[1]
    assert all(v >= 0 for _, v in logged["train/grad_norm"])
    # before the first update policy == reference, so the first KL is 0
    assert abs(logged["train/kl"][0][1]) < 1e-6
    assert (cli.trainer.log_dir and Path(cli.trainer.log_dir, "completions.jsonl").exists())


def test_grpo_lora_trains_only_the_adapter(tmp_path, tiny_llama_dir):
    cli = fit(tmp_path, tiny_llama_dir, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
              "--model.init_args.lora_rank=2", "--model.init_args.use_rslora=true")
    model = cli.model
    assert model.ref_model is None  # the reference is the same model with the adapter disabled
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_num_generations_below_two_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPO(model_name_or_path=str(tiny_llama_dir), num_generations=1)
    with pytest.raises(ValueError, match="max_completion_length must be >= 1"):
        GRPO(model_name_or_path=str(tiny_llama_dir), max_completion_length=0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GRPO(model_name_or_path=str(tmp_path / "no_model"))


def test_rewards_get_the_extra_fields_and_the_policy_tokenizer(tiny_llama_dir):
    seen = {}

    def spy(prompts, completions, tokenizer=None, **fields):
        seen.update(fields=fields, tokenizer=tokenizer, n=len(completions))
        return [float(len(c)) for c in completions]

    m = GRPO(model_name_or_path=str(tiny_llama_dir), rewards=[spy], num_generations=2, beta=0.0)
    batch = {"prompt": ["a", "b"], "eligible": [True, False]}
    out = m.score(batch, ["x", "yy", "zzz", ""], group=2)
    assert seen["fields"] == {"eligible": [True, True, False, False]} and seen["tokenizer"] is m.tokenizer
    assert torch.equal(out["total"], torch.tensor([1.0, 2.0, 3.0, 0.0]))


@pytest.mark.slow
def test_grpo_learns_sentence_length_on_the_pretrained_model(tmp_path):
    """Mean sentence_length_10_smooth reward rises by >= 0.15 (real TinyStories prompts, fixed seed)."""
    from lightning_rlm.models.base_model import build

    base = build("tiny-llama-tinystories")
    cli = RLMCLI(args=[
        "fit", "--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"),
        "--model.init_args.model_name_or_path", str(base), "--data.init_args.tokenizer", str(base),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--trainer.max_steps=160", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
    ])
    rewards = [v for _, v in scalars(tmp_path / "runs")["train/reward"]]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last - first >= 0.15, (first, last)
    assert cli.trainer.global_step == 160


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_held_out_evaluation_subcommands(subcommand, tmp_path, tiny_llama_dir):
    """`lightning-rlm validate|test` generate on held-out prompts: sampled and greedy rewards."""
    split = "val" if subcommand == "validate" else "test"
    cli = RLMCLI(args=[
        subcommand, "--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"),
        "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer", str(tiny_llama_dir),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu", "--model.init_args.max_completion_length=8", "--model.init_args.eval_samples=4",
        f"--trainer.limit_{split if split == 'test' else 'val'}_batches=1",
    ])
    metrics = cli.trainer.callback_metrics
    for tag in ["reward/total", "greedy_reward/total", "unique_first_sentences"]:
        assert f"{split}/{tag}" in metrics, sorted(metrics)
