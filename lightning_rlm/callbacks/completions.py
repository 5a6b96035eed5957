"""Log sample completions with their rewards and advantages: a TensorBoard table and a JSONL file.

Reading what the policy actually writes is the quickest way to spot reward hacking. Every
`every_n_steps` global steps the first `max_rows` completions of the current training rollout (see
`lightning_rlm.callbacks.rollout` for the rollout contract) are

* rendered as a markdown table (prompt / completion / one column per reward function / advantage) and
  sent to TensorBoard's text tab (`add_text`, tag `completions/train`) when a `TensorBoardLogger` is
  attached, or to `log_text` of loggers that have one (e.g. W&B);
* appended to `<trainer.log_dir>/<filename>` as one JSON object per completion:
  `{"step", "stage", "index", "group", "prompt", "completion", "reference", "rewards": {name: value},
  "advantage"}` (non-finite numbers become null, so every line is strict JSON).

Only rank zero logs, from its own rollout. Each JSON line goes to the file in a single `os.write` on a
descriptor opened with `O_APPEND` (no user-space buffer to flush), so a killed run never leaves a torn
line behind. With `log_validation`, the first validation batch of each validation epoch is logged too
(stage `val`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_rlm.callbacks.rollout import get_rollout, per_completion
from lightning_rlm.checks import check_at_least
from lightning_rlm.logging_utils import append_jsonl_line
from lightning_rlm.rollout.text import TextRollout

__all__ = ["CompletionsLogger", "append_jsonl_line", "rollout_rows", "rows_to_markdown"]


def _finite_or_none(value: Any) -> float | None:
    """A float for JSON; None for missing or non-finite values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rollout_rows(rollout: TextRollout, max_rows: int | None = None) -> list[dict[str, Any]]:
    """One dict per completion (the first `max_rows`): prompt, completion, reference, rewards, advantage."""
    completions = rollout.completions
    n, g = len(completions), rollout.group_size
    prompts = per_completion(rollout.prompts, n, g)
    references = per_completion(rollout.references, n, g)
    advantages = per_completion(rollout.advantages, n, g)
    rewards = {name: per_completion(values, n, g) for name, values in rollout.rewards.items()}
    rows = []
    for i in range(n if max_rows is None else min(n, max_rows)):
        rows.append(
            {
                "index": i,
                "group": i // g,
                "prompt": prompts[i],
                "completion": completions[i],
                "reference": references[i],
                "rewards": {name: _finite_or_none(values[i]) for name, values in rewards.items()},
                "advantage": _finite_or_none(advantages[i]),
            }
        )
    return rows


def _cell(value: Any, max_chars: int) -> str:
    """A markdown table cell: truncated, pipes escaped, newlines as <br>."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def rows_to_markdown(rows: list[dict[str, Any]], max_chars: int = 1000) -> str:
    """Markdown table with columns prompt | completion | <reward names> | advantage."""
    reward_names = list(rows[0]["rewards"]) if rows else []
    header = ["#", "prompt", "completion", *reward_names, "advantage"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            str(row["index"]),
            _cell(row["prompt"], max_chars),
            _cell(row["completion"], max_chars),
            *(_cell(row["rewards"].get(name), max_chars) for name in reward_names),
            _cell(row["advantage"], max_chars),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class CompletionsLogger(Callback):
    """Every `every_n_steps` steps, log the first `max_rows` completions of the rollout (rank zero only).

    Args:
        every_n_steps: log when the global step reaches a multiple of this (the first batch with a
            rollout at or after it; at most once per step).
        max_rows: completions per log.
        filename: JSONL file name inside `trainer.log_dir` (an absolute path is used as is).
        log_validation: also log the first validation batch of each validation epoch.
        max_chars: truncation of each cell in the markdown table (the JSONL keeps full texts).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_rows: int = 8,
        filename: str = "completions.jsonl",
        log_validation: bool = True,
        max_chars: int = 1000,
    ) -> None:
        super().__init__()
        check_at_least(1, every_n_steps=every_n_steps)
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.filename = filename
        self.log_validation = log_validation
        self.max_chars = max_chars
        self._next_step = 0
        self._log_dir: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    @property
    def path(self) -> Path | None:
        """Where the JSONL goes (known after `setup`)."""
        if Path(self.filename).is_absolute():
            return Path(self.filename)
        return None if self._log_dir is None else Path(self._log_dir) / self.filename

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts, so it must be read on every rank: here, not in rank-zero-only code.
        self._log_dir = trainer.log_dir or trainer.default_root_dir

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step < self._next_step:
            return
        rollout = get_rollout(outputs)
        if rollout is None:
            return  # try again at the next batch
        self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
        if trainer.is_global_zero:
            self._log(trainer, rollout, "train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.log_validation or trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0:
            return
        rollout = get_rollout(outputs)
        if rollout is not None and trainer.is_global_zero:
            self._log(trainer, rollout, "val")

    def _log(self, trainer: pl.Trainer, rollout: TextRollout, stage: str) -> None:
        rows = rollout_rows(rollout, self.max_rows)
        if not rows:
            return
        step = trainer.global_step
        tag = f"completions/{stage}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, rows_to_markdown(rows, self.max_chars), global_step=step)
            elif hasattr(logger, "log_text"):  # e.g. WandbLogger: a table
                reward_names = list(rows[0]["rewards"])
                columns = ["prompt", "completion", *reward_names, "advantage"]
                data = [
                    [r["prompt"], r["completion"], *(r["rewards"][k] for k in reward_names), r["advantage"]]
                    for r in rows
                ]
                logger.log_text(key=tag, columns=columns, data=data, step=step)
        path = self.path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        for row in rows:
            append_jsonl_line(path, {"step": step, "stage": stage, **row})
