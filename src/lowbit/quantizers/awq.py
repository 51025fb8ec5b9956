"""Activation-aware scaling (AWQ, Lin et al., 2023): protect the input channels that see large activations.

Multiplying a layer's input channel ``i`` by ``1/s_i`` and its weight column ``i`` by ``s_i`` changes
nothing in full precision, but rounding ``W·diag(s)`` puts relatively finer steps on the columns
with large ``s``. AWQ takes ``s = mean|x|^α`` and searches ``α`` on a grid:

    s(α)   = a^α / sqrt(max(a^α) · min(a^α))        a = mean |x| per input channel (clamped ≥ 1e-4)
    Ŵ(α)   = Q(W · diag(s)) · diag(s)⁻¹               Q = round to nearest on min-max ranges
    err(α) = tr((Ŵ - W) H (Ŵ - W)ᵀ)                   H = 2/n Σ xᵀx, the inputs' second moment

``err`` is (twice) the mean squared error the rounding adds to the outputs of all the layers fed by
that input, summed, over every calibration row — computed exactly from the Hessian the pipeline
already collects, so no activations are kept and no forward pass is rerun per candidate. ``α = 0``
(``s = 1``) is on the grid, so the search never does worse than plain RTN on this measure.

Folding ``1/s`` into the module that produces the input (a norm's gain, or the rows of a preceding
linear layer) is the architecture's business: see :mod:`lowbit.models.scaling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats import QuantSpec, dequantize_codes
from lowbit.quantizers.rtn import minmax_qparams, round_to_grid


@dataclass(frozen=True)
class ScaleSearch:
    scale: Tensor          # fp32 (in,), multiply the weight columns by it, divide the inputs by it
    alpha: float
    error_before: float    # err at α = 0 (plain RTN)
    error_after: float     # err at the chosen α


def scales_for(act_absmean: Tensor, alpha: float) -> Tensor:
    """``a^α`` normalised so that max·min = 1 (keeps the scaled weights near their original magnitude)."""
    s = act_absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    e = approx - weight
    return float(((e @ hessian) * e).sum())


def fake_rtn(weight: Tensor, spec: QuantSpec) -> Tensor:
    scale, zero = minmax_qparams(weight, spec)
    return dequantize_codes(round_to_grid(weight, scale, zero, spec), scale, zero, spec)


def awq_search(weight: Tensor, hessian: Tensor, act_absmean: Tensor, spec: QuantSpec, grid: int = 20,
               max_rows: int = 512) -> ScaleSearch:
    """Best ``α`` in ``{0, 1/grid, …, (grid-1)/grid}`` for ``weight`` (all layers fed the input, rows stacked).

    The error is summed over at most ``max_rows`` output rows, evenly spaced (rounding is per row,
    so this is an unbiased estimate of the full sum for choosing one scalar, at a fraction of the cost)."""
    w = weight.float()
    if w.shape[0] > max_rows:
        w = w[torch.linspace(0, w.shape[0] - 1, max_rows).round().long()]
    h = hessian.float()
    best = None
    before = None
    for k in range(grid):
        alpha = k / grid
        s = scales_for(act_absmean, alpha)
        err = output_error(w, fake_rtn(w * s, spec) / s, h)
        if k == 0:
            before = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    return ScaleSearch(s, alpha, before, err)


def scaled_stats(stats: dict[str, Tensor], scale: Tensor) -> dict[str, Tensor]:
    """The statistics of the inputs ``x / s``: ``H → H / (s sᵀ)``, ``mean|x| → mean|x| / s``."""
    out = dict(stats)
    if "hessian" in stats:
        out["hessian"] = stats["hessian"] / (scale[:, None] * scale[None, :])
    if "act_absmean" in stats:
        out["act_absmean"] = stats["act_absmean"] / scale
    return out


__all__ = ["ScaleSearch", "awq_search", "fake_rtn", "output_error", "scaled_stats", "scales_for"]
