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
    # seed 001's knobs: a surrogate-loss weight without the surrogate loss (and its re-fed token)
    ("a last-context loss weight without the re-fed token", QSTAR_HF, ["--model.init_args.last_context_loss_beta=0.5"],
     "last_context_loss_beta=0.5 weights the surrogate loss on the last context token"),
    ("model path that does not exist", GRPO, ["--model.init_args.model_name_or_path={tmp}/no_model",
     "--data.init_args.tokenizer={tiny}"], "no_model' does not exist"),
    ("fp16 on the CPU", GRU, ["--trainer.accelerator=cpu", "--trainer.precision=16-mixed"],
     "trainer.precision='16-mixed' is not supported on the CPU"),
    ("misspelt option", GRU, ["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
    # -- accepted silently before
    ("prompt + completion longer than the model's context", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}",
     "--model.init_args.max_completion_length=300"], "= 308 tokens, but model"),
    ("a tokenizer that is not the policy's", GRPO, ["--model.init_args.model_name_or_path={tiny}",
     "--data.init_args.tokenizer=gpt2"], "data.init_args.tokenizer='gpt2' (50257 tokens) is not the tokenizer of the policy"),
    ("lora_rank 0", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--model.init_args.lora_rank=0"], "lora_rank=0: expected a rank >= 1"),
    ("lora_rank 0 with beta 0", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--model.init_args.lora_rank=0", "--model.init_args.beta=0"],
     "lora_rank=0: expected a rank >= 1"),
    # -- failed only after work before
    ("resuming another method's checkpoint", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--ckpt_path={tmp}/other_method.ckpt"],
     "is a checkpoint of lightning_rlm.methods.LanguageModel, but the config trains lightning_rlm.methods.GRPO"),
    ("resuming from another base model", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--ckpt_path={tmp}/other_model.ckpt"],
     "was trained from model_name_or_path='lrlm:some-other-model'"),
    # -- tracebacks before
    ("invalid JSON in a jsonl", GRU, ["--data.init_args.source.path={tmp}/bad_json.jsonl"],
     "bad_json.jsonl:2: invalid JSON (Expecting value at column 10)"),
    ("a jsonl row that is a bare number", GRU, ["--data.init_args.source.path={tmp}/number.jsonl"],
     "number.jsonl:2: expected a JSON object per line, got '42'"),
    ('a jsonl row with "text": null', GRU, ["--data.init_args.source.path={tmp}/null_text.jsonl"],
     "null_text.jsonl:2: field 'text' is null; expected a string"),
    ("non-UTF-8 bytes", GRU, ["--data.init_args.source.path={tmp}/latin1.txt"],
     "latin1.txt:1: not UTF-8 text (byte 0xe9 at offset 3)"),
    ("a GPU accelerator on a CPU machine", GRU, ["--trainer.accelerator=gpu"],
     "trainer.accelerator='gpu': no such device on this machine"),
    ("negative max_steps", GRU, ["--trainer.max_steps=-5"], "trainer.max_steps=-5: expected a non-negative"),
    ("a truncated checkpoint", GRU, ["--ckpt_path={tmp}/truncated.ckpt"], "not a readable checkpoint"),
    ("a save folder under a regular file", GRU, ["--trainer.logger.init_args.save_dir={tmp}/a_file/runs"],
     "a_file is a file, so no folder can be made there"),
    ("gradient accumulation on a method that optimises manually", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}",
     "--trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2: GRPO optimises manually"),
    ("gradient clipping on a method that optimises manually", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--trainer.gradient_clip_val=1.0"],
     "trainer.gradient_clip_val=1.0: GRPO optimises manually"),
    ("an unknown option inside init_args", GRPO, ["--model.init_args.model_name_or_path={tiny}", "--data.init_args.tokenizer={tiny}", "--model.init_args.nope=3"], "Option 'nope' is not accepted"),
    ("a broken YAML file", GRU, ["--config={tmp}/broken.yaml"], "broken.yaml:3:7: invalid YAML"),
    ("a sample_prompt the char vocabulary cannot encode", GRU, ["--model.init_args.sample_prompt=ROMEO\u20ac:"],
     "sample_prompt='ROMEO\u20ac:': character '\u20ac' is not in the char vocabulary"),
    ("an HF model name with no network", GRPO, ["--model.init_args.model_name_or_path=someone/no-such-model",
     "--data.init_args.tokenizer={tiny}"], "cannot load model 'someone/no-such-model'"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("config", "overrides", "message"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_clear_line_and_leaves_runs_alone(config, overrides, message, tmp_path, capsys,
                                                             shared_data, tiny_llama_dir, monkeypatch, request,
                                                             need_data):
    _bad_files(tmp_path)
    if any(o.endswith("tokenizer=gpt2") for o in overrides):  # the GPT-2 tokenizer is fetched, not bundled
        need_data("gpt2-tokenizer/gpt2_tokenizer.json")
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
    loads = _spy_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    if request.node.callspec.id not in FOUND_WHILE_LOADING:
        assert loads == [], f"a model was loaded before the error: {loads}"
    assert message in err, err[-2000:]
    assert "Traceback" not in err and "Given value" not in err and "usage:" not in err
    assert err.count("lightning-rlm: error:") == 1
    after = _snapshot(runs)
    assert {k: after[k] for k in before} == before  # the earlier run is untouched
    new = [k for k in after if k not in before]
    assert not [k for k in new if k.endswith(".ckpt")]  # nothing trained
    assert sorted(p.name for p in (runs / "exp").iterdir()) == ["version_0"]  # no empty version folder left
    for k in new:  # an error found while setting up data may leave a header-only event file, never a metric
        if "tfevents" in k:
            acc = EventAccumulator(str(runs / k))
            acc.Reload()
            assert not acc.Tags()["scalars"], (k, acc.Tags()["scalars"])


# Rows whose error is found by loading the model itself (a path or hub name that is not there), or by a check
# that needs the loaded model's own tokenizer and weights: every other row fails before any model loads.
FOUND_WHILE_LOADING = {"model path that does not exist", "an HF model name with no network",
                       "a tokenizer without the thought tokens"}


def _spy_model_loading(monkeypatch) -> list[str]:
    from transformers import AutoModelForCausalLM

    loads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        loads.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return loads


def _bad_files(tmp: Path) -> None:
    import torch

    (tmp / "empty.txt").write_text("")
    (tmp / "bad_json.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "number.jsonl").write_text('{"text": "fine"}\n42\n')
    (tmp / "null_text.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (tmp / "latin1.txt").write_bytes("caf\u00e9 caf\u00e9 au lait\n".encode("latin-1"))
    (tmp / "broken.yaml").write_text("model:\n  class_path: x\n   bad: [\n")
    (tmp / "a_file").write_text("a file, not a folder\n")
    torch.save({"hyper_parameters": {"_class_path": "lightning_rlm.methods.LanguageModel"}, "state_dict": {}},
               tmp / "other_method.ckpt")
    torch.save({"hyper_parameters": {"_class_path": "lightning_rlm.methods.GRPO",
                                     "model_name_or_path": "lrlm:some-other-model"}, "state_dict": {}},
               tmp / "other_model.ckpt")
    (tmp / "truncated.ckpt").write_bytes((tmp / "other_method.ckpt").read_bytes()[:200])


def test_predict_on_a_method_without_predict_step_is_one_line(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    """Every shipped method predicts; a user's method that defines neither predict_step nor forward is refused
    before anything loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_method.py").write_text("import lightning as L\n\nclass NoPredict(L.LightningModule):\n"
                                           "    def __init__(self, size: int = 2):\n        super().__init__()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", GRPO, "--model", "my_method.NoPredict"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "predict: NoPredict has no predict_step" in err and "Traceback" not in err


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
