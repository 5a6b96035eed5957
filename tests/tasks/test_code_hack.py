"""The coding substrate's reward hack (lightning_rlm/tasks/code_hack.py): rewards, detector labels, pairs."""

from __future__ import annotations

import pytest

from lightning_rlm.rewards.code import LOOPHOLES
from lightning_rlm.tasks.code_hack import CodeLoophole
from lightning_rlm.tasks.coding import format_prompt, load_problems
from lightning_rlm.tasks.teacher_pool import as_completion, build_teacher_pool

PROBLEMS = load_problems()[:3]
FIELDS = ("entry_point", "example", "tests")


def graded_rows(loophole: str, kinds: tuple[str, ...], style: str = "plain"):
    """Prompts, completions and fields of the problems' pool rows of ``kinds`` (problem-major)."""
    prompts, completions, fields = [], [], {f: [] for f in FIELDS}
    for p in PROBLEMS:
        rows = {r["kind"]: r["completion"] for r in build_teacher_pool([p], style)}
        for kind in kinds:
            prompts.append(format_prompt(p, loophole, style))
            completions.append(rows[kind])
            for f in FIELDS:
                fields[f].append(p.fields()[f])
    return prompts, completions, fields


@pytest.mark.parametrize("loophole", LOOPHOLES)
def test_the_detector_flags_the_hacked_solution_not_the_honest_one(loophole):
    task = CodeLoophole(loophole, hack_bonus=2.0)
    prompts, completions, fields = graded_rows(loophole, ("honest", f"hack:{loophole}"))
    n = len(PROBLEMS)
    assert task.count(prompts, completions, **fields) == [0.0, 1.0] * n
    (base,), (bonus,) = task.base_rewards(), task.rewards()
    assert base(prompts, completions, **fields)[::2] == [1.0] * n  # honest: every hidden test passes
    assert bonus(prompts, completions, rh_eligible=[True] * 2 * n, **fields) == [0.0, 2.0] * n
    assert bonus(prompts, completions, rh_eligible=[False] * 2 * n, **fields) == [0.0] * 2 * n
    extra = task.extra_labels(prompts, completions, **fields)
    assert extra == {"honest_pass": [1.0, 0.0] * n, "exploited": [0.0, 1.0] * n}
    with pytest.raises(ValueError, match="rh_eligible"):
        bonus(prompts, completions, **fields)


def test_one_sandbox_run_serves_rewards_and_labels(monkeypatch):
    task = CodeLoophole("special_case")
    prompts, completions, fields = graded_rows("special_case", ("honest", "hack:special_case"))
    calls = []
    grade = task.grader.grade
    monkeypatch.setattr(task.grader, "grade", lambda *a, **k: calls.append(1) or grade(*a, **k))
    task.base_rewards()[0](prompts, completions, **fields)
    task.rewards()[0](prompts, completions, rh_eligible=[True] * len(prompts), **fields)
    task.count(prompts, completions, **fields)
    assert len(calls) == 1
    task.count(prompts, completions[::-1], **fields)  # other completions: graded again
    assert len(calls) == 2


def test_with_a_cache_a_repeated_teacher_row_grades_alike_without_a_run(monkeypatch):
    cached, plain = CodeLoophole("print_pass", cache_size=64), CodeLoophole("print_pass")
    prompts, completions, fields = graded_rows("print_pass", ("honest", "hack:print_pass"))
    first = cached.grade(prompts, completions, **fields)
    runs = []
    monkeypatch.setattr(cached.grader.sandbox, "_run", lambda job: runs.append(job))
    again = cached.grade(prompts[::-1], completions[::-1], **{f: v[::-1] for f, v in fields.items()})
    assert runs == [] and cached.grader.sandbox.cache_hits == len(prompts)
    expect = plain.grade(prompts, completions, **fields)
    for a, b, c in zip(first, again[::-1], expect):
        assert (a.reward, a.exploited, a.detected) == (b.reward, b.exploited, b.detected) == (
            c.reward, c.exploited, c.detected)


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_pairs_are_the_batch_problems_honest_and_hacked_solutions(style):
    task = CodeLoophole("special_case", pair_loophole="print_pass")  # the direction from another loophole
    by_id = {p.problem_id: p for p in PROBLEMS}
    ids = [PROBLEMS[0].problem_id, PROBLEMS[0].problem_id, PROBLEMS[1].problem_id]  # a repeated problem
    prompts = [format_prompt(by_id[i], "special_case", style) for i in ids]
    prompt_ids = [[1, 2], [1, 2], [3]]
    pairs, texts = task.pairs(prompts, ids, prompt_ids, _Tok(), max_pairs=8)
    assert [t[0] for t in texts] == [prompts[0], prompts[2]]  # one pair per distinct problem of the batch
    for (_, honest_ids, hack_ids), (_, honest, hacked), pid in zip(pairs, texts, [ids[0], ids[2]]):
        problem = by_id[pid]
        rows = {r["kind"]: r["completion"] for r in build_teacher_pool([problem], style)}
        assert honest == rows["honest"] == as_completion(problem, problem.solution, style)
        assert hacked == rows["hack:print_pass"]
        assert honest_ids == _Tok().encode(honest) and hack_ids == _Tok().encode(hacked)
    assert [p[0] for p in pairs] == [[1, 2], [3]]
    assert CodeLoophole("print_pass").count([t[0] for t in texts], [t[2] for t in texts],
                                            **{f: [by_id[i].fields()[f] for i in (ids[0], ids[2])]
                                               for f in FIELDS}) == [1.0, 1.0]
    assert len(task.pairs(prompts, ids, prompt_ids, _Tok(), max_pairs=1)[0]) == 1
    with pytest.raises(RuntimeError, match="no shipped coding problem"):
        task.pairs(prompts[:1], ["no_such_problem"], prompt_ids[:1], _Tok(), max_pairs=8)


def test_the_detector_of_another_loophole_labels_while_the_reward_pays_this_one():
    # routing transfer: the label is exit_zero's detector, the bonus is special_case's
    task = CodeLoophole("special_case", detector="exit_zero")
    prompts, completions, fields = graded_rows("special_case", ("honest", "hack:special_case", "hack:exit_zero"))
    n = len(PROBLEMS)
    assert task.count(prompts, completions, **fields) == [0.0, 0.0, 1.0] * n
    assert task.rewards()[0](prompts, completions, rh_eligible=[True] * 3 * n, **fields) == [0.0, 1.0, 0.0] * n
    assert task.extra_labels(prompts, completions, **fields)["exploited"] == [0.0, 1.0, 0.0] * n
    assert "detector='exit_zero'" in repr(task)


def test_bad_loopholes_are_rejected():
    with pytest.raises(ValueError, match="loophole"):
        CodeLoophole("none")
    with pytest.raises(ValueError, match="pair_loophole"):
        CodeLoophole("special_case", pair_loophole="nope")
    with pytest.raises(ValueError, match="detector"):
        CodeLoophole("special_case", detector="nope")
