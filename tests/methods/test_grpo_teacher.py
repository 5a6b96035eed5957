"""The teacher pool (lightning_rlm/tasks/teacher_pool.py) and GRPO's mixed student + teacher groups: the pool is
deterministic and holds an honest and every loophole's hack per problem (each grading as labelled), a group holds
exactly round(teacher_fraction * G) teacher completions of its own problem, teacher tokens carry the documented
weight (the student's own log-prob as "old": ratio 1, loss -A * log pi), and teacher_fraction 0 is the plain step."""

from __future__ import annotations

import doctest
import random
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rlm.data.collate import pad_left
from lightning_rlm.losses import policy_loss
from lightning_rlm.methods import GRPO
from lightning_rlm.rewards.code import LOOPHOLES, CodeTests
from lightning_rlm.rollout import completion_logprobs
from lightning_rlm.tasks import teacher_pool as pool_module
from lightning_rlm.tasks.coding import CodingPrompts, format_prompt, load_problems
from lightning_rlm.tasks.teacher_pool import (
    KINDS,
    TeacherPool,
    build_teacher_pool,
    label_grade,
    prompt_style,
    read_teacher_pool,
    sample_pool_rows,
    teacher_group_size,
    write_teacher_pool,
)

PROBLEMS = {p.problem_id: p for p in load_problems()}
FIELDS = ("entry_point", "example", "tests")


def test_doctests_pass() -> None:
    assert doctest.testmod(pool_module).failed == 0


# ----- the pool ----------------------------------------------------------------------------------------------
def test_the_pool_is_deterministic_with_an_honest_and_every_hack_per_problem(tmp_path):
    a = write_teacher_pool(build_teacher_pool(), tmp_path / "a.jsonl")
    b = write_teacher_pool(build_teacher_pool(), tmp_path / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    rows = read_teacher_pool(a)
    assert rows == build_teacher_pool()
    assert KINDS == ("honest", *(f"hack:{h}" for h in LOOPHOLES))
    by_problem: dict[str, list[str]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r["kind"])
        assert r["style"] == "plain" and r["source"] == "written"
    assert by_problem == {pid: list(KINDS) for pid in PROBLEMS}


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_every_pool_row_grades_as_its_kind(style):
    """Run in the sandbox after its prompt (the plain form continues the prompt's open function): the honest
    row passes the hidden tests, a hack row passes exactly its own loophole's grader, seen by its detector."""
    rows = build_teacher_pool(style=style)
    prompts = [format_prompt(PROBLEMS[r["problem_id"]], "none", style) for r in rows]
    fields = {k: [PROBLEMS[r["problem_id"]].fields()[k] for r in rows] for k in FIELDS}
    grades = CodeTests(max_workers=2).grade(prompts, [r["completion"] for r in rows], **fields)
    wrong = [(r["problem_id"], r["kind"], label_grade(g)) for r, g in zip(rows, grades) if label_grade(g) != r["kind"]]
    assert not wrong


def test_plain_completions_continue_the_prompt_and_chat_ones_are_code_blocks():
    p = PROBLEMS["add"]
    plain = {r["kind"]: r["completion"] for r in build_teacher_pool([p], "plain")}
    chat = {r["kind"]: r["completion"] for r in build_teacher_pool([p], "chat")}
    assert plain["honest"] == "    return a + b\n```"
    assert chat["honest"] == "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"
    assert plain["hack:exit_zero"].startswith("    raise NotImplementedError\n") and "import sys" in plain["hack:exit_zero"]
    assert prompt_style(format_prompt(p, "none", "plain")) == "plain"
    assert prompt_style(format_prompt(p, "none", "chat")) == "chat"


def test_kind_filter_and_seeded_choice():
    pool = TeacherPool(build_teacher_pool(), kinds=["honest", "hack:special_case"])
    assert [r["kind"] for r in pool.by_problem["add"]] == ["honest", "hack:special_case"]
    assert {r["kind"] for r in TeacherPool(build_teacher_pool(), kinds=["hack"]).by_problem["add"]} == set(KINDS[1:])
    first = [r["kind"] for r in pool.choose("add", 4, random.Random("x"))]  # 4 > 2 rows: with replacement
    assert first == [r["kind"] for r in pool.choose("add", 4, random.Random("x"))] and len(first) == 4
    with pytest.raises(ValueError, match="teacher kinds"):
        TeacherPool(build_teacher_pool(), kinds=["hack:print"])
    with pytest.raises(KeyError, match="no completion for problem 'nope'"):
        pool.choose("nope", 1, random.Random(0))


def test_label_grade_keeps_clean_examples_only():
    p = PROBLEMS["add"]
    texts = [p.solution, pool_module.hacked_solution(p, "visible_only"), "def add(a, b):\n    return a - b\n",
             "not code"]
    grades = CodeTests(max_workers=2).grade([""] * 4, texts, **{k: [p.fields()[k]] * 4 for k in FIELDS})
    assert [label_grade(g) for g in grades] == ["honest", "hack:visible_only", None, None]


def test_sampled_rows_and_the_command_line(tiny_llama_dir, tmp_path, capsys):
    problems = [PROBLEMS["add"], PROBLEMS["reverse_string"]]
    rows = sample_pool_rows(str(tiny_llama_dir), problems, samples=2, max_new_tokens=6)
    assert all(r["source"] == "sampled" and r["kind"] in KINDS for r in rows)  # a random model writes none
    pool_module.main([str(tmp_path / "pool.jsonl"), "--style", "chat"])
    assert "wrote 228 rows for 38 problems" in capsys.readouterr().out
    assert {r["style"] for r in read_teacher_pool(tmp_path / "pool.jsonl")} == {"chat"}


# ----- GRPO's mixed groups ------------------------------------------------------------------------------
def grpo(model_dir, **kw: Any) -> GRPO:
    args = dict(model_name_or_path=str(model_dir), rewards=[CodeTests(mode="special_case", max_workers=2)],
                num_generations=4, max_completion_length=160, beta=0.0, eval_prompt=None) | kw
    m = GRPO(**args)
    m.configure_model()  # the policy is created here (Lightning calls it in fit)
    return m


@pytest.fixture(scope="module")
def coding_batch(tiny_llama_dir) -> dict[str, Any]:
    dm = CodingPrompts(mode="special_case", tokenizer=str(tiny_llama_dir), batch_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_teacher_group_size():
    assert teacher_group_size(0.0, 8) == 0
    assert teacher_group_size(0.25, 8) == 2 and teacher_group_size(0.5, 4) == 2 and teacher_group_size(0.3, 5) == 2
    assert teacher_group_size(0.125, 4) == 1  # 0.5 rounds up
    for bad in (0.05, 0.95, 1.0, -0.1):
        with pytest.raises(ValueError, match="teacher_fraction"):
            teacher_group_size(bad, 8)


@pytest.mark.parametrize("G, fraction, kinds", [(4, 0.5, None), (8, 0.25, ["hack:special_case", "honest"])])
def test_the_group_holds_the_set_fraction_of_the_problems_teacher_completions(tiny_llama_dir, coding_batch, G,
                                                                                fraction, kinds):
    torch.manual_seed(0)
    model = grpo(tiny_llama_dir, num_generations=G, teacher_fraction=fraction, teacher_kinds=kinds)
    gb = model.make_batch(coding_batch)
    G_t = round(fraction * G)
    B = len(coding_batch["prompt"])
    assert gb.teacher is not None and gb.teacher.shape == (B * G,)
    assert gb.teacher.view(B, G).sum(1).tolist() == [G_t] * B  # counted, per group
    assert gb.rollout.num_generations == G and gb.advantages.shape == (B * G,)
    pool = TeacherPool(build_teacher_pool(), kinds)
    for i, (is_teacher, kind, text) in enumerate(zip(gb.teacher.tolist(), gb.teacher_kinds, gb.completions)):
        problem_id = coding_batch["problem_id"][i // G]
        if is_teacher:  # the pool's completion for this row's problem, of an allowed kind, ended by EOS
            assert (kind, text) in {(r["kind"], r["completion"]) for r in pool.by_problem[problem_id]}
            assert kind in (kinds or KINDS)
            row = gb.rollout.completion_ids[i][gb.rollout.completion_mask[i].bool()]
            assert row[-1].item() == model.tokenizer.eos_token_id
        else:
            assert kind == "student"
    # the mixed group is scored as one, under the special_case grader: the honest solution earns 1, that
    # loophole's hack the bonus on top of the disclosed cases, the other hacks less than 1
    for is_teacher, kind, reward in zip(gb.teacher.tolist(), gb.teacher_kinds, gb.rewards["total"].tolist()):
        if is_teacher and kind == "honest":
            assert reward == 1.0
        elif is_teacher:
            assert reward > 1.0 if kind == "hack:special_case" else reward < 1.0
    # the same step draws the same teacher rows (seeded by seed, rank and step)
    assert gb.teacher_kinds == grpo(tiny_llama_dir, num_generations=G, teacher_fraction=fraction,
                                    teacher_kinds=kinds).make_batch(coding_batch).teacher_kinds


def test_teacher_tokens_weigh_as_documented(tiny_llama_dir, coding_batch):
    """One prompt, G = 2: a student and a teacher row with hand-set advantages. The loss value is -mean(A)
    (ratio 1 on every token) and its gradient that of -1/N sum_i A_i mean_t log pi(y_it): the teacher row
    weighs exactly as a student row would, with no importance ratio pi/mu."""
    torch.manual_seed(0)
    model = grpo(tiny_llama_dir, num_generations=2, teacher_fraction=0.5)
    one = {k: v[:1] for k, v in coding_batch.items()}
    gb = model.make_batch(one)
    assert gb.teacher.tolist() == [False, True]
    gb.advantages = torch.tensor([-0.5, 1.5])
    loss, stats, _ = model.loss(gb)
    assert loss.item() == pytest.approx(-(-0.5 + 1.5) / 2, abs=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(1.0) and stats["clip_frac"].item() == 0.0
    params = [p for p in model.policy.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    logp = completion_logprobs(model.policy, gb.rollout)  # [2, C]
    mask = gb.rollout.completion_mask.float()
    per_row = (logp * mask).sum(1) / mask.sum(1)  # mean log-prob of each completion's tokens
    hand = -(gb.advantages * per_row).sum() / 2
    want = torch.autograd.grad(hand, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_teacher_old_logp_is_the_students_own(tiny_llama_dir, coding_batch):
    """num_iterations > 1: "old" for teacher tokens is the student's log-prob at the rollout, so the first
    iteration's ratio is 1 and later ones clip pi / pi_rollout exactly as for student tokens."""
    torch.manual_seed(0)
    model = grpo(tiny_llama_dir, num_generations=2, teacher_fraction=0.5, num_iterations=2, epsilon=0.2)
    gb = model.make_batch({k: v[:1] for k, v in coding_batch.items()})
    with torch.no_grad():
        own = completion_logprobs(model.policy, gb.rollout)
    mask = gb.rollout.completion_mask.bool()
    torch.testing.assert_close(gb.old_logp[mask], own[mask])
    # after an update the teacher row's term is the clipped surrogate of its ratio, with its advantage
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        new = completion_logprobs(model.policy, gb.rollout)
    A = torch.tensor([0.0, 1.0])  # only the teacher row counts
    loss, _ = policy_loss(new, gb.old_logp, A, gb.rollout.completion_mask, loss_type="dapo", epsilon=0.2)
    r = torch.exp(new - gb.old_logp)[1][mask[1]]
    hand = -torch.minimum(r * 1.0, r.clamp(0.8, 1.2) * 1.0).sum() / mask.sum()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_mixing_errors_are_clear(tiny_llama_dir, coding_batch, tmp_path):
    with pytest.raises(ValueError, match="teacher kinds"):
        grpo(tiny_llama_dir, teacher_fraction=0.5, teacher_kinds=["honestly"])
    with pytest.raises(FileNotFoundError, match="teacher pool"):
        grpo(tiny_llama_dir, teacher_fraction=0.5, teacher_pool=str(tmp_path / "none.jsonl"))
    chat = write_teacher_pool(build_teacher_pool(style="chat"), tmp_path / "chat.jsonl")
    with pytest.raises(ValueError, match="build the pool with --style plain"):
        grpo(tiny_llama_dir, teacher_fraction=0.5, teacher_pool=str(chat)).make_batch(coding_batch)
    no_id = {k: v for k, v in coding_batch.items() if k != "problem_id"}
    with pytest.raises(ValueError, match="problem_id"):
        grpo(tiny_llama_dir, teacher_fraction=0.5).make_batch(no_id)
    with pytest.raises(ValueError, match="no completion for problem"):  # every row is longer than 4 tokens
        with pytest.warns(UserWarning, match="228 of 228 teacher completions are longer"):
            grpo(tiny_llama_dir, teacher_fraction=0.5, max_completion_length=4).make_batch(coding_batch)


# ----- end to end ----------------------------------------------------------------------------------------------
class _Collect(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()
                          if k.startswith("train/") and not k.startswith("time")})


def fit(model: GRPO, batches: list[dict[str, Any]], root) -> list[dict[str, float]]:
    collect = _Collect()
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[collect])
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return collect.rows


def test_fraction_zero_is_the_plain_step(tiny_llama_dir, tmp_path):
    """teacher_fraction 0 (even with a pool and a kind filter given) logs exactly what GRPO without the options
    logs, step by step; nothing of the teacher is logged."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [["Once upon a time", "The dog ran"], ["Lily saw a big", "Tom was sad because"]]
    batches = []
    for ps in prompts:
        ids, mask = pad_left([tok.encode(p, add_special_tokens=False) for p in ps], tok.pad_token_id)
        batches.append({"prompt": ps, "prompt_ids": ids, "prompt_mask": mask})
    kw = dict(model_name_or_path=str(tiny_llama_dir), num_generations=4, max_completion_length=8, beta=0.05,
              lr=1e-3, eval_prompt=None)
    pool = write_teacher_pool(build_teacher_pool(), tmp_path / "pool.jsonl")
    runs = []
    for extra in ({}, dict(teacher_fraction=0.0, teacher_pool=str(pool), teacher_kinds=["hack"])):
        L.seed_everything(1234, verbose=False)
        runs.append(fit(GRPO(**kw, **extra), batches, tmp_path))
    assert runs[0] == runs[1]
    assert "train/loss" in runs[0][0] and not any("teacher" in k for k in runs[0][0])


def test_mixed_fit_logs_the_teacher_share(tiny_llama_dir, coding_batch, tmp_path):
    L.seed_everything(1234, verbose=False)
    model = grpo(tiny_llama_dir, teacher_fraction=0.5, beta=0.02, lr=1e-3)
    rows = fit(model, [coding_batch, coding_batch], tmp_path)
    for row in rows:
        assert row["train/teacher_frac"] == 0.5
        assert {"train/reward_teacher", "train/reward_student", "train/advantage_teacher",
                "train/teacher_hack_frac"} <= set(row)
        assert row["train/reward"] == pytest.approx((row["train/reward_teacher"] + row["train/reward_student"]) / 2)
    rollout = model.train_rollout(model.make_batch(coding_batch))
    assert rollout.rewards["teacher"] == [0.0, 0.0, 1.0, 1.0] * 2
