"""Two LoRA adapters on one model with per-sample gradient routing (Cloud et al. 2024, "Gradient Routing").

Every targeted linear layer (all ``nn.Linear`` of the attention and MLP blocks; not the LM head) becomes

    y = W x + s_r · B_r A_r x + s_f · B_f A_f x            s = alpha / rank  (alpha / sqrt(rank) with rsLoRA)

with a **retain** adapter (kept at deployment) and a **forget** adapter (ablated at deployment, meant to
absorb an unwanted behaviour). Both are active in every training forward and in rollouts. Gradient routing is
set per sample with :meth:`DualLoRAModel.route`: for samples flagged ``True`` the retain branch output is
replaced by its detached copy,

    out_r' = where(flagged[n], out_r.detach(), out_r)       # [N, T, D_out], same value, no retain gradient

so a flagged sample's loss reaches only the forget adapter while an unflagged one updates both.

Why this is exact: the retain parameters of a layer enter the network only through ``out_r`` of that layer,
and samples of a batch never interact in a causal LM forward (attention, norms and MLPs act within a row).
The gradient of a per-sample-additive loss with respect to the retain parameters is therefore the sum over
samples of ``d loss_n / d out_r[n] · d out_r[n] / d theta_r``; the ``where`` removes the flagged terms and
leaves the others untouched (the downstream retain branches still shape ``d loss_n / d out_r[n]`` of an
unflagged sample, as they must). Values are selected, not blended, so the forward output is bit-identical to
the unrouted one.

DDP safety: no parameter ever drops out of the autograd graph. The routed branch keeps ``out_r`` in the graph
(``where`` sends it an exact zero gradient when every row is flagged), and an adapter switched off by
:meth:`~DualLoRAModel.retain_only` / :meth:`~DualLoRAModel.forget_only` / :meth:`~DualLoRAModel.base` while
grad is enabled contributes ``0 · out`` instead of being skipped. So every adapter parameter gets a gradient
tensor (possibly zero) in every backward, and DDP's reducer never waits for an adapter that got no gradient
(``find_unused_parameters`` stays False). Under ``no_grad`` (rollouts, evaluation, the KL reference) a
switched off branch is skipped outright.

Relation to the paper: Cloud et al. route with per-data-point masks on edges of the computational graph,
``m·a + (1-m)·sg(a)``; this is that rule with a 0/1 mask per sequence on one edge per layer (the retain
branch). Departures: the routed regions are two added LoRA adapters (not MLP dimensions added by "expand"
or parts of the full network), labels are per completion rather than per token, and there is no retain-only
fine-tuning after ablation. Adam's momentum still moves the retain adapter on steps where all of its gradients
are zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rlm.adapters.wrapping import LinearWrappingModel, WrappedLinear, wrap_linears

__all__ = ["ADAPTER_MODES", "AdapterMode", "DualLoRALinear", "DualLoRAModel", "LoRABranch", "add_dual_lora"]

AdapterMode = Literal["both", "retain_only", "forget_only", "base"]
ADAPTER_MODES: tuple[str, ...] = ("both", "retain_only", "forget_only", "base")
_MODE_SWITCHES = {  # mode -> (retain on, forget on)
    "both": (True, True),
    "retain_only": (True, False),
    "forget_only": (False, True),
    "base": (False, False),
}


@dataclass
class _AdapterState:
    """Switches shared by every wrapped layer of one model (a plain object: not saved in the state dict)."""

    retain_on: bool = True
    forget_on: bool = True
    flagged: Optional[Tensor] = None  # [N] bool: samples whose gradient must not reach the retain adapter


class LoRABranch(nn.Module):
    """One low-rank update ``scale · B A x``; ``B`` starts at zero so the adapter starts as a no-op."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, use_rslora: bool,
        device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # [r, D_in]
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))  # [D_out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the nn.Linear / PEFT default for A
        self.rank = rank
        self.scale = alpha / (math.sqrt(rank) if use_rslora else rank)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale  # [..., D_out]

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scale  # [D_out, D_in]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class DualLoRALinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus a retain and a forget :class:`LoRABranch`, switched by a shared state."""

    def __init__(
        self, base: nn.Linear, retain_rank: int, forget_rank: int, retain_alpha: float, forget_alpha: float,
        use_rslora: bool, state: _AdapterState,
    ) -> None:
        super().__init__(base)
        # fp32 adapters on a low-precision base (as PEFT does): the updates are small and Adam needs the range
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        d_in, d_out, kw = base.in_features, base.out_features, dict(device=base.weight.device, dtype=dtype)
        self.retain = LoRABranch(d_in, d_out, retain_rank, retain_alpha, use_rslora, **kw)
        self.forget = LoRABranch(d_in, d_out, forget_rank, forget_alpha, use_rslora, **kw)
        self._state = state

    def _branch(self, branch: LoRABranch, x: Tensor, on: bool, flagged: Optional[Tensor]) -> Optional[Tensor]:
        if not on:
            if torch.is_grad_enabled() and branch.A.requires_grad:
                return branch(x) * 0.0  # exact zero that keeps the parameters in the graph (DDP)
            return None
        out = branch(x)  # [N, T, D_out]
        if flagged is not None:
            if flagged.shape[0] != out.shape[0]:
                raise ValueError(f"route(flagged) has {flagged.shape[0]} entries but the forward has a batch "
                                 f"of {out.shape[0]}")
            routed = flagged.to(out.device).view(-1, *([1] * (out.dim() - 1)))  # [N, 1, 1]
            # values selected, not blended: same output; flagged rows send no gradient to the retain adapter
            out = torch.where(routed, out.detach(), out)
        return out

    def delta_weight(self) -> Optional[Tensor]:
        st = self._state
        deltas = [b.delta_weight() for b, on in ((self.retain, st.retain_on), (self.forget, st.forget_on)) if on]
        return sum(deltas[1:], deltas[0]) if deltas else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # [N, T, D_out]
        st = self._state
        xa = x.to(self.retain.A.dtype)
        for delta in (self._branch(self.retain, xa, st.retain_on, st.flagged),
                      self._branch(self.forget, xa, st.forget_on, None)):
            if delta is not None:
                y = y + delta.to(y.dtype)
        return y


class DualLoRAModel(LinearWrappingModel):
    """A causal LM whose targeted linear layers carry a retain and a forget LoRA adapter.

    Calls are forwarded to the wrapped model, so it drops into
    :func:`~lightning_rlm.rollout.sample_completions` and :func:`~lightning_rlm.rollout.completion_logprobs`.
    The base weights are frozen; only the adapters train.

    Args:
        model: an HF causal LM (modified in place: its linear layers are wrapped).
        retain_rank, forget_rank: LoRA ranks (>= 1; they may differ).
        retain_alpha, forget_alpha: LoRA alphas (default: the rank, i.e. scale 1).
        use_rslora: scale by ``alpha / sqrt(rank)``.
        target_modules: suffixes of module names to wrap (e.g. ``["q_proj", "v_proj"]``); ``None`` wraps every
            ``nn.Linear`` except the output embedding (all linear layers of attention and MLP).
    """

    SWITCHES = ("retain_on", "forget_on")
    MODES = _MODE_SWITCHES

    def __init__(
        self,
        model: nn.Module,
        retain_rank: int = 32,
        forget_rank: int = 32,
        retain_alpha: Optional[float] = None,
        forget_alpha: Optional[float] = None,
        use_rslora: bool = False,
        target_modules: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        for name, rank in (("retain_rank", retain_rank), ("forget_rank", forget_rank)):
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {rank!r}")
        model.requires_grad_(False)
        self.model = model
        self._state = _AdapterState()
        self.target_names = wrap_linears(model, target_modules, lambda name, base: DualLoRALinear(
            base, retain_rank, forget_rank,
            float(retain_rank if retain_alpha is None else retain_alpha),
            float(forget_rank if forget_alpha is None else forget_alpha), use_rslora, self._state,
        ))

    # ----- parameters -----------------------------------------------------------------------------------
    def dual_layers(self) -> Iterator[DualLoRALinear]:
        return (m for m in self.model.modules() if isinstance(m, DualLoRALinear))

    def retain_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.dual_layers() for p in layer.retain.parameters()]

    def forget_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.dual_layers() for p in layer.forget.parameters()]

    # ----- routing and ablation -------------------------------------------------------------------------
    @contextmanager
    def route(self, flagged: Tensor) -> Iterator[DualLoRAModel]:
        """Within the block, rows with ``flagged[n]`` True send no gradient to the retain adapter.

        ``flagged`` is ``[N]`` (bool or 0/1), one entry per row of every forward run inside the block. Only
        the forward needs to be inside: the routing is recorded in the autograd graph.
        """
        if flagged.dim() != 1:
            raise ValueError(f"flagged must be 1-D [N], got shape {tuple(flagged.shape)}")
        previous = self._state.flagged
        self._state.flagged = flagged.bool()
        try:
            yield self
        finally:
            self._state.flagged = previous

    def retain_only(self) -> AbstractContextManager[DualLoRAModel]:
        """Ablate the forget adapter (the deployed model)."""
        return self.adapters("retain_only")

    def forget_only(self) -> AbstractContextManager[DualLoRAModel]:
        """Ablate the retain adapter."""
        return self.adapters("forget_only")


def add_dual_lora(model: nn.Module, *args: Any, **kwargs: Any) -> DualLoRAModel:
    """Wrap ``model`` (in place) with a retain and a forget LoRA adapter; arguments as :class:`DualLoRAModel`."""
    return DualLoRAModel(model, *args, **kwargs)
