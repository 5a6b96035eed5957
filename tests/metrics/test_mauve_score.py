"""MAUVE and its featurizers: offline MiniLM, pooling of HF/policy featurizers, real-vs-shuffled text."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_rlm.metrics import (
    HFFeaturizer,
    MiniLMFeaturizer,
    PolicyFeaturizer,
    compute_mauve,
    compute_mauve_from_features,
)
from lightning_rlm.metrics import mauve as mauve_module


def _paragraphs(root: Path) -> list[str]:
    text = (root / "tinystories" / "tinystories_val_head.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def minilm() -> MiniLMFeaturizer:
    return MiniLMFeaturizer(num_threads=1)  # one thread is fastest on a shared 2-core CPU


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted while loading an offline model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_minilm_loads_offline_and_gives_unit_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _block_network(monkeypatch)
    monkeypatch.setattr(mauve_module, "_MINILM_CACHE", {})  # force a real load from the package folder
    feats = MiniLMFeaturizer(batch_size=2, device="cpu")(
        ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Stock markets fell sharply today."]
    )
    assert feats.shape == (3, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    cos = feats @ feats.T  # [3, 3]
    assert cos[0, 1] > cos[0, 2] + 0.2  # paraphrases are closer than unrelated text


@pytest.mark.slow
def test_minilm_loads_in_a_fresh_offline_process(tmp_path: Path) -> None:
    # A fresh interpreter with HF_HUB_OFFLINE=1 set before transformers is imported and an empty HF cache.
    code = (
        "from lightning_rlm.metrics.mauve import MiniLMFeaturizer\n"
        "import numpy as np\n"
        "f = MiniLMFeaturizer(device='cpu')(['hello world', 'once upon a time'])\n"
        "assert f.shape == (2, 384), f.shape\n"
        "assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_minilm_is_order_preserving_and_batch_independent(minilm: MiniLMFeaturizer) -> None:
    texts = ["short", "a much longer text about a dog who ran to the park", "medium length text"]
    one_batch = minilm(texts)
    minilm_small = MiniLMFeaturizer(batch_size=1, num_threads=1)  # shares the cached model
    np.testing.assert_allclose(minilm_small(texts), one_batch, atol=1e-5)
    np.testing.assert_allclose(minilm(texts[::-1]), one_batch[::-1], atol=1e-5)


def test_mauve_real_text_beats_word_shuffled_text(minilm: MiniLMFeaturizer, shared_data: Path) -> None:
    paras = _paragraphs(shared_data)
    rng = random.Random(0)
    rng.shuffle(paras)
    n = 150
    p, q = paras[:n], paras[n : 2 * n]  # disjoint samples of real TinyStories paragraphs

    def shuffle_words(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    q_shuffled = [shuffle_words(t) for t in q]
    t0 = time.perf_counter()
    p_f, q_f, qs_f = minilm(p), minilm(q), minilm(q_shuffled)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="biased"):
        real = compute_mauve_from_features(p_f, q_f, n_seeds=5)
    shuffled = compute_mauve_from_features(p_f, qs_f, n_seeds=5, warn_small=False)
    t_score = time.perf_counter() - t0
    print(
        f"\nMAUVE {n} vs {n} (MiniLM, 5 seeds): real {real['mauve']:.3f}±{real['mauve_std']:.3f}, "
        f"shuffled {shuffled['mauve']:.3f}±{shuffled['mauve_std']:.3f}; "
        f"featurize {3 * n} texts {t_feat:.1f}s, score {t_score:.1f}s"
    )
    # measured over 6 random 150/150 splits: real 0.94-0.99, shuffled 0.76-0.84
    assert real["mauve"] > 0.85
    assert real["mauve"] > shuffled["mauve"] + 0.05
    assert real["mauve_star"] > shuffled["mauve_star"]
    assert real["frontier_integral"] < shuffled["frontier_integral"]
    assert real["num_buckets"] == 15 and real["n_p"] == n


def test_compute_mauve_contract() -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=(40, 8)).astype(np.float32)
    far = rng.normal(loc=3.0, size=(40, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match="biased"):
        same = compute_mauve_from_features(p, p, num_buckets=4, n_seeds=2, kmeans_num_redo=1)
    assert same["mauve"] == pytest.approx(1.0, abs=1e-3)  # identical samples share every histogram bin
    assert same["mauve_std"] == pytest.approx(0.0, abs=1e-6)
    assert set(same) >= {
        "mauve",
        "mauve_std",
        "mauve_star",
        "mauve_star_std",
        "frontier_integral",
        "frontier_integral_std",
        "frontier_integral_star",
        "frontier_integral_star_std",
        "num_buckets",
        "score_seconds",
    }
    # installed mauve-text (>= 0.4) computes MAUVE*, so it must be a real number, not NaN
    assert 0.0 < same["mauve_star"] <= 1.0
    diff = compute_mauve_from_features(p, np.concatenate([p[:20], far[:20]]), num_buckets=4, warn_small=False)
    assert diff["mauve"] < same["mauve"]
    with pytest.raises(ValueError):
        compute_mauve_from_features(p[:1], p, warn_small=False)
    with pytest.raises(ValueError):
        compute_mauve_from_features(p[:3], p[:3], num_buckets=10, warn_small=False)


def test_compute_mauve_with_texts(minilm: MiniLMFeaturizer, shared_data: Path) -> None:
    paras = _paragraphs(shared_data)
    out = compute_mauve(paras[:30], paras[30:60], minilm, warn_small=False, kmeans_num_redo=1)
    assert out["num_buckets"] == 3  # auto: max(2, 30 // 10)
    assert 0.0 < out["mauve"] <= 1.0 and out["featurize_seconds"] > 0


# ------------------------------------------------------------------------ HF and policy featurizers
@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tokenizer_file: Path) -> tuple[torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(gpt2_tokenizer_file), eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval(), tok


def test_policy_featurizer_pools_last_real_token(tiny_gpt2: tuple[torch.nn.Module, object]) -> None:
    model, tok = tiny_gpt2
    texts = ["Once upon a time there was a cat.", "Hi.", "The dog ran to the big red ball in the park."]
    last = PolicyFeaturizer(model, tok, pooling="last", batch_size=3)(texts)  # [3, 32]
    mean = PolicyFeaturizer(model, tok, pooling="mean", batch_size=3)(texts)
    assert last.shape == (3, 32) and mean.shape == (3, 32)
    for i, text in enumerate(texts):  # unpadded, one at a time
        ids = torch.tensor([tok(text)["input_ids"]])  # [1, T]
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [T, D]
        np.testing.assert_allclose(last[i], h[-1].numpy(), atol=1e-5)
        np.testing.assert_allclose(mean[i], h.mean(0).numpy(), atol=1e-5)
    tok.padding_side = "left"  # a generation-style tokenizer: the featurizer pads right internally
    try:
        np.testing.assert_allclose(PolicyFeaturizer(model, tok, batch_size=3)(texts), last, atol=1e-5)
        assert tok.padding_side == "left"  # and restores the caller's setting
    finally:
        tok.padding_side = "right"
    model.train()
    PolicyFeaturizer(model, tok)(texts[:1])
    assert model.training  # training mode restored
    model.eval()


def test_hf_featurizer_from_local_path(tiny_gpt2: tuple[torch.nn.Module, object], tmp_path: Path) -> None:
    model, tok = tiny_gpt2
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    texts = ["Once upon a time.", "The end of the story came."]
    feats = HFFeaturizer(str(tmp_path), pooling="last", device="cpu")(texts)
    np.testing.assert_allclose(feats, PolicyFeaturizer(model, tok)(texts), atol=1e-5)
    with pytest.raises(ValueError):
        HFFeaturizer(str(tmp_path), pooling="max")  # type: ignore[arg-type]
