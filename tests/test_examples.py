"""The README's "your model, your reward" example runs as printed: the YAML through `python -m lightning_rlm`
and the Python script, from a folder holding `examples/` (slow: SmolLM2); the YAML also on the tiny Llama (fast)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def copy_examples(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def test_yaml_example_on_the_tiny_model(tmp_path, tiny_llama_dir):
    cwd = copy_examples(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lightning_rlm", "fit", "--config", "examples/grpo_my_reward.yaml",
                          "--trainer.max_steps", "2", f"--model.init_args.model_name_or_path={tiny_llama_dir}",
                          f"--data.init_args.tokenizer={tiny_llama_dir}", "--data.init_args.chat=null"],
                         cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((cwd / "runs" / "examples" / "grpo_my_reward").rglob("last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    "python -m lightning_rlm fit --config examples/grpo_my_reward.yaml --trainer.max_steps 3",
    "python examples/grpo_my_reward.py",
])
def test_readme_example_runs_as_printed(tmp_path, command):
    cwd = copy_examples(tmp_path)
    argv = [sys.executable, *command.split()[1:]]
    out = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached." in out.stderr + out.stdout
