"""Rounds of training and the pool a self-feeding loop trains on (KL-barrier SFT, seed 003).

`round_schedule` splits `trainer.max_steps` into rounds; `val_prompt_batches` and `train_prompt_batches` are
the prompts a round samples on (held-out evaluation, the pool); `select_pool` picks which of a round's
generations the next round trains on (by a trait score, or at random: the matched control) and `take_pool`
makes them the pool; `text_key` is the digest that pool distinctness and overlap compare;
`pool_batch` cuts the pool into the next round's batches.

The round schedule must fit `trainer.max_steps`. Without `steps_per_round`, a max_steps below n_rounds runs
max_steps rounds of one step each (SFTKLBarrier warns): this is what `--trainer.fast_dev_run` gets
(Lightning sets max_steps to its number of batches), so a smoke test runs one step and one round, with its
sampling and scoring. An explicit `steps_per_round` with steps_per_round · n_rounds > max_steps is shrunk
the same way under fast_dev_run only; otherwise it is an error, as is no max_steps (-1) without
steps_per_round. The CLI checks this before the model loads (`lightning_rlm.cli.check_round_schedule`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Optional, Union

from lightning_rlm.data.collate import DictCollator

__all__ = ["TRAINING_KEYS", "pool_batch", "round_schedule", "select_pool", "take_pool", "text_key",
           "train_prompt_batches", "val_prompt_batches"]

TRAINING_KEYS = ("prompt", "prompt_ids", "completion", "completion_ids")  # what a pool example trains on


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


def val_prompt_batches(datamodule: Any, n_prompts: int) -> list[dict[str, Any]]:
    """The first `n_prompts` prompts of the DataModule's val loader (on this rank: the loader is sharded over
    ranks), as its left-padded batches cut to those rows: {prompt, prompt_ids [b, P], prompt_mask [b, P]}."""
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        raise ValueError("SFTKLBarrier takes its held-out prompts from a DataModule's val_dataloader")
    batches, left = [], n_prompts
    for batch in datamodule.val_dataloader():
        n = min(left, len(batch["prompt"]))
        # left padding survives dropping rows (every row still ends in a real token)
        batches.append({"prompt": batch["prompt"][:n], "prompt_ids": batch["prompt_ids"][:n],
                        "prompt_mask": batch["prompt_mask"][:n]})
        left -= n
        if left == 0:
            break
    if not batches:
        raise ValueError("the DataModule's val_dataloader is empty: no held-out prompts to evaluate")
    return batches


def train_prompt_batches(datamodule: Any, n_prompts: int, num_generations: int, rank: int, world: int,
                         pad_token_id: int) -> list[dict[str, Any]]:
    """This rank's share of the first `n_prompts` prompts of the DataModule's train set, as left-padded prompt
    batches of the DataModule's batch_size, each asking for `num_generations` samples per prompt. The count is
    rounded down to a multiple of `world`: equal contiguous shares, so every rank runs as many forwards, and
    gathered in rank order they are the prompts in order."""
    train = getattr(datamodule, "train_set", None)
    if train is None or len(train) == 0:
        raise ValueError("data_source: self_feeding samples its pool on the prompts of the DataModule's "
                         "train_set; this DataModule has none")
    share = min(n_prompts, len(train)) // world
    if share == 0:
        raise ValueError(f"the train set has {len(train)} prompt(s) for {world} processes' pools")
    mine = [train[i] for i in range(rank * share, (rank + 1) * share)]
    collate, size = DictCollator(pad_token_id), max(1, getattr(datamodule, "batch_size", 8))
    return [{**collate([{"prompt_ids": ex["prompt_ids"]} for ex in mine[i : i + size]]),
             "prompt": [ex["prompt"] for ex in mine[i : i + size]], "num_generations": num_generations}
            for i in range(0, len(mine), size)]


def take_pool(records: list[dict[str, Any]], kept: list[int],
              seen: set[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The pool of the `kept` generations (their TRAINING_KEYS and `score`) and what its selection logs.

    `records` are a round's scored generations (`score`, `loop` each), `kept` the indices selected, `seen`
    the text digests kept by earlier rounds (for the overlap: the pool saturating); the kept ones are added
    to `seen`.
    """
    pool = [{key: records[i][key] for key in (*TRAINING_KEYS, "score")} for i in kept]
    keys = [text_key(r["completion"]) for r in pool]
    n = len(pool)
    stats = {"pool_generations": float(len(records)), "pool_kept": float(n),
             "pool_trait": sum(r["score"] for r in records) / max(len(records), 1),
             "pool_trait_kept": sum(r["score"] for r in pool) / n if n else 0.0,
             "pool_coherence": 1.0 - sum(records[i]["loop"] for i in kept) / n if n else 0.0,
             "pool_distinct": float(len(set(keys))),
             "pool_overlap": sum(key in seen for key in keys) / n if n else 0.0}
    seen.update(keys)
    return pool, stats


def pool_batch(pool: list[dict[str, Any]], draws: int, rank: int, world: int, size: int, pool_seed: int,
               pool_round: Optional[int], pad_token_id: int) -> dict[str, Any]:
    """This rank's slice of the pool's batch number `draws`, collated (ids padded with `pad_token_id`, masks
    [b, L], texts listed) from the kept generations' TRAINING_KEYS.

    The pool is streamed through seeded shuffles (pass e: `Random("<pool_seed>-<pool_round>-<e>")`) and cut
    into global batches of `size · world` examples, rank r taking the r-th `size` of each: a function of (pool
    round, batches drawn), so a resumed run draws the same batches.
    """
    n, start = len(pool), (draws * world + rank) * size
    orders: dict[int, list[int]] = {}
    examples = []
    for position in range(start, start + size):
        e, i = divmod(position, n)
        if e not in orders:
            orders[e] = list(range(n))
            random.Random(f"{pool_seed}-{pool_round}-{e}").shuffle(orders[e])
        examples.append({key: pool[orders[e][i]][key] for key in TRAINING_KEYS})
    return DictCollator(pad_token_id)(examples)
