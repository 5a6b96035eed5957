"""What every DataModule shares: read a source, split it by document, build the tokenizer, save it."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader

from lightning_rlm.checks import check_at_least, check_fraction, check_prompt_template
from lightning_rlm.data.chat import ChatFormat
from lightning_rlm.data.collate import DictCollator
from lightning_rlm.data.paths import resolve_data_path
from lightning_rlm.data.sampler import ResumableSampler
from lightning_rlm.data.sources import TextSource
from lightning_rlm.data.tokenizers import (
    HFTokenizer,
    TextTokenizer,
    build_tokenizer,
    check_tokenizer_spec,
    train_bpe,
)

log = logging.getLogger(__name__)


def split_documents_by_seed(
    docs: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Train/val split by document, deterministic by seed.

    A single document (one corpus, e.g. Tiny Shakespeare) is split by its tail instead: the last
    `val_fraction` of its characters is validation, as nanoGPT and char-rnn do.
    """
    check_fraction(val_fraction=val_fraction)
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    return split_rows_by_seed(docs, val_fraction, seed)


def split_rows_by_seed(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Train/val split of rows (at least one in val), each side in the original order, deterministic by seed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_fraction))
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


class TextDataModule(L.LightningDataModule):
    """Base class: `source` + `tokenizer` + a seeded split. Subclasses build datasets in `setup`.

    Args:
        source: where documents come from (a preset, a file, or a hub dataset).
        tokenizer: `char`, `gpt2`, `bpe`, or a path/name for `AutoTokenizer`.
        tokenizer_vocab_size: vocab size of a `bpe` tokenizer trained here.
        batch_size: examples per step over all processes (each of W processes takes batch_size / W).
        val_fraction: fraction of documents held out for validation.
        seed: seeds the split (and any per-document random windows).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: str = "char",
        tokenizer_vocab_size: int = 2048,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_tokenizer_spec(tokenizer)  # an unknown tokenizer fails at config time, not after loading data
        check_at_least(1, batch_size=batch_size)
        check_fraction(val_fraction=val_fraction)
        if source.resolved_format() in ("text", "jsonl", "parquet") and source.path != "<prompts>":
            resolve_data_path(source.path)  # a missing file fails at config time, before any run folder
        self.source = source
        self.tokenizer_spec = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Optional[TextTokenizer] = None
        self.train_docs: list[str] = []
        self.val_docs: list[str] = []
        self._consumed: tuple[int, int] = (0, 0)  # (epoch, training batches used in it)
        self._resume_from: Optional[tuple[int, int]] = None
        self._train_sampler: Optional[ResumableSampler] = None

    def prepare_data(self) -> None:
        # Runs once per node before setup: train the BPE into the cache so DDP ranks only read it.
        if self.tokenizer_spec == "bpe":
            train, _ = split_documents_by_seed(self.source.read(), self.val_fraction, self.seed)
            train_bpe(train, self.tokenizer_vocab_size)

    def load_documents(self) -> None:
        """Read, split and tokenize-ready the corpus (idempotent)."""
        if self.tokenizer is not None:
            return
        docs = self.source.read()
        self.train_docs, self.val_docs = split_documents_by_seed(docs, self.val_fraction, self.seed)
        # char vocab from the whole corpus (so val has no unknown chars); BPE trained on train docs only
        texts = docs if self.tokenizer_spec == "char" else self.train_docs
        self.tokenizer = build_tokenizer(self.tokenizer_spec, texts, self.tokenizer_vocab_size)
        log.info(
            "%s: %d train / %d val documents, vocab %d",
            self.source.describe(), len(self.train_docs), len(self.val_docs), self.tokenizer.vocab_size,
        )

    def save_tokenizer(self) -> None:
        """Save the tokenizer with the run, so generation and export use the same vocabulary."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.logger is None:
            return  # no run folder (logger=False): nothing to save next to
        log_dir = trainer.logger.log_dir or trainer.log_dir  # trainer.log_dir broadcasts: read on every rank
        if log_dir and trainer.is_global_zero:
            self.tokenizer.save(Path(log_dir) / "tokenizer")

    def set_prompt_format(self, prompt_template: Optional[str], chat: Optional[ChatFormat] = None) -> None:
        """Keep how subclasses render prompts: `prompt_template` (None, or a string with `{text}`), then `chat`."""
        check_prompt_template(prompt_template)
        self.prompt_template = prompt_template
        self.chat = chat

    def render_prompt(self, text: str) -> str:
        """`text` through `prompt_template`, then as a user turn of the tokenizer's chat template (`chat`)."""
        if self.prompt_template is not None:
            text = self.prompt_template.format(text=text)
        return text if self.chat is None else self.chat.render(self.tokenizer, text)

    @property
    def hf_tokenizer(self):
        return self.tokenizer.hf if isinstance(self.tokenizer, HFTokenizer) else None

    # ----- loaders: `train_set` / `val_set` of each subclass --------------------------------------------------
    drop_last_train = False  # RL prompt batches and LM windows keep a fixed size; SFT pairs use every example

    def collate_fn(self):
        """Dict examples of ragged id lists (prompts, prefix/completion pairs) are padded into tensors."""
        return DictCollator(self.tokenizer.pad_token_id)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        drop_last = shuffle and self.drop_last_train and len(ds) >= self.batch_size
        return DataLoader(ds, batch_sampler=self.batch_sampler(len(ds), shuffle, drop_last),
                          num_workers=self.num_workers, collate_fn=self.collate_fn(),
                          generator=self.loader_generator())

    # ----- sharding and mid-epoch resume (shared by every subclass) -------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "Trainer(use_distributed_sampler=True) would re-shard this DataModule's batches; set it to False "
                "(the lightning-rlm CLI does): the DataModule shards each global batch over processes itself"
            )
        return trainer.global_rank, trainer.world_size

    def per_rank_batch_size(self) -> int:
        """`batch_size` is the global batch: each of the W processes takes batch_size / W examples."""
        _, world = self._rank_world()
        if self.batch_size % world:
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch and must split evenly over {world} "
                f"processes; use a multiple of {world}"
            )
        return self.batch_size // world

    def batch_sampler(self, num_items: int, shuffle: bool, drop_last: bool) -> BatchSampler:
        """Seeded, sharded by global batch, resumable (see `ResumableSampler`); one per train loader."""
        rank, world = self._rank_world()
        sampler = ResumableSampler(num_items, self.per_rank_batch_size(), shuffle=shuffle, seed=self.seed,
                                   rank=rank, world_size=world, drop_last=drop_last)
        if shuffle:
            if self._resume_from is not None:
                sampler.resume(*self._resume_from)
                self._resume_from = None
            self._train_sampler = sampler
        return BatchSampler(sampler, self.per_rank_batch_size(), drop_last=False)

    def loader_generator(self) -> torch.Generator:
        """For DataLoader's worker base seed, which it otherwise draws from the global RNG at every `iter()`
        (so a validation pass would shift the training stream)."""
        return torch.Generator().manual_seed(self.seed)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Runs once per batch the trainer actually uses (after prefetching): count training batches per epoch.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_sampler is not None:
            epoch = self._train_sampler.epoch
            if epoch != self._consumed[0]:
                self._consumed = (epoch, 0)
            self._consumed = (epoch, self._consumed[1] + 1)
        return batch

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where in which epoch the training data stopped."""
        return {"epoch": self._consumed[0], "batches": self._consumed[1]}

    def load_state_dict(self, state_dict: dict) -> None:
        epoch, batches = int(state_dict.get("epoch", 0)), int(state_dict.get("batches", 0))
        self._consumed = (epoch, batches)
        self._resume_from = (epoch, batches)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
