"""Lightning's smoke test on every shipped config: `lightning-rlm fit --config <cfg> --trainer.fast_dev_run true`.

Each config runs in a fresh process (`python -m lightning_rlm`, as a user would), so one config's imports,
globals or random state cannot help or break another's. Configs on the pretrained base model
(`lrlm:tiny-llama-tinystories`) or SmolLM2 run on the tiny random Llama of `tiny_llama_dir` (with ChatML's
tokens and template for SmolLM2: `tiny_chat_llama_dir`) instead (as in `tests/test_configs.py`): the base model
takes minutes to build, and a smoke test checks the wiring, not the weights. Run folders, round files and
checkpoints go under each config's own folder (also the run's working directory, where fast_dev_run's
logger-less runs write).

The runs are independent processes of one thread each, so they run `LRLM_TEST_JOBS` at a time (`run_pool`:
default 2, or 1 on a 1-core machine): the first test starts every selected config's run and each test waits for
its own. A run takes ~6.5 s of CPU, ~4 s of it the imports of a fresh process; one at a time the 102 configs took
~12 min of CI's slow suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import pytest

from lightning_rlm.data import PRESETS
from lightning_rlm.data.paths import find_data_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "presets")
# per config folder, to keep a run short: the KL-barrier rounds sample 64 prompts x 48 tokens by default; the
# self-feeding loop's pool keeps every generation here (a random model's samples rarely hold the trait keyword,
# and an empty pool would stop the loop before its step)
OVERRIDES = {"sft_kl_barrier": ["--model.init_args.eval_prompts=8", "--model.init_args.eval_max_new_tokens=8",
                                "--model.init_args.pool_prompts=8", "--model.init_args.keep_min_score=null"]}


def presets(config: Path) -> list[str]:
    return re.findall(r"preset:\s*(\w+)", config.read_text())


def smoke_run(config: Path, folder: Path, tiny: Optional[Path]) -> subprocess.CompletedProcess:
    """`lightning-rlm fit --config <config> --trainer.fast_dev_run=true` in a fresh process, in `folder`."""
    args = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(config)]
    if tiny is not None:  # the tiny random Llama (with ChatML for the SmolLM2 configs)
        args += ["--config", str(tiny)]
    args += ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={folder / 'runs'}",
             *OVERRIDES.get(config.parent.name, [])]
    # one thread: on a busy machine OpenMP's spinning threads make a run ~3x slower (20 s instead of 6 s)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_runs(selected_params, tmp_path_factory, tiny_model_yaml, run_pool):
    """{config: (its folder, its run's future)} for the configs this session runs, started in the tests' order;
    a config whose sample is missing is left out (its test skips or fails naming it)."""
    runs: dict[Path, tuple[Path, Future]] = {}
    for config in selected_params("test_fast_dev_run", "config"):
        if all(find_data_path(PRESETS[p]["path"]) is not None for p in presets(config)):
            folder = tmp_path_factory.mktemp(f"smoke_{config.parent.name}_{config.stem}")
            runs[config] = (folder, run_pool.submit(smoke_run, config, folder, tiny_model_yaml(config, folder)))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_fast_dev_run(config: Path, need_data, smoke_runs) -> None:
    """One training batch, one validation batch and the method's own hooks (rounds, rollouts) end to end."""
    for preset in presets(config):  # a sample that is not bundled: skip or fail clearly
        need_data(PRESETS[preset]["path"])
    folder, run = smoke_runs[config]
    proc = run.result()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{config.relative_to(CONFIGS)} failed:\n{output[-4000:]}"
    assert "Running in `fast_dev_run` mode" in output
    if config.parent.name == "sft_kl_barrier":  # max_steps=1 < n_rounds: one round of one step
        assert "round 1 (step 1)" in output and (folder / "generations_round_1.jsonl").exists()
        if config.stem.startswith("loop_"):  # round 1's step trained on all of round 0's pool
            assert re.search(r"round 0: pool kept (\d+) of \1 ", output), output[-4000:]
            assert (folder / "pool_round_1.jsonl").exists()
