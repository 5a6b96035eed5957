"""Hugging Face causal LMs, built from a config or loaded with `from_pretrained`.

`HFCausalLM` is the network the `LanguageModel` method trains: give it a config dict
(`{"model_type": "llama", "hidden_size": 192, ...}`) to build a model from scratch, or a name/path to load
one. `load_causal_lm` is what RL methods use to load their base policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


def check_model_path(name_or_path: str) -> None:
    """A local-looking path that does not exist is a clear error (instead of a hub lookup that hangs)."""
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not p.exists():
        raise FileNotFoundError(
            f"model path {name_or_path!r} does not exist. Build the base model first with "
            "`lightning-rlm base-model` or give an existing folder / hub name."
        )


def load_causal_lm(name_or_path: str, dtype: Optional[str] = None) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with a clear error for a missing local path."""
    from transformers import AutoModelForCausalLM

    from lightning_rlm.models.base_model import resolve_model_path

    name_or_path = resolve_model_path(name_or_path)
    check_model_path(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as e:  # not found locally or on the hub, no network: name the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load model {name_or_path!r}: {first}") from e


def config_from_dict(config: dict, vocab_size: Optional[int] = None):
    from transformers import AutoConfig

    config = dict(config)
    if "model_type" not in config:
        raise ValueError(f"a model config needs a `model_type` (e.g. llama, qwen2, gpt2); got keys {sorted(config)}")
    model_type = config.pop("model_type")
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **config)


class HFCausalLM(nn.Module):
    """An HF causal LM as a plain module: forward(input_ids) → logits [B, T, V].

    Args:
        vocab_size: from the tokenizer (overrides the config's vocab size when building from a config).
        config: a config dict with `model_type`, to build a randomly initialised model.
        name_or_path: a model to load with `from_pretrained` (its vocab must cover the tokenizer's).
    """

    def __init__(self, vocab_size: int, config: Optional[dict] = None, name_or_path: Optional[str] = None) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        if (config is None) == (name_or_path is None):
            raise ValueError("HFCausalLM needs exactly one of `config` or `name_or_path`")
        if config is not None:
            self.model = AutoModelForCausalLM.from_config(config_from_dict(config, vocab_size))
        else:
            self.model = load_causal_lm(name_or_path)
            if self.model.config.vocab_size < vocab_size:
                raise ValueError(
                    f"model {name_or_path!r} has vocab {self.model.config.vocab_size} < tokenizer vocab {vocab_size}"
                )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits  # [B, T, V]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample with a KV cache; returns the new ids [B, max_new_tokens]."""
        from transformers import DynamicCache

        from lightning_rlm.models.gru_lm import sample_next

        cache = DynamicCache()
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        new = []
        for _ in range(max_new_tokens):
            nxt = sample_next(out.logits[:, -1], temperature, top_k, generator)  # [B, 1]
            new.append(nxt)
            out = self.model(input_ids=nxt, cache=out.cache, use_cache=True)
        return torch.cat(new, dim=1)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        self.model.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))


# End-of-turn tokens of common chat templates: a completion ends at the turn's end, not only at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>")


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> int | list[int]:
    """The ids that end a completion: EOS, the generation config's EOS ids, and the end-of-turn token of the
    tokenizer's chat template when it has one. One int when there is one id (the common case), else a list.
    """
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in END_OF_TURN_TOKENS:
        if token in template:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.append(tid)
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (less memory for ~1/3 more compute) in the HF model inside `model`
    (itself, or wrapped by PEFT or an adapter); non-reentrant, so frozen inputs and adapters both work."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or not hf.supports_gradient_checkpointing:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no Hugging Face model that supports it")
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_policy(name_or_path: str, dtype: Optional[str] = None):
    """The base policy of an RL/SFT method: (causal LM, its tokenizer with a pad token, stop ids).

    `lrlm:<name>` resolves to the cached base model; a tokenizer without EOS is a clear error (generation
    needs it to end completions). The stop ids (`stop_token_ids`) include a chat template's end-of-turn token.
    """
    from lightning_rlm.models.base_model import resolve_model_path

    path = resolve_model_path(name_or_path)
    model = load_causal_lm(path, dtype=dtype)
    tokenizer = _padded_tokenizer(path, name_or_path)
    return model, tokenizer, stop_token_ids(tokenizer, getattr(model, "generation_config", None))


def load_tokenizer(name_or_path: str) -> tuple[Any, int | list[int]]:
    """`load_policy` without the weights: (tokenizer with a pad token, stop ids), read from the model's folder
    (tokenizer, config and generation config only), so a method can know its vocabulary and stop ids in
    `__init__` and create the weights later in `configure_model` (:func:`load_causal_lm`). The stop ids are
    those `load_policy` gives: the generation config's, or the model config's when the folder has none."""
    from transformers import AutoConfig, GenerationConfig

    from lightning_rlm.models.base_model import resolve_model_path

    path = resolve_model_path(name_or_path)
    check_model_path(path)
    tokenizer = _padded_tokenizer(path, name_or_path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: HF derives it from the model config, as here
        generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    return tokenizer, stop_token_ids(tokenizer, generation_config)


def _padded_tokenizer(path: str, name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # not found locally or on the hub, no network: name the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load model {name_or_path!r}: {first}") from e
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no EOS token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
