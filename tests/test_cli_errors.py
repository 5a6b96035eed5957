"""Bad input, as a table: each row a bad config or bad data, and what the user gets — one clear line naming
the bad value, exit code 2, before any training, and an existing run folder left exactly as it was.

Rows run the CLI in-process (`lightning_rlm.cli.main`), so the table costs seconds, not a process each.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlm.cli import clean_error, main

ROOT = Path(__file__).resolve().parents[1]
GRU = str(ROOT / "configs/lm/gru_shakespeare.yaml")
QSTAR = str(ROOT / "configs/quiet_star_gru/reasoner_32.yaml")
GRPO = str(ROOT / "configs/grpo/sentence_length_10_smooth.yaml")
SFT = str(ROOT / "configs/sft_kl_barrier/kl_rev_rmse.yaml")
QSTAR_HF = str(ROOT / "configs/quiet_star/qwen2_shakespeare_char.yaml")

# (id, config, overrides; "{tiny}" is the tiny Llama folder and "{tmp}" the test folder, expected message)
ROWS = [
    ("missing data file", GRU, ["--data.init_args.source.path=nope/missing.txt"],
     "data file 'nope/missing.txt' not found"),
    ("empty corpus", GRU, ["--data.init_args.source.path={tmp}/empty.txt"], "has no documents (empty corpus)"),
    ("documents shorter than the window", GRU,
     ["--data.init_args.source.preset=tinystories", "--data.init_args.cross_documents=false",
      "--data.init_args.block_size=100000"], "block_size=100000 is larger than every train document"),
    ("window longer than the corpus", GRU, ["--data.init_args.block_size=5000000"],
     "block_size=5000000 is larger than the whole train split"),
    ("unknown tokenizer", GRU, ["--data.init_args.tokenizer=charr"], "unknown tokenizer 'charr'"),
    ("unknown reward class path", GRPO, ["--model.init_args.model_name_or_path={tiny}",
     "--data.init_args.tokenizer={tiny}", '--model.init_args.rewards=[{"class_path": "lightning_rlm.rewards.Nope"}]'],
     "has no attribute 'Nope'"),
    ("unknown method class path", GRU, ["--model=lightning_rlm.methods.Nope"], "lightning_rlm.methods.Nope"),
    ("num_generations < 2", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}",
     "--model.init_args.num_generations=1"], "num_generations must be >= 2"),
    ("max_completion_length 0", GRPO, ["--model.init_args.model_name_or_path={tiny}",
     "--data.init_args.tokenizer={tiny}", "--model.init_args.max_completion_length=0"],
     "max_completion_length must be >= 1, got 0"),
    ("negative tau", SFT, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}",
     "--model.init_args.tau=-1"], "tau must be >= 0"),
    # checked before the model loads: the model folder does not exist and is never read
    ("round schedule longer than max_steps", SFT, ["--model.init_args.model_name_or_path={tmp}/never_loaded",
     "--data.init_args.tokenizer={tiny}", "--model.init_args.steps_per_round=50"],
     "steps_per_round=50 x n_rounds=4 = 200 steps do not fit trainer.max_steps=1"),
    ("weight_groups that cannot share", QSTAR, ["--model.init_args.weight_groups=AAAA",
     "--model.init_args.reasoner_hidden_dim=128"], "weight_groups='AAAA' shares one GRU"),
    # Quiet-STaR's thought markers start from the embedding of thought_init_text: a tokenizer that cannot
    # encode it (here a char vocabulary without '€') has no thought tokens to start from
    ("a tokenizer without the thought tokens", QSTAR_HF, ["--model.init_args.thought_init_text=€€€"],
     "thought_init_text '€€€' cannot be encoded by the DataModule's tokenizer"),
    ("model path that does not exist", GRPO, ["--model.init_args.model_name_or_path={tmp}/no_model",
     "--data.init_args.tokenizer={tiny}"], "no_model' does not exist"),
    ("fp16 on the CPU", GRU, ["--trainer.accelerator=cpu", "--trainer.precision=16-mixed"],
     "trainer.precision='16-mixed' is not supported on the CPU"),
    ("misspelt option", GRU, ["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("config", "overrides", "message"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_clear_line_and_leaves_runs_alone(config, overrides, message, tmp_path, capsys,
                                                             shared_data, tiny_llama_dir, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    runs = tmp_path / "runs"
    old_run = runs / "exp" / "version_0"  # an earlier run under the same name
    (old_run / "checkpoints").mkdir(parents=True)
    (old_run / "checkpoints" / "last.ckpt").write_bytes(b"earlier weights")
    (old_run / "events.out.tfevents.1.host").write_bytes(b"earlier logs")
    (old_run / "completions.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(runs)
    monkeypatch.chdir(tmp_path)

    args = ["fit", "--config", config, f"--trainer.logger.init_args.save_dir={runs}",
            "--trainer.logger.init_args.name=exp", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
            *[o.replace("{tiny}", str(tiny_llama_dir)).replace("{tmp}", str(tmp_path)) for o in overrides]]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err, err[-2000:]
    assert "Traceback" not in err and "Given value" not in err and "usage:" not in err
    assert err.count("lightning-rlm: error:") == 1
    after = _snapshot(runs)
    assert {k: after[k] for k in before} == before  # the earlier run is untouched
    new = [k for k in after if k not in before]
    assert not [k for k in new if k.endswith(".ckpt")]  # nothing trained
    for k in new:  # an error found while setting up data may leave a header-only event file, never a metric
        if "tfevents" in k:
            acc = EventAccumulator(str(runs / k))
            acc.Reload()
            assert not acc.Tags()["scalars"], (k, acc.Tags()["scalars"])


def test_clean_error_keeps_the_keys_and_the_innermost_reason():
    report = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'lightning_rlm.methods.GRPO':
        Parser key "rewards":
          Errors:
            - module 'lightning_rlm.rewards' has no attribute 'Nope'
            - Expected a <class 'NoneType'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""
    assert clean_error(report) == "model.rewards: module 'lightning_rlm.rewards' has no attribute 'Nope'"
    assert clean_error("plain message") == "plain message"
