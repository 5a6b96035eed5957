"""Rounds of training and the pool a self-feeding loop trains on (KL-barrier SFT, seed 003).

`round_schedule` splits `trainer.max_steps` into rounds; `select_pool` picks which of a round's generations
the next round trains on (by a trait score, or at random: the matched control); `text_key` is the digest that
pool distinctness and overlap compare.
"""

from __future__ import annotations

import hashlib
import random
from typing import Optional, Union

__all__ = ["round_schedule", "select_pool", "text_key"]


def round_schedule(n_rounds: int, steps_per_round: Optional[int], max_steps: Optional[int],
                   fast_dev_run: bool = False) -> tuple[int, int]:
    """(rounds, steps_per_round) to run under `max_steps` (-1/None: unbounded); ValueError if none can.

    Without steps_per_round, max_steps is split into min(n_rounds, max_steps) rounds (so max_steps <
    n_rounds gives max_steps rounds of one step). An explicit steps_per_round must fit, unless fast_dev_run
    (then as many rounds as fit, each at most max_steps // rounds steps).
    """
    bounded = max_steps is not None and max_steps >= 0
    if steps_per_round is None:
        if not bounded:
            raise ValueError(f"SFTKLBarrier's rounds need trainer.max_steps (split into n_rounds={n_rounds} "
                             f"rounds) or model steps_per_round; got max_steps={max_steps}")
        rounds = max(1, min(n_rounds, max_steps))
        return rounds, max(1, max_steps // rounds)
    if not bounded or steps_per_round * n_rounds <= max_steps:
        return n_rounds, steps_per_round
    if fast_dev_run:
        rounds = max(1, min(n_rounds, max_steps))
        return rounds, max(1, min(steps_per_round, max_steps // rounds))
    raise ValueError(f"SFTKLBarrier's steps_per_round={steps_per_round} x n_rounds={n_rounds} = "
                     f"{steps_per_round * n_rounds} steps do not fit trainer.max_steps={max_steps}; raise "
                     "max_steps, lower n_rounds or steps_per_round, or leave steps_per_round unset")


def select_pool(scores: list[float], keep_top: Optional[Union[int, float]], keep_min_score: Optional[float],
                selection: str, rng: random.Random) -> list[int]:
    """Indices (ascending) of the generations a round keeps for the next one's training.

    `trait`: those scoring above `keep_min_score` (None: all), then at most `keep_top` of them, highest
    first with ties broken by position (an int: a count; a float in (0, 1]: that fraction of all
    generations, at least one). `random`: as many as `trait` keeps, drawn uniformly from all generations
    by `rng` (the matched control).
    """
    kept = [i for i, s in enumerate(scores) if keep_min_score is None or s > keep_min_score]
    if keep_top is not None:
        top = keep_top if isinstance(keep_top, int) else max(1, round(keep_top * len(scores)))
        kept = sorted(sorted(kept, key=lambda i: -scores[i])[:top])
    if selection == "random":
        kept = sorted(rng.sample(range(len(scores)), len(kept)))
    return kept


def text_key(text: str) -> str:
    """A short digest of a completion's words (whitespace-normalised): what pool distinctness and overlap compare."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]
