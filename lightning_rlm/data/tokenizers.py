"""Tokenizers behind one small interface.

`build_tokenizer(spec, texts)` accepts:
- `char`: a character vocabulary built from the corpus (saved with the run as `tokenizer/chars.json`);
- `gpt2`: the GPT-2 byte-level BPE shipped in the data root (`gpt2-tokenizer/gpt2_tokenizer.json`);
- `bpe`: a byte-level BPE trained here with the `tokenizers` library on the training documents
  (`vocab_size` is a setting; cached on disk keyed by the corpus hash and vocab size);
- anything else: a path or name that `transformers.AutoTokenizer.from_pretrained` loads
  (a saved run, an exported model folder, or a hub name for users with network).
Every tokenizer but `char` is a `PreTrainedTokenizerFast` (`.hf`), so it can be saved next to an HF model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from lightning_rlm.data.paths import cache_dir, resolve_data_path

EOS = "<|endoftext|>"
BUILTIN = ("char", "gpt2", "bpe")


class TextTokenizer:
    """encode/decode plus the ids a language model needs."""

    vocab_size: int
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    is_char: bool = False
    hf = None  # the transformers tokenizer, when there is one

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError


class CharTokenizer(TextTokenizer):
    """One id per character seen in the corpus. Unknown characters are an error, not silently dropped."""

    is_char = True

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def from_texts(cls, texts: list[str]) -> CharTokenizer:
        return cls(sorted(set("".join(texts)) | {"\n"}))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "chars.json").write_text(json.dumps(self.chars))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        return cls(json.loads((Path(directory) / "chars.json").read_text()))


class HFTokenizer(TextTokenizer):
    """Any transformers tokenizer; an EOS token is added as pad when the tokenizer has no pad."""

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


def _fast_from_file(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, unk_token=EOS)


def corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def bpe_cache_path(texts: list[str], vocab_size: int) -> Path:
    return cache_dir("tokenizers") / f"bpe-{vocab_size}-{corpus_hash(texts)}.json"


def train_bpe(texts: list[str], vocab_size: int) -> Path:
    """Train (or reuse from the cache) a byte-level BPE on `texts`; return the tokenizer.json path."""
    path = bpe_cache_path(texts, vocab_size)
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: two may train the same one at once
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path


def check_tokenizer_spec(spec: str) -> None:
    """Cheap early check (before reading data): built-in names, an existing path, or a hub-style name."""
    if spec in BUILTIN or spec.startswith("lrlm:") or Path(spec).expanduser().exists():
        return
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec:
        return  # looks like a hub name (org/model): AutoTokenizer decides later
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected 'char', 'gpt2', 'bpe', an existing tokenizer path, "
        "or a hub name such as 'org/model'"
    )


def build_tokenizer(spec: str, texts: Optional[list[str]] = None, vocab_size: int = 2048) -> TextTokenizer:
    """Build the tokenizer named by `spec` (see the module docstring); `texts` are needed for char and bpe."""
    check_tokenizer_spec(spec)
    if spec == "char":
        if texts is None:
            raise ValueError("the char tokenizer is built from the corpus: pass texts")
        return CharTokenizer.from_texts(texts)
    if spec == "gpt2":
        return HFTokenizer(_fast_from_file(resolve_data_path("gpt2-tokenizer/gpt2_tokenizer.json")))
    if spec == "bpe":
        if texts is None:
            raise ValueError("the bpe tokenizer is trained on the corpus: pass texts")
        return HFTokenizer(_fast_from_file(train_bpe(texts, vocab_size)))
    from lightning_rlm.models.base_model import resolve_model_path

    spec = resolve_model_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "chars.json").exists():
        return CharTokenizer.load(path)
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(_fast_from_file(path))
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(spec))
    except Exception as e:  # noqa: BLE001 - re-raised with the spec and the accepted forms
        raise ValueError(
            f"unknown tokenizer {spec!r}: AutoTokenizer could not load it ({type(e).__name__}: {e}). "
            "Expected 'char', 'gpt2', 'bpe', or a tokenizer path/name"
        ) from e
