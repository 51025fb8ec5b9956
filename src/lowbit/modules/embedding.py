"""``QuantEmbedding``: a drop-in token embedding whose table stays packed, read one row per token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.formats import GroupedInt, dequantize_codes, format_class, unpack_codes
from lowbit.modules.quant_linear import QuantLinear


class QuantEmbedding(nn.Module):
    """``out[..., :] = dequantize(table)[ids] · embed_scale`` with the table a :class:`GroupedInt` (vocab, dim).

    Row ``t`` of the table is token ``t``'s vector; a per-channel format (``group_size=-1``) has one
    fp16 scale per token. The table is held in one of two ways:

    ========  =================================================  ==========================================
    mode      tensors                                            used for
    ========  =================================================  ==========================================
    own       ``codes``, ``scale`` (``zero``) buffers, as in     an embedding not tied to the head
              :class:`QuantLinear`
    tied      none: reads the rows of the head's                 a head tied to the embeddings (SmolLM2,
              :class:`QuantLinear` (vocab, dim)                  Gemma, GPT-2, OPT): one copy of the codes
    ========  =================================================  ==========================================

    A tied module keeps the head as a plain reference, not a registered submodule, so
    ``state_dict``, ``.to()`` and byte counts see the shared codes once, under the head's name;
    whoever installs it (:mod:`lowbit.head`) sets the head in the same model.

    ``embed_scale`` is a scalar buffer (not saved): Gemma's ``√hidden`` (its embedding modules
    multiply inside ``forward``), 1 elsewhere. Its dtype is the output dtype, so casting the model
    (``.to(torch.bfloat16)``) changes the output dtype like it would an ``nn.Embedding``'s weight;
    the stored codes and fp16 scales keep their dtypes (as in :class:`QuantLinear`).

    The gathered rows go through the format's own :func:`~lowbit.formats.dequantize_codes`
    (``(q - zero) · scale`` in fp32), then are cast and scaled: ``forward(ids)`` equals
    ``dequantize()[ids].to(dtype) * embed_scale`` bit for bit. Only the looked-up rows are
    dequantized; like :func:`dequantize_codes` (which allocates its output there), this runs on the CPU.
    """

    def __init__(self, fmt: GroupedInt | None = None, *, tied_to: QuantLinear | None = None,
                 padding_idx: int | None = None, embed_scale: float | Tensor = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if (fmt is None) == (tied_to is None):
            raise ValueError("QuantEmbedding needs exactly one of fmt (own table) or tied_to (the head)")
        table = fmt if fmt is not None else tied_to.fmt
        if not isinstance(table, GroupedInt):
            raise TypeError(f"QuantEmbedding reads grouped_int tables, got {type(table).__name__}")
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx
        self.meta = table.meta()
        if fmt is not None:
            for name, t in fmt.tensors().items():
                self.register_buffer(name, t)
            self._tied: tuple[QuantLinear, ...] = ()
        else:
            self._tied = (tied_to,)                     # a tuple: not registered as a submodule
        scale = embed_scale.detach().clone() if isinstance(embed_scale, Tensor) else torch.tensor(float(embed_scale))
        self.register_buffer("embed_scale", scale.to(dtype), persistent=False)

    @classmethod
    def empty(cls, meta: dict, *, padding_idx: int | None = None, embed_scale: float | Tensor = 1.0,
              dtype: torch.dtype = torch.float32) -> QuantEmbedding:
        """An own-table module with uninitialised tensors of the right shapes, for a checkpoint to fill."""
        return cls(format_class(meta).empty(meta), padding_idx=padding_idx, embed_scale=embed_scale, dtype=dtype)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @property
    def fmt(self) -> GroupedInt:
        """The table's format, built from the current tensors (the head's when tied)."""
        if self._tied:
            return self._tied[0].fmt
        names = ("codes", "scale") + (("zero",) if "zero" in self._buffers else ())
        return format_class(self.meta).from_tensors(self.meta, {n: self._buffers[n] for n in names})

    def _apply(self, fn, *args, **kw):
        """Device moves apply to every tensor; dtype casts reach ``embed_scale`` only: the codes and scales keep
        their dtypes and values (taken from before the cast, since fp16 -> bf16 -> fp16 would round the scales)."""
        stored = {n: b for n, b in self._buffers.items() if b is not None and n != "embed_scale"}
        out = super()._apply(fn, *args, **kw)
        for name, before in stored.items():
            if self._buffers[name].dtype != before.dtype:
                self._buffers[name] = before.to(self._buffers[name].device)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        fmt = self.fmt
        flat = ids.reshape(-1)                                                   # (n,) token ids
        q = unpack_codes(fmt.codes[flat], fmt.spec.bits, self.embedding_dim)     # (n, dim) uint8
        scale = fmt.scale[flat]                                                  # (n, G) fp16
        w = dequantize_codes(q, scale, fmt.zero_points(flat), fmt.spec)        # (n, dim) fp32: the format's own rule
        out = w.to(self.embed_scale.dtype) * self.embed_scale
        return out.view(*ids.shape, self.embedding_dim)

    @property
    def weight_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def nbytes(self) -> int:
        """Bytes this module stores: the table's, or 0 when tied (the head's :class:`QuantLinear` counts them)."""
        return 0 if self._tied else self.fmt.nbytes()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self.meta['kind']} bits={self.meta.get('bits')} "
                f"group_size={self.meta.get('group_size')}" + (", tied to the head" if self._tied else ""))
