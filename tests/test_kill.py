"""A run killed in the middle of writing a checkpoint keeps a loadable `last.ckpt` and its completions jsonl free
of torn lines (one O_APPEND write per line), and resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs the real CLI, but each checkpoint's temporary file lingers 5 s before its rename: the kill lands mid-save.
SLOW_COMMIT = """
import sys, time
from fsspec.implementations.local import LocalFileOpener
_commit = LocalFileOpener.commit
def commit(self):
    print("SAVING", flush=True)
    time.sleep(5)
    _commit(self)
LocalFileOpener.commit = commit
from lightning_rlm.main import main
main()
"""


def _args(model_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/grpo/sentence_length_10_smooth.yaml"),
            f"--model.init_args.model_name_or_path={model_dir}", f"--data.init_args.tokenizer={model_dir}",
            "--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            "--checkpoint.every_n_train_steps=1", f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.logger.init_args.name=run", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_kill_during_checkpoint_save_keeps_a_loadable_checkpoint(sig, tmp_path, tiny_llama_dir):
    """SIGTERM: Lightning finishes the save in flight and stops (step 3). SIGKILL: the save in flight is lost
    (its temporary file was never renamed) and the previous one (step 2) is intact."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMIT, *_args(tiny_llama_dir, tmp_path,
                            "--trainer.max_steps=100",
                            '--trainer.callbacks=[{"class_path": "lightning_rlm.callbacks.CompletionsLogger", '
                            '"init_args": {"every_n_steps": 1}}]')],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saves = 0
    deadline = time.time() + 300
    try:
        while saves < 3 and time.time() < deadline:  # two saves done, the third one in flight
            line = proc.stdout.readline()
            saves += line.startswith("SAVING")
        assert saves == 3, "the run never reached its third checkpoint save"
        time.sleep(1)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    run = tmp_path / "run" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)  # the previous save, whole
    assert ckpt["global_step"] == (2 if sig == signal.SIGKILL else 3)
    lines = (run / "completions.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # no torn line
    out = subprocess.run([sys.executable, "-m", "lightning_rlm", *_args(tiny_llama_dir, tmp_path,
                          "--trainer.max_steps=4", f"--ckpt_path={last}")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = tmp_path / "run" / "version_1" / "checkpoints" / "last.ckpt"  # a resumed run logs a new version
    assert torch.load(resumed, map_location="cpu", weights_only=False)["global_step"] == 4
