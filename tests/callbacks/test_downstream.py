"""DownstreamEvaluation: user jsonl tasks from YAML alone, logged in a short fit and by `validate`, equal to a
direct `evaluate` call; methods without an LM are refused before training."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlm.callbacks.downstream import DownstreamEvaluation, records_to_markdown
from lightning_rlm.cli import RLMCLI
from lightning_rlm.tasks import JsonlChoiceTask, JsonlGenerationTask, evaluate, think_or_not

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write_tasks(tmp_path: Path) -> Path:
    """Two user tasks (generation and multiple choice) and a YAML that evaluates them: nothing but files."""
    math = [{"q": f"What is {a} plus {b}?", "a": str(a + b)} for a in range(4) for b in range(3)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in math) + "\n")
    colours = [{"question": f"Which colour is thing {i}?", "options": ["red", "green", "blue"], "label": i % 3}
               for i in range(9)]
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(r) for r in colours) + "\n")
    preset = tmp_path / "eval.yaml"
    preset.write_text(f"""evaluation:
  tasks:
    - class_path: lightning_rlm.tasks.JsonlGenerationTask
      init_args:
        path: {tmp_path / "sums.jsonl"}
        question_field: q
        answer_field: a
        max_new_tokens: 6
    - class_path: lightning_rlm.tasks.JsonlChoiceTask
      init_args:
        path: {tmp_path / "colours.jsonl"}
        choices_field: options
        answer_field: label
  limit: 5
  seed: 3
  batch_size: 4
""")
    return preset


def grpo_args(tmp_path: Path, model_dir: Path, preset: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "grpo/sentence_length_10_smooth.yaml"), "--config", str(preset),
            "--model.init_args.model_name_or_path", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", "--model.init_args.max_completion_length=8",
            "--model.init_args.num_generations=2", "--model.init_args.eval_samples=2",
            "--model.init_args.eval_num_generations=2", "--trainer.limit_val_batches=1", *extra]


def test_user_tasks_from_yaml_are_logged_in_a_short_fit(tmp_path, tiny_llama_dir):
    preset = write_tasks(tmp_path)
    cli = RLMCLI(args=["fit", *grpo_args(tmp_path, tiny_llama_dir, preset, "--trainer.max_steps=2",
                                         "--trainer.val_check_interval=2")])
    assert cli.trainer.global_step == 2
    ea = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ["eval/sums/accuracy", "eval/sums/n", "eval/colours/accuracy", "eval/colours/accuracy_sum",
                "eval/colours/accuracy_mean", "eval/colours/n"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert [e.value for e in ea.Scalars("eval/sums/n")] == [5.0]  # the sanity check is not evaluated
    assert any("eval/sums/answers" in t for t in ea.Tags()["tensors"])  # the text table of graded answers


def test_validate_logs_what_evaluate_computes(tmp_path, tiny_llama_dir):
    preset = write_tasks(tmp_path)
    cli = RLMCLI(args=["validate", *grpo_args(tmp_path, tiny_llama_dir, preset, "--evaluation.think_probe=true",
                                              "--evaluation.think_tokens=4")])  # the bare model
    metrics = cli.trainer.callback_metrics
    policy, tok = cli.model.policy, cli.model.tokenizer
    colours = JsonlChoiceTask(str(tmp_path / "colours.jsonl"), choices_field="options", answer_field="label")
    sums = JsonlGenerationTask(str(tmp_path / "sums.jsonl"), question_field="q", answer_field="a", max_new_tokens=6)
    direct = evaluate(colours, policy, tok, limit=5, seed=3)
    assert metrics["eval/colours/accuracy"].item() == pytest.approx(direct["accuracy"])
    assert metrics["eval/colours/accuracy_sum"].item() == pytest.approx(direct["accuracy_sum"])
    assert metrics["eval/sums/accuracy"].item() == pytest.approx(evaluate(sums, policy, tok, limit=5, seed=3)["accuracy"])
    assert metrics["eval/colours/n"].item() == 5
    probe = think_or_not(colours, policy, tok, limit=5, seed=3, think_tokens=4)
    for k in ("accuracy_thought", "accuracy_null", "changed", "fixed", "broken"):
        assert metrics[f"eval/colours/think/{k}"].item() == pytest.approx(probe[k])


def test_adapter_wrappers_are_scored_with_their_adapters_on(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_rlm.adapters.dual_lora import add_dual_lora

    write_tasks(tmp_path)
    task = JsonlChoiceTask(str(tmp_path / "colours.jsonl"), choices_field="options", answer_field="label")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    wrapped = add_dual_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 2, 2, None, None, False)
    for p in wrapped.parameters():  # non-zero adapters, so "on" and "off" differ
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    on = evaluate(task, wrapped, tok)
    with wrapped.base():
        off = evaluate(task, wrapped, tok)
    inner = evaluate(task, wrapped.model, tok)
    assert [r["loglik_sum"] for r in on["records"]] == [r["loglik_sum"] for r in inner["records"]]
    assert [r["loglik_sum"] for r in on["records"]] != [r["loglik_sum"] for r in off["records"]]


def test_a_method_without_a_language_model_is_refused_before_training():
    class NoLM(torch.nn.Module):
        pass

    task = JsonlGenerationTask("unused.jsonl")
    with pytest.raises(ValueError, match="has no language model"):
        DownstreamEvaluation(tasks=[task]).setup(None, NoLM(), "fit")  # type: ignore[arg-type]


def test_bad_settings_are_refused():
    task = JsonlGenerationTask("a/x.jsonl")
    with pytest.raises(ValueError, match="distinct names"):
        DownstreamEvaluation(tasks=[task, JsonlGenerationTask("b/x.jsonl")])
    with pytest.raises(ValueError, match="limit must be >= 1"):
        DownstreamEvaluation(tasks=[task], limit=0)


def test_markdown_table_shows_the_chosen_answer_text():
    records = [{"question": "Q|1", "choices": ["red", "green"], "prediction": "B", "gold": "A", "correct": False},
               {"question": "Q2", "completion": "it is 5\nok", "prediction": "5", "gold": "5", "correct": True}]
    table = records_to_markdown(records, rows=2).splitlines()
    assert table[2] == "| Q\\|1 | green | B | A | False |"
    assert table[3] == "| Q2 | it is 5 ok | 5 | 5 | True |"


def test_quiet_star_is_scored_with_and_without_thoughts(tmp_path, tiny_chat_llama_dir):
    preset = write_tasks(tmp_path)
    cli = RLMCLI(args=[
        "validate", "--config", str(CONFIGS / "quiet_star/smollm2_tinystories.yaml"), "--config", str(preset),
        "--model.init_args.model_name_or_path", str(tiny_chat_llama_dir),
        "--data.init_args.tokenizer", str(tiny_chat_llama_dir), "--data.init_args.block_size=16",
        "--model.init_args.sample_every_n_steps=0", "--trainer.limit_val_batches=1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu"])
    metrics = cli.trainer.callback_metrics
    for variant in ("base", "thoughts"):
        assert metrics[f"eval/sums/{variant}/n"].item() == 5
        assert f"eval/colours/{variant}/accuracy_mean" in metrics
    lms = cli.model.downstream_lms()
    colours = JsonlChoiceTask(str(tmp_path / "colours.jsonl"), choices_field="options", answer_field="label")
    base, thinking = (evaluate(colours, *lms[v], limit=5, seed=3) for v in ("base", "thoughts"))
    assert metrics["eval/colours/base/accuracy_sum"].item() == pytest.approx(base["accuracy_sum"])
    assert metrics["eval/colours/thoughts/accuracy_sum"].item() == pytest.approx(thinking["accuracy_sum"])
    # the thinking model's answer likelihoods are its own, not the base path's
    assert [r["loglik_sum"] for r in base["records"]] != [r["loglik_sum"] for r in thinking["records"]]
    assert not cli.model.net.training or cli.model.training  # evaluation left the train/eval flags as they were
