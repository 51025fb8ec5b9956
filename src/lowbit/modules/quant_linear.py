"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight stays packed; ``QuantExperts`` for fused MoE experts."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import kernels
from lowbit.formats import WeightFormat, format_class


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in a :class:`WeightFormat`.

    The format's tensors are registered as buffers under their own names (``codes``,
    ``scale``, ``zero`` …), so ``state_dict`` holds exactly the stored bytes; ``meta`` (a
    JSON-able dict) says how to read them. No fp32 copy of the weight is kept between calls.
    """

    def __init__(self, fmt: WeightFormat, bias: Tensor | None = None):
        super().__init__()
        self.meta = fmt.meta()
        self.out_features, self.in_features = fmt.shape
        for name, t in fmt.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._fmt: WeightFormat | None = fmt
        self._plans: dict = {}
        self._dense: Tensor | None = None         # set only inside dense_weights()
        self._decode: tuple | None = None          # kernel + state for one row, bound by prepare_decode()
        self._shared = None                        # the SharedInput group this layer's rows belong to, if any
        self._rows: tuple[int, int] | None = None  # its rows in that group
        self._fused_in = None                      # the fused decoder layer (lowbit.decoding.fused) using its tensors

    @classmethod
    def empty(cls, meta: dict, bias: bool) -> "QuantLinear":
        """A module with uninitialised tensors of the right shapes, for a checkpoint to fill."""
        fmt = format_class(meta).empty(meta)
        out_f = fmt.shape[0]
        return cls(fmt, torch.zeros(out_f) if bias else None)

    @property
    def fmt(self) -> WeightFormat:
        if self._fmt is None:
            names = format_class(self.meta).empty(self.meta).tensors().keys()
            self._fmt = format_class(self.meta).from_tensors(self.meta, {n: getattr(self, n) for n in names})
        return self._fmt

    def _invalidate(self):
        if self._shared is not None:               # moved or reloaded: the stacked copy no longer matches
            self._shared.dissolve()
        if self._fused_in is not None:             # nor do the tensors a fused decoder layer took
            self._fused_in.stale = True
            self._fused_in = None
        self._fmt, self._plans, self._decode = None, {}, None

    def prepare_decode(self) -> None:
        """Choose and prepare the one-row kernel now, so that a ``torch.compile`` trace of the decode step
        finds it bound (nothing is timed or built inside a trace)."""
        if self._shared is not None:
            self._shared.prepare_decode()
            return
        self._decode = kernels.bind(self.fmt, 1, self._plans)

    def _apply(self, fn, *args, **kw):
        """Device moves apply; dtype casts (``.float()``, ``.to(torch.bfloat16)``) leave the stored tensors' dtypes alone."""
        self._invalidate()
        stored = {name: buf for name, buf in self._buffers.items() if buf is not None}
        out = super()._apply(fn, *args, **kw)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:       # the tensor from before the cast (fp16 -> bf16 would round)
                self._buffers[name] = before.to(after.device)
        return out

    def _load_from_state_dict(self, *args, **kw):
        self._invalidate()
        return super()._load_from_state_dict(*args, **kw)

    def forward(self, x: Tensor) -> Tensor:
        if self._dense is not None:
            if torch.is_autocast_enabled("cpu"):
                return F.linear(x, self._dense, self.bias)
            return F.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if torch.is_autocast_enabled("cpu"):
            # mixed-precision passes (the pipeline's bf16 calibration forwards): the weight in full, so
            # that autocast runs the matmul in its low precision like every other layer's
            return F.linear(x, self.fmt.dequantize(torch.float32), self.bias)
        if self._shared is not None:               # one kernel call for the layers reading x (modules.shared)
            return self._shared.run(self, x)
        return kernels.module_linear(x, self.fmt, self.bias, self._plans, self._decode)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        """Bytes of the stored weight (format tensors; the bias is counted with the unquantized rest)."""
        return self.fmt.nbytes()

    def extra_repr(self) -> str:
        m = self.meta.get("base", self.meta)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.meta['kind']} bits={m.get('bits')} group_size={m.get('group_size')} symmetric={m.get('symmetric')}")


@contextmanager
def dense_weights(root: nn.Module, dtype: torch.dtype = torch.float32):
    """While active, every :class:`QuantLinear` under ``root`` multiplies by its weight dequantized once on
    entry (``dtype``: fp32, or bf16 for passes under bf16 autocast, which would cast it on every call),
    instead of decoding it on each call: for passes of many large batches, such as the pipeline's
    calibration forwards. The copies are dropped on exit."""
    mods = [m for m in root.modules() if isinstance(m, QuantLinear)]
    for m in mods:
        m._dense = m.fmt.dequantize(torch.float32).to(dtype)
    try:
        yield
    finally:
        for m in mods:
            m._dense = None


class QuantExperts(nn.Module):
    """Replacement for transformers' fused MoE experts (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)).

    Each expert's two matrices become :class:`QuantLinear` modules, stored as
    ``gate_up_proj.<e>.*`` and ``down_proj.<e>.*``; the routing loop matches the original.
    """

    def __init__(self, gate_up: list[QuantLinear], down: list[QuantLinear], act_fn: nn.Module):
        super().__init__()
        self.num_experts = len(gate_up)
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.act_fn = act_fn

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)                                   # (tokens, H)
        for e in torch.unique(top_k_index).tolist():
            token_idx, slot = torch.where(top_k_index == e)                      # tokens routed to expert e
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@dataclass(frozen=True)
class Footprint:
    """Honest size figures of a model holding quantized layers."""

    quantized_weights: int       # number of weights in quantized layers
    quantized_bytes: int         # every byte stored for them: codes, scales, zeros, side data
    total_bytes: int             # the whole model: quantized layers + everything kept in full precision
    bits_per_weight: float       # 8 * quantized_bytes / quantized_weights

    def to_dict(self) -> dict:
        return asdict(self)


def footprint(model: nn.Module) -> Footprint:
    """Bytes as stored (shared tensors such as tied embeddings counted once)."""
    qmods = quant_modules(model)
    n = sum(m.weight_numel for m in qmods.values())
    qbytes = sum(m.nbytes() for m in qmods.values())
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return Footprint(n, qbytes, total, 8 * qbytes / n if n else 32.0)
