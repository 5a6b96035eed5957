"""notebooks/results.ipynb runs headless (`jupyter nbconvert --execute`) on the logs of short runs made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "results.ipynb"


def _fit(config: str, save_dir: Path, name: str, *extra: str) -> None:
    args = [sys.executable, "-m", "lightning_rlm", "fit", "--config", str(ROOT / config),
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={name}", *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_results_notebook_executes_on_real_logs(tmp_path, shared_data, tiny_llama_dir):
    runs = tmp_path / "runs"
    gru = ["--model.init_args.network.init_args.embed_dim=32", "--model.init_args.network.init_args.hidden_size=32",
           "--model.init_args.sample_every_n_steps=0", "--data.init_args.block_size=32",
           "--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    for seed in (1, 2):  # two seeds of one setting: the NLL table's mean ± std
        _fit("configs/lm/gru_shakespeare.yaml", runs, f"lm/seed={seed}", f"--seed_everything={seed}", *gru)
    _fit("configs/grpo/sentence_length_10_smooth.yaml", runs, "grpo/tiny",
         f"--model.init_args.model_name_or_path={tiny_llama_dir}", f"--data.init_args.tokenizer={tiny_llama_dir}",
         "--model.init_args.max_completion_length=6", "--model.init_args.num_generations=2",
         "--trainer.callbacks=[]", "--trainer.max_steps=6", "--trainer.val_check_interval=6")
    _fit("configs/sft_kl_barrier/kl_rev_rmse.yaml", runs, "sft/tiny",
         f"--model.init_args.model_name_or_path={tiny_llama_dir}", f"--data.init_args.tokenizer={tiny_llama_dir}",
         "--model.init_args.eval_prompts=2", "--model.init_args.eval_max_new_tokens=4", "--model.init_args.n_rounds=2",
         "--data.init_args.completion_tokens=8", "--data.init_args.prefix_tokens=8", "--data.init_args.batch_size=4",
         "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    executed = tmp_path / "executed.ipynb"
    out = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                          "--output", str(executed), str(NOTEBOOK)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LRLM_RUNS": str(runs), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads(executed.read_text())["cells"]
    text = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    images = sum("image/png" in o.get("data", {}) for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    assert "4 runs in 3 settings" in text, text
    assert "reward curves: 1" in text
    assert "| lm/all | 2 |" in text, text  # the two seeds grouped into one setting
    assert "coherence curves: 1" in text
    assert images >= 2  # the reward and coherence figures
