"""Downstream accuracy during `fit`, `validate` and `test`: GSM8K, CommonsenseQA or your jsonl task.

Every method that produces a language model says which one through `downstream_lms()`:
`{variant: (causal LM, tokenizer)}` with variant `""` for the plain model (GRPO and its variants: the policy
with its adapters on; KL-barrier SFT: the policy; GAN-RL: the generator; the HF LM baseline), and two
variants for Quiet-STaR: `base` (the base path, no thoughts) and `thoughts` (the thinking model: thought-mixed
generation and answer likelihoods). At each of the callback's moments, for every task and variant,
:func:`lightning_rlm.tasks.evaluate` scores the same seeded subset (`limit` examples drawn with `seed`,
sharded over DDP ranks with the counts all-reduced) and the callback logs

    eval/<task>[/<variant>]/accuracy      (likelihood scoring adds accuracy_sum and accuracy_mean)
    eval/<task>[/<variant>]/n             the number of examples behind it

(with `think_probe`, seed 001's think-or-not probe too: `eval/<task>[/<variant>]/think/...`), plus a
TensorBoard text table of the first `table_rows` graded answers (rank 0). Moments: the end of every
validation epoch (`every_n_steps: null`, the default; the sanity check is skipped), or every
`every_n_steps` training steps instead; and the end of every `validate` / `test` run, so
`lightning-rlm validate --config <run>.yaml --config configs/presets/eval_reasoning.yaml [--ckpt_path ...]`
evaluates a checkpoint or, without `--ckpt_path`, the bare model the config names.

The CLI adds this callback as `evaluation:` (no tasks: it does nothing), so a preset only fills in its tasks.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_rlm.checks import check_at_least
from lightning_rlm.logging_utils import log_text
from lightning_rlm.tasks.base import Task
from lightning_rlm.tasks.evaluate import evaluate
from lightning_rlm.tasks.think import think_or_not

__all__ = ["DownstreamEvaluation", "records_to_markdown"]


def _cell(value: Any, width: int = 300) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def records_to_markdown(records: list[dict[str, Any]], rows: int) -> str:
    """A markdown table of graded answers: question, what the model answered, prediction, gold, correct."""
    lines = ["| question | answer | prediction | gold | correct |", "|---|---|---|---|---|"]
    for r in records[:rows]:
        answer = r.get("completion")
        if answer is None and "choices" in r:  # likelihood scoring: the chosen answer text
            labels = [chr(ord("A") + i) for i in range(len(r["choices"]))]
            answer = dict(zip(labels, r["choices"])).get(r["prediction"], r["prediction"])
        lines.append(f"| {_cell(r['question'])} | {_cell(answer)} | {_cell(r['prediction'])} | "
                     f"{_cell(r['gold'])} | {r['correct']} |")
    return "\n".join(lines)


class DownstreamEvaluation(Callback):
    """Accuracy of the method's language model on downstream tasks (see the module docstring).

    Args:
        tasks: the tasks (`lightning_rlm.tasks.GSM8K`, `CommonsenseQA`, `JsonlGenerationTask`, ...). Empty:
            the callback does nothing.
        limit: examples per task, a subset fixed by `seed` (None: all).
        seed: seed of the subset.
        batch_size: examples per forward / generate call.
        every_n_steps: evaluate every N training steps instead of at the end of each validation epoch.
        max_new_tokens: generation budget (None: each task's own).
        variants: the model variants to score (None: all the method offers, e.g. Quiet-STaR's `base` and
            `thoughts`).
        table_rows: graded answers shown in the TensorBoard text table (0: none).
        think_probe: also run seed 001's "think or not" probe (:func:`lightning_rlm.tasks.think.think_or_not`):
            logs `eval/<task>[/<variant>]/think/{accuracy_thought,accuracy_null,changed,fixed,broken}`.
        think_tokens: the thought's token budget in the probe.
    """

    def __init__(
        self,
        tasks: Optional[list[Task]] = None,
        limit: Optional[int] = 100,
        seed: int = 0,
        batch_size: int = 8,
        every_n_steps: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        variants: Optional[list[str]] = None,
        table_rows: int = 4,
        think_probe: bool = False,
        think_tokens: int = 128,
    ) -> None:
        check_at_least(1, limit=limit, batch_size=batch_size, every_n_steps=every_n_steps,
                       max_new_tokens=max_new_tokens)
        check_at_least(0, table_rows=table_rows)
        check_at_least(1, think_tokens=think_tokens)
        self.tasks = list(tasks or [])
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation tasks need distinct names (their metric names), got {names}")
        # what every evaluate() / think_or_not() call of this callback shares
        self.subset = {"limit": limit, "seed": seed, "batch_size": batch_size}
        self.max_new_tokens, self.think_tokens = max_new_tokens, think_tokens
        self.every_n_steps, self.variants, self.table_rows, self.think_probe = (every_n_steps, variants, table_rows,
                                                                              think_probe)
        self._last_step = -1

    # ----- what to score -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.tasks:
            return
        if not callable(getattr(pl_module, "downstream_lms", None)):
            raise ValueError(f"evaluation.tasks: {type(pl_module).__name__} has no language model to evaluate "
                             "(no downstream_lms()); remove the evaluation tasks for this method")
        for task in self.tasks:
            task.examples()  # a missing or malformed task file fails now, before any training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tasks:
            self.models(pl_module)  # a method without a usable LM fails before training, not at validation

    def models(self, pl_module: pl.LightningModule) -> dict[str, tuple[Any, Any]]:
        lms = pl_module.downstream_lms()  # type: ignore[operator]
        if self.variants is not None:
            unknown = [v for v in self.variants if v not in lms]
            if unknown:
                raise ValueError(f"evaluation.variants {unknown} not offered by {type(pl_module).__name__}; "
                                 f"it offers {sorted(lms)}")
            lms = {v: lms[v] for v in self.variants}
        return lms

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool = False) -> dict[str, float]:
        """Score every task and variant now; log and return the accuracies."""
        logged: dict[str, float] = {}
        if not self.tasks or trainer.sanity_checking:
            return logged
        self._last_step = trainer.global_step
        for variant, (model, tokenizer) in self.models(pl_module).items():
            for task in self.tasks:
                result = evaluate(task, model, tokenizer, max_new_tokens=self.max_new_tokens, **self.subset)
                prefix = f"eval/{task.name}" + (f"/{variant}" if variant else "")
                values = {k: v for k, v in result.items() if k.startswith("accuracy")}
                values["n"] = float(result["n"])
                for k, v in values.items():
                    # every rank holds the all-reduced value: no sync needed
                    pl_module.log(f"{prefix}/{k}", float(v), on_step=on_step, on_epoch=not on_step, batch_size=1)
                    logged[f"{prefix}/{k}"] = float(v)
                if self.table_rows and trainer.is_global_zero:
                    log_text(pl_module, f"{prefix}/answers", records_to_markdown(result["records"], self.table_rows))
                if self.think_probe:
                    probe = think_or_not(task, model, tokenizer, think_tokens=self.think_tokens, **self.subset)
                    for k in ("accuracy_thought", "accuracy_null", "changed", "fixed", "broken"):
                        pl_module.log(f"{prefix}/think/{k}", float(probe[k]), on_step=on_step, on_epoch=not on_step,
                                      batch_size=1)
                        logged[f"{prefix}/think/{k}"] = float(probe[k])
        return logged

    # ----- when -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        n = self.every_n_steps
        if n and trainer.global_step % n == 0 and trainer.global_step != self._last_step:
            self.run(trainer, pl_module, on_step=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self.every_n_steps:
            return  # during fit, every_n_steps replaces the validation-time evaluation
        self.run(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)
