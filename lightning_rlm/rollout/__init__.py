"""Rollout sampling and completion scoring shared by the RL objectives (GRPO, gradient routing, GAN-RL)."""

from lightning_rlm.rollout.generate import (
    Rollout,
    apply_repetition_penalty,
    apply_top_k_top_p,
    completion_logprobs,
    completion_mask_from_eos,
    position_ids_from_mask,
    sample_categorical,
    sample_completions,
)

__all__ = [
    "Rollout",
    "apply_repetition_penalty",
    "apply_top_k_top_p",
    "completion_logprobs",
    "completion_mask_from_eos",
    "position_ids_from_mask",
    "sample_categorical",
    "sample_completions",
]
