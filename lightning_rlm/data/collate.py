"""Padding helpers shared by the prompt and prefix/completion DataModules."""

from __future__ import annotations

import torch


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists (prompts end where generation starts). Returns ids [B, L] and mask [B, L]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists (completions start right after the prompt). Returns ids [B, L] and mask [B, L]."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


class DictCollator:
    """Collate dict examples: `*_ids` lists are padded (left for prompts, right otherwise), the rest listed."""

    def __init__(self, pad_id: int, left_padded: tuple[str, ...] = ("prompt_ids", "prefix_ids")) -> None:
        self.pad_id = pad_id
        self.left_padded = left_padded

    def __call__(self, examples: list[dict]) -> dict:
        batch: dict = {}
        for key in examples[0]:
            values = [ex[key] for ex in examples]
            if key.endswith("_ids"):
                pad = pad_left if key in self.left_padded else pad_right
                batch[key], batch[key[: -len("_ids")] + "_mask"] = pad(values, self.pad_id)
            else:
                batch[key] = values
        return batch
