"""`lightning-rlm predict` of an RL method: a prompts file in, one JSON line per sampled completion out."""

import json
from pathlib import Path

import pytest

from lightning_rlm.callbacks import PredictionsWriter
from lightning_rlm.cli import RLMCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_grpo_predict_writes_completions_with_rewards(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\nA girl named Lily\n")
    override = tmp_path / "prompts.yaml"
    override.write_text(f"data:\n  init_args:\n    source: {{preset: null, path: {prompts}, separator: \"\\n\"}}\n"
                        "    prompt_tokens: null\n")
    args = ["predict", "--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"), "--config", str(override),
            "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
            str(tiny_llama_dir),
            "--model.init_args.eval_num_generations=2", "--model.init_args.max_completion_length=6",
            "--trainer.enable_progress_bar=false"]
    cli = RLMCLI(args=args)
    files = list(Path(cli.trainer.log_dir).glob("predictions*.jsonl"))
    assert [f.name for f in files] == ["predictions.jsonl"]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, s) for p in ("Once upon a time", "The little dog",
                                                                           "A girl named Lily") for s in (0, 1)]
    assert all(isinstance(r["completion"], str) and set(r["rewards"]) == {"sentence_length_10_smooth", "total"}
               for r in rows)
    # a second predict run writes a new file, never into the first one
    cli = RLMCLI(args=[*args, "--trainer.logger.init_args.version", Path(cli.trainer.log_dir).name])
    assert sorted(f.name for f in Path(cli.trainer.log_dir).glob("predictions*.jsonl")) == [
        "predictions-1.jsonl", "predictions.jsonl"]


def test_writer_refuses_a_file_that_is_not_jsonl():
    with pytest.raises(ValueError, match="must end with .jsonl"):
        PredictionsWriter(filename="out.txt")


def test_gan_rl_predict_writes_generations_beside_the_ground_truth(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = RLMCLI(args=["predict", "--config", str(CONFIGS / "gan_rl/05_pile.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                       str(tiny_llama_dir), "--data.init_args.source.preset=tinystories",
                       "--data.init_args.source.max_documents=40", "--model.init_args.reasoning_tokens=3",
                       "--model.init_args.completion_tokens=5", "--data.init_args.completion_tokens=5",
                       "--data.init_args.prefix_tokens=12", "--trainer.limit_predict_batches=2",
                       "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false"])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    val = cli.datamodule.val_set
    n = min(len(val), 2 * cli.datamodule.batch_size)  # every held-out window, up to 2 batches
    assert len(rows) == n > 0
    assert [r["prefix"] for r in rows] == [val[i]["prefix"] for i in range(n)]
    assert [r["ground_truth"] for r in rows] == [val[i]["completion"] for i in range(n)]
    assert all(0.0 <= r["d_prob"] <= 1.0 and isinstance(r["completion"], str) for r in rows)


def test_sft_predict_writes_completions_with_trait_and_loop_flags(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = RLMCLI(args=["predict", "--config", str(CONFIGS / "sft_kl_barrier/kl_rev_rmse.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                       str(tiny_llama_dir), "--data.init_args.source.max_documents=60",
                       "--data.init_args.completion_tokens=5", "--data.init_args.prefix_tokens=12",
                       "--model.init_args.eval_max_new_tokens=5", "--model.init_args.eval_num_generations=2",
                       "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false"])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    val = cli.datamodule.val_set
    n = min(len(val), cli.datamodule.batch_size)
    assert [r["prompt"] for r in rows] == [val[i]["prompt"] for i in range(n) for _ in range(2)]
    assert all(isinstance(r["completion"], str) and r["trait"] in (0.0, 1.0) and isinstance(r["loop"], bool)
               for r in rows)


def test_quiet_star_predict_writes_thinking_continuations(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = RLMCLI(args=["predict", "--config", str(CONFIGS / "quiet_star/llama_tinystories.yaml"),
                       "--model.init_args.model_name_or_path", str(tiny_llama_dir), "--data.init_args.tokenizer",
                       str(tiny_llama_dir), "--data.init_args.block_size=16", "--data.init_args.source.max_documents=40",
                       "--model.init_args.n_ahead=3", "--model.init_args.sample_tokens=4",
                       "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false"])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in rows)
    assert all(len(r["thoughts"]) == 4 for r in rows)  # one thought per generated token
