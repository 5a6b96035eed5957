"""SFT on the rows of `lightning-rlm rationalize`: the prompt, then the best reasoning trace and the ground truth.

Each row (`lightning_rlm.rollout.rationalize`) becomes one SFT example in GAN-RL's token layout, every
piece encoded on its own without special tokens, as GAN-RL concatenates them:

    prompt_ids     = encode(prompt)                                  (GAN-RL's prompt, ending in "<think>")
    completion_ids = encode(reasoning) + encode(think_close) + encode(completion)  [+ EOS with add_eos]
    loss_mask      =        1 …               0 …                       1 …          [+ 1]

The loss covers the reasoning and the completion tokens only: not the prompt (it is the prompt side of the
batch) and, by default, not `think_close`. GAN-RL appends `think_close` itself after the reasoning phase
(which it ends at EOS or the reasoning budget), so it is context, never an action; a model trained to write
it would run on into the completion inside GAN-RL's reasoning phase. `train_think_close: true` puts it in
the loss too (for a sampler that stops at the model's own `</think>`).

`SFTKLBarrier` takes the batch's `loss_mask` for its NLL and its KL barrier (its attention still covers the
whole completion side). `min_gain` keeps only rows whose best trace beats no reasoning by that many nats
(STaR's filter); `think_close` is read from each row (the one it was scored with) unless set here.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from lightning_rlm.data.collate import DictCollator, pad_right
from lightning_rlm.data.pairs import PairsDataModule
from lightning_rlm.data.sources import TextSource

log = logging.getLogger(__name__)

__all__ = ["RationalesDataModule"]


class LossMaskCollator(DictCollator):
    """`DictCollator`, plus `loss_mask` (one 0/1 list per completion) right-padded with 0 to [B, C]."""

    def __call__(self, examples: list[dict]) -> dict:
        batch = super().__call__(examples)
        if "loss_mask" in batch:
            batch["loss_mask"] = pad_right(batch["loss_mask"], 0)[0]  # [B, C], the width of completion_ids
        return batch


class RationalesDataModule(PairsDataModule):
    """(prompt, reasoning + think_close + completion) examples from a rationales jsonl, with a loss mask.

    Args:
        source: the jsonl written by `lightning-rlm rationalize` (fields prompt, reasoning, completion,
            think_close, gain).
        think_close: the text between reasoning and completion (None: each row's own `think_close`).
        train_think_close: put the `think_close` tokens in the loss (default: context only, as in GAN-RL).
        min_gain: keep rows whose gain (best trace over no reasoning, nats) is at least this (None: all).
        max_prompt_tokens: keep the last N prompt tokens (None: all).
        max_reasoning_tokens: keep the first N reasoning tokens (None: all).
        max_completion_tokens: keep the first N completion tokens (None: all).
        add_eos: end every example with the tokenizer's EOS (in the loss).
        See `PairsDataModule` / `TextDataModule` for the rest.
    """

    def __init__(
        self,
        source: TextSource,
        think_close: Optional[str] = None,
        train_think_close: bool = False,
        min_gain: Optional[float] = None,
        max_prompt_tokens: Optional[int] = None,
        max_reasoning_tokens: Optional[int] = None,
        max_completion_tokens: Optional[int] = None,
        add_eos: bool = False,
        tokenizer: str = "gpt2",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, prompt_field="prompt", completion_field="completion",
                         max_prompt_tokens=max_prompt_tokens, max_completion_tokens=max_completion_tokens,
                         add_eos=add_eos, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        if max_reasoning_tokens is not None and max_reasoning_tokens < 0:
            raise ValueError(f"max_reasoning_tokens must be >= 0 or None, got {max_reasoning_tokens}")
        self.think_close = think_close
        self.train_think_close = train_think_close
        self.min_gain = min_gain
        self.max_reasoning_tokens = max_reasoning_tokens

    def load_documents(self) -> None:
        if self.tokenizer is not None:
            return
        super().load_documents()
        for row in self.train_rows + self.val_rows:
            missing = [f for f in ("reasoning",) + (("think_close",) if self.think_close is None else ())
                       if f not in row]
            if missing:
                raise KeyError(f"a row of {self.source.describe()!r} has no field(s) {missing} (fields: "
                               f"{sorted(row)}): is it a file written by `lightning-rlm rationalize`?")

    def encode_example(self, row: dict) -> Optional[dict]:
        """One example (None when the prompt or the target is empty): ids, texts and the loss mask."""
        tok = self.tokenizer
        close = self.think_close if self.think_close is not None else str(row["think_close"])
        prompt_ids = tok.encode(str(row["prompt"]))
        reasoning_ids = tok.encode(str(row["reasoning"]))
        close_ids = tok.encode(close)
        answer_ids = tok.encode(str(row["completion"]))
        if self.max_prompt_tokens is not None:
            prompt_ids = prompt_ids[-self.max_prompt_tokens:]
        if self.max_reasoning_tokens is not None:
            reasoning_ids = reasoning_ids[: self.max_reasoning_tokens]
        if self.max_completion_tokens is not None:
            answer_ids = answer_ids[: self.max_completion_tokens]
        if self.add_eos:
            answer_ids = [*answer_ids, tok.eos_token_id]
        if not prompt_ids or not (reasoning_ids or answer_ids):
            return None
        completion_ids = reasoning_ids + close_ids + answer_ids
        loss_mask = [1] * len(reasoning_ids) + [int(self.train_think_close)] * len(close_ids) + [1] * len(answer_ids)
        return {"prompt": tok.decode(prompt_ids), "completion": tok.decode(completion_ids),
                "prompt_ids": prompt_ids, "completion_ids": completion_ids, "loss_mask": loss_mask}

    def _examples(self, rows: list[dict], split: str) -> list[dict]:
        examples, filtered, empty = [], 0, 0
        for row in rows:
            if self.min_gain is not None and not (row.get("gain") is not None and row["gain"] >= self.min_gain):
                filtered += 1
                continue
            example = self.encode_example(row)
            if example is None:
                empty += 1
                continue
            examples.append(example)
        log.info("%s: %d rationales, %d below min_gain=%s, %d empty", split, len(examples), filtered,
                 self.min_gain, empty)
        if not examples:
            raise ValueError(f"no {split} row of {self.source.describe()!r} is left to train on ({filtered} below "
                             f"min_gain={self.min_gain}, {empty} with an empty prompt or target)")
        return examples

    def collate_fn(self):
        return LossMaskCollator(self.tokenizer.pad_token_id)
