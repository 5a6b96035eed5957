"""Several named LoRA adapters on one PEFT model, one active per forward (GAN-RL's separate adapters).

PEFT keeps every adapter's weights on the same frozen base and runs only the active one. Adding an adapter
(:func:`add_named_adapter`) copies an existing adapter's config (rank, alpha, rsLoRA, targets) with fresh
weights (B = 0); :func:`using_adapter` makes one active inside a ``with`` block and switches back after. Each
adapter's parameters are :func:`lora_parameters`, so each can have its own optimizer.

PEFT marks inactive adapters ``requires_grad=False`` whenever it switches or re-enables adapters
(``set_adapter``, leaving ``disable_adapter``), and autograd drops the gradient of a leaf that no longer
requires it at backward time: with several adapters, all are turned back on after every switch
(:func:`lora_grads_on`; call it too after a forward with the adapters disabled).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["add_named_adapter", "lora_grads_on", "lora_parameters", "using_adapter"]


def lora_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of one named adapter of ``model``."""
    return [p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter}." in n]


def lora_grads_on(model: nn.Module) -> None:
    """Every LoRA parameter of ``model`` (all adapters) requires grad again (see the module docstring)."""
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.requires_grad_(True)


def add_named_adapter(model: nn.Module, name: str, like: str = "default") -> None:
    """Add adapter ``name`` to the PEFT ``model`` with ``like``'s config and fresh weights (B = 0), not active."""
    model.add_adapter(name, copy.deepcopy(model.peft_config[like]))
    lora_grads_on(model)


@contextmanager
def using_adapter(model: nn.Module, adapter: str, back: str = "default") -> Iterator[None]:
    """Inside: ``adapter`` is the active one of the PEFT ``model``; after, ``back`` is (grads on for all)."""
    model.set_adapter(adapter)
    lora_grads_on(model)
    try:
        yield
    finally:
        model.set_adapter(back)
        lora_grads_on(model)
