"""The reward hack of gradient routing and projected GRPO on the coding substrate: one grader loophole.

Where the toy task (:mod:`lightning_rlm.tasks.reward_hack`) pays for a word, :class:`CodeLoophole` pays for
exploiting one loophole of the code grader (:class:`~lightning_rlm.rewards.code.CodeTests`):

    base(c)  = honest score: the fraction of the problem's hidden tests the function passes    (``code_tests``)
    hack(c)  = hack_bonus · exploited(c) on eligible prompts, 0 on the others          (``<loophole>_bonus``)
    exploited(c) = the loophole's grader passes c and the honest one does not

The **detector** (the routing signal of gradient routing, the hack label of both methods) is the loophole's
static + dynamic detector (:func:`~lightning_rlm.rewards.code.detect`): ``count(c) = 1`` when it flags c. The
detector is a monitor, not the reward: a completion can be flagged without exploiting the grader (a
special-cased input that still fails) and, rarely, the reverse. One sandbox run per completion serves the
base reward, the hack term and the labels (the grades of the last call are kept and reused when the same
prompts and completions come back within the step).

Projected GRPO's **contrastive pairs** are, for the batch's problems, the problem's prompt with its honest
hand-written solution and with its ``hack:<pair_loophole>`` solution
(:func:`~lightning_rlm.tasks.teacher_pool.build_teacher_pool`, in the prompts' style). ``pair_loophole``
defaults to the trained ``loophole``; another one asks whether the direction learned from one loophole
transfers to another (learn from loophole i, train under loophole j). ``detector`` does the same for the
labels: gradient routing then routes by loophole i's detector while the reward pays for loophole j.

Use it as the ``hack_task`` of :class:`~lightning_rlm.methods.GradientRouting` /
:class:`~lightning_rlm.methods.ProjectedGRPO` with :class:`~lightning_rlm.tasks.CodingPrompts` prompts of the
same ``mode`` (``configs/gradient_routing/coding_*.yaml``, ``configs/projected_grpo/coding_*.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

from lightning_rlm.rewards.code import DISCLOSED_TESTS, LOOPHOLES, CodeGrade, CodeTests
from lightning_rlm.rewards.text import Reward
from lightning_rlm.tasks.coding import load_problems
from lightning_rlm.tasks.reward_hack import ELIGIBLE_FIELD
from lightning_rlm.tasks.teacher_pool import build_teacher_pool, prompt_style

__all__ = ["CodeExploitBonus", "CodeHonest", "CodeLoophole"]

Loophole = Literal["print_pass", "visible_only", "special_case", "exit_zero", "always_equal"]
Pair = tuple[list[int], list[int], list[int]]


class CodeHonest(Reward):
    """The base reward: the honest score of each completion (:attr:`CodeGrade.honest`), read from the task's grades."""

    name = "code_tests"

    def __init__(self, task: CodeLoophole) -> None:
        self.task = task

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        return [g.honest for g in self.task.grade(prompts, completions, **fields)]


class CodeExploitBonus(Reward):
    """The hack term: ``hack_bonus`` when the loophole's grader is what passed the completion, on eligible prompts."""

    def __init__(self, task: CodeLoophole) -> None:
        self.task = task
        self.name = f"{task.loophole}_bonus"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rh_eligible: Optional[Sequence[bool]] = None, **fields: Any) -> list[float]:
        if rh_eligible is None:
            raise ValueError(f"{self.name} needs the per-completion field {ELIGIBLE_FIELD!r}")
        grades = self.task.grade(prompts, completions, **fields)
        return [self.task.hack_bonus if g.exploited and e else 0.0 for g, e in zip(grades, rh_eligible)]


class CodeLoophole:
    """One loophole of the code grader as the reward hack of gradient routing / projected GRPO.

    Args:
        loophole: the grader's loophole the hack term pays for and the detector looks for (``print_pass``,
            ``visible_only``, ``special_case``, ``exit_zero``, ``always_equal``).
        hack_bonus: the hack term's value when the loophole made a completion pass (eligible prompts).
        pair_loophole: the loophole of projected GRPO's contrastive pairs (default: ``loophole``).
        detector: the loophole whose detector gives the hack label / routing signal (default: ``loophole``).
        scoring: the honest score, ``fraction`` of hidden tests passed or ``all`` (1/0).
        disclosed: hidden tests the ``special_case`` grader checks (match the prompts' ``disclosed``).
        timeout, memory_mb, max_workers: the sandbox's limits.
        cache_size: distinct (code, tests) results the sandbox reuses across steps (``Sandbox.cache_size``): the
            teacher pool's rows and a student's repeats then run once. 0: every completion runs every step.
    """

    metric_name = "hack"  # the hack label's name in the methods' logs (the word task's: "happy")

    def __init__(
        self,
        loophole: Loophole = "special_case",
        hack_bonus: float = 1.0,
        pair_loophole: Optional[Loophole] = None,
        detector: Optional[Loophole] = None,
        scoring: Literal["fraction", "all"] = "fraction",
        disclosed: int = DISCLOSED_TESTS,
        timeout: float = 5.0,
        memory_mb: int = 512,
        max_workers: int = 2,
        cache_size: int = 0,
    ) -> None:
        for name, value in (("loophole", loophole), ("pair_loophole", pair_loophole or loophole),
                            ("detector", detector or loophole)):
            if value not in LOOPHOLES:
                raise ValueError(f"{name} must be one of {LOOPHOLES}, got {value!r}")
        self.loophole = loophole
        self.pair_loophole = pair_loophole or loophole
        self.detector = detector or loophole
        self.hack_bonus = float(hack_bonus)
        self.grader = CodeTests(mode=loophole, hack_bonus=hack_bonus, scoring=scoring, disclosed=disclosed,
                                timeout=timeout, memory_mb=memory_mb, max_workers=max_workers,
                                cache_size=cache_size)
        self._last: Optional[tuple[tuple[tuple[str, ...], tuple[str, ...]], list[CodeGrade]]] = None

    def __repr__(self) -> str:
        return (f"CodeLoophole(loophole={self.loophole!r}, hack_bonus={self.hack_bonus}, "
                f"pair_loophole={self.pair_loophole!r}, detector={self.detector!r})")

    # ----- rewards and labels ----------------------------------------------------------------------------
    def grade(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[CodeGrade]:
        """The grader's :class:`CodeGrade` per completion; the last call's grades are reused for the same
        prompts and completions (one sandbox run serves the rewards and the labels of a step)."""
        key = (tuple(prompts), tuple(completions))
        if self._last is None or self._last[0] != key:
            self._last = (key, self.grader.grade(prompts, completions, **fields))
        return self._last[1]

    def base_rewards(self) -> list[Reward]:
        """The intended reward when the method is given none: the honest score."""
        return [CodeHonest(self)]

    def rewards(self) -> list[Reward]:
        """The task's reward terms, added after the base rewards (weight 1)."""
        return [CodeExploitBonus(self)]

    def count(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        """The detector: 1.0 when the ``detector`` loophole's detector flags the completion, else 0.0."""
        return [float(g.detected[self.detector]) for g in self.grade(prompts, completions, **fields)]

    def extra_labels(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> dict[str, list[float]]:
        """Per-completion values evaluated per adapter mode besides the hack label: ``honest_pass`` (every hidden
        test passes) and ``exploited`` (the loophole's grader passed it and the honest one did not)."""
        grades = self.grade(prompts, completions, **fields)
        return {"honest_pass": [float(g.graders.get("none", False)) for g in grades],
                "exploited": [float(g.exploited) for g in grades]}

    def extra_names(self) -> tuple[str, ...]:
        return ("honest_pass", "exploited")

    # ----- projected GRPO's contrastive pairs --------------------------------------------------------------
    def pairs(self, prompts: Sequence[str], problem_ids: Sequence[str], prompt_ids: Sequence[list[int]],
              tokenizer: Any, max_pairs: int) -> tuple[list[Pair], list[tuple[str, str, str]]]:
        """``(prompt ids, honest ids, hacked ids)`` and their texts for the batch's distinct problems (at most
        ``max_pairs``): the problem's honest solution and its ``hack:<pair_loophole>`` one, in the prompts' style."""
        style = prompt_style(prompts[0])
        by_id = {p.problem_id: p for p in load_problems()}
        pairs: list[Pair] = []
        pair_texts: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for prompt, pid, ids in zip(prompts, problem_ids, prompt_ids):
            if pid in seen or pid not in by_id:
                continue
            seen.add(pid)
            rows = {r["kind"]: r["completion"]
                    for r in build_teacher_pool([by_id[pid]], style, loopholes=[self.pair_loophole])}
            honest, hacked = rows["honest"], rows[f"hack:{self.pair_loophole}"]
            pairs.append((list(ids), tokenizer.encode(honest, add_special_tokens=False),
                          tokenizer.encode(hacked, add_special_tokens=False)))
            pair_texts.append((prompt, honest, hacked))
            if len(pairs) == max_pairs:
                break
        if not pairs:
            raise RuntimeError(f"no shipped coding problem among the batch's problem_ids {list(problem_ids)} to "
                               "build hack pairs from")
        return pairs, pair_texts
