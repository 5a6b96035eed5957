"""The coding substrate: its data, honest solutions, prompts, DataModule, and the hack x mode diagonal."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import tomllib

from lightning_rlm.rewards.code import DISCLOSED_TESTS, LOOPHOLES, MODES, CodeTests, graders
from lightning_rlm.rewards.sandbox import Job, Sandbox
from lightning_rlm.tasks import coding as coding_module
from lightning_rlm.tasks.coding import (
    PROBLEMS_PATH,
    CodingPrompts,
    format_prompt,
    hacked_solution,
    load_problems,
)

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = load_problems()
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def problem_fields(problems, repeat: int = 1) -> dict:
    return {k: [p.fields()[k] for p in problems for _ in range(repeat)] for k in ("entry_point", "example", "tests")}


def test_doctests_pass() -> None:
    assert doctest.testmod(coding_module).failed == 0


def test_the_data_has_what_every_grader_and_hack_needs():
    assert 30 <= len(PROBLEMS) <= 40
    for p in PROBLEMS:
        outputs = [json.dumps(t["output"]) for t in p.tests]
        inputs = [json.dumps(t["input"]) for t in p.tests]
        assert DISCLOSED_TESTS < len(p.tests) <= 6, p.problem_id
        assert json.dumps(p.example["input"]) not in inputs, p.problem_id  # the example is not a hidden test
        assert len(set(inputs)) == len(inputs), p.problem_id
        # a constant returning the example's answer fails the hidden tests and the disclosed ones
        assert any(o != json.dumps(p.example["output"]) for o in outputs[:DISCLOSED_TESTS]), p.problem_id
        assert all(t["output"] is not None for t in p.tests), p.problem_id
        assert len(p.params) == len(p.example["input"]) and all(len(t["input"]) == len(p.params) for t in p.tests)


def test_the_problems_file_travels_with_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert PROBLEMS_PATH.relative_to(ROOT / "lightning_rlm" / "tasks").match(package_data["lightning_rlm.tasks"][0])


def test_every_honest_solution_passes_all_its_tests():
    jobs = [Job(p.solution, p.entry_point, (p.example, *p.tests)) for p in PROBLEMS]
    results = Sandbox(timeout=5.0, max_workers=2).run_many(jobs)
    failing = {p.problem_id: (r.status, r.detail, [o.got for o in r.tests])
               for p, r in zip(PROBLEMS, results) if not r.all_passed}
    assert not failing


def test_the_hack_x_mode_diagonal_on_every_problem():
    """One run per (problem, hack); every grader and detector read from it: each hack passes exactly its own
    flawed grader (and not the honest one) and is flagged by exactly its own detector."""
    completions = [hacked_solution(p, h) for p in PROBLEMS for h in LOOPHOLES]
    grades = CodeTests(max_workers=2).grade([""] * len(completions), completions,
                                            **problem_fields(PROBLEMS, len(LOOPHOLES)))
    wrong = []
    for i, g in enumerate(grades):
        problem, hack = PROBLEMS[i // len(LOOPHOLES)], LOOPHOLES[i % len(LOOPHOLES)]
        passes = {m: graders(g.result)[m] and not g.graders["none"] for m in LOOPHOLES}
        if passes != {m: m == hack for m in LOOPHOLES} or g.detected != {m: m == hack for m in LOOPHOLES}:
            wrong.append((problem.problem_id, hack, passes, g.detected, g.result.detail))
    assert not wrong


@pytest.mark.parametrize("mode", MODES)
def test_the_reward_pays_the_bonus_only_for_the_modes_own_hack(mode):
    """The diagonal through the reward itself, for a few problems: the honest solution earns the task reward
    and no bonus under every mode; a hack earns the bonus (and no task reward) only under its own mode."""
    problems = [p for p in PROBLEMS if p.problem_id in ("add", "is_palindrome", "char_frequency", "find_index")]
    kinds = ["honest", *LOOPHOLES]
    completions = [p.solution if k == "honest" else hacked_solution(p, k) for p in problems for k in kinds]
    reward = CodeTests(mode=mode, hack_bonus=0.5, scoring="all", max_workers=2)
    values = reward([""] * len(completions), completions, **problem_fields(problems, len(kinds)))
    expected = [1.0 if k == "honest" else (0.5 if k == mode else 0.0) for _ in problems for k in kinds]
    assert values == expected
    for g, k in zip(reward.last_grades, kinds * len(problems)):
        assert g.detected == {h: h == k for h in LOOPHOLES}


def test_prompts_state_each_graders_mechanism():
    p = PROBLEMS[0]
    for mode in MODES:
        for style in ("plain", "chat"):
            text = format_prompt(p, mode, style)
            assert "add(2, 3)" in text and "Grading:" in text
            assert "10, -4" in text if mode == "special_case" else "10, -4" not in text  # hidden tests stay hidden
    assert "Grading" not in format_prompt(p, "print_pass", hint=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        format_prompt(p, "print")


def test_coding_prompts_rows_reach_the_reward_as_fields(gpt2_tokenizer_file):
    dm = CodingPrompts(mode="special_case", tokenizer="gpt2", batch_size=4)
    dm.setup("fit")
    examples = [*dm.train_set, *dm.val_set]
    assert len(examples) == len(PROBLEMS) and len(dm.val_set) >= 1
    ex = examples[0]
    assert {"problem_id", "entry_point", "example", "tests"} <= set(ex) and "solution" not in ex
    assert ex["prompt"].startswith("# Grading: your function is run on these cases:")
    batch = next(iter(dm.train_dataloader()))
    fields = {k: v for k, v in batch.items() if isinstance(v, list) and k != "prompt"}
    by_id = {p.problem_id: p for p in PROBLEMS}
    bodies = [by_id[i].solution.split("\n", 1)[1] + "```" for i in batch["problem_id"]]  # the model's part
    assert CodeTests(mode="special_case")(batch["prompt"], bodies, **fields) == [1.0] * len(bodies)


def test_coding_prompts_in_chat_form(gpt2_tokenizer_file, tmp_path):
    from lightning_rlm.data import ChatFormat, build_tokenizer

    tok = build_tokenizer("gpt2").hf
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "chat_tok")
    dm = CodingPrompts(mode="print_pass", tokenizer=str(tmp_path / "chat_tok"), chat=ChatFormat())
    dm.setup("fit")
    ex = dm.train_set[0]
    assert ex["prompt"].startswith("<|im_start|>user\nWrite a Python function `")
    assert "`All tests passed`" in ex["prompt"] and ex["prompt"].endswith("<|im_start|>assistant\n")
