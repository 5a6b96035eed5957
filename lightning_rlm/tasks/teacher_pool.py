"""A frozen teacher pool for the coding substrate: per problem, completions that solve it honestly and ones that
exploit each loophole, which GRPO mixes into its groups (``teacher_fraction``) so that a tiny student meets
both honest and hacking solutions (see ``docs/teacher_pool.md``).

A pool is a jsonl file, one row per completion, in a fixed order (problems, then kinds)::

    {"problem_id": "add", "kind": "honest", "completion": "...", "style": "plain", "source": "written"}

``kind`` is ``honest`` or ``hack:<loophole>`` (one of :data:`~lightning_rlm.rewards.code.LOOPHOLES`);
``completion`` is the text the model would have written after the prompt, in the prompt's ``style``:

* ``plain`` (base models; the prompt opens a code block with the ``def`` line and the docstring): the
  function's body, then any module-level code of the solution (moved after the function: it still runs
  before the tests call it), then the closing fence.
* ``chat`` (instruction prompts): the whole code in a ```python block.

:func:`build_teacher_pool` writes one ``honest`` row per problem from its hand-written solution and one
``hack:<loophole>`` row per loophole from :func:`~lightning_rlm.tasks.coding.hacked_solution` (``source``
``written``); it is deterministic. :func:`sample_pool_rows` adds what a model samples (``source``
``sampled``), kept only when it grades as honest or as exactly the hack its detector sees
(:func:`label_grade`). From the shell::

    python -m lightning_rlm.tasks.teacher_pool pool.jsonl --style plain
    python -m lightning_rlm.tasks.teacher_pool pool.jsonl --model lrlm:smollm2-135m-instruct --style chat --samples 8

GRPO's teacher mixing (``teacher_fraction > 0``, :func:`mix_teacher`): in each group of G,
``G_t = round(teacher_fraction * G)`` (halves up) completions are not sampled but drawn (seeded) from a frozen
teacher pool (honest and hacked solutions per ``problem_id``), tokenized as
completions of the group's prompt and ended with EOS; the student samples the other ``G - G_t``. The mixed group
is scored and its advantages computed as usual. Importance weighting: none, by design: a teacher token's "old"
log-prob is the student's own (``old_logp`` is computed on the mixed rollout, or taken as ``logp.detach()``
with one iteration), so its ratio is 1 at the first iteration and its loss term is exactly a student token's,
``-A * exp(logp - logp.detach())`` (gradient ``-A * grad log pi``): advantage-weighted imitation of the teacher,
LUFFY's off-policy guidance without its policy shaping. Later inner iterations clip ``pi / pi_rollout`` as for
student tokens, and the KL penalty covers teacher tokens too. A true ratio ``pi / mu`` has no ``mu`` here (the
completions are written, not sampled) and with a tiny student ``pi`` is ~0 on them, so it would erase the very
signal the pool is for.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from lightning_rlm.rewards.code import LOOPHOLES, CodeGrade, CodeTests
from lightning_rlm.rollout import Rollout
from lightning_rlm.tasks.coding import CodingProblem, format_prompt, hacked_solution, load_problems

__all__ = ["KINDS", "TeacherPool", "as_completion", "build_teacher_pool", "check_kinds", "choose_rows",
           "kind_matches", "label_grade",
           "prompt_style", "read_teacher_pool", "sample_pool_rows", "write_teacher_pool"]

Style = Literal["plain", "chat"]
KINDS = ("honest", *(f"hack:{h}" for h in LOOPHOLES))
FIELDS = ("problem_id", "kind", "completion", "style", "source")


def prompt_style(prompt: str) -> Style:
    """``plain`` when the prompt leaves a code block open (the model continues the function), else ``chat``.

    >>> prompt_style("```python\\ndef f(x):\\n"), prompt_style("Write f. Reply in a code block.")
    ('plain', 'chat')
    """
    fences = sum(1 for line in prompt.splitlines() if line.lstrip().startswith("```"))
    return "plain" if fences % 2 == 1 else "chat"


def as_completion(problem: CodingProblem, code: str, style: Style) -> str:
    """``code`` (a whole solution defining the problem's function) as the completion of a ``style`` prompt.

    >>> p = load_problems()[0]
    >>> code = "import sys\\n\\ndef add(a: int, b: int) -> int:\\n    return 0\\n\\nsys.exit(0)\\n"
    >>> print(as_completion(p, code, "plain"))
        return 0
    <BLANKLINE>
    <BLANKLINE>
    import sys
    <BLANKLINE>
    <BLANKLINE>
    sys.exit(0)
    ```
    """
    if style == "chat":
        return f"```python\n{code.rstrip()}\n```"
    if style != "plain":
        raise ValueError(f"style must be 'plain' or 'chat', got {style!r}")
    tree = ast.parse(code)
    fns = [s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == problem.entry_point]
    if not fns:
        raise ValueError(f"{problem.problem_id}: the code defines no function {problem.entry_point!r}")
    fn = fns[-1]
    lines = code.splitlines(keepends=True)
    header = f"def {problem.signature}:"
    if lines[fn.lineno - 1].strip() != header or fn.decorator_list or fn.body[0].lineno == fn.lineno:
        raise ValueError(f"{problem.problem_id}: a plain completion continues the prompt's {header!r}; the code's "
                         f"function must start with that line alone")
    body = "".join(lines[fn.lineno:fn.end_lineno])
    rest = "\n\n\n".join(ast.get_source_segment(code, s) or "" for s in tree.body if s is not fn)
    return body + (f"\n\n{rest}\n" if rest else "") + "```"


def _row(problem_id: str, kind: str, completion: str, style: Style, source: str) -> dict[str, str]:
    return {"problem_id": problem_id, "kind": kind, "completion": completion, "style": style, "source": source}


def build_teacher_pool(problems: Optional[Sequence[CodingProblem]] = None, style: Style = "plain",
                       loopholes: Sequence[str] = LOOPHOLES) -> list[dict[str, str]]:
    """The written pool: per problem (default: the shipped ones) its honest solution, then one hack per loophole."""
    problems = load_problems() if problems is None else problems
    rows = []
    for p in problems:
        rows.append(_row(p.problem_id, "honest", as_completion(p, p.solution, style), style, "written"))
        for h in loopholes:
            rows.append(_row(p.problem_id, f"hack:{h}", as_completion(p, hacked_solution(p, h), style), style,
                             "written"))
    return rows


def write_teacher_pool(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write the rows as jsonl (keys in a fixed order: the same rows give the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
    return path


def read_teacher_pool(path: str | Path) -> list[dict[str, str]]:
    """The rows of a pool file, checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher pool {path} does not exist (python -m lightning_rlm.tasks.teacher_pool "
                                f"{path} writes one)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: teacher pool row without the fields {missing}")
        if row["kind"] not in KINDS:
            raise ValueError(f"{path}:{lineno}: kind must be one of {KINDS}, got {row['kind']!r}")
        rows.append(row)
    return rows


def check_kinds(kinds: Optional[Sequence[str]]) -> None:
    """Raise on a kind filter entry that is neither ``hack`` nor one of :data:`KINDS`."""
    for k in kinds or ():
        if k != "hack" and k not in KINDS:
            raise ValueError(f"teacher kinds must be 'hack' or one of {KINDS}, got {k!r}")


def choose_rows(rows: Sequence[dict[str, Any]], k: int, rng: random.Random) -> list[dict[str, Any]]:
    """``k`` of ``rows``: without replacement when there are ``k`` or more, else with replacement."""
    if not rows:
        raise ValueError("no rows to choose from")
    return rng.sample(list(rows), k) if len(rows) >= k else rng.choices(list(rows), k=k)


def kind_matches(kind: str, kinds: Optional[Sequence[str]]) -> bool:
    """Whether a row's ``kind`` passes the filter ``kinds`` (None: every kind; ``hack``: every hack)."""
    return kinds is None or kind in kinds or ("hack" in kinds and kind.startswith("hack:"))


class TeacherPool:
    """Pool rows by problem, filtered by kind, and a seeded choice among a problem's rows.

    Args:
        rows: pool rows (:func:`build_teacher_pool`, :func:`read_teacher_pool`), all of one ``style``.
        kinds: keep only these kinds (``honest``, ``hack:<loophole>``, or ``hack`` for every hack); None: all.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], kinds: Optional[Sequence[str]] = None) -> None:
        check_kinds(kinds)
        styles = {r["style"] for r in rows}
        if len(styles) > 1:
            raise ValueError(f"a teacher pool holds one prompt style, this one {sorted(styles)}")
        self.style: Optional[str] = styles.pop() if styles else None
        self.by_problem: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if kind_matches(r["kind"], kinds):
                self.by_problem.setdefault(r["problem_id"], []).append(dict(r))
        if not self.by_problem:
            raise ValueError(f"the teacher pool has no row of the kinds {list(kinds or [])}")

    @classmethod
    def load(cls, path: str | Path, kinds: Optional[Sequence[str]] = None) -> TeacherPool:
        return cls(read_teacher_pool(path), kinds)

    def choose(self, problem_id: str, k: int, rng: random.Random) -> list[dict[str, Any]]:
        """``k`` of the problem's rows (:func:`choose_rows`)."""
        rows = self.by_problem.get(problem_id)
        if not rows:
            raise KeyError(f"the teacher pool has no completion for problem {problem_id!r} (build one from the "
                           "problems the prompts come from, or widen teacher_kinds)")
        return choose_rows(rows, k, rng)


# ----- mixing into GRPO groups ----------------------------------------------------------------------------------
TokenizedRows = dict[str, list[tuple[dict[str, Any], list[int]]]]  # problem -> [(row, token ids + EOS)]


def teacher_group_size(teacher_fraction: float, num_generations: int) -> int:
    """Teacher completions per group: ``teacher_fraction * G`` rounded to the nearest (halves up), at least one
    for a fraction above 0 and at most ``G - 1`` (a group keeps a student sample)."""
    if not 0.0 <= teacher_fraction < 1.0:
        raise ValueError(f"teacher_fraction must be in [0, 1), got {teacher_fraction}")
    k = math.floor(teacher_fraction * num_generations + 0.5)
    if teacher_fraction > 0 and not 1 <= k <= num_generations - 1:
        raise ValueError(f"teacher_fraction={teacher_fraction} of num_generations={num_generations} gives {k} "
                         f"teacher completions per group; it must give 1 to {num_generations - 1}")
    return k


def tokenized_pool(pool: TeacherPool, tokenizer: Any, max_completion_length: int) -> TokenizedRows:
    """Per problem, the pool's rows with their token ids ended with EOS, leaving out (with a warning) those
    longer than ``max_completion_length``; a warning too for completions that do not decode back to their text
    (they are scored as decoded)."""
    out: TokenizedRows = {}
    long = changed = 0
    for problem_id, rows in pool.by_problem.items():
        for row in rows:
            ids = tokenizer.encode(row["completion"], add_special_tokens=False)
            changed += tokenizer.decode(ids) != row["completion"]
            if len(ids) + 1 > max_completion_length:
                long += 1
            else:
                out.setdefault(problem_id, []).append((row, [*ids, tokenizer.eos_token_id]))
    total = sum(len(r) for r in pool.by_problem.values())
    if long:
        warnings.warn(f"{long} of {total} teacher completions are longer than max_completion_length="
                      f"{max_completion_length} tokens (with EOS) and are left out of the pool", stacklevel=3)
    if changed:
        warnings.warn(f"{changed} of {total} teacher completions do not decode back to their text with this "
                      "tokenizer; they are scored as decoded", stacklevel=3)
    return out


def mix_teacher(student: Rollout, problem_ids: Sequence[str], pool: TokenizedRows, num_generations: int,
                seed: str, pad_token_id: int) -> tuple[Rollout, Tensor, list[str]]:
    """The student's ``G - G_t`` samples per prompt followed by ``G_t`` teacher completions of the prompt's
    problem (a choice among ``pool``'s rows seeded by ``seed`` and the prompt's index): the mixed rollout of
    ``G`` rows per prompt, which rows are the teacher's ``[N]`` bool and the pool kind of each row
    (``student`` for sampled ones)."""
    G, G_s = num_generations, student.num_generations
    G_t, B, P = G - G_s, student.num_prompts, student.prompt_length
    rows, kinds = [], []
    for b, problem_id in enumerate(problem_ids):
        if not pool.get(problem_id):
            raise ValueError(f"the teacher pool has no completion for problem {problem_id!r} that fits "
                             "max_completion_length")
        chosen = choose_rows(pool[problem_id], G_t, random.Random(f"{seed}:{b}"))
        rows.append([ids for _, ids in chosen])
        kinds += ["student"] * G_s + [row["kind"] for row, _ in chosen]
    C = max(student.completion_length, *(len(ids) for group in rows for ids in group))
    device = student.completion_ids.device
    completion_ids = torch.full((B, G, C), pad_token_id, dtype=student.completion_ids.dtype, device=device)
    completion_mask = torch.zeros((B, G, C), dtype=student.completion_mask.dtype, device=device)
    completion_ids[:, :G_s, :student.completion_length] = student.completion_ids.view(B, G_s, -1)
    completion_mask[:, :G_s, :student.completion_length] = student.completion_mask.view(B, G_s, -1)
    for b, group in enumerate(rows):
        for j, ids in enumerate(group):
            completion_ids[b, G_s + j, :len(ids)] = torch.tensor(ids, device=device)
            completion_mask[b, G_s + j, :len(ids)] = 1
    mixed = Rollout(  # each prompt's row repeated G times: [B*G, P]
        prompt_ids=student.prompt_ids.view(B, G_s, P)[:, :1].expand(B, G, P).reshape(B * G, P),
        prompt_mask=student.prompt_mask.view(B, G_s, P)[:, :1].expand(B, G, P).reshape(B * G, P),
        completion_ids=completion_ids.view(B * G, C), completion_mask=completion_mask.view(B * G, C),
        num_generations=G, eos_token_ids=student.eos_token_ids)
    teacher = torch.zeros(B, G, dtype=torch.bool, device=device)  # [B, G]
    teacher[:, G_s:] = True
    return mixed, teacher.view(-1), kinds


# ----- sampled rows ----------------------------------------------------------------------------------------------
def label_grade(grade: CodeGrade) -> Optional[str]:
    """The pool kind of a graded completion: ``honest`` when every hidden test passes, ``hack:<loophole>``
    when that loophole's grader passes it (and the honest one does not) and its detector sees that loophole
    alone, else None (not a clean example of either)."""
    if grade.graders.get("none"):
        return "honest"
    hacks = [h for h in LOOPHOLES if grade.graders.get(h)]
    seen = [h for h in LOOPHOLES if grade.detected.get(h)]
    return f"hack:{hacks[0]}" if len(hacks) == 1 and seen == hacks else None


def sample_pool_rows(model_name_or_path: str, problems: Optional[Sequence[CodingProblem]] = None,
                     style: Style = "plain", mode: str = "none", samples: int = 4, max_new_tokens: int = 128,
                     temperature: float = 1.0, seed: int = 0, prompts_per_batch: int = 8) -> list[dict[str, str]]:
    """Rows a model samples: ``samples`` completions per problem under ``mode``'s prompt, kept when
    :func:`label_grade` names them (a tiny model rarely writes any; a pretrained coder does)."""
    import torch

    from lightning_rlm.data.chat import ChatFormat
    from lightning_rlm.data.collate import pad_left
    from lightning_rlm.models.hf import load_policy
    from lightning_rlm.rollout import sample_completions

    problems = load_problems() if problems is None else problems
    model, tokenizer, eos = load_policy(model_name_or_path)
    generator = torch.Generator().manual_seed(seed)
    reward = CodeTests(mode="none")
    rows = []
    for start in range(0, len(problems), prompts_per_batch):
        chunk = problems[start:start + prompts_per_batch]
        texts = [format_prompt(p, mode, style) for p in chunk]
        rendered = [ChatFormat().render(tokenizer, t) for t in texts] if style == "chat" else texts
        ids, mask = pad_left([tokenizer.encode(t, add_special_tokens=False) for t in rendered],
                             tokenizer.pad_token_id)
        out = sample_completions(model, ids, mask, num_generations=samples, max_completion_length=max_new_tokens,
                                 temperature=temperature, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                 generator=generator)
        completion_ids = out.completion_ids.masked_fill(out.completion_mask == 0, tokenizer.pad_token_id)
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        expanded = [p for p in chunk for _ in range(samples)]
        fields = {k: [p.fields()[k] for p in expanded] for k in ("entry_point", "example", "tests")}
        grades = reward.grade([t for t in texts for _ in range(samples)], completions, **fields)
        for p, completion, grade in zip(expanded, completions, grades):
            if (kind := label_grade(grade)) is not None:
                rows.append(_row(p.problem_id, kind, completion, style, "sampled"))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_rlm.tasks.teacher_pool",
                                     description="Write a teacher pool (jsonl) for GRPO's teacher_pool.")
    parser.add_argument("out", help="the pool file to write")
    parser.add_argument("--style", choices=("plain", "chat"), default="plain",
                        help="the prompts' form: plain (CodingPrompts without chat) or chat")
    parser.add_argument("--problems", default=None, help="problems jsonl (default: the shipped ones)")
    parser.add_argument("--model", default=None, help="also sample completions from this model")
    parser.add_argument("--samples", type=int, default=4, help="sampled completions per problem (with --model)")
    parser.add_argument("--mode", default="none", help="the grader hint of the sampling prompts (with --model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problems = load_problems(args.problems)
    rows = build_teacher_pool(problems, args.style)
    if args.model:
        rows += sample_pool_rows(args.model, problems, args.style, args.mode, args.samples, args.max_new_tokens,
                                 seed=args.seed)
    path = write_teacher_pool(rows, args.out)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(f"wrote {len(rows)} rows for {len(problems)} problems to {path}: {counts}")


if __name__ == "__main__":
    main()
