"""Networks: the GRU LM and Hugging Face causal LMs."""

from lightning_rlm.models.gru_lm import GRULanguageModel, sample_next
from lightning_rlm.models.hf import HFCausalLM, config_from_dict, load_causal_lm, load_policy

__all__ = ["GRULanguageModel", "HFCausalLM", "config_from_dict", "load_causal_lm", "load_policy", "sample_next"]
