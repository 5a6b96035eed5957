"""Names users already know: short class names for methods, DataModules, rewards and callbacks, and a top-level
`--help` that lists every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lightning_rlm.cli import RLMCLI
from lightning_rlm.methods import GRPO

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_short_class_names_resolve(tmp_path, tiny_llama_dir):
    config = tmp_path / "short.yaml"
    config.write_text(f"""model:
  class_path: GRPO
  init_args:
    model_name_or_path: {tiny_llama_dir}
    rewards:
      - class_path: SentenceLength
        init_args: {{n: 6}}
      - class_path: KeywordCount
data:
  class_path: PromptDataModule
  init_args:
    source: {{preset: tinystories, max_documents: 20}}
    tokenizer: {tiny_llama_dir}
trainer:
  callbacks:
    - class_path: CompletionsLogger
""")
    cli = RLMCLI(args=["--config", str(config)], run=False)
    assert type(cli.model) is GRPO
    assert [type(r).__name__ for r in cli.model.rewards] == ["SentenceLength", "KeywordCount"]
    assert cli.model.rewards[0].n == 6
    assert type(cli.datamodule).__name__ == "PromptDataModule"
    assert "CompletionsLogger" in [type(c).__name__ for c in cli.trainer.callbacks]
    # and on the command line
    cli = RLMCLI(args=["--config", str(config), "--model", "GRPO", "--model.num_generations", "3"], run=False)
    assert type(cli.model) is GRPO and cli.model.hparams.num_generations == 3


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lightning_rlm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("fit", "validate", "test", "predict", "base-model", "sweep", "report", "data", "export",
                    "rationalize"):
        assert f"  {command}" in out.stdout, (command, out.stdout)


def test_default_root_dir_moves_the_run_folder(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    RLMCLI(args=["fit", "--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"),
                 "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                 str(tiny_llama_dir), "--trainer.default_root_dir", str(root), "--trainer.max_steps=1",
                 "--trainer.limit_val_batches=0", "--model.init_args.num_generations=2",
                 "--model.init_args.max_completion_length=4", "--trainer.enable_progress_bar=false"])
    run = root / "grpo" / "sentence_length_10_smooth" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents*"))
    assert not (tmp_path / "runs").exists()
