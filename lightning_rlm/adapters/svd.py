"""SVD-basis adapter (one trainable knob per singular axis) and hack-direction gradient projection.

**Adapter.** Every targeted ``nn.Linear`` (attention and MLP projections; never the LM head) with weight
``W [D_out, D_in] = U Σ Vᵀ`` (thin SVD, ``r = min(D_in, D_out)``) becomes

    y = W x + U · diag(δS + δS_hack) · Vᵀ x          U [D_out, r], Vᵀ = Vh [r, D_in], δS, δS_hack [r]

computed as ``base(x) + U (s ⊙ (Vh x))``: ``W`` is never rebuilt from its factors, so with
``δS = δS_hack = 0`` the added term is an exact ``0.0`` and the outputs are bit-identical to the base model
(``y + 0.0 == y``). ``δS`` is the main trainable vector; ``δS_hack`` is a quarantine that only the ``route``
projection feeds, and that evaluation can zero (mode ``no_hack``) to ablate what was routed there. The
reference policy of the KL term is the same model with both vectors switched off (:meth:`SVDAdapterModel.
reference`): no second model. Only the ``2 r`` knobs per module train (2 · 1344 per transformer layer of the
tiny Llama).

**Memory.** Each wrapped layer keeps ``U [D_out, r]`` and ``Vh [r, D_in]`` as buffers (plus ``Σ [r]``), i.e.
``r · (D_in + D_out)`` numbers: twice the weight for a square layer, 1.25x for a 4:1 MLP layer, stored in
the weight's dtype (fp32 when the weight is 16-bit). For the tiny Llama of this repo (hidden 192, MLP 768,
4 layers, fp32): per layer 4 · 2 · 192² (q/k/v/o) + 3 · 192 · (192 + 768) (gate/up/down) = 0.85 M floats, so
3.39 M floats = 13.6 MB in all, against 9.4 MB for the wrapped weights themselves (1.44x). For a 7B Llama
(4096 / 11008, 32 layers) it is 10.2 G numbers, 41 GB in fp32 (1.6x the weights' count). The buffers are
not saved in checkpoints (they are recomputed, or loaded from the SVD cache).

**SVD cache.** ``add_svd_adapter(..., cache_dir=d)`` stores one file per module, ``d/<module name>.pt``,
with the factors and the SHA-256 of the weight they were computed from. A later build loads the factors
instead of recomputing them; a file whose hash differs from the current weight is a stale cache and raises
:class:`StaleSVDCacheError` naming the module (delete the folder, or give another one). Callers that want
automatic invalidation key the folder itself by :func:`weights_fingerprint` (as ``ProjectedGRPO`` does).

**Hack direction** (per module, :func:`hack_axes`). From ``n`` contrastive pairs (same prompt; a hacking
and a clean completion) take the per-module gradients of the completion NLL (summed over its tokens) with
respect to ``δS``, and their differences ``d_i = ∇NLL(clean_i) - ∇NLL(hack_i)`` [r]: ``d_i`` is the
gradient-descent step on ``NLL(hack) - NLL(clean)``, i.e. the direction in δS space that makes the hack more
likely than the clean text. Stack ``D [n, r]``, take its SVD ``D = P Λ Qᵀ`` and keep the top ``top_k`` rows of
``Qᵀ`` whose singular value is at least ``noise_floor · λ_1`` (the noise floor drops weak axes; an all-zero
``D`` keeps none). Each kept axis ``q_j`` is oriented by majority vote: flipped when most pairs have
``d_i · q_j < 0`` (ties broken by the sign of ``Σ_i d_i · q_j``), so ``+q_j`` points hack-ward.

**Projection** of the δS gradient ``g`` [r] of a module with hack axes ``V [k, r]`` (orthonormal rows), per
step after the backward (and the DDP all-reduce), before clipping:

    c = V g                      [k]   coefficients; the descent step -g moves along +v_j iff c_j < 0
    c⁻ = min(c, 0)               [k]   only the hack-ward part (one-sided)
    removed = Vᵀ c⁻              [r]
    erase:  g ← g - removed            (now V g = max(c, 0): the step has no hack-ward component)
    route:  g ← g - removed,  g_hack ← removed     (the autograd gradient of δS_hack, which equals g
                                                    because the forward uses δS + δS_hack, is replaced)
    measure_only: g unchanged (only the cosine and the would-be-removed share are logged)

With AdamW the gradient is normalised per coordinate afterwards, so ``erase`` guarantees a hack-free
*gradient*, not a hack-free *update* (momentum from earlier steps and the per-coordinate scaling can still
move δS along ``+v``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_rlm.adapters.wrapping import LinearWrappingModel, WrappedLinear, wrap_linears
from lightning_rlm.checks import check_at_least
from lightning_rlm.rollout.generate import completion_logprobs

__all__ = [
    "DEFAULT_SVD_TARGETS",
    "PROJECTIONS",
    "SVD_MODES",
    "HackAxes",
    "ProjectionStats",
    "SVDAdapterModel",
    "SVDLinear",
    "StaleSVDCacheError",
    "add_svd_adapter",
    "cached_svd",
    "compute_svd",
    "contrastive_grad_diffs",
    "erase_hack_component",
    "hack_axes",
    "hack_component",
    "hack_cosine",
    "project_gradients",
    "route_hack_component",
    "weight_sha256",
    "weights_fingerprint",
]

DEFAULT_SVD_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj")
SVDMode = Literal["both", "no_hack", "hack_only", "base"]
SVD_MODES: tuple[str, ...] = ("both", "no_hack", "hack_only", "base")
_MODE_SWITCHES = {  # mode -> (δS on, δS_hack on)
    "both": (True, True),
    "no_hack": (True, False),
    "hack_only": (False, True),
    "base": (False, False),
}
Projection = Literal["none", "measure_only", "erase", "route"]
PROJECTIONS: tuple[str, ...] = ("none", "measure_only", "erase", "route")


class StaleSVDCacheError(RuntimeError):
    """A cached SVD was computed from a different weight than the module now holds."""


# ----- SVD and its cache ---------------------------------------------------------------------------------
def weight_sha256(weight: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (any dtype, any device)."""
    w = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(hashes: Mapping[str, str]) -> str:
    """One short key for a set of ``{module name: weight sha256}`` (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}={hashes[name]};".encode())
    return h.hexdigest()[:16]


def compute_svd(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``W [D_out, D_in] = U [D_out, r] · diag(S [r]) · Vh [r, D_in]`` in fp32 (fp64 stays fp64)."""
    w = weight.detach()
    w = w.double() if w.dtype == torch.float64 else w.float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U, S, Vh


def cached_svd(weight: Tensor, name: str, cache_dir: Optional[str | os.PathLike] = None,
               sha: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`compute_svd` of ``weight``, through ``cache_dir/<name>.pt`` when a folder is given.

    The file holds the factors and the weight's SHA-256: a hit with the same hash loads (no SVD); a hit with
    another hash raises :class:`StaleSVDCacheError` naming ``name``; a miss computes and writes atomically.
    """
    sha = sha or weight_sha256(weight)
    if cache_dir is None:
        return compute_svd(weight)
    path = Path(cache_dir) / f"{name}.pt"
    if path.exists():
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("sha256") != sha:
            raise StaleSVDCacheError(
                f"stale SVD cache for module {name!r}: {path} was computed from a weight with sha256 "
                f"{str(entry.get('sha256'))[:12]}..., but the module's weight now hashes to {sha[:12]}... "
                "(the base model changed). Delete that cache folder or pass another cache_dir.")
        return entry["U"], entry["S"], entry["Vh"]
    U, S, Vh = compute_svd(weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"sha256": sha, "U": U.cpu(), "S": S.cpu(), "Vh": Vh.cpu()}, tmp)
    os.replace(tmp, path)
    return U, S, Vh


# ----- the adapter -----------------------------------------------------------------------------------------
@dataclass
class _SVDState:
    """Switches shared by every wrapped layer of one model (a plain object: not in the state dict)."""

    main_on: bool = True
    hack_on: bool = True


class SVDLinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus ``U diag(δS + δS_hack) Vᵀ``, switched by a shared state."""

    def __init__(self, base: nn.Linear, U: Tensor, S: Tensor, Vh: Tensor, state: _SVDState,
                 weight_sha: str = "") -> None:
        super().__init__(base)
        dev = base.weight.device
        # fp32 factors and knobs on a 16-bit base (as PEFT does for LoRA): small updates need the range
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        r = min(base.in_features, base.out_features)
        if U.shape != (base.out_features, r) or Vh.shape != (r, base.in_features) or S.shape != (r,):
            raise ValueError(f"SVD factors {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vh.shape)} do not fit a "
                             f"Linear({base.in_features}, {base.out_features})")
        self.register_buffer("U", U.to(dev, dtype), persistent=False)  # [D_out, r]
        self.register_buffer("S", S.to(dev, dtype), persistent=False)  # [r]
        self.register_buffer("Vh", Vh.to(dev, dtype), persistent=False)  # [r, D_in]
        self.delta_s = nn.Parameter(torch.zeros(r, device=dev, dtype=dtype))  # [r]
        self.delta_s_hack = nn.Parameter(torch.zeros(r, device=dev, dtype=dtype))  # [r]
        self.rank = r
        self.weight_sha = weight_sha
        self._state = state

    def _scale(self) -> Optional[Tensor]:
        """``δS·[main on] + δS_hack·[hack on]`` [r]; an off vector that trains joins as ``0·v`` (DDP keeps
        every trainable parameter in the graph); ``None`` when nothing contributes (the base layer)."""
        grad = torch.is_grad_enabled()
        terms = []
        for p, on in ((self.delta_s, self._state.main_on), (self.delta_s_hack, self._state.hack_on)):
            if on:
                terms.append(p)
            elif grad and p.requires_grad:
                terms.append(p * 0.0)
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def delta_weight(self) -> Optional[Tensor]:
        s = self._scale()  # [r]
        return None if s is None else (self.U * s) @ self.Vh  # [D_out, D_in] = U diag(s) Vᵀ

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # [..., D_out], exactly the base layer's output
        s = self._scale()  # [r]
        if s is None:
            return y
        h = F.linear(x.to(self.Vh.dtype), self.Vh)  # [..., r]  = Vᵀ x
        delta = F.linear(h * s, self.U)  # [..., D_out] = U diag(s) Vᵀ x; exactly 0.0 when s == 0
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class SVDAdapterModel(LinearWrappingModel):
    """A causal LM whose targeted linear layers carry ``δS`` / ``δS_hack`` knobs in their SVD basis.

    Calls are forwarded to the wrapped model, so it drops into
    :func:`~lightning_rlm.rollout.sample_completions` and :func:`~lightning_rlm.rollout.completion_logprobs`.
    The base weights are frozen; ``δS`` trains, ``δS_hack`` trains only when ``train_hack`` is set.

    Args:
        model: an HF causal LM (modified in place: its linear layers are wrapped).
        target_modules: suffixes of module names to wrap (default :data:`DEFAULT_SVD_TARGETS`); ``None`` wraps
            every ``nn.Linear`` except the output embedding.
        cache_dir: folder of the SVD cache (see :func:`cached_svd`); ``None`` computes without caching.
        train_hack: whether ``δS_hack`` requires grad (only the ``route`` projection feeds it).
    """

    SWITCHES = ("main_on", "hack_on")
    MODES = _MODE_SWITCHES

    def __init__(self, model: nn.Module, target_modules: Optional[Sequence[str]] = DEFAULT_SVD_TARGETS,
                 cache_dir: Optional[str | os.PathLike] = None, train_hack: bool = True) -> None:
        super().__init__()
        model.requires_grad_(False)
        self.model = model
        self._state = _SVDState()
        def make(name: str, base: nn.Linear) -> SVDLinear:
            sha = weight_sha256(base.weight)
            U, S, Vh = cached_svd(base.weight, name, cache_dir, sha=sha)
            return SVDLinear(base, U, S, Vh, self._state, weight_sha=sha)

        self.target_names = wrap_linears(model, target_modules, make)
        for p in self.hack_parameters():
            p.requires_grad_(train_hack)

    # ----- layers and parameters ------------------------------------------------------------------------
    def svd_layers(self) -> dict[str, SVDLinear]:
        """``{module name: layer}`` in model order (names relative to the wrapped model)."""
        return {name: self.model.get_submodule(name) for name in self.target_names}

    def delta_parameters(self) -> list[nn.Parameter]:
        return [layer.delta_s for layer in self.svd_layers().values()]

    def hack_parameters(self) -> list[nn.Parameter]:
        return [layer.delta_s_hack for layer in self.svd_layers().values()]

    def fingerprint(self) -> str:
        """Key of the base weights of the wrapped layers (see :func:`weights_fingerprint`)."""
        return weights_fingerprint({n: layer.weight_sha for n, layer in self.svd_layers().items()})

    # ----- modes (adapters(mode), base() and reference() come from LinearWrappingModel) ---------------------
    def no_hack(self) -> AbstractContextManager[SVDAdapterModel]:
        """Ablate ``δS_hack`` (the deployed model of the ``route`` projection)."""
        return self.adapters("no_hack")


def add_svd_adapter(model: nn.Module, target_modules: Optional[Sequence[str]] = DEFAULT_SVD_TARGETS,
                    cache_dir: Optional[str | os.PathLike] = None, train_hack: bool = True) -> SVDAdapterModel:
    """Wrap ``model`` (in place) with SVD-basis knobs; see :class:`SVDAdapterModel`."""
    return SVDAdapterModel(model, target_modules, cache_dir, train_hack)


# ----- hack direction ----------------------------------------------------------------------------------------
def contrastive_grad_diffs(model: SVDAdapterModel, pairs: Sequence[tuple[Sequence[int], Sequence[int],
                                                                          Sequence[int]]],
                           pad_token_id: int) -> dict[str, Tensor]:
    """Per-module ``D [n, r]``, row ``i = ∇_δS NLL(clean_i) - ∇_δS NLL(hack_i)`` at the current δS.

    ``pairs`` are ``(prompt ids, clean completion ids, hacking completion ids)``; NLL is summed over the
    completion's tokens. Gradients come from ``torch.autograd.grad`` (nothing accumulates into ``.grad``, and
    no DDP reducer hook fires), one forward of the two sequences per pair.
    """
    layers = model.svd_layers()
    params = [layer.delta_s for layer in layers.values()]
    device = params[0].device
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}
    for prompt, clean, hack in pairs:
        if not prompt or not clean or not hack:
            raise ValueError("every pair needs a non-empty prompt, clean and hacking completion")
        C = max(len(clean), len(hack))
        ids = torch.full((2, len(prompt) + C), pad_token_id, dtype=torch.long)  # [2, P+C]
        mask = torch.zeros_like(ids)
        for row, comp in enumerate((clean, hack)):  # same prompt, completions right-padded
            ids[row, : len(prompt) + len(comp)] = torch.tensor([*prompt, *comp])
            mask[row, : len(prompt) + len(comp)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.enable_grad():
            logp = completion_logprobs(model, ids, mask, C)  # [2, C]
            assert isinstance(logp, Tensor)
            nll = -(logp * mask[:, -C:]).sum(-1)  # [2]
            grads = torch.autograd.grad(nll[0] - nll[1], params, allow_unused=True)
        for name, g, p in zip(layers, grads, params):
            rows[name].append(torch.zeros_like(p) if g is None else g.detach())
    return {name: torch.stack(r) for name, r in rows.items()}  # name -> [n, r]


def cached_pair_diffs(model: SVDAdapterModel, pairs: Sequence[tuple[list[int], list[int], list[int]]],
                      pair_texts: Sequence[tuple[str, str, str]], pad_token_id: int,
                      folder: str | os.PathLike) -> tuple[dict[str, Tensor], bool]:
    """:func:`contrastive_grad_diffs` cached in ``folder`` (on CPU) under a key of the model, its targets, the
    pairs and where δS stands; the texts ride along in the file for reading. Returns the diffs and whether
    they came from the cache."""
    knobs = hashlib.sha256()
    for p in model.delta_parameters():  # the gradients depend on where δS stands
        knobs.update(p.detach().float().cpu().numpy().tobytes())
    key = hashlib.sha256(json.dumps({
        "model": model.fingerprint(), "targets": model.target_names, "pairs": pairs, "knobs": knobs.hexdigest(),
    }).encode()).hexdigest()[:24]
    path = Path(folder) / f"pair_grads_{key}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)["diffs"], True
    diffs = {n: d.cpu() for n, d in contrastive_grad_diffs(model, pairs, pad_token_id).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process, as for the SVD factors
    torch.save({"diffs": diffs, "pairs": list(pair_texts)}, tmp)
    os.replace(tmp, path)
    return diffs, False


class HackAxes(NamedTuple):
    directions: Tensor  # [k, r] orthonormal rows, oriented hack-ward (k may be 0)
    singular_values: Tensor  # [k]
    agreement: Tensor  # [k] share of pairs with d_i · v_j > 0 after orientation


def hack_axes(diffs: Tensor, top_k: int = 1, noise_floor: float = 0.1) -> HackAxes:
    """Top singular directions of the pair differences ``diffs [n, r]``, majority-oriented, noise-floored.

    Keeps axis ``j < top_k`` when ``λ_j >= noise_floor · λ_1`` and ``λ_j > 0``.
    """
    if diffs.dim() != 2:
        raise ValueError(f"diffs must be [n, r], got shape {tuple(diffs.shape)}")
    check_at_least(1, top_k=top_k)
    if not 0.0 <= noise_floor <= 1.0:
        raise ValueError(f"noise_floor must be in [0, 1], got {noise_floor}")
    D = diffs.double()  # [n, r]
    _, lam, Qh = torch.linalg.svd(D, full_matrices=False)  # lam [m], Qh [m, r], m = min(n, r)
    top = lam[0] if lam.numel() else torch.zeros((), dtype=D.dtype)
    keep = [j for j in range(min(top_k, lam.numel())) if lam[j] > 0 and lam[j] >= noise_floor * top]
    dirs, agree = [], []
    for j in keep:
        q = Qh[j]  # [r]
        proj = D @ q  # [n]
        votes = torch.sign(proj).sum()
        if votes < 0 or (votes == 0 and proj.sum() < 0):
            q, proj = -q, -proj
        dirs.append(q)
        agree.append((proj > 0).double().mean())
    r = diffs.shape[1]
    out_dtype = diffs.dtype if diffs.is_floating_point() else torch.float32
    if not dirs:
        empty = diffs.new_zeros((0,), dtype=out_dtype)
        return HackAxes(diffs.new_zeros((0, r), dtype=out_dtype), empty, empty)
    return HackAxes(torch.stack(dirs).to(out_dtype), lam[keep].to(out_dtype), torch.stack(agree).to(out_dtype))


# ----- projection (pure tensor functions) -----------------------------------------------------------------
def hack_component(grad: Tensor, directions: Tensor) -> Tensor:
    """The hack-ward part of a gradient: ``Vᵀ min(V g, 0)``. ``grad [r]``, ``directions V [k, r]`` -> ``[r]``.

    The descent step ``-g`` moves along ``+v_j`` exactly when ``v_j · g < 0``; only those coefficients are kept.
    """
    if directions.numel() == 0:
        return torch.zeros_like(grad)
    V = directions.to(grad.dtype)  # [k, r]
    c = V @ grad  # [k]
    return V.T @ c.clamp(max=0.0)  # [r]


def erase_hack_component(grad: Tensor, directions: Tensor) -> Tensor:
    """``g - Vᵀ min(V g, 0)`` [r]: afterwards ``V g' = max(V g, 0)`` (no hack-ward step along any axis)."""
    return grad - hack_component(grad, directions)


def route_hack_component(grad: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """``(g - removed, removed)`` [r] each: the new gradients of ``δS`` and ``δS_hack`` (``removed`` as in
    :func:`hack_component`). Their sum is ``g``."""
    removed = hack_component(grad, directions)
    return grad - removed, removed


def hack_cosine(grads: Sequence[Tensor], directions: Sequence[Tensor]) -> Tensor:
    """Cosine between the concatenated descent step ``-g`` and the concatenated top axes (unit ``v_1`` per
    module, zeros for modules without an axis). > 0: the step pushes toward the hack. Scalar; 0 when either is 0.
    """
    dot = grads[0].new_zeros((), dtype=torch.float32)
    g_sq = grads[0].new_zeros((), dtype=torch.float32)
    v_sq = grads[0].new_zeros((), dtype=torch.float32)
    for g, V in zip(grads, directions):
        g = g.float()
        g_sq = g_sq + g.square().sum()
        if V.numel():
            v = V[0].to(g)  # [r]
            dot = dot - v @ g
            v_sq = v_sq + v.square().sum()
    denom = (g_sq * v_sq).sqrt()
    return torch.where(denom > 0, dot / denom.clamp(min=1e-30), torch.zeros_like(dot))


@dataclass
class ProjectionStats:
    hack_cos: Tensor  # scalar: cosine of the descent step with the hack axes (before projection)
    removed_frac: Tensor  # scalar: ||hack-ward part|| / ||g|| over all modules (removed unless measure_only)
    grad_norm: Tensor  # scalar: ||g|| of δS before projection


def project_gradients(model: SVDAdapterModel, axes: Mapping[str, Tensor], projection: Projection
                      ) -> ProjectionStats:
    """Apply ``projection`` in place to the ``.grad`` of every ``δS`` (and ``δS_hack`` for ``route``).

    ``axes`` maps module names to hack directions ``[k, r]``; modules missing from it are left alone. With
    ``none`` / ``measure_only`` the gradients are untouched. For ``route`` the gradient of ``δS_hack`` is set to
    the removed part (its autograd gradient is discarded); otherwise a ``δS_hack`` gradient, if any, is zeroed.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    grads, dirs, removed_sq = [], [], []
    for name, layer in model.svd_layers().items():
        g = layer.delta_s.grad
        if g is None:
            g = torch.zeros_like(layer.delta_s)
        V = axes.get(name, g.new_zeros((0, g.shape[0])))  # [k, r]
        grads.append(g.detach().clone())
        dirs.append(V)
        removed = hack_component(g, V)  # [r]
        removed_sq.append(removed.float().square().sum())
        hack_grad = layer.delta_s_hack.grad
        if projection in ("erase", "route") and layer.delta_s.grad is not None:
            layer.delta_s.grad.sub_(removed)
        if projection == "route":
            if not layer.delta_s_hack.requires_grad:
                raise ValueError("projection='route' needs a trainable δS_hack (add_svd_adapter(train_hack=True))")
            layer.delta_s_hack.grad = removed.to(layer.delta_s_hack.dtype)
        elif hack_grad is not None:
            hack_grad.zero_()
    g_norm = torch.stack([g.float().square().sum() for g in grads]).sum().sqrt()
    r_norm = torch.stack(removed_sq).sum().sqrt()
    return ProjectionStats(
        hack_cos=hack_cosine(grads, dirs),
        removed_frac=torch.where(g_norm > 0, r_norm / g_norm.clamp(min=1e-30), torch.zeros_like(g_norm)),
        grad_norm=g_norm,
    )
