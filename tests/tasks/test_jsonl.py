"""A user's own jsonl tasks, built from YAML alone (class_path + init_args, as LightningCLI builds them)."""

from __future__ import annotations

import json

import pytest
from jsonargparse import ArgumentParser

from lightning_rlm.tasks import JsonlChoiceTask, JsonlGenerationTask, Task, evaluate, normalize_text


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(yaml: str) -> Task:
    parser = ArgumentParser()
    parser.add_argument("--task", type=Task)
    return parser.instantiate_classes(parser.parse_string(yaml)).task


def test_generation_task_from_yaml_runs(tiny_lm, tmp_path):
    path = _write(
        tmp_path / "sums.jsonl",
        [{"q": f"What is {a} plus {a}?", "a": f"It is {2 * a}."} for a in range(1, 6)],
    )
    task = _build(f"""
task:
  class_path: lightning_rlm.tasks.JsonlGenerationTask
  init_args:
    path: {path}
    question_field: q
    answer_field: a
    name: sums
    template: "Q: {{question}}\\nA:"
    num_fewshot: 1
    max_new_tokens: 6
    stop: ["\\n"]
""")
    assert isinstance(task, JsonlGenerationTask) and task.name == "sums" and task.match == "number"
    assert [ex.gold for ex in task.examples()] == ["2", "4", "6", "8", "10"]
    ex = task.examples()[0]
    prompt = task.prompt(ex, None)
    assert prompt.endswith("Q: What is 1 plus 1?\nA:") and prompt.count("Q:") == 2 and "\nA: It is" in prompt
    model, tok = tiny_lm
    result = evaluate(task, model, tok, batch_size=2)
    assert result["task"] == "sums" and result["n"] == 5 and 0 <= result["accuracy"] <= 1
    assert all("\n" not in r["completion"] for r in result["records"])  # cut at the stop string


def test_choice_task_from_yaml_runs(tiny_lm, tmp_path):
    rows = [
        {"prompt": "The sky is", "options": ["blue", "green", "loud"], "label": 0},
        {"prompt": "Fish live in", "options": ["trees", "water"], "label": "water"},
        {
            "prompt": "Two and two make",
            "options": {"label": ["x", "y"], "text": ["four", "five"]},
            "label": "x",
        },
    ]
    path = _write(tmp_path / "mine.jsonl", rows)
    task = _build(f"""
task:
  class_path: lightning_rlm.tasks.JsonlChoiceTask
  init_args: {{path: {path}, question_field: prompt, choices_field: options, answer_field: label,
              template: "{{question}}", scoring: sum}}
""")
    assert [(ex.gold, ex.gold_index) for ex in task.examples()] == [("A", 0), ("B", 1), ("x", 0)]
    model, tok = tiny_lm
    result = evaluate(task, model, tok, batch_size=2)
    assert result["n"] == 3 and result["scoring"] == "sum" and result["accuracy"] == result["accuracy_sum"]
    assert [len(r["loglik_sum"]) for r in result["records"]] == [3, 2, 2]
    letter = evaluate(task, model, tok, scoring="letter", max_new_tokens=3)
    assert letter["n"] == 3 and 0 <= letter["accuracy"] <= 1


@pytest.mark.parametrize(
    "match, completion, answer, correct",
    [
        ("exact", " Paris.\nMore text", "paris", True),
        ("exact", "Paris is nice", "Paris", False),
        ("contains", "I think it is PARIS, France", "Paris", True),
        ("number", "so 12", "#### 12", True),
    ],
)
def test_match_modes(tmp_path, match, completion, answer, correct):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "answer": answer}])
    task = JsonlGenerationTask(path=str(path), match=match)
    ex = task.examples()[0]
    assert task.is_correct(task.extract(completion), ex) is correct


def test_bad_rows_are_clear_errors(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "C"}])
    with pytest.raises(ValueError, match=r"t.jsonl:1: answer 'C' is neither"):
        JsonlChoiceTask(path=str(path)).examples()
    with pytest.raises(ValueError, match=r"no field 'ans'"):
        JsonlChoiceTask(path=str(path), answer_field="ans").examples()
    with pytest.raises(ValueError, match="template must contain"):
        JsonlGenerationTask(path=str(path), template="no slot")
    assert normalize_text(" 'Yes!' ") == "yes"
