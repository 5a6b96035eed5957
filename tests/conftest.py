"""Shared fixtures: real text from the data root, small threads, an isolated cache."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_rlm.data.paths import data_root

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub. The cache ($LRLM_CACHE_DIR) is shared on purpose: trained tokenizers are
    # keyed by corpus hash and the pretrained base model takes minutes to build.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data():
    root = data_root()
    if not (root / "tinyshakespeare" / "input.txt").exists():
        pytest.fail(f"the real text samples are missing: expected them under {root} (set LRLM_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, shared_data):
    """A tiny random Llama + a 512-token BPE trained on TinyStories, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_rlm.data import TextSource, build_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    docs = TextSource(preset="tinystories", max_documents=400).read()
    tok = build_tokenizer("bpe", docs, vocab_size=512)
    tok.hf.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
