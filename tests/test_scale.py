"""Scale and reliability through the real CLI, for every method: DDP on 2 CPU processes (gloo), exact resume
from `last.ckpt`, and 2 processes × B == 1 process × 2B for the LM baseline.

Each method runs its shipped YAML made tiny by overrides (a tiny random Llama for the RL methods, few
tokens, few steps). These spawn real `lightning-rlm fit` processes, so they are marked slow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
DDP = str(ROOT / "configs/presets/ddp_cpu.yaml")


def _rl(model_dir: Path) -> list[str]:
    return [f"--model.init_args.model_name_or_path={model_dir}", f"--data.init_args.tokenizer={model_dir}"]


# method -> (config, overrides given the tiny model folder, scalar tags that must match on resume)
METHODS = {
    "language_model": ("configs/lm/gru_shakespeare.yaml", lambda d: [
        "--model.init_args.network.init_args.embed_dim=32", "--model.init_args.network.init_args.hidden_size=32",
        "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=32",
        "--data.init_args.batch_size=8"], ["train/loss"]),
    "quiet_star_gru": ("configs/quiet_star_gru/reasoner_32.yaml", lambda d: [
        "--model.init_args.max_reasoning_len=2", "--model.init_args.trice_samples=2",
        "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=16",
        "--data.init_args.batch_size=4"], ["train/loss", "train/policy_loss"]),
    "quiet_star": ("configs/quiet_star/llama_tinystories.yaml", lambda d: [*_rl(d),
        "--model.init_args.n_ahead=4", "--model.init_args.think_positions=4", "--model.init_args.sample_tokens=0",
        "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=16",
        "--data.init_args.batch_size=4"], ["train/loss", "train/policy_loss"]),
    "grpo": ("configs/grpo/sentence_length_10_smooth.yaml", lambda d: [*_rl(d),
        "--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2",
        "--trainer.callbacks=[]"], ["train/loss", "train/reward"]),
    "gradient_routing": ("configs/gradient_routing/routing_r4.yaml", lambda d: [*_rl(d),
        "--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2",
        "--model.init_args.eval_num_generations=2", "--trainer.callbacks=[]"],
        ["train/loss", "train/reward"]),
    "sft_kl_barrier": ("configs/sft_kl_barrier/kl_rev_rmse.yaml", lambda d: [*_rl(d),
        "--model.init_args.eval_prompts=2", "--model.init_args.eval_max_new_tokens=4",
        "--model.init_args.n_rounds=2", "--data.init_args.completion_tokens=8",
        "--data.init_args.prefix_tokens=8", "--data.init_args.batch_size=4"], ["train/loss"]),
    # the self-feeding loop: from step 2 on, the steps train on round 1's pool (checkpointed with its position)
    "sft_kl_loop": ("configs/sft_kl_barrier/loop_rmse.yaml", lambda d: [*_rl(d),
        "--model.init_args.eval_prompts=2", "--model.init_args.eval_max_new_tokens=4",
        "--model.init_args.n_rounds=2", "--model.init_args.pool_prompts=4", "--model.init_args.keep_min_score=null",
        "--data.init_args.completion_tokens=8", "--data.init_args.prefix_tokens=8", "--data.init_args.batch_size=4"],
        ["train/loss", "train/div"]),
    "projected_grpo": ("configs/projected_grpo/route.yaml", lambda d: [*_rl(d),
        "--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2",
        "--model.init_args.eval_num_generations=2", "--model.init_args.hack_pairs=2",
        "--trainer.callbacks=[]"], ["train/loss", "train/reward"]),
    "gan_rl": ("configs/gan_rl/05_tinystories.yaml", lambda d: [*_rl(d),
        "--model.init_args.reasoning_tokens=3", "--model.init_args.completion_tokens=6",
        "--data.init_args.completion_tokens=6", "--data.init_args.prefix_tokens=8",
        "--data.init_args.batch_size=2", "--trainer.callbacks=[]"], ["train/g_loss", "train/d_loss"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(config: str, extra: list[str], save_dir: Path, name: str, *, ddp: bool = False,
        timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(_free_port())}
    args = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(ROOT / config)]
    if ddp:
        args += ["--config", DDP]
    args += ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
             "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={save_dir}",
             f"--trainer.logger.init_args.name={name}", *extra]
    out = subprocess.run(args, cwd=save_dir, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_ddp_runs_every_method(method, tmp_path, tiny_llama_dir):
    config, overrides, tags = METHODS[method]
    fit(config, [*overrides(tiny_llama_dir), "--trainer.max_steps=2", "--trainer.val_check_interval=2"],
        tmp_path, method, ddp=True)
    run = tmp_path / method / "version_0"
    assert scalars(run, tags[0]), f"no {tags[0]} in the TensorBoard events"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 2
    # The global batch is the config's: the data position counts global batches, not per-rank ones.
    dm_state = next(v for k, v in ckpt.items() if k.endswith("DataModule"))
    assert dm_state["batches"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_from_last_ckpt_is_exact(method, tmp_path, tiny_llama_dir):
    """4 steps straight == 2 steps, stop, resume from last.ckpt, 2 more: the same logged losses/rewards."""
    config, overrides, tags = METHODS[method]
    extra = [*overrides(tiny_llama_dir), "--trainer.val_check_interval=4"]
    fit(config, [*extra, "--trainer.max_steps=4"], tmp_path, "straight")
    stop = '--trainer.callbacks+={"class_path": "lightning_rlm.callbacks.StopAt", "init_args": {"step": 2}}'
    fit(config, [*extra, "--trainer.max_steps=4", stop], tmp_path, "resumed")  # schedules span 4 steps
    last = tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    fit(config, [*extra, "--trainer.max_steps=4", f"--ckpt_path={last}"], tmp_path, "resumed")
    for tag in tags:
        straight = scalars(tmp_path / "straight" / "version_0", tag)
        resumed = {**scalars(tmp_path / "resumed" / "version_0", tag), **scalars(tmp_path / "resumed" / "version_1", tag)}
        assert len(straight) == 4, (tag, straight)
        assert sorted(resumed) == sorted(straight), (tag, resumed, straight)
        for step, value in straight.items():
            assert resumed[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step, resumed, straight)


@pytest.mark.slow
def test_two_processes_of_b_equal_one_process_of_2b(tmp_path, shared_data):
    """The config's batch_size is global: 2 × 8 under DDP follows the same loss trajectory as 1 × 16."""
    config, overrides, _ = METHODS["language_model"]
    extra = [*overrides(None), "--data.init_args.batch_size=16", "--trainer.max_steps=5",
             "--trainer.val_check_interval=5"]
    fit(config, extra, tmp_path, "single")
    fit(config, extra, tmp_path, "ddp", ddp=True)
    single = scalars(tmp_path / "single" / "version_0", "train/loss")
    ddp = scalars(tmp_path / "ddp" / "version_0", "train/loss")
    assert len(single) == 5 and sorted(ddp) == sorted(single)
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), (step, ddp, single)
