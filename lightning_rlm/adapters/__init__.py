"""Parameter-efficient adapters (LoRA) and reference-policy helpers."""

from lightning_rlm.adapters.lora import (
    add_lora,
    check_lora_source,
    frozen_copy,
    is_peft_model,
    load_lora_weights,
    lora_scaling,
    reference_logprobs,
    reference_mode,
)

__all__ = ["add_lora", "check_lora_source", "frozen_copy", "is_peft_model", "load_lora_weights", "lora_scaling",
           "reference_logprobs", "reference_mode"]
from lightning_rlm.adapters.svd import SVDAdapterModel, add_svd_adapter  # noqa: E402

__all__ += ["SVDAdapterModel", "add_svd_adapter"]
