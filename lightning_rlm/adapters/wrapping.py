"""What the adapters that replace ``nn.Linear`` layers in place share (dual LoRA, SVD basis).

`WrappedLinear` keeps the frozen layer as ``.base`` and exposes its ``weight``/``bias``/sizes, which some HF
code reads directly. `wrap_linears` finds the targeted Linears (every one but the output embedding, or those
whose names end in a target) and swaps each for a wrapper. `LinearWrappingModel` is the model-level wrapper
that only forwards calls (``forwards_to_wrapped`` tells the static-cache sampler it may look inside).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

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
    """A causal LM (in ``.model``) whose Linears carry adapters; calls are forwarded unchanged."""

    # Read by the static-cache sampler: this wrapper only forwards, the adapters live in the wrapped Linears.
    forwards_to_wrapped = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)
