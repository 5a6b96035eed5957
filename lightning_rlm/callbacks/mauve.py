"""Periodic MAUVE of the policy's completions against reference text, as a Lightning callback.

Reward curves say whether the policy optimises its reward, not whether its text still looks like the
reference distribution; MAUVE (see `lightning_rlm.metrics.mauve`) measures the latter and falls when RL
drives the policy into reward hacking, mode collapse or degenerate text.

Two sources of model text:

* **Rollouts** (the default): every training batch's rollout (`outputs["rollout"]`, see
  `lightning_rlm.callbacks.rollout`) is appended to a sliding window of the last `window` completions,
  and of the matching references when the rollout has them (one per group: the `group_size` copies of a
  prompt's reference are collapsed so the reference histogram is not artificially spiky). When rollouts
  carry no references, the fixed `references` list given to the callback is the reference side.
* **Generation**: if no rollout with text has been seen and `prompts` + `references` are given, the
  callback calls `pl_module.generate_text(prompts, max_new_tokens=max_new_tokens)` (methods are expected to
  offer it; it must return one decoded completion string per prompt) every `every_n_steps` steps, in eval
  mode under `torch.no_grad()`, and scores those completions against `references`.

Every `every_n_steps` optimizer steps, rank zero featurizes both sides and logs `<prefix>/mauve`,
`<prefix>/mauve_star`, `<prefix>/frontier_integral`, `<prefix>/frontier_integral_star` (plus `_std` over
k-means seeds when `n_seeds > 1`, `<prefix>/n_model`, `<prefix>/n_reference` and `<prefix>/seconds`)
to every logger at the current global step; the values are broadcast so that all ranks also see them in
`trainer.callback_metrics` (so a `ModelCheckpoint` may monitor them). Under DDP each rank's rollout texts are
gathered with `torch.distributed.all_gather_object` every step, so every rank holds the same global window
(which also makes the rank-zero checkpoint of the window correct for all ranks on resume). Validation
rollouts, if any, are pooled over each validation epoch (up to `window`) and logged as `val_<prefix>/...`.

The window is saved in and restored from checkpoints (`state_dict` / `load_state_dict`). Features of the
fixed `references` list are computed once and reused (except with a policy featurizer, whose features
change as the policy trains).

YAML (LightningCLI) example::

    trainer:
      callbacks:
        - class_path: lightning_rlm.callbacks.MauveCallback
          init_args:
            every_n_steps: 200
            window: 2000
            featurizer:
              class_path: lightning_rlm.metrics.MiniLMFeaturizer
              init_args: {batch_size: 128}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_rlm.callbacks.rollout import (
    all_gather_objects,
    broadcast_object,
    get_rollout,
    per_group,
    world_info,
)
from lightning_rlm.checks import check_at_least
from lightning_rlm.metrics.mauve import (
    SMALL_SAMPLE_WARNING,
    Featurizer,
    MiniLMFeaturizer,
    PolicyFeaturizer,
    compute_mauve_from_features,
)

__all__ = ["MauveCallback"]

_SCORES = ("mauve", "mauve_star", "frontier_integral", "frontier_integral_star")


class MauveCallback(Callback):
    """Log MAUVE of recent completions vs references every `every_n_steps` global steps.

    Args:
        every_n_steps: score when the global step reaches a multiple of this (at most once per step).
        window: number of most recent completions (and references) scored.
        featurizer: a `Featurizer` (class-path instantiable from YAML), `"policy"` to embed with the
            policy itself (`pl_module.policy`/`.model`/`.net` and an HF-style `pl_module.tokenizer`;
            not for sharded strategies such as FSDP, where rank zero alone cannot run the model), or None
            for the offline `MiniLMFeaturizer` (created on rank zero on first use).
        num_buckets: k-means clusters; default a tenth of the texts per side (`window // 10` once the
            window is full), at least 2.
        mauve_scaling_factor, kmeans_num_redo, kmeans_max_iter: passed to `mauve-text`.
        n_seeds: k-means seeds averaged (the `_std` metrics are their spread).
        prompts: fixed prompts for generation mode (see the module docstring).
        references: reference texts: the reference side in generation mode, and for rollouts without
            references.
        max_new_tokens: generation length in generation mode.
        seed: first k-means seed.
        num_threads: BLAS/OpenMP threads while clustering (see `compute_mauve_from_features`).
        min_texts: skip scoring (with a warning) while either side has fewer texts than this.
        log_prefix: metric name prefix.
        on_validation: also score validation rollouts once per validation epoch.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        window: int = 2000,
        featurizer: Featurizer | Literal["policy"] | None = None,
        num_buckets: int | None = None,
        mauve_scaling_factor: float = 5.0,
        kmeans_num_redo: int = 5,
        kmeans_max_iter: int = 500,
        n_seeds: int = 1,
        prompts: list[str] | None = None,
        references: list[str] | None = None,
        max_new_tokens: int = 64,
        seed: int = 25,
        num_threads: int | None = 1,
        min_texts: int = 10,
        log_prefix: str = "mauve",
        on_validation: bool = True,
    ) -> None:
        super().__init__()
        check_at_least(1, every_n_steps=every_n_steps)
        check_at_least(2, window=window)
        if isinstance(featurizer, str) and featurizer != "policy":
            raise ValueError(f"featurizer must be a Featurizer, 'policy' or None, got {featurizer!r}")
        if prompts is not None and not references:
            raise ValueError("generation mode (prompts=...) needs references=... to score against")
        self.every_n_steps = every_n_steps
        self.window = window
        self.featurizer = featurizer
        self.num_buckets = num_buckets
        # passed as they are to compute_mauve_from_features
        self.score_args = dict(mauve_scaling_factor=mauve_scaling_factor, kmeans_num_redo=kmeans_num_redo,
                               kmeans_max_iter=kmeans_max_iter, n_seeds=n_seeds, seed=seed, num_threads=num_threads)
        self.prompts = list(prompts) if prompts is not None else None
        self.references = list(references) if references is not None else None
        self.max_new_tokens = max_new_tokens
        self.min_texts = min_texts
        self.log_prefix = log_prefix
        self.on_validation = on_validation

        self._completions: deque[str] = deque(maxlen=window)
        self._references: deque[str] = deque(maxlen=window)
        self._val_completions: deque[str] = deque(maxlen=window)
        self._val_references: deque[str] = deque(maxlen=window)
        self._next_step = every_n_steps
        self._default_featurizer: Featurizer | None = None
        self._static_q_features: np.ndarray | None = None  # features of `references`, computed once
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, window=self.window, log_prefix=self.log_prefix
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "completions": list(self._completions),
            "references": list(self._references),
            "next_step": self._next_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._completions = deque(state_dict.get("completions", []), maxlen=self.window)
        self._references = deque(state_dict.get("references", []), maxlen=self.window)
        self._next_step = int(state_dict.get("next_step", self.every_n_steps))

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collect(outputs, self._completions, self._references)
        step = trainer.global_step
        if step > 0 and step >= self._next_step:
            self._next_step = (step // self.every_n_steps + 1) * self.every_n_steps
            self._evaluate_train(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._collect(outputs, self._val_completions, self._val_references)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or not self._val_completions:
            return
        p = list(self._val_completions)
        q, static = (
            (list(self._val_references), False) if self._val_references else (self.references or [], True)
        )
        self._val_completions.clear()
        self._val_references.clear()
        self._score_and_log(trainer, pl_module, p, q, f"val_{self.log_prefix}", static)

    # ----------------------------------------------------------------------------------------- internals
    def _collect(self, outputs: Any, completions: deque[str], references: deque[str]) -> None:
        """Append this step's rollout texts (from all ranks) to the given window."""
        rollout = get_rollout(outputs)
        local: tuple[list[str], list[str]] | None = None
        if rollout is not None:
            n, g = len(rollout.completions), rollout.group_size
            local = (rollout.completions, per_group(rollout.references, n, g))
        parts = all_gather_objects(local) if world_info()[1] > 1 else [local]
        for part in parts:
            if part is not None:
                completions.extend(part[0])
                references.extend(part[1])

    def _evaluate_train(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._completions:
            p = list(self._completions)
            q, static = (list(self._references), False) if self._references else (self.references or [], True)
        elif self.prompts:
            p = self._generate(pl_module)
            q, static = self.references or [], True
        else:
            self._warn_once(
                "nothing",
                "MauveCallback: no rollout with completions seen and no prompts given; nothing to score",
            )
            return
        self._score_and_log(trainer, pl_module, p, q, self.log_prefix, static)

    def _generate(self, pl_module: pl.LightningModule) -> list[str]:
        """Completions for `self.prompts` from `pl_module.generate_text`, each rank a shard, gathered."""
        generate = getattr(pl_module, "generate_text", None)
        if generate is None:
            raise AttributeError(
                f"{type(pl_module).__name__} has no generate_text(prompts, max_new_tokens=...): MauveCallback "
                "needs it (or rollouts with completions) to get model text"
            )
        assert self.prompts is not None
        rank, world = world_info()
        shard = self.prompts[rank::world]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                texts = list(generate(shard, max_new_tokens=self.max_new_tokens)) if shard else []
        finally:
            pl_module.train(was_training)
        return [t for part in all_gather_objects(texts) for t in part]

    def _featurizer(self, pl_module: pl.LightningModule) -> Featurizer:
        if isinstance(self.featurizer, Featurizer):
            return self.featurizer
        if self.featurizer == "policy":
            model = next(
                (
                    m
                    for name in ("policy", "model", "net")
                    if isinstance(m := getattr(pl_module, name, None), nn.Module)
                ),
                None,
            )
            tokenizer = getattr(pl_module, "tokenizer", None)
            if model is None or tokenizer is None:
                raise AttributeError(
                    "featurizer='policy' needs pl_module.policy/.model/.net (an nn.Module) and pl_module.tokenizer"
                )
            return PolicyFeaturizer(model, tokenizer)
        if self._default_featurizer is None:
            self._default_featurizer = MiniLMFeaturizer()
        return self._default_featurizer

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _score_and_log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        p: Sequence[str],
        q: Sequence[str],
        prefix: str,
        static_q: bool = False,
    ) -> None:
        """Rank zero scores p vs q; all ranks get the metrics; rank zero logs them. A collective.

        `static_q` marks q as the fixed `references` list, whose features are computed once and reused.
        """
        if len(p) < self.min_texts or len(q) < self.min_texts:  # same on all ranks: the windows are global
            self._warn_once(
                f"few-{prefix}",
                f"MauveCallback: skipping {prefix} with {len(p)} model vs {len(q)} reference texts "
                f"(min_texts={self.min_texts})",
            )
            return
        rank, world = world_info()
        metrics: dict[str, float] | None = None
        error: BaseException | None = None
        if rank == 0:
            try:
                metrics = self._compute(pl_module, p, q, prefix, static_q)
            except Exception as e:  # tell the other ranks instead of leaving them waiting
                if world == 1:
                    raise
                error = e
        payload = broadcast_object({"metrics": metrics, "error": repr(error) if error else None})
        if payload["error"] is not None:
            if error is not None:
                raise error
            raise RuntimeError(f"MauveCallback failed on rank zero: {payload['error']}")
        metrics = payload["metrics"]
        assert metrics is not None
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _compute(
        self, pl_module: pl.LightningModule, p: Sequence[str], q: Sequence[str], prefix: str, static_q: bool
    ) -> dict[str, float]:
        n = min(len(p), len(q))
        k = max(2, n // 10) if self.num_buckets is None else min(self.num_buckets, len(p) + len(q))
        if n < SMALL_SAMPLE_WARNING:
            self._warn_once(
                "small",
                f"MauveCallback: scoring {len(p)} vs {len(q)} texts; MAUVE is biased below "
                f"~{SMALL_SAMPLE_WARNING} texts per side: compare only runs with the same window and buckets",
            )
        featurizer = self._featurizer(pl_module)
        t0 = time.perf_counter()
        p_features = featurizer(list(p))  # [N_p, D]
        if static_q and not isinstance(featurizer, PolicyFeaturizer):  # policy features drift: no caching
            if self._static_q_features is None:
                self._static_q_features = featurizer(list(q))
            q_features = self._static_q_features  # [N_q, D]
        else:
            q_features = featurizer(list(q))  # [N_q, D]
        featurize_seconds = time.perf_counter() - t0
        out = compute_mauve_from_features(p_features, q_features, num_buckets=k, warn_small=False, **self.score_args)
        metrics = {f"{prefix}/{key}": out[key] for key in _SCORES}
        if self.score_args["n_seeds"] > 1:
            metrics.update({f"{prefix}/{key}_std": out[f"{key}_std"] for key in _SCORES})
        metrics[f"{prefix}/n_model"] = float(len(p))
        metrics[f"{prefix}/n_reference"] = float(len(q))
        metrics[f"{prefix}/seconds"] = featurize_seconds + out["score_seconds"]
        return metrics
