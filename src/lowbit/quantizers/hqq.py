"""HQQ-style refinement (after Badri & Shaji's Half-Quadratic Quantization, 2023): data-free.

Start from each group's min-max scale ``s`` and zero ``z`` and move the zero (code units, not an
integer) to minimise the l_p norm, p < 1, of the weight error. Such a norm lets a few large errors
(outliers, clipped ends) stay large so that the bulk of the group is fitted tightly:

    min_z  Σ_group |w - (q - z)·s|^p,       q = clamp(round(w/s + z), 0, maxq)

Splitting the error off as its own variable ``e``, coupled quadratically with weight β,
``|e|_p^p + β/2 ‖w - (q - z)·s - e‖²``, makes every step closed-form:

    q ← clamp(round(w/s + z), 0, maxq)          codes for the current parameters
    e ← s · shrink_p((w - (q - z)·s) / s, β)    the sparse (outlier) part of the error
    z ← mean_group(q - (w - e)/s)               least-squares zero for the rest
    s ← Σ (w - e)(q - z) / Σ (q - z)²           (opt_scale, or symmetric: z is fixed there)
    β ← κ·β

with the generalised soft threshold ``shrink_p(x, β) = sign(x)·max(|x| - |x|^(p-1)/β, 0)``, which
zeroes ``|x| <= β^(-1/(2-p))`` (0.17 at β = 10, p = 0.7). Unlike the original, the shrink sees the
error in code units (``x/s``), so β means the same for a layer of weights ~0.01 as for one of ~1
(equivalently: β_weight-units = β / s^(2-p) per group).

The parameters are kept fp16-representable at every step and each group keeps the iterate with
the lowest l_p error, the min-max start included: never worse than RTN in that norm, and the
stored codes are exactly ``round_to_grid`` of the stored fp16 scale and zero. All ``iters`` steps
run (no early stop): the shrink caps each step of z near 0.17 code units, so on SmolLM2 groups
still improve at step 20. A symmetric spec has no zero to move; its scale is refined instead. With
integer zeros (``int_zero``) the zero moves continuously between iterations but every iterate is
scored and kept with its rounded value, and the scale is refined too.

``opt_scale`` cuts weight MSE further (~0.76 of RTN's at w3g128 vs ~0.95 zero-only) but shrinks
scales until the largest weights clip; on SmolLM2-135M w3g128 it raised KL to the fp32 model from
2.5 to 4.6 (RTN: 3.0), so it is off by default. The paper's p = 0.7, β = 10, κ = 1.01, 20 steps
were as good as any nearby setting tried there (β 3-100, p 0.5-1, 40-50 steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import RecipeError
from lowbit.formats import GroupedInt, QuantSpec
from lowbit.quantizers.rtn import (
    _FP16_TINY,
    _ZERO_LIMIT,
    group_view,
    minmax_qparams,
    round_to_grid,
)

_FP16_MAX = 65504.0


def hqq(weight: Tensor, spec: QuantSpec, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, opt_scale: bool = False) -> GroupedInt:
    """Min-max RTN with the zeros (and, with ``opt_scale`` or a symmetric spec, the scales) refined by l_p fitting."""
    if not (isinstance(iters, int) and iters >= 0):
        raise RecipeError(f"hqq: iters={iters!r} must be an integer >= 0 (0 gives plain RTN)")
    if not 0 < lp_norm <= 1:
        raise RecipeError(f"hqq: lp_norm={lp_norm!r} must be in (0, 1]; 0.7 is the usual choice")
    if not (beta > 0 and kappa >= 1):
        raise RecipeError(f"hqq: beta={beta!r} must be > 0 and kappa={kappa!r} >= 1")
    scale, zero = minmax_qparams(weight, spec)                          # fp16 (out, G)
    groups, valid = group_view(weight.float(), spec)                    # (out, G, g), NaN padding
    w = torch.where(valid, groups, 0.0)
    m = valid.float()                                                   # 0 on the ragged tail's padding
    n = m.sum(-1, keepdim=True)                                         # (out, G, 1) columns per group
    s, z = scale.float()[..., None], zero.float()[..., None]            # (out, G, 1), fp16 values
    # an integer zero (int_zero) moves in whole steps, so the scale is refined as well: measured on
    # Gaussian groups, zero-only fitting then never beat RTN, with the scale it did (2-bit g64: -38 % MSE)
    fit_zero, fit_scale = not spec.symmetric, opt_scale or spec.symmetric or spec.int_zero

    best_err = torch.full(scale.shape, torch.inf)                       # (out, G)
    best_s, best_z = s, z
    u = w / s                                                           # (out, G, g) weights in code units
    for it in range(iters + 1):
        # integer zeros: z moves continuously, each iterate is scored (and kept) with its rounded value
        zq = z.round().clamp(0, spec.maxq) if spec.int_zero else z
        x = u + zq                                                      # w/s + z, as round_to_grid computes it
        q = torch.round(x).clamp_(0, spec.maxq)
        x.sub_(q).mul_(m)                                               # error in code units, w/s - (q - z)
        a = x.abs()
        ap = a.pow(lp_norm)
        err = ap.sum(-1) * s[..., 0].pow(lp_norm)                       # (out, G) Σ|w - (q - z)s|^p
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better[..., None], s, best_s)
        best_z = torch.where(better[..., None], zq, best_z)
        if it == iters:
            break
        # the error less its sparse part e, x - shrink_p(x, β) = sign(x)·min(|x|, |x|^(p-1)/β); 0 where x = 0
        r = ap.div_(a.clamp(min=1e-30)).div_(beta)                      # |x|^(p-1)/β, reusing ap's memory
        r = torch.minimum(a, r, out=r).copysign_(x)
        z_old = zq
        if fit_zero:                                                    # z ← mean(q - (w - e)/s) = z - mean(r)
            z = (z - r.sum(-1, keepdim=True) / n).clamp_(-_ZERO_LIMIT, _ZERO_LIMIT).half().float()
        if fit_scale:                                                   # s ← Σ (w - e)(q - z) / Σ (q - z)²
            d = (q - (z.round().clamp(0, spec.maxq) if spec.int_zero else z)).mul_(m)
            target = q.sub_(z_old).add_(r)                              # (w - e)/s, with the z that gave q
            s_ls = s * (target * d).sum(-1, keepdim=True) / d.pow(2).sum(-1, keepdim=True)
            ok = torch.isfinite(s_ls) & (s_ls >= _FP16_TINY) & (s_ls <= _FP16_MAX)
            s = torch.where(ok, s_ls, s).half().float()                 # a degenerate group keeps its scale
            u = w / s
        beta *= kappa

    scale, zero = best_s[..., 0].half(), best_z[..., 0].half()          # exact: already fp16 values
    q = round_to_grid(weight, scale, zero, spec)
    return GroupedInt.pack(q, scale, None if spec.symmetric else zero, spec)
