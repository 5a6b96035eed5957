import pytest

from lightning_rlm.data import CharTokenizer, TextSource, build_tokenizer
from lightning_rlm.data.tokenizers import bpe_cache_path


def test_char_round_trip_and_save(tmp_path, shared_data):
    text = TextSource(preset="shakespeare").read()[0]
    tok = build_tokenizer("char", [text])
    assert tok.vocab_size == 65
    sample = text[:500]
    assert tok.decode(tok.encode(sample)) == sample
    tok.save(tmp_path / "tok")
    again = build_tokenizer(str(tmp_path / "tok"))
    assert isinstance(again, CharTokenizer) and again.encode(sample) == tok.encode(sample)
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        tok.encode("ü")


def test_gpt2_round_trip(shared_data, gpt2_tokenizer_file):
    tok = build_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256
    s = "Once upon a time, there was a little girl named Lily."
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode(s)) == s


def test_bpe_trained_here_is_cached(shared_data):
    docs = TextSource(preset="tinystories", max_documents=200).read()
    tok = build_tokenizer("bpe", docs, vocab_size=400)
    path = bpe_cache_path(docs, 400)
    assert path.exists() and tok.vocab_size == 400
    s = docs[3]
    assert tok.decode(tok.encode(s)) == s
    mtime = path.stat().st_mtime_ns
    build_tokenizer("bpe", docs, vocab_size=400)
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    assert bpe_cache_path(docs, 500) != path and bpe_cache_path(docs[:-1], 400) != path


def test_autotokenizer_path(tmp_path, shared_data, gpt2_tokenizer_file):
    build_tokenizer("gpt2").save(tmp_path / "saved")
    tok = build_tokenizer(str(tmp_path / "saved"))
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("spec", ["charr", "./no/such/dir", "not a tokenizer"])
def test_unknown_tokenizer(spec):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer(spec, ["abc"])


def test_bpe_training_leaves_another_process_s_temporary_file_alone(tmp_path, monkeypatch):
    """Two processes that train the same BPE at once (parallel runs on one cache) each write their own temporary
    file: a file another writer has in flight at the shared name is neither overwritten nor moved."""
    monkeypatch.setenv("LRLM_CACHE_DIR", str(tmp_path))
    docs = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot"] * 5
    path = bpe_cache_path(docs, 280)
    path.parent.mkdir(parents=True, exist_ok=True)
    other = path.with_suffix(".tmp")  # the name every writer used before: a writer's half-written file
    other.write_text("half of another writer's file")
    tok = build_tokenizer("bpe", docs, vocab_size=280)
    assert path.is_file() and tok.decode(tok.encode(docs[1])) == docs[1]
    assert other.read_text() == "half of another writer's file"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp") and p != other]
