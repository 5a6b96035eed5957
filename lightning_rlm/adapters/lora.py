"""LoRA adapters and the reference policy for KL-regularized RL.

KL-regularized objectives need log-probs under a frozen reference policy. With LoRA the reference is free:
the same model with its adapters switched off (:func:`reference_mode`), so no second copy of the weights is
kept. With full fine-tuning the reference must be a frozen deep copy made before training
(:func:`frozen_copy`). :func:`reference_logprobs` picks whichever applies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from lightning_rlm.adapters.wrapping import LinearWrappingModel
from lightning_rlm.rollout.generate import completion_logprobs

__all__ = ["add_lora", "frozen_copy", "is_peft_model", "reference_logprobs", "reference_mode"]


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap a causal LM with trainable LoRA adapters; the base weights are frozen.

    Args:
        model: an HF causal LM. PEFT injects the adapters in place, so keep a copy first if the plain
            model is still needed.
        rank: LoRA rank ``r`` (>= 1).
        alpha: LoRA alpha; defaults to ``rank`` (scaling 1 without rsLoRA).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank`` (keeps the update's size
            stable across ranks).
        dropout: dropout on the LoRA input path.
        target_modules: module names to adapt, or ``"all-linear"`` (every linear layer except the LM head).
        adapter_name: name of the adapter inside the PEFT model.

    Returns:
        The ``PeftModel``. LoRA ``B`` starts at zero, so its outputs initially equal the base model's.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=target_modules,
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily turn a PEFT policy into its reference: adapters disabled, eval mode, no grad.

    Yields the same model object. Eval mode matches :func:`frozen_copy` (no dropout in the reference);
    the adapters and the training flag are restored on exit. For a model without adapters this raises,
    since the reference must then be a separate frozen copy.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"reference_mode needs a PEFT (LoRA) model, got {type(model).__name__}; for full fine-tuning "
            "keep a reference made with frozen_copy(model) before training and pass it as ref_model"
        )
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen and in eval mode: the reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def reference_logprobs(
    policy: nn.Module,
    ref_model: nn.Module | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Completion log-probs ``[N, C]`` under the reference policy, without gradients.

    Uses ``ref_model`` when given (full fine-tuning); otherwise ``policy`` is evaluated as its own reference:
    a PEFT model with its adapters disabled, or a model with a ``reference()`` context (the dual-LoRA and
    SVD adapters, :class:`~lightning_rlm.adapters.wrapping.LinearWrappingModel`). ``input_ids`` /
    ``attention_mask`` are ``[N, P+C]``.
    """
    if ref_model is not None:
        was_training = ref_model.training
        ref_model.eval()
        try:
            with torch.no_grad():
                logp = completion_logprobs(
                    ref_model, input_ids, attention_mask, completion_len, temperature=temperature
                )
        finally:
            ref_model.train(was_training)
        assert isinstance(logp, Tensor)
        return logp
    with (policy.reference() if isinstance(policy, LinearWrappingModel) else reference_mode(policy)) as ref:
        logp = completion_logprobs(ref, input_ids, attention_mask, completion_len, temperature=temperature)
    assert isinstance(logp, Tensor)
    return logp
