"""Stopping and resuming through the real CLI: a run stopped by SIGTERM writes `last.ckpt`, exits 143 and is
not marked done; the sweep (or `fit --ckpt_path last`) resumes it and ends at the losses of a run that was
never stopped. The stop lands at a fixed step (a callback that signals its own process), so the comparison
is exact; one test signals the sweep itself from outside. About 1 minute in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
GRU = str(ROOT / "configs/lm/gru_shakespeare.yaml")
TINY = ["--model.init_args.network.init_args.embed_dim=32", "--model.init_args.network.init_args.hidden_size=32",
        "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=32", "--data.init_args.batch_size=8",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=4"]
STEPS = 8
KILLER = '''
import os, signal
import lightning as L

class SigtermAt(L.Callback):
    """Send SIGTERM to this process when training reaches `step` (not when resumed at or past it)."""

    def __init__(self, step: int) -> None:
        self.step, self.start = step, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and self.start < self.step:
            os.kill(os.getpid(), signal.SIGTERM)
'''


def _env(tmp_path: Path) -> dict:
    (tmp_path / "killer.py").write_text(KILLER)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


def _kill_at(step: int) -> str:
    return '--trainer.callbacks+={"class_path": "killer.SigtermAt", "init_args": {"step": ' + str(step) + "}}"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_rlm", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _sweep(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return _cli(tmp_path, "sweep", "--config", GRU, "--grid", "seed_everything=7", "--out", str(tmp_path / "sweeps"),
                "--name", name, "--", *TINY, f"--trainer.max_steps={STEPS}", *extra)


@pytest.mark.slow
def test_sigterm_in_a_sweep_run_is_not_done_and_the_rerun_ends_where_an_unstopped_run_does(tmp_path):
    straight = _sweep(tmp_path, "straight")
    assert straight.returncode == 0, straight.stdout + straight.stderr[-3000:]
    stopped = _sweep(tmp_path, "stopped", _kill_at(3))
    run = tmp_path / "sweeps" / "stopped" / "run"  # one point: the run is named "run"
    assert stopped.returncode != 0, stopped.stdout
    assert "exit code 143" in (run / "log.txt").read_text()
    assert "stopped by SIGTERM at step 3" in (run / "log.txt").read_text()
    assert not (run / "DONE").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    again = _sweep(tmp_path, "stopped", _kill_at(3))
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert (run / "DONE").exists() and "[resume] run" in again.stdout
    expected = losses(tmp_path / "sweeps" / "straight" / "run" / "tb" / "version_0")
    got = losses(run / "tb" / "version_0")
    assert sorted(expected) == sorted(got) and len(got) == STEPS, (expected, got)
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, got, expected)
    assert (run / "tb" / "version_0" / "config.yaml").is_file()
    assert (run / "tb" / "version_0" / "config.resume-1.yaml").is_file()  # the first run's config is kept


@pytest.mark.slow
def test_fit_ckpt_path_last_in_a_new_process_continues_at_the_saved_step(tmp_path):
    common = ["fit", "--config", GRU, *TINY, f"--trainer.max_steps={STEPS}", "--trainer.logger.init_args.save_dir=runs"]
    straight = _cli(tmp_path, *common, "--trainer.logger.init_args.name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = _cli(tmp_path, *common, _kill_at(5))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 5" in stopped.stderr and "--ckpt_path last" in stopped.stderr
    resumed = _cli(tmp_path, *common, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = tmp_path / "runs" / "lm" / "gru_shakespeare"
    assert [p.name for p in run.iterdir()] == ["version_0"]  # continued in the same folder
    expected, got = losses(tmp_path / "runs" / "straight" / "version_0"), losses(run / "version_0")
    assert sorted(got) == sorted(expected) and len(got) == STEPS
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, got, expected)


@pytest.mark.slow
def test_a_sweep_that_receives_sigterm_stops_its_run_and_exits_143(tmp_path):
    args = [sys.executable, "-m", "lightning_rlm", "sweep", "--config", GRU, "--grid", "seed_everything=1,2",
            "--out", str(tmp_path / "sweeps"), "--name", "s", "--", *TINY, "--trainer.max_steps=100000",
            "--checkpoint.every_n_train_steps=1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    first = tmp_path / "sweeps" / "s" / "seed=1"
    deadline = time.time() + 300
    while not (first / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    assert "exit code 143" in (first / "log.txt").read_text() and not (first / "DONE").exists()
    assert not (tmp_path / "sweeps" / "s" / "seed=2").exists()  # no new run started after the stop
    assert "stopped by a signal" in out
