"""Seed 001's think-or-not probe: the null block is the task with the block in its template, the thought is the
model's own greedy one, and the changed / fixed / broken shares add up."""

from __future__ import annotations

import json

import pytest

from lightning_rlm.tasks import JsonlChoiceTask, JsonlGenerationTask, evaluate, generate_greedy, think_or_not
from lightning_rlm.tasks.think import CLOSE, NULL_THOUGHT, OPEN


def write(tmp_path):
    rows = [{"question": f"Which colour is thing {i}?", "options": ["red", "green", "blue"], "label": i % 3}
            for i in range(12)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sums = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(3) for b in range(3)]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in sums) + "\n")
    return str(tmp_path / "c.jsonl"), str(tmp_path / "s.jsonl")


def test_null_block_equals_the_block_written_into_the_template(tiny_lm, tmp_path):
    model, tok = tiny_lm
    choices, _ = write(tmp_path)
    task = JsonlChoiceTask(choices, choices_field="options", answer_field="label")
    probe = think_or_not(task, model, tok, limit=8, seed=1, think_tokens=6)
    by_hand = JsonlChoiceTask(choices, choices_field="options", answer_field="label",
                              template="Question: {question}\nAnswer:" + OPEN + NULL_THOUGHT + CLOSE)
    direct = evaluate(by_hand, model, tok, limit=8, seed=1)
    assert probe["accuracy_null"] == direct["accuracy"]
    assert [r["prediction_null"] for r in probe["records"]] == [r["prediction"] for r in direct["records"]]
    # the thought is the model's own greedy continuation of the opened block
    examples = [task.examples()[r["index"]] for r in probe["records"]]
    raw = generate_greedy(model, tok, [task.prompt(ex, tok) + OPEN for ex in examples], 6)
    assert [r["thought"] for r in probe["records"]] == [t.split("</think>")[0].strip() for t in raw]


def test_shares_are_consistent_on_a_generation_task(tiny_lm, tmp_path):
    model, tok = tiny_lm
    _, sums = write(tmp_path)
    task = JsonlGenerationTask(sums, max_new_tokens=4)
    probe = think_or_not(task, model, tok, think_tokens=5)
    assert probe["n"] == 9
    assert probe["fixed"] - probe["broken"] == pytest.approx(probe["accuracy_thought"] - probe["accuracy_null"])
    changed = sum(r["prediction_thought"] != r["prediction_null"] for r in probe["records"]) / 9
    assert probe["changed"] == pytest.approx(changed)
    assert probe["fixed"] + probe["broken"] <= probe["changed"] + 1e-9


def test_bad_settings(tiny_lm, tmp_path):
    model, tok = tiny_lm
    task = JsonlGenerationTask(write(tmp_path)[1])
    with pytest.raises(ValueError, match="think_tokens"):
        think_or_not(task, model, tok, think_tokens=0)
    with pytest.raises(ValueError, match="null_thought"):
        think_or_not(task, model, tok, null_thought="no </think>")
