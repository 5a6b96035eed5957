"""Contiguous token windows for next-token training."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_rlm.checks import check_at_least
from lightning_rlm.data.base import TextDataModule
from lightning_rlm.data.sources import TextSource

log = logging.getLogger(__name__)


class WindowDataset(Dataset):
    """Non-overlapping windows of `block_size + 1` tokens over one token stream (input = [:-1], target = [1:])."""

    def __init__(self, tokens: torch.Tensor, block_size: int, starts: torch.Tensor) -> None:
        self.tokens = tokens  # [N]
        self.block_size = block_size
        self.starts = starts  # [num_windows]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.tokens[s : s + self.block_size + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class LMWindowDataModule(TextDataModule):
    """Token windows of `block_size` for next-token training.

    Documents are tokenized and joined (with EOS between them when the tokenizer has one, else a blank
    line), then cut into windows. With `cross_documents=False` windows stay inside documents, and
    documents shorter than a window are dropped.

    Args:
        block_size: tokens per training window (context length).
        cross_documents: let windows span document boundaries.
        See `TextDataModule` for the rest.
    """

    def __init__(
        self,
        source: TextSource,
        block_size: int = 128,
        cross_documents: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        check_at_least(1, block_size=block_size)
        self.block_size = block_size
        self.cross_documents = cross_documents
        self.train_set: WindowDataset | None = None
        self.val_set: WindowDataset | None = None

    def _windows(self, docs: list[str], split: str) -> WindowDataset:
        tok = self.tokenizer
        encoded = [tok.encode(d) for d in docs]
        w = self.block_size + 1
        if self.cross_documents:
            sep = [tok.eos_token_id] if tok.eos_token_id is not None else tok.encode("\n\n")
            stream: list[int] = []
            for i, ids in enumerate(encoded):
                stream.extend(ids if i == 0 else sep + ids)
            if len(stream) < w:
                raise ValueError(
                    f"block_size={self.block_size} is larger than the whole {split} split of "
                    f"{self.source.describe()!r} ({len(stream)} tokens); use a smaller block_size or more data"
                )
            tokens = torch.tensor(stream, dtype=torch.long)
            starts = torch.arange(0, len(stream) - w + 1, self.block_size)
        else:
            longest = max(len(e) for e in encoded)
            if longest < w:
                raise ValueError(
                    f"block_size={self.block_size} is larger than every {split} document of "
                    f"{self.source.describe()!r} (longest has {longest} tokens); use a smaller block_size "
                    "or cross_documents=True"
                )
            kept = [e for e in encoded if len(e) >= w]
            log.info("%s: %d of %d documents shorter than a window dropped", split, len(encoded) - len(kept),
                     len(encoded))
            tokens_list, starts_list, offset = [], [], 0
            for ids in kept:
                tokens_list.extend(ids)
                starts_list.extend(range(offset, offset + len(ids) - w + 1, self.block_size))
                offset += len(ids)
            tokens = torch.tensor(tokens_list, dtype=torch.long)
            starts = torch.tensor(starts_list, dtype=torch.long)
        return WindowDataset(tokens, self.block_size, starts)

    def setup(self, stage: str | None = None) -> None:
        self.load_documents()
        if self.train_set is None:
            self.train_set = self._windows(self.train_docs, "train")
            self.val_set = self._windows(self.val_docs, "val")
            log.info("windows: %d train, %d val of %d tokens", len(self.train_set), len(self.val_set),
                     self.block_size)
        self.save_tokenizer()

    drop_last_train = True

    def collate_fn(self):
        return None  # windows have one length: the default collate stacks them

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
