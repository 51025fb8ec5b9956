"""Group-wise integer codes with fp16 scales (and zero points): the 2/3/4/8-bit workhorse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import CheckpointError, RecipeError, ShapeError
from lowbit.formats.base import WeightFormat, check_tensors
from lowbit.formats.packing import pack_codes, packed_row_bytes, unpack_codes
from lowbit.formats.spec import QuantSpec


@dataclass(eq=False)
class GroupedInt(WeightFormat, kind="grouped_int"):
    """Integer codes in groups of ``group_size`` consecutive input columns, one scale (and zero) per group.

    Tensors (``G = ceil(in_features / group_size)``):

    ======  ======  =======================================  ==================================
    name    dtype   shape                                    meaning
    ======  ======  =======================================  ==================================
    codes   uint8   (out, ceil(in * bits / 8))               codes bit-packed per row, see packing
    scale   fp16    (out, G)                                 step of each group
    zero    fp16    (out, G)  -- asymmetric only             zero point in code units
    zero    uint8   (out, ceil(G * bits / 8))  -- int_zero   integer zero points packed like codes
    ======  ======  =======================================  ==================================

    ``w[o, i] = (q[o, i] - zero[o, i // group_size]) * scale[o, i // group_size]``; symmetric
    formats use the fixed zero ``2**(bits-1)``. :meth:`zero_points` gives the fp16 (out, G) zeros
    of every variant.

    A ``group_size`` that does not divide ``in_features`` leaves a shorter last group
    (SmolLM2's 576 columns at group 128 give groups of 128, 128, 128, 128 and 64): nothing is
    padded and ``nbytes`` counts exactly what is stored.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    spec: QuantSpec
    in_features: int

    def __post_init__(self):
        if self.spec.symmetric and self.zero is not None:
            raise ShapeError("a symmetric format stores no zero points")
        check_tensors(self, self.layout(self.codes.shape[0], self.in_features, self.spec), f"grouped_int {self.spec}")

    @staticmethod
    def layout(out_f: int, in_f: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        """name -> (shape, dtype) of every tensor the format stores (the table above)."""
        g = spec.n_groups(in_f)
        want = {"codes": ((out_f, packed_row_bytes(in_f, spec.bits)), torch.uint8),
                "scale": ((out_f, g), torch.float16)}
        if spec.int_zero:
            want["zero"] = ((out_f, packed_row_bytes(g, spec.bits)), torch.uint8)
        elif not spec.symmetric:
            want["zero"] = ((out_f, g), torch.float16)
        return want

    # -- construction -----------------------------------------------------------------
    @classmethod
    def pack(cls, q: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> "GroupedInt":
        """From unpacked integer codes (out, in) in [0, 2**bits) and fp16 per-group parameters (with
        ``spec.int_zero``, ``zero`` holds integers in [0, 2**bits), which are packed)."""
        if spec.int_zero and zero is not None and zero.dtype != torch.uint8:
            z = zero.float()
            if not bool(((z == z.round()) & (z >= 0) & (z <= spec.maxq)).all()):
                raise ShapeError(f"int_zero format: zero points must be integers in [0, {spec.maxq}]")
            zero = pack_codes(z.to(torch.uint8), spec.bits)
        return cls(pack_codes(q, spec.bits), scale, zero, spec, q.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.in_features)

    def tensors(self) -> dict[str, Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), **self.spec.to_dict()}

    @classmethod
    def _spec_of(cls, meta: dict) -> tuple[QuantSpec, int, int]:
        try:
            out_f, in_f = meta["shape"]
            spec = QuantSpec(meta["bits"], meta["group_size"], meta["symmetric"], meta.get("int_zero", False))
        except (KeyError, ValueError, TypeError, RecipeError) as e:
            raise CheckpointError(f"bad grouped_int metadata {meta!r}: {e}") from None
        return spec, int(out_f), int(in_f)

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, Tensor]) -> "GroupedInt":
        spec, _, in_f = cls._spec_of(meta)
        missing = [n for n in ("codes", "scale") + (() if spec.symmetric else ("zero",)) if n not in tensors]
        if missing:
            raise CheckpointError(f"grouped_int: tensor(s) {', '.join(missing)} missing; the checkpoint is incomplete")
        fmt = cls(tensors["codes"], tensors["scale"], tensors.get("zero"), spec, in_f)
        if list(fmt.shape) != list(meta["shape"]):
            raise ShapeError(f"grouped_int: codes hold shape {fmt.shape}, metadata says {meta['shape']}")
        return fmt

    @classmethod
    def empty(cls, meta: dict) -> "GroupedInt":
        spec, out_f, in_f = cls._spec_of(meta)
        t = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in cls.layout(out_f, in_f, spec).items()}
        return cls(t["codes"], t["scale"], t.get("zero"), spec, in_f)

    # -- reading ----------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> "GroupedInt":
        """Output rows ``start:stop`` as a format of their own (codes, scales and zeros are stored per row)."""
        zero = None if self.zero is None else self.zero[start:stop].clone()
        return GroupedInt(self.codes[start:stop].clone(), self.scale[start:stop].clone(), zero, self.spec,
                          self.in_features)

    def unpacked(self) -> Tensor:
        """uint8 codes (out, in)."""
        return unpack_codes(self.codes, self.spec.bits, self.in_features)

    def zero_points(self, rows: Tensor | None = None) -> Tensor:
        """fp16 (out, G) zero points, the fixed midpoint for symmetric formats; with ``rows`` (an index
        tensor) those rows only, (len(rows), G)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])   # noqa: E731
        if self.spec.int_zero:
            return unpack_codes(pick(self.zero), self.spec.bits, self.spec.n_groups(self.in_features)).half()
        if self.zero is not None:
            return pick(self.zero)
        return torch.full_like(pick(self.scale), float(1 << (self.spec.bits - 1)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_codes(self.unpacked(), self.scale, self.zero_points(), self.spec).to(dtype)


def expand_groups(per_group: Tensor, spec: QuantSpec, in_features: int) -> Tensor:
    """(out, G) per-group values -> (out, in) per-column values (ragged last group handled).

    A broadcast view reshaped, not ``repeat_interleave`` (a gather): its backward is a plain sum over each
    group's columns, where a gather's, an accumulating scatter, took a tenth of a 3-bit learning step
    on SmolLM2 (:mod:`lowbit.quantizers.learned` differentiates through this)."""
    g = spec.group_width(in_features)
    out, groups = per_group.shape
    return per_group[:, :, None].expand(out, groups, g).reshape(out, groups * g)[:, :in_features]


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """fp32 (out, in) from integer codes (out, in) and fp16 (out, G) scale/zero, written in place group-wise."""
    out_f, in_f = q.shape
    g = spec.group_width(in_f)
    full = in_f // g                                                  # groups of full width
    scale, zero = scale.float(), zero.float()
    if torch.compiler.is_compiling():
        # the same arithmetic as one expression: the writes through views below (``out=`` a slice of w) break
        # a compiled graph, and AOT autograd's replay of the aliased output then failed on torch 2.13
        # (``Dimension out of range``: the reference kernel in a compiled decode step without the extension)
        return (q.float() - expand_groups(zero, spec, in_f)) * expand_groups(scale, spec, in_f)
    w = torch.empty(out_f, in_f, device=q.device)
    if full:
        wv = w[:, : full * g].unflatten(1, (full, g))                 # (out, full, g) view into w
        torch.sub(q[:, : full * g].unflatten(1, (full, g)), zero[:, :full, None], out=wv)
        wv.mul_(scale[:, :full, None])
    if full * g < in_f:                                               # the shorter last group
        tail = w[:, full * g:]
        torch.sub(q[:, full * g:], zero[:, full:], out=tail)
        tail.mul_(scale[:, full:])
    return w
