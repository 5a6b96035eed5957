"""The next run from a two-level factorial: steepest ascent in log space, rounded to clean values.

Response-surface method of steepest ascent (Box & Wilson 1951), as in the GAN-RL seed note: each factor
is coded on a log10 scale around the center run, -1 at its low level and +1 at its high level (orthogonal
coding), a first-order model ``y = b0 + Σ_j b_j x_j`` is fitted by least squares to the factorial runs
(center runs included; in an orthogonal design they only move ``b0``), and the next run moves along
``b`` (the gradient in coded units) from the center.

Step size: the factor with the largest ``|b_j|`` moves ``step`` coded units, the others proportionally
(``x_j = step · b_j / max|b|``). A coded unit of factor ``j`` is converted to decades by its *upper*
interval ``log10(high_j) − log10(center_j)`` by default (``interval="upper"``, the seed's choice, which
handles a design that is not symmetric around the center in log space, e.g. d-lr 0.6 decades below and 0.7
above), or by the lower one, or by whichever side the move goes to (``"side"``). The proposal is rounded
to the nearest clean value ``m × 10^k`` with ``m`` in ``mantissas`` (default 1, 2, 3, 5), nearest in log
space.

On the seed's table (ids 00-03 a 2^(3-1) half fraction, 04 the center, response MAUVE) the effects are
g-lr 0.01125, d-lr 0.01075, d-scale 0.01225 per coded unit: all three factors go up. With ``step=1.5``
the raw proposal is g-lr 2.60e-5, d-lr 1.66e-4, d-scale 31.6, which rounds to the seed's run 05
(3e-5, 2e-4, 30); any step in about (1.41, 1.59) gives the same rounded run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["AscentProposal", "code_factor", "round_clean", "steepest_ascent"]

Interval = Literal["upper", "lower", "side"]


@dataclass
class AscentProposal:
    """The fitted first-order model and the proposed next run (all dicts keyed by factor)."""

    effects: dict[str, float]  # b_j: response change per coded unit
    intercept: float  # b0
    coded: dict[str, float]  # the move in coded units
    decades: dict[str, float]  # the move in log10 units from the center
    raw: dict[str, float]  # unrounded proposal
    values: dict[str, float]  # proposal rounded to clean values
    curvature: float | None  # mean(center responses) − mean(factorial responses); None without center runs


def round_clean(x: float, mantissas: Sequence[float] = (1, 2, 3, 5)) -> float:
    """The nearest (in log space) value ``m × 10^k``, ``m`` in ``mantissas``. Keeps the sign; 0 stays 0."""
    if x == 0:
        return 0.0
    sign, a = (1.0 if x > 0 else -1.0), abs(x)
    k = math.floor(math.log10(a))
    candidates = [m * 10.0 ** e for e in (k - 1, k, k + 1) for m in mantissas]
    best = min(candidates, key=lambda c: abs(math.log10(c) - math.log10(a)))
    return sign * float(f"{best:.12g}")  # strip float noise such as 3.0000000000000004e-05


def code_factor(value: float, center: float, low: float, high: float) -> float:
    """Coded level of ``value``: 0 at the center, -1 at ``low``, +1 at ``high``, piecewise linear in log10."""
    lv, lc = math.log10(value), math.log10(center)
    if lv >= lc:
        return (lv - lc) / (math.log10(high) - lc)
    return (lv - lc) / (lc - math.log10(low))


def steepest_ascent(
    runs: Sequence[Mapping[str, float]],
    center: Mapping[str, float],
    response: str = "mauve",
    *,
    step: float = 1.5,
    interval: Interval = "upper",
    maximize: bool = True,
    mantissas: Sequence[float] = (1, 2, 3, 5),
) -> AscentProposal:
    """Propose the next run from a two-level (fractional) factorial with center runs.

    Args:
        runs: one mapping per run with every factor of ``center`` and the ``response``.
        center: the center run's factor values (the factors are its keys); all values must be > 0.
        response: the key of the response to maximize (or minimize with ``maximize=False``).
        step: coded units moved by the factor with the largest effect (see the module docstring).
        interval: decades per coded unit: ``upper`` (high − center), ``lower`` (center − low), or ``side``
            (the side the move goes to).
        mantissas: clean mantissas for rounding.

    Returns:
        An :class:`AscentProposal`.
    """
    factors = list(center)
    if not factors:
        raise ValueError("center names no factors")
    for f in factors:
        vals = [float(r[f]) for r in runs] + [float(center[f])]
        if min(vals) <= 0:
            raise ValueError(f"factor {f!r} has a value <= 0: steepest ascent here works in log space")
    lows = {f: min(float(r[f]) for r in runs) for f in factors}
    highs = {f: max(float(r[f]) for r in runs) for f in factors}
    for f in factors:
        if not lows[f] < float(center[f]) < highs[f]:
            raise ValueError(f"factor {f!r}: center {center[f]} must lie strictly between the low {lows[f]} "
                             f"and high {highs[f]} levels")
    x = np.array([[code_factor(float(r[f]), float(center[f]), lows[f], highs[f]) for f in factors]
                  for r in runs])  # [n_runs, n_factors]
    y = np.array([float(r[response]) for r in runs])  # [n_runs]
    design = np.column_stack([np.ones(len(runs)), x])  # [n_runs, 1 + n_factors]
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError("the runs do not identify every main effect (design matrix is rank deficient)")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    b = coef[1:] if maximize else -coef[1:]
    scale = np.abs(b).max()
    if scale == 0:
        raise ValueError("every effect is zero: no direction of ascent")
    coded = step * b / scale  # [n_factors]

    decades, raw, values = {}, {}, {}
    for j, f in enumerate(factors):
        lc = math.log10(float(center[f]))
        up, down = math.log10(highs[f]) - lc, lc - math.log10(lows[f])
        if interval == "upper":
            unit = up
        elif interval == "lower":
            unit = down
        elif interval == "side":
            unit = up if coded[j] >= 0 else down
        else:
            raise ValueError(f"interval must be 'upper', 'lower' or 'side', got {interval!r}")
        decades[f] = float(coded[j] * unit)
        raw[f] = 10.0 ** (lc + decades[f])
        values[f] = round_clean(raw[f], mantissas)

    is_center = np.all(np.abs(x) < 1e-12, axis=1)  # [n_runs]
    curvature = float(y[is_center].mean() - y[~is_center].mean()) if is_center.any() and (~is_center).any() \
        else None
    return AscentProposal(
        effects={f: float(coef[1 + j]) for j, f in enumerate(factors)}, intercept=float(coef[0]),
        coded={f: float(coded[j]) for j, f in enumerate(factors)}, decades=decades, raw=raw, values=values,
        curvature=curvature,
    )
