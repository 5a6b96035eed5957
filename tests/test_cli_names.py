"""Names users already know: short class names for methods, DataModules, rewards and callbacks, and a top-level
`--help` that lists every command."""

from __future__ import annotations

import subprocess
import sys

from lightning_rlm.cli import RLMCLI
from lightning_rlm.methods import GRPO


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
    for command in ("fit", "validate", "test", "predict", "base-model", "sweep", "report", "data"):
        assert f"  {command}" in out.stdout, (command, out.stdout)
