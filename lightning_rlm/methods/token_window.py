"""What the methods trained on token windows share (LM baselines, both Quiet-STaR methods): a network built
in `configure_model` once the DataModule's tokenizer is known, tokens/s between steps, val/test through one
`_eval_step`, and the optimiser (AdamW, warm-up, then constant or cosine)."""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning_rlm.optim import adamw_warmup_cosine

__all__ = ["TokenWindowSteps", "VocabFromData"]


class VocabFromData:
    """Mixin for LightningModules whose network is built once the DataModule's tokenizer is known.

    The subclass gives `make_net(vocab_size)`; `vocab_size` is saved in hparams when built, so checkpoints
    rebuild without the data. `exact_vocab`: the tokenizer's vocab must equal the model's (e.g. when an id
    past the vocab has a meaning), instead of fitting inside it.

    The network is created in `configure_model`, which Lightning calls after `setup` (the DataModule's
    tokenizer is known by then) inside the strategy's context, so FSDP wraps it as it is created and
    `trainer.init_module(empty_init=True)` / the meta device skip the random initialisation; Lightning calls it
    again in `load_from_checkpoint`. Given `vocab_size` in `__init__` (a checkpoint's hparams, a test), the
    subclasses build at once, where `trainer.init_module()` places it; `configure_model` then only checks it.
    """

    exact_vocab = False

    def make_net(self, vocab_size: int):
        raise NotImplementedError

    def _build(self, vocab_size: int) -> None:
        self.net = self.make_net(vocab_size)
        self.hparams.vocab_size = vocab_size

    @property
    def tokenizer(self):
        dm = self.trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "tokenizer", None)

    def configure_model(self) -> None:
        """Build the network from the DataModule's tokenizer, or check one built in `__init__` (from
        `vocab_size`) against it. Idempotent: a second call builds nothing."""
        self.build_from_data()

    def build_from_data(self) -> None:
        """Build the network from the tokenizer, or check a built one against it."""
        name = type(self).__name__
        if self.net is None:
            if self.tokenizer is None:
                raise ValueError(f"{name} needs vocab_size, or a DataModule with a tokenizer")
            self._build(self.tokenizer.vocab_size)
            return
        if self.tokenizer is None:
            return
        have, want = self.tokenizer.vocab_size, self.hparams.vocab_size
        if (have != want) if self.exact_vocab else (have > want):
            raise ValueError(f"{name}: tokenizer vocab {have} {'!=' if self.exact_vocab else '>'} model vocab_size "
                             f"{want}")


class TokenWindowSteps:
    """Mixin for LightningModules on token windows: `log_throughput(batch)` logs `train/tokens_per_s` over
    the whole loop between two training steps (validation and epoch turnover not counted); validation and
    test run `_eval_step(batch, split)`; `configure_optimizers` reads the usual optimiser hparams."""

    _last_step_time: Optional[float] = None

    def log_throughput(self, batch: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:  # whole-loop time between steps: the honest throughput
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None  # do not count validation / epoch turnover as step time

    def _eval_step(self, batch: dict[str, Any], split: str) -> Any:
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        out = self._eval_step(batch, "val")
        self._last_step_time = None
        return out

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        out = self._eval_step(batch, "test")
        self._last_step_time = None
        return out

    def configure_optimizers(self):
        h = self.hparams  # lr, weight_decay, betas, warmup_steps, min_lr_ratio, lr_schedule
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return adamw_warmup_cosine(self, total, h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio,
                                   h.lr_schedule)
