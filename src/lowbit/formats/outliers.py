"""A base weight format plus a sparse set of weights kept exactly in fp16 (outlier protection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import CheckpointError, ShapeError, WeightValueError
from lowbit.formats.base import WeightFormat, check_tensors, format_class

_PREFIX = "outlier_"
_INT16_MAX_COLS = 32767            # column indices fit int16 up to this many input features


def col_dtype(in_features: int) -> torch.dtype:
    """int16 column indices while ``in_features <= 32767``, int32 beyond."""
    return torch.int16 if in_features <= _INT16_MAX_COLS else torch.int32


@dataclass(eq=False)
class OutlierFormat(WeightFormat, kind="outliers"):
    """A base format (e.g. :class:`GroupedInt`) with ``nnz`` weights overridden by exact fp16 values.

    The outliers are stored in CSR order (row by row, columns ascending within a row):

    ===============  ============  ============  ================================================
    name             dtype         shape         meaning
    ===============  ============  ============  ================================================
    (base tensors)   (the base's)  (the base's)  e.g. ``codes``, ``scale``, ``zero`` of grouped_int
    outlier_row_ptr  int32         (out + 1,)    row ``o`` owns entries ``row_ptr[o]:row_ptr[o+1]``
    outlier_col      int16/int32   (nnz,)        input column of each entry; int16 if in <= 32767
    outlier_values   fp16          (nnz,)        the original weight at that position
    ===============  ============  ============  ================================================

    ``W = base.dequantize()`` with the ``nnz`` positions *overwritten* by ``values``: a stored
    value is the weight itself, not a correction, so ``dequantize()`` gives ``fp16(w)`` exactly
    there, whatever the base's codes hold at those positions (a quantizer fills them with a
    neutral value, see :func:`lowbit.quantizers.outliers.with_outliers`). A kernel computes
    ``x @ base.T + x @ D.T`` with the sparse ``D = values - base`` at those positions, derived
    once per layer (:meth:`corrections`).

    Bytes: ``base.nbytes() + 4 * (out + 1) + (2 or 4) * nnz + 2 * nnz``. ``meta()`` nests the
    base's meta under ``"base"`` and records ``nnz`` so :meth:`empty` can allocate exact shapes.
    """

    base: WeightFormat
    row_ptr: Tensor
    col: Tensor
    values: Tensor

    def __post_init__(self):
        if isinstance(self.base, OutlierFormat):
            raise ShapeError("outliers: the base format cannot itself hold outliers")
        clash = [n for n in self.base.tensors() if n.startswith(_PREFIX)]
        assert not clash, f"base tensor names {clash} collide with the outlier tensors"
        out_f, in_f = self.base.shape
        nnz = self.values.shape[0] if self.values.dim() == 1 else -1
        want = {
            "row_ptr": ((out_f + 1,), torch.int32),
            "col": ((nnz,), col_dtype(in_f)),
            "values": ((nnz,), torch.float16),
        }
        check_tensors(self, want, f"outliers ({out_f}x{in_f}, nnz={nnz})")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_mask(cls, base: WeightFormat, mask: Tensor, weight: Tensor) -> "OutlierFormat":
        """Keep ``weight`` (out, in) in fp16 wherever the bool ``mask`` (out, in) is set, ``base`` elsewhere."""
        if tuple(mask.shape) != base.shape or tuple(weight.shape) != base.shape:
            raise ShapeError(f"outliers: mask {tuple(mask.shape)} and weight {tuple(weight.shape)} "
                             f"must both have the base's shape {base.shape}")
        mask = mask.bool()
        per_row = mask.sum(1)                                                  # (out,)
        row_ptr = torch.zeros(base.shape[0] + 1, dtype=torch.int32, device=mask.device)
        row_ptr[1:] = per_row.cumsum(0)
        col = mask.nonzero()[:, 1].to(col_dtype(base.shape[1]))               # row-major: CSR order
        values = weight[mask].to(torch.float16)
        if not torch.isfinite(values).all():
            raise WeightValueError(f"outliers: a kept weight is NaN or beyond fp16's range (|w| > 65504): "
                                   f"max |w| = {weight[mask].abs().max().item():g}; rescale or re-export the model")
        return cls(base, row_ptr, col, values)

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {**self.base.tensors(), f"{_PREFIX}row_ptr": self.row_ptr, f"{_PREFIX}col": self.col,
                f"{_PREFIX}values": self.values}

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "nnz": self.nnz, "base": self.base.meta()}

    @classmethod
    def _parse(cls, meta: dict) -> tuple[dict, int]:
        try:
            base_meta, nnz = meta["base"], int(meta["nnz"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"bad outliers metadata {meta!r}: {e!r}") from None
        if not isinstance(base_meta, dict) or nnz < 0:
            raise CheckpointError(f"bad outliers metadata {meta!r}: 'base' must be a format's metadata, 'nnz' >= 0")
        return base_meta, nnz

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, Tensor]) -> "OutlierFormat":
        base_meta, nnz = cls._parse(meta)
        names = [f"{_PREFIX}{n}" for n in ("row_ptr", "col", "values")]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(f"outliers: tensor(s) {', '.join(missing)} missing; the checkpoint is incomplete")
        base = format_class(base_meta).from_tensors(
            base_meta, {n: t for n, t in tensors.items() if not n.startswith(_PREFIX)})
        fmt = cls(base, *(tensors[n] for n in names))
        if fmt.nnz != nnz or list(fmt.shape) != list(meta.get("shape", fmt.shape)):
            raise ShapeError(f"outliers: tensors hold {fmt.shape} with nnz={fmt.nnz}, "
                             f"metadata says {meta.get('shape')} with nnz={nnz}")
        fmt.check_indices()
        return fmt

    @classmethod
    def empty(cls, meta: dict) -> "OutlierFormat":
        base_meta, nnz = cls._parse(meta)
        base = format_class(base_meta).empty(base_meta)
        out_f, in_f = base.shape
        return cls(base, torch.zeros(out_f + 1, dtype=torch.int32), torch.zeros(nnz, dtype=col_dtype(in_f)),
                   torch.zeros(nnz, dtype=torch.float16))

    def check_indices(self) -> None:
        """row_ptr runs from 0 to nnz without decreasing; columns are in range and strictly ascending per row."""
        out_f, in_f = self.shape
        rp, col = self.row_ptr.long(), self.col.long()
        if rp[0] != 0 or rp[-1] != self.nnz or (rp.diff() < 0).any():
            raise ShapeError(f"outliers: row_ptr must rise from 0 to nnz={self.nnz}; the tensors are corrupt")
        if self.nnz and (col.min() < 0 or col.max() >= in_f):
            raise ShapeError(f"outliers: column index outside [0, {in_f}); the tensors are corrupt")
        rows = self.rows()
        same_row = rows[1:] == rows[:-1]
        if (same_row & (col[1:] <= col[:-1])).any():
            raise ShapeError("outliers: columns must be strictly ascending within a row; the tensors are corrupt")

    # -- reading ----------------------------------------------------------------------
    def rows(self) -> Tensor:
        """int64 (nnz,) row of each entry, expanded from ``row_ptr``."""
        counts = self.row_ptr.long().diff()                                 # (out,)
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.base.dequantize(torch.float32)                             # (out, in)
        w[self.rows(), self.col.long()] = self.values.float()
        return w.to(dtype)

    def corrections(self) -> Tensor:
        """fp32 (nnz,) ``values - base`` at the outlier positions: what a kernel adds to the base's product."""
        base = self.base.dequantize(torch.float32)                          # transient (out, in)
        return self.values.float() - base[self.rows(), self.col.long()]
