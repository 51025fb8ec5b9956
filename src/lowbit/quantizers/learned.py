"""Learned rounding and ranges: the differentiable side of block-wise quantization (AutoRound-style).

A layer's quantized weight is parametrised around a starting format (round-to-nearest or GPTQ):

    s = s₀ · γ                     γ per group, learnable, kept in [1 - r, 1 + r]
    z = z₀ + δ                     δ per group (code units), learnable, kept in [-d, d]; fixed if symmetric;
                                   rounded to an integer in [0, maxq] (straight through) with ``int_zero``
    q = clamp(⌊w / s + z + v⌉, 0, maxq)    v per weight, learnable, kept in [-½, ½]
    ŵ = (q - z) · s

``⌊·⌉`` passes gradients straight through (straight-through estimator), so the block's output error
can move ``v`` (which way each weight rounds) and ``γ, δ`` (each group's range) jointly for all
layers of a block; the pipeline runs the optimisation (:func:`lowbit.pipeline.refine_block`).
``s`` and ``z`` pass through fp16 in the forward (gradients straight through), so the block is
trained with the scales and zeros it will store.

``v`` starts at the smallest offset that reproduces the starting codes: 0 wherever they are
round-to-nearest's (so a weight near a rounding boundary flips with a small step, as in AutoRound),
else just past the boundary of the starting code (GPTQ), with that weight's range widened to
include it. Starting ``v`` at ``round(x) - x`` instead, the middle of every code's interval, left
the signed steps of a whole run (their sum is about ½ with the default decaying step) too short to
flip almost any weight: only the group ranges were learned.

With equivalent scaling (``learned.scaling``) the layers reading one shared input (a scale group of
:mod:`lowbit.models.scaling`) also learn one per-input-channel factor ``c = exp(a)``, ``a`` kept in
``[-r, r]`` (``scaling_range``), as OmniQuant's learnable equivalent transformation: each consumer
is trained as ``Q(W · diag(c)) · diag(1/c)`` (its group ranges follow the min/max of ``W · diag(c)``,
``γ`` and ``δ`` on top), which is exactly what it computes once ``1/c`` is folded into the producer
of the shared input (a norm's gain, or the output rows of the previous linear layer: for a quantized
producer, its stored row scales). So the stored model holds ``Q(W · diag(c))`` and no extra vector.

The result is an ordinary :class:`~lowbit.formats.GroupedInt` (codes, fp16 scale, fp16 or integer
zero as the spec says): no new storage and no extra bits. Outlier positions (if any) are kept exactly and excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.formats import (
    GroupedInt,
    OutlierFormat,
    QuantSpec,
    WeightFormat,
    expand_groups,
)

_FP16_TINY = 6.2e-5


class _FakeQuant(torch.autograd.Function):
    """``ŵ = (clamp(⌊w / s + z + v⌉, 0, maxq) - z) · s`` with per-group ``s, z`` (out, G): one C++ pass forward
    and one backward (``torch.ops.lowbit.fake_quant``, ``csrc/fused_learn.cpp``), the values of the eager
    expression bit for bit and its gradients (straight-through round, clamp passing where the code is in
    range) up to the order of the group sums. ``w`` gets no gradient."""

    @staticmethod
    def forward(ctx, w: Tensor, v: Tensor, s: Tensor, z: Tensor, width: int, maxq: int) -> Tensor:
        ctx.save_for_backward(w, v, s, z)
        ctx.consts = (width, maxq)
        return torch.ops.lowbit.fake_quant(w, v, s, z, width, maxq)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, v, s, z = ctx.saved_tensors
        gv, gs, gz = torch.ops.lowbit.fake_quant_backward(grad, w, v, s, z, *ctx.consts)
        return None, gv, gs, gz, None, None


def _fused_fake_quant(w: Tensor) -> bool:
    """Whether :class:`_FakeQuant` runs for ``w``: lowbit's extension is built and ``w`` is fp32 on the CPU."""
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return False
    from lowbit.kernels import _ext

    return _ext.available()


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass(frozen=True)
class LearnedSpec:
    """How a block's rounding and ranges are learned (recipe key ``learned``)."""

    iters: int = 200               # optimisation steps per block
    lr: float = 0.0                # signed-gradient step; 0 = 1 / iters (AutoRound's default)
    batch: int = 8                 # calibration windows per step (8 x 512 tokens: about 0.4 s per SmolLM2 block step, 2 cores, bf16)
    scale_range: float = 0.5       # γ ∈ [1 - r, 1 + r]
    zero_range: float = 1.0        # δ ∈ [-d, d] code units
    target: str = "fp"             # "fp": the full-precision model's block outputs (fp inputs); "block": the fp block on the quantized inputs
    seed: int = 0
    scaling: bool = False          # learn a per-input-channel equivalent scale per scale group (module docstring)
    scaling_range: float = 1.0     # log-scale a ∈ [-r, r]
    kl: float = 0.0                # weight of the KL divergence of the final logits to the fp model's (0 = off)
    kl_blocks: int = 1             # the KL term is used for the last kl_blocks blocks (later blocks run in fp)
    kl_tokens: int = 256           # token positions per step whose logits enter the KL term

    def __post_init__(self):
        from lowbit.errors import RecipeError

        for k in ("iters", "batch", "kl_blocks", "kl_tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RecipeError(f"learned.{k}={v!r} must be a positive integer")
        for k in ("lr", "scale_range", "zero_range", "scaling_range", "kl"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RecipeError(f"learned.{k}={v!r} must be a non-negative number")
        if not 0 <= self.scale_range < 1:
            raise RecipeError(f"learned.scale_range={self.scale_range!r} must be in [0, 1)")
        if self.target not in ("fp", "block"):
            raise RecipeError(f"learned.target={self.target!r} must be 'fp' or 'block'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RecipeError(f"learned.seed={self.seed!r} must be an integer")
        if not isinstance(self.scaling, bool):
            raise RecipeError(f"learned.scaling={self.scaling!r} must be true or false")
        if self.kl > 0 and self.target != "fp":
            raise RecipeError("learned.kl needs learned.target 'fp' (the KL is taken to the full-precision model's logits)")

    @property
    def step(self) -> float:
        return self.lr if self.lr > 0 else 1.0 / self.iters


class LearnedWeight(nn.Module):
    """The learnable quantized version of one weight (out, in), started from ``init`` (GroupedInt or outliers)."""

    def __init__(self, weight: Tensor, init: WeightFormat, spec: QuantSpec, learned: LearnedSpec):
        super().__init__()
        base = init.base if isinstance(init, OutlierFormat) else init
        if not isinstance(base, GroupedInt):
            raise TypeError(f"learned rounding starts from a grouped_int format, not {type(base).__name__}")
        self.spec, self.learned = spec, learned
        self.outliers = init if isinstance(init, OutlierFormat) else None
        w = weight.detach().float()
        self.register_buffer("w", w)
        self.register_buffer("s0", base.scale.float())
        self.register_buffer("z0", base.zero_points().float())
        in_f = w.shape[1]
        self.width = spec.group_width(in_f)                 # columns per group (_ranges); the last may be shorter
        mask = None
        if self.outliers is not None:
            mask = torch.zeros_like(w, dtype=torch.bool)
            rows = self.outliers.rows()
            mask[rows.long(), self.outliers.col.long()] = True
        self.register_buffer("mask", mask)
        # start at the smallest offset that reproduces the starting codes (module docstring)
        x = w / expand_groups(self.s0, spec, in_f) + expand_groups(self.z0, spec, in_f)
        q0 = base.unpacked().float()
        d = q0 - torch.round(x)
        margin = 0.05
        v0 = torch.where(d > 0, q0 - 0.5 + margin - x, torch.where(d < 0, q0 + 0.5 - margin - x, torch.zeros_like(x)))
        wide = bool((v0.abs() > 0.5).any())
        self.register_buffer("v_lo", torch.minimum(v0, torch.full_like(v0, -0.5)) if wide else None)
        self.register_buffer("v_hi", torch.maximum(v0, torch.full_like(v0, 0.5)) if wide else None)
        self.v = nn.Parameter(v0.clamp(-0.5, 0.5) if not wide else v0)
        self.gamma = nn.Parameter(torch.ones_like(self.s0))
        self.delta = nn.Parameter(torch.zeros_like(self.z0), requires_grad=not spec.symmetric)
        self.fused = True                                  # False: the eager expression (tests compare the two)

    # -- equivalent scaling (module docstring) -------------------------------------------
    def scale_inputs(self, log_c: Tensor) -> None:
        """Train this layer as ``Q(W · diag(c)) · diag(1/c)``, ``c = exp(log_c)``; ``log_c`` (in_features,) is a
        parameter shared by every layer reading the same input, owned (and stepped) by the caller."""
        object.__setattr__(self, "_log_c", log_c)             # not registered: not one of this layer's parameters
        lo, hi = self._ranges(self.w)
        self.register_buffer("span0", (hi - lo).clamp(min=1e-12))
        self.register_buffer("amax0", torch.maximum(-lo, hi).clamp(min=1e-12))
        self.register_buffer("zmm0", -lo * self.spec.maxq / self.span0)

    def scale_outputs(self, c: Tensor, rows: slice) -> None:
        """Store output rows ``rows`` divided by ``c`` (the fold of the next layers' input scale): their fp16
        scales (and outlier values) are divided, codes and zero points unchanged."""
        div = self.row_div if getattr(self, "row_div", None) is not None else torch.ones(self.w.shape[0])
        div = div.clone()
        div[rows] = c.detach().float()
        self.register_buffer("row_div", div)

    def _c(self) -> Tensor | None:
        log_c = getattr(self, "_log_c", None)
        return None if log_c is None else torch.exp(log_c)

    def _ranges(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group (min, max) of ``w``, zero included (as round-to-nearest's ranges)."""
        out, n = w.shape
        pad = self.s0.shape[1] * self.width - n                 # the short last group is padded with zeros,
        g = F.pad(w, (0, pad)).view(out, -1, self.width)        # which the ranges include anyway
        return g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)

    def _params(self, scaled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.s0 * self.gamma
        z = self.z0 + self.delta
        if scaled is not None:                             # the ranges follow W · diag(c): s₀ and z₀ move with them
            lo, hi = self._ranges(scaled)
            if self.spec.symmetric:
                s = s * torch.maximum(-lo, hi) / self.amax0
            else:
                span = (hi - lo).clamp(min=1e-12)
                s = s * span / self.span0
                z = z + (-lo * self.spec.maxq / span - self.zmm0)
        s = s.clamp(min=_FP16_TINY)
        if self.spec.int_zero:                             # stored as an integer code: rounded, gradients straight through
            z = _ste_round(z).clamp(0, self.spec.maxq)
        return s, z

    def forward(self) -> Tensor:
        """The fake-quantized weight (out, in), differentiable in v, γ, δ (and the shared input scale)."""
        c = self._c()
        w = self.w if c is None else self.w * c
        s, z = self._params(None if c is None else w)
        s = s + (s.half().float() - s).detach()            # the stored fp16 values, gradients straight through
        z = z + (z.half().float() - z).detach()
        if c is None and self.fused and _fused_fake_quant(w):   # one C++ pass each way, the same values
            w_hat = _FakeQuant.apply(w, self.v, s.contiguous(), z.contiguous(), self.width, self.spec.maxq)
        else:
            s, z = expand_groups(s, self.spec, w.shape[1]), expand_groups(z, self.spec, w.shape[1])
            q = torch.clamp(_ste_round(w / s + z + self.v), 0, self.spec.maxq)
            w_hat = (q - z) * s
        if self.mask is not None:
            w_hat = torch.where(self.mask, w, w_hat)
        return w_hat if c is None else w_hat / c

    @torch.no_grad()
    def project(self) -> None:
        """Keep every parameter in its allowed range (after each step)."""
        r, d = self.learned.scale_range, self.learned.zero_range
        if self.v_lo is None:
            self.v.clamp_(-0.5, 0.5)
        else:
            torch.maximum(self.v, self.v_lo, out=self.v)
            torch.minimum(self.v, self.v_hi, out=self.v)
        self.gamma.clamp_(1 - r, 1 + r)
        self.delta.clamp_(-d, d)

    @torch.no_grad()
    def to_format(self) -> WeightFormat:
        """The stored format: codes from the learned rounding with the fp16 scale and zero actually stored
        (the input scale multiplied in, the output rows' divisor folded into the scales)."""
        c = self._c()
        w = self.w if c is None else self.w * c
        s, z = self._params(None if c is None else w)
        zero = z.half()
        sf = expand_groups(s.half().float(), self.spec, w.shape[1])
        zf = expand_groups(zero.float(), self.spec, w.shape[1])
        q = torch.round(w / sf + zf + self.v).clamp_(0, self.spec.maxq).to(torch.uint8)
        div = getattr(self, "row_div", None)
        if div is not None:
            s, w = s / div[:, None], w / div[:, None]
        base = GroupedInt.pack(q, s.half(), None if self.spec.symmetric else zero, self.spec)
        if self.outliers is None:
            return base
        return OutlierFormat.from_mask(base, self.mask, w)


__all__ = ["LearnedSpec", "LearnedWeight"]
