"""Parameter-efficient adapters (LoRA) and reference-policy helpers."""

from lightning_rlm.adapters.lora import (
    add_lora,
    frozen_copy,
    is_peft_model,
    reference_logprobs,
    reference_mode,
)

__all__ = ["add_lora", "frozen_copy", "is_peft_model", "reference_logprobs", "reference_mode"]
