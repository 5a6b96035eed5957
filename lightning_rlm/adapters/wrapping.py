"""What the adapters that replace ``nn.Linear`` layers in place share (dual LoRA, SVD basis).

`WrappedLinear` keeps the frozen layer as ``.base`` and exposes its ``weight``/``bias``/sizes, which some HF
code reads directly. `wrap_linears` finds the targeted Linears (every one but the output embedding, or those
whose names end in a target) and swaps each for a wrapper. `LinearWrappingModel` is the model-level wrapper
that only forwards calls (``forwards_to_wrapped`` tells the static-cache sampler it may look inside), and
the one adapter protocol of the methods: ``adapters(mode)`` switches the two adapters for a block (the
modes name which are on; ``base`` is neither) and ``reference()`` is the KL reference (both off, eval
mode, no grad). ``merge_and_unload(mode)`` folds the adapters of a mode into the Linears' weights and returns
the plain model (what ``lightning-rlm export`` saves): each wrapper gives its update as ``delta_weight()``.
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

    def delta_weight(self) -> Optional[Tensor]:
        """The weight update ``[D_out, D_in]`` of the adapters switched on now (``None``: none is on), so that
        ``base(x) + adapters(x) == x @ (W + delta_weight()).T + b``."""
        raise NotImplementedError


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

    @torch.no_grad()
    def merge_and_unload(self, mode: str) -> nn.Module:
        """The wrapped model with the adapters of ``mode`` folded into plain ``nn.Linear`` weights.

        In place: every wrapper is replaced by its base Linear with ``W + ΔW`` (ΔW computed in the adapters'
        dtype, fp32 on a 16-bit base, then cast to the weight's dtype), so this wrapper is spent afterwards.
        The result is the Hugging Face model itself (``save_pretrained`` / ``from_pretrained`` as usual).
        """
        with self.adapters(mode):
            for name, module in list(self.model.named_modules()):
                if not isinstance(module, WrappedLinear):
                    continue
                base = module.base
                delta = module.delta_weight()
                if delta is not None:
                    base.weight.copy_((base.weight.to(delta.dtype) + delta).to(base.weight.dtype))
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, base)
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)
