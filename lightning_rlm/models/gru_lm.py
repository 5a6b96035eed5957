"""A GRU next-token model: embedding → n-layer GRU → head (linear, or a 2-layer MLP)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn


class GRULanguageModel(nn.Module):
    """Character- or token-level GRU language model.

    Args:
        vocab_size: number of token ids (filled in from the tokenizer by the method).
        embed_dim: token embedding width.
        hidden_size: GRU hidden width.
        num_layers: stacked GRU layers.
        head: `linear` (hidden → vocab) or `mlp` (hidden → hidden → GELU → vocab).
        dropout: between GRU layers and before the head.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 256,
        hidden_size: int = 256,
        num_layers: int = 2,
        head: Literal["linear", "mlp"] = "linear",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"vocab_size, hidden_size and num_layers must be >= 1, got {vocab_size}, {hidden_size}, "
                f"{num_layers}"
            )
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_size, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        if head == "linear":
            self.head = nn.Linear(hidden_size, vocab_size)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                      nn.Linear(hidden_size, vocab_size))
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")

    def hidden_states(self, input_ids: torch.Tensor, state: Optional[torch.Tensor] = None):
        """Top-layer states [B, T, H] and the final recurrent state [L, B, H]."""
        out, state = self.gru(self.embed(input_ids), state)  # [B, T, H]
        return out, state

    def forward(self, input_ids: torch.Tensor, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        out, _ = self.hidden_states(input_ids, state)
        return self.head(self.drop(out))  # [B, T, V]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample a continuation; returns the new ids [B, max_new_tokens]. O(1) per token (recurrent state)."""
        out, state = self.hidden_states(input_ids)
        logits = self.head(out[:, -1])  # [B, V]
        new = []
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # [B, 1]
            new.append(nxt)
            out, state = self.hidden_states(nxt, state)
            logits = self.head(out[:, -1])
        return torch.cat(new, dim=1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample one id per row from logits [B, V] (greedy when temperature == 0). Returns [B, 1]."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
