"""Bad input: one clear error line, non-zero exit, before training starts."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRU = str(ROOT / "configs/lm/gru_shakespeare.yaml")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_rlm", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.init_args.source.path", "nope/missing.txt"], "data file 'nope/missing.txt' not found"),
        (["--data.init_args.tokenizer", "charr"], "unknown tokenizer 'charr'"),
        (["--data.init_args.block_size", "5000000"], "block_size=5000000 is larger than the whole train split"),
    ],
)
def test_bad_input_fails_before_training(override, message, tmp_path, shared_data):
    out = cli("fit", "--config", GRU, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
              "--trainer.max_steps", "1", *override, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained
