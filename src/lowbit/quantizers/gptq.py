"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

    H = 2/n Σ xᵀx  (+ λ·mean(diag H)·I)          the layer's input second moment, damped
    U = chol(H⁻¹)ᵀ (upper)                        rows of U carry the error-propagation weights
    for each column j (in processing order):
        q_j   = round(w_j / s + z)  clamped        (group parameters of column j's group)
        e_j   = (w_j - dq(q_j)) / U[j, j]
        w_k  -= e_j · U[j, k]      for k after j   (lazily, a block of 128 columns at a time)

Act-order processes columns by descending ``diag(H)`` with static groups: the group parameters
are fitted on the natural column groups before the pass, so codes, scales and zeros stay in
natural order and no permutation is stored (it costs zero bits). Without act-order the
parameters of a group are fitted when its first column is reached, on the already-updated weights.
Dead input channels (``H[i, i] == 0``: the input is always zero) get ``H[i, i] = 1`` and weight 0.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lowbit.formats import GroupedInt, QuantSpec
from lowbit.quantizers.rtn import clip_qparams, minmax_qparams

log = logging.getLogger("lowbit.gptq")


def damped_inverse_cholesky(h: Tensor, damp: float, name: str = "") -> Tensor:
    """Upper Cholesky factor of ``(H + λ I)⁻¹``; λ starts at ``damp · mean(diag H)`` and doubles until it factors
    (in small steps: every doubling blurs the Hessian a little more)."""
    mean_diag = h.diagonal().mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(24):
        lam = (damp if attempt == 0 else max(damp, 1e-5) * 2 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info.item() == 0:
            if attempt:
                log.warning("%sHessian not positive definite at damping %.3g; raised to %.3g of mean diag",
                            f"{name}: " if name else "", damp, lam / mean_diag)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
    raise ValueError(f"{name + ': ' if name else ''}Hessian cannot be factored even with damping {lam / mean_diag:g}")


def gptq(weight: Tensor, hessian: Tensor, spec: QuantSpec, damp: float = 0.01, block: int = 128,
         act_order: bool = True, name: str = "", clip: str = "none", grid: int = 20,
         min_ratio: float = 0.5) -> GroupedInt:
    """GPTQ of ``weight`` (out, in) given the input Hessian (in, in).

    ``clip`` chooses how group ranges are fitted (:func:`~lowbit.quantizers.rtn.clip_qparams`):
    plain min-max (``"none"``), or shrunk by the ratio minimising the group's weight or output error."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_f, in_f = w.shape
    gw = spec.group_width(in_f)

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    fixed = act_order or gw == in_f              # static groups (act-order), or one group per row
    fit = lambda cols, a: clip_qparams(cols, spec, clip, h[a:a + cols.shape[1], a:a + cols.shape[1]],  # noqa: E731
                                       grid, min_ratio)
    scale, zero = fit(w, 0) if fixed else minmax_qparams(w, spec)  # if not fixed, refitted as each group is reached

    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_f)
    w, h = w[:, perm], h[perm][:, perm]
    u = damped_inverse_cholesky(h, damp, name)                              # (in, in) upper
    group_of = perm // gw                                                   # natural group of each processed column
    q = torch.empty(out_f, in_f, dtype=torch.uint8)
    s32, z32 = scale.float(), zero.float()

    groups = group_of.tolist()
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        wb = w[:, i1:i2].clone()                                            # (out, b)
        ub = u[i1:i2, i1:i2]
        if fixed:                                                           # every column's group parameters, known now
            sb, zb = s32[:, group_of[i1:i2]], z32[:, group_of[i1:i2]]
        if fixed and _column_kernel():                                      # the loop below in one C++ call, same values
            qb, err = torch.ops.lowbit.gptq_block(wb, ub.contiguous(), sb.contiguous(), zb.contiguous(), spec.maxq)
        else:
            qb = torch.empty_like(wb)                                       # the block's codes, as floats
            err = torch.empty_like(wb)
            for i in range(i2 - i1):
                col = i1 + i
                if fixed:
                    s, z = sb[:, i], zb[:, i]
                else:
                    g = groups[col]
                    if col % gw == 0:                                       # first column of its group (no perm here)
                        sg, zg = fit(_natural_group(w, wb, i1, i, gw, in_f), col)
                        scale[:, g], zero[:, g] = sg[:, 0], zg[:, 0]
                        s32[:, g], z32[:, g] = sg[:, 0].float(), zg[:, 0].float()
                    s, z = s32[:, g], z32[:, g]
                qc = qb[:, i]
                torch.round(wb[:, i] / s + z, out=qc).clamp_(0, spec.maxq)
                e = err[:, i]
                torch.sub(wb[:, i], (qc - z) * s, out=e).div_(ub[i, i])
                wb[:, i:] -= torch.outer(e, ub[i, i:])                      # rank-1 update: products rounded, then subtracted
        q[:, i1:i2] = qb.to(torch.uint8)
        w[:, i2:] -= err @ u[i1:i2, i2:]

    codes = torch.empty_like(q)
    codes[:, perm] = q                                                      # back to natural column order
    return GroupedInt.pack(codes, scale, None if spec.symmetric else zero, spec)


# The column loop of a block with static groups runs as torch.ops.lowbit.gptq_block (csrc/fused_gptq.cpp: the eager
# loop's values bit for bit, 5-10x faster on SmolLM2's layers) where lowbit's extension is built; tests switch it off
# to compare the two.
USE_KERNEL = True


def _column_kernel() -> bool:
    if not USE_KERNEL:
        return False
    from lowbit.kernels import _ext

    return _ext.available()


def _natural_group(w: Tensor, wb: Tensor, i1: int, i: int, gw: int, in_f: int) -> Tensor:
    """The current (error-updated) weights of the group starting at column ``i1 + i`` (natural order)."""
    width = min(gw, in_f - (i1 + i))
    in_block = min(width, wb.shape[1] - i)
    cols = [wb[:, i:i + in_block]]
    if width > in_block:
        cols.append(w[:, i1 + i + in_block:i1 + i + width])
    return torch.cat(cols, dim=1)
