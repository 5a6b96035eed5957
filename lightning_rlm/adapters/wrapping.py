"""What the adapters that replace ``nn.Linear`` layers in place share (dual LoRA, SVD basis).

`WrappedLinear` keeps the frozen layer as ``.base`` and exposes its ``weight``/``bias``/sizes, which some HF
code reads directly. `wrap_linears` finds the targeted Linears (every one but the output embedding, or those
whose names end in a target) and swaps each for a wrapper. `LinearWrappingModel` is the model-level wrapper
that only forwards calls (``forwards_to_wrapped`` tells the static-cache sampler it may look inside), and
the one adapter protocol of the methods: ``adapters(mode)`` switches the two adapters for a block (the
modes name which are on; ``base`` is neither) and ``reference()`` is the KL reference (both off, eval
mode, no grad).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn


class WrappedLinear(nn.Module):
    """Base of Linear wrappers: the frozen layer in ``.base`` and its attributes passed through."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    # some HF code reads projection weights directly (dtype checks, fused kernels)
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


def wrap_linears(model: nn.Module, target_modules: Optional[Sequence[str]],
                 make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace each targeted ``nn.Linear`` (``None``: all but the output embedding) by ``make(name, layer)``;
    returns the replaced names in model order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
        and (target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules))
    ]
    if not targets:
        raise ValueError(f"no nn.Linear module matches target_modules={target_modules!r}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(name, getattr(parent, child)))
    return targets


class LinearWrappingModel(nn.Module):
    """A causal LM (in ``.model``) whose Linears carry two adapters; calls are forwarded unchanged.

    A subclass sets ``_state`` (switches shared by its layers), ``SWITCHES`` (the names of the two on/off
    attributes of the state) and ``MODES`` (mode -> the two switch values, with ``base`` = both off).
    """

    # Read by the static-cache sampler: this wrapper only forwards, the adapters live in the wrapped Linears.
    forwards_to_wrapped = True
    SWITCHES: ClassVar[tuple[str, str]]
    MODES: ClassVar[dict[str, tuple[bool, bool]]]
    _state: Any

    @contextmanager
    def adapters(self, mode: str) -> Iterator[Any]:
        """Switch the adapters for the block (see ``MODES``); restored on exit."""
        if mode not in self.MODES:
            raise ValueError(f"{type(self).__name__} adapter mode must be one of {tuple(self.MODES)}, got {mode!r}")
        previous = tuple(getattr(self._state, name) for name in self.SWITCHES)
        for name, on in zip(self.SWITCHES, self.MODES[mode]):
            setattr(self._state, name, on)
        try:
            yield self
        finally:
            for name, on in zip(self.SWITCHES, previous):
                setattr(self._state, name, on)

    def base(self) -> AbstractContextManager[Any]:
        """Both adapters off: outputs equal the base model's exactly."""
        return self.adapters("base")

    @contextmanager
    def reference(self) -> Iterator[Any]:
        """The KL reference: both adapters off, eval mode (no dropout), no grad; restored on exit."""
        was_training = self.training
        self.eval()
        try:
            with self.adapters("base"), torch.no_grad():
                yield self
        finally:
            self.train(was_training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)
