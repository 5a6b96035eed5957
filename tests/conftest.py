"""Shared fixtures: real text from the data roots, small threads, an isolated cache.

`LRLM_TEST_BARE=1` (set by `.ci/run` for its run from a bare clone) marks a run without `shared/data`: a
test that needs a file that is neither bundled nor fetched is then skipped, naming the fetch command;
in every other run a missing file fails the test.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lightning_rlm.data.paths import find_data_path

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub. The cache ($LRLM_CACHE_DIR) is shared on purpose: trained tokenizers are
    # keyed by corpus hash and the pretrained base model takes minutes to build.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _need_data(relpath: str):
    """The path of a data file from the data roots; skipped (bare run) or failed when it is missing."""
    found = find_data_path(relpath)
    if found is None:
        from lightning_rlm.data.catalog import dataset_of_file

        why = f"needs {relpath} (lightning-rlm data fetch {dataset_of_file(relpath)})"
        if os.environ.get("LRLM_TEST_BARE") == "1":
            pytest.skip(why)
        pytest.fail(f"{why}; set LRLM_DATA_DIR to the folder that holds it")
    return found[1]


@pytest.fixture(scope="session")
def shared_data():
    """The data root holding the real text samples that travel with the package (Shakespeare, TinyStories)."""
    return _need_data("tinyshakespeare/input.txt").parents[1]


@pytest.fixture(scope="session")
def gpt2_tokenizer_file():
    return _need_data("gpt2-tokenizer/gpt2_tokenizer.json")


@pytest.fixture(scope="session")
def pile_file():
    return _need_data("pile/pile_sample_pearl.jsonl")


@pytest.fixture
def need_data():
    """`need_data(relpath)`: the file from the data roots, or a skip (bare run) / failure naming the fetch."""
    return _need_data


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


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with ChatML's special tokens and chat template (SmolLM2's format, 2 layers, random)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_chat_llama")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_yaml(tiny_llama_dir, tiny_chat_llama_dir):
    """`tiny_model_yaml(config_path, folder)`: a YAML written in `folder` that puts a shipped config on a tiny
    random model (the chat one for configs on SmolLM2), or None for configs that build their own model."""

    def make(config, folder):
        text = config.read_text()
        if "lrlm:" not in text:
            return None
        model = tiny_chat_llama_dir if "lrlm:smollm2" in text else tiny_llama_dir
        where = ("  init_args:\n    network:\n      init_args:\n        name_or_path" if "network:" in text
                 else "  init_args:\n    model_name_or_path")
        out = folder / f"tiny_{config.stem}.yaml"
        out.write_text(f"model:\n{where}: {model}\ndata:\n  init_args:\n    tokenizer: {model}\n")
        return out

    return make


@pytest.fixture
def tiny_model_config(tiny_model_yaml, tmp_path):
    """`tiny_model_config(config_path)`: `tiny_model_yaml` in the test's tmp_path."""
    return lambda config: tiny_model_yaml(config, tmp_path)


@pytest.fixture(scope="module")
def run_pool():
    """A pool of `LRLM_TEST_JOBS` threads (default 2, or 1 on a 1-core machine) for a module whose parametrized
    tests each run an independent one-thread process: the first test starts them all, each test waits for its
    own (`tests/test_fast_dev_run_configs.py`, `tests/test_seed001_commands.py`)."""
    pool = ThreadPoolExecutor(int(os.environ.get("LRLM_TEST_JOBS") or min(2, os.cpu_count() or 1)))
    yield pool
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def selected_params(request):
    """`selected_params(test, name)`: the values of parameter `name` of the items of test function `test` that this
    session runs, in order (what a `run_pool` module starts ahead)."""
    items = request.session.items
    return lambda test, name: [i.callspec.params[name] for i in items if getattr(i, "originalname", None) == test]
