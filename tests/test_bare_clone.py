"""A copy of the repository with no `shared/` beside it and no $LRLM_DATA_DIR runs the README.

The copy (every file git tracks or would add) sits in a temporary folder; commands run there in fresh
processes, so `lightning_rlm` is imported from the copy and finds only its bundled samples. About 60 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bare_clone(tmp_path_factory) -> tuple[Path, dict]:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    base = tmp_path_factory.mktemp("bare")
    clone = base / "repo"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, clone / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LRLM_", "PYTHONPATH"))}
    env.update(LRLM_CACHE_DIR=str(base / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    assert not (base / "shared").exists()
    return clone, env


def _run(clone: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_rlm", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)


def test_main_job_runs_from_the_bundled_samples(bare_clone):
    clone, env = bare_clone
    listing = _run(clone, env, "data")
    assert listing.returncode == 0, listing.stderr
    shakespeare = next(line for line in listing.stdout.splitlines() if line.startswith("shakespeare"))
    assert f"bundled samples ({clone / 'lightning_rlm' / 'data' / 'samples'}" in shakespeare
    assert "shared/data beside" not in listing.stdout.split("data set")[1]  # nothing found outside the clone
    r = _run(clone, env, "fit", "--config", "configs/lm/gru_shakespeare.yaml", "--trainer.max_steps=3",
             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
             "--model.init_args.sample_tokens=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((clone / "runs" / "lm" / "gru_shakespeare").glob("version_0/checkpoints/last.ckpt"))


def test_base_model_data_loads_from_the_bundled_samples(bare_clone):
    clone, env = bare_clone
    code = ("from lightning_rlm.models.base_model import BASE_MODELS, build_key\n"
            "from lightning_rlm.data.paths import resolve_data_path\n"
            "config, data = BASE_MODELS['tiny-llama-tinystories']\n"
            "print(resolve_data_path(data)); print(build_key('tiny-llama-tinystories'))\n"
            "from lightning_rlm.cli import RLMCLI\n"
            "cli = RLMCLI(args=['--config', config], run=False)\n"
            "cli.datamodule.setup('fit'); print(len(cli.datamodule.train_dataloader()))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    path, key, batches = r.stdout.split()[:3]
    assert Path(path) == clone / "lightning_rlm" / "data" / "samples" / "tinystories" / "tinystories_val_head.txt"
    assert len(key) == 16 and int(batches) > 0


def test_a_preset_that_is_not_there_names_the_fetch_command(bare_clone):
    clone, env = bare_clone
    r = _run(clone, env, "fit", "--config", "configs/quiet_star_gru/fineweb_bpe.yaml", "--trainer.max_steps=1")
    lines = [line for line in r.stderr.splitlines() if line.startswith("lightning-rlm: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "lightning-rlm data fetch fineweb" in lines[0] and "fineweb-edu/" in lines[0]
    assert not (clone / "runs" / "quiet_star_gru").exists()
