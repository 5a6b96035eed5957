"""Lightning's smoke test on every shipped config: `lightning-rlm fit --config <cfg> --trainer.fast_dev_run true`.

Each config runs in a fresh process (`python -m lightning_rlm`, as a user would), so one config's imports,
globals or random state cannot help or break another's. Configs on the pretrained base model
(`lrlm:tiny-llama-tinystories`) or SmolLM2 run on the tiny random Llama of `tiny_llama_dir` (with ChatML's
tokens and template for SmolLM2: `tiny_chat_llama_dir`) instead (as in `tests/test_configs.py`): the base model takes minutes to build, and a smoke test checks the wiring, not the
weights. Run folders, round files and checkpoints go under the test's tmp_path (also the working directory,
where fast_dev_run's logger-less runs write).

Time on the development machine (2 CPU cores, shared with other jobs at a load of ~3; warm tokenizer cache):
8 min 50 s for the 67 configs, 4-13 s each, with 7 min of CPU time (~6.5 s a config, ~4 s of it the imports
of a fresh process), so about 7 min on an idle 2-core machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlm.data import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "presets")
# per config folder, to keep a run short: the KL-barrier rounds sample 64 prompts x 48 tokens by default; the
# self-feeding loop's pool keeps every generation here (a random model's samples rarely hold the trait keyword,
# and an empty pool would stop the loop before its step)
OVERRIDES = {"sft_kl_barrier": ["--model.init_args.eval_prompts=8", "--model.init_args.eval_max_new_tokens=8",
                                "--model.init_args.pool_prompts=8", "--model.init_args.keep_min_score=null"]}


@pytest.mark.slow
@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_fast_dev_run(config: Path, tmp_path: Path, need_data, tiny_model_config) -> None:
    """One training batch, one validation batch and the method's own hooks (rounds, rollouts) end to end."""
    text = config.read_text()
    for preset in re.findall(r"preset:\s*(\w+)", text):  # a sample that is not bundled: skip or fail clearly
        need_data(PRESETS[preset]["path"])
    args = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(config)]
    if tiny := tiny_model_config(config):  # the tiny random Llama (with ChatML for the SmolLM2 configs)
        args += ["--config", str(tiny)]
    args += ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
             *OVERRIDES.get(config.parent.name, [])]
    # one thread: on a busy machine OpenMP's spinning threads make a run ~3x slower (20 s instead of 6 s)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{config.relative_to(CONFIGS)} failed:\n{output[-4000:]}"
    assert "Running in `fast_dev_run` mode" in output
    if config.parent.name == "sft_kl_barrier":  # max_steps=1 < n_rounds: one round of one step
        assert "round 1 (step 1)" in output and (tmp_path / "generations_round_1.jsonl").exists()
        if config.stem.startswith("loop_"):  # round 1's step trained on all of round 0's pool
            assert re.search(r"round 0: pool kept (\d+) of \1 ", output), output[-4000:]
            assert (tmp_path / "pool_round_1.jsonl").exists()
