"""Round-to-nearest: min-max ranges, optionally shrunk by a searched clipping ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats import GroupedInt, QuantSpec, dequantize_codes, expand_groups

_FP16_TINY = 6.2e-5  # smallest normal fp16: scales below it would lose precision
_ZERO_LIMIT = 60000.0  # |zero| bound, below fp16's largest finite 65504


def group_view(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> (out, G, g) groups padded with NaN, and the (out, G, g) validity mask."""
    out_f, in_f = weight.shape
    g, n_groups = spec.group_width(in_f), spec.n_groups(in_f)
    padded = weight.new_full((out_f, n_groups * g), float("nan"))
    padded[:, :in_f] = weight
    padded = padded.view(out_f, n_groups, g)
    return padded, ~padded.isnan()


def minmax_qparams(weight: Tensor, spec: QuantSpec, ratio: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """fp16 (out, G) scale and zero from each group's range, shrunk by ``ratio`` (scalar or (out, G))."""
    groups, valid = group_view(weight.float(), spec)
    lo = torch.where(valid, groups, torch.inf).amin(-1) * ratio                    # (out, G)
    hi = torch.where(valid, groups, -torch.inf).amax(-1) * ratio
    if spec.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (2 * absmax / spec.maxq).clamp(min=_FP16_TINY).half()
        return scale, torch.full_like(scale, float(1 << (spec.bits - 1)))
    if spec.int_zero:
        # an integer zero in [0, maxq] is the code of w = 0, so the grid must contain 0: widen to it
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        span = hi - lo
        scale = torch.where(span > 0, span / spec.maxq, torch.ones_like(span)).clamp(min=_FP16_TINY).half()
        zero = torch.round(-lo / scale.float()).clamp(0, spec.maxq).half()
        return scale, zero
    span = hi - lo
    absmax = torch.maximum(lo.abs(), hi.abs())
    # a constant group (span 0) is still exact: its one value sits on code 0 or maxq
    scale = torch.where(span > 1e-6 * absmax, span / spec.maxq, absmax / spec.maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=_FP16_TINY)
    # the zero point (code units, fp16) must stay finite: a narrow group far from 0 gets a coarser step
    scale = torch.maximum(scale, lo.abs() / _ZERO_LIMIT).half()
    zero = (-lo / scale.float()).half()
    return scale, zero


def round_to_grid(weight: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """uint8 codes (out, in): ``clamp(round(w / scale + zero), 0, maxq)`` with the stored fp16 parameters."""
    in_f = weight.shape[1]
    s = expand_groups(scale.float(), spec, in_f)
    z = expand_groups(zero.float(), spec, in_f)
    return torch.round(weight.float() / s + z).clamp_(0, spec.maxq).to(torch.uint8)


def _pack(q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> GroupedInt:
    return GroupedInt.pack(q, scale, None if spec.symmetric else zero, spec)


def rtn(weight: Tensor, spec: QuantSpec) -> GroupedInt:
    """Round to nearest on each group's min-max range."""
    scale, zero = minmax_qparams(weight, spec)
    return _pack(round_to_grid(weight, scale, zero, spec), scale, zero, spec)


def group_sq_error(weight: Tensor, q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """(out, G) squared reconstruction error per group."""
    err = (dequantize_codes(q, scale, zero, spec) - weight.float()).pow(2)
    groups, valid = group_view(err, spec)
    return torch.where(valid, groups, 0.0).sum(-1)


def output_group_error(weight: Tensor, q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec,
                       hessian: Tensor) -> Tensor:
    """(out, G) output error per group: ``e_g H_gg e_gᵀ`` for each row's error ``e_g`` on the group's columns.

    With ``H = 2/n Σ xᵀx`` this is twice the mean squared error that the group's weights add to
    the layer's output over the calibration rows (cross-group terms left out, so each group's
    choice is independent)."""
    err = dequantize_codes(q, scale, zero, spec) - weight.float()
    in_f = weight.shape[1]
    g = spec.group_width(in_f)
    cols = []
    for a in range(0, in_f, g):
        e = err[:, a:a + g]
        cols.append(((e @ hessian[a:a + g, a:a + g]) * e).sum(-1))
    return torch.stack(cols, dim=1)


CLIP_OBJECTIVES = ("none", "weight", "output")


def clip_qparams(weight: Tensor, spec: QuantSpec, objective: str = "weight", hessian: Tensor | None = None,
                 grid: int = 20, min_ratio: float = 0.5) -> tuple[Tensor, Tensor]:
    """Scale and zero with each group's range shrunk by the ratio in [min_ratio, 1] that minimises its error.

    ``objective``: ``"weight"`` (squared weight error), ``"output"`` (layer output error through the
    input Hessian, see :func:`output_group_error`; needs ``hessian``) or ``"none"`` (plain min-max)."""
    if objective == "none":
        return minmax_qparams(weight, spec)
    if objective == "output" and hessian is None:
        raise ValueError("clipping by output error needs the layer's input Hessian")
    best_err = best_scale = best_zero = None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        scale, zero = minmax_qparams(weight, spec, ratio)
        q = round_to_grid(weight, scale, zero, spec)
        err = (group_sq_error(weight, q, scale, zero, spec) if objective == "weight"
               else output_group_error(weight, q, scale, zero, spec, hessian))
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def rtn_clip(weight: Tensor, spec: QuantSpec, grid: int = 20, min_ratio: float = 0.5, objective: str = "weight",
             hessian: Tensor | None = None) -> GroupedInt:
    """Round to nearest with each group's range shrunk by a searched clipping ratio (:func:`clip_qparams`)."""
    scale, zero = clip_qparams(weight, spec, objective, hessian, grid, min_ratio)
    return _pack(round_to_grid(weight, scale, zero, spec), scale, zero, spec)
