"""Statistics of a layer's inputs that quantizers ask for, collected with forward hooks.

===========  ==========================  ==============================================
name         shape                       value
===========  ==========================  ==============================================
hessian      fp32 (in, in)               ``H = 2/n Σ xᵀx`` over the n input rows seen
act_absmean  fp32 (in,)                  ``mean |x|`` per input channel
===========  ==========================  ==============================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lowbit.cpu import native_bf16
from lowbit.errors import LowbitError

STATS: dict[str, type["Statistic"]] = {}

def forward_dtype(requested: str) -> torch.dtype:
    """The dtype of the calibration forward passes for ``calibration.dtype`` = ``requested``: ``float32`` as
    asked; ``bfloat16`` (the default) where the CPU computes it natively (:func:`native_bf16`), else fp32,
    since there emulated bf16 is both slower and less accurate."""
    return torch.bfloat16 if requested == "bfloat16" and native_bf16() else torch.float32


class Statistic(ABC):
    """Accumulates one statistic of the rows ``x`` (n, in) a layer receives."""

    name: str

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        STATS[cls.name] = cls

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.n = 0

    @abstractmethod
    def update(self, x: Tensor) -> None: ...

    @abstractmethod
    def result(self) -> Tensor: ...


def _band_starts(width: int, band: int = 384) -> list[int]:
    """First columns of the bands a Hessian is accumulated in: 1 band up to 511 wide, 2 up to 1023, then ~``band`` wide."""
    n = 1 if width < 512 else 2 if width < 1024 else -(-width // band)
    step = -(-width // n)
    return list(range(0, width, step))


class Hessian(Statistic):
    name = "hessian"

    def __init__(self, in_features):
        super().__init__(in_features)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.starts = _band_starts(in_features)

    def update(self, x):
        # product in the rows' precision (fp32, or bf16 with fp32 accumulation inside the matmul,
        # rounded once per batch: about 1e-3 relative), fp64 running sum. Only the block rows on and
        # above the diagonal are multiplied (XᵀX is symmetric): 62.5 % of the work at 4 bands
        for a, z in zip(self.starts, [*self.starts[1:], self.in_features]):
            self.xtx[a:z, a:] += (x[:, a:z].t() @ x[:, a:]).double()
        self.n += x.shape[0]

    def result(self):
        upper = torch.triu(self.xtx)                    # the computed part holds the whole upper triangle
        return (2.0 / max(self.n, 1) * (upper + torch.triu(self.xtx, 1).t())).float()


class ActAbsMean(Statistic):
    name = "act_absmean"

    def __init__(self, in_features):
        super().__init__(in_features)
        self.total = torch.zeros(in_features, dtype=torch.float64)

    def update(self, x):
        self.total += x.abs().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    def result(self):
        return (self.total / max(self.n, 1)).float()


def check_needs(needs: frozenset[str]) -> None:
    unknown = set(needs) - set(STATS)
    if unknown:
        raise LowbitError(f"unknown statistic(s) {sorted(unknown)}; known: {', '.join(sorted(STATS))}")


@contextmanager
def collecting(modules: dict[str, nn.Module], needs: frozenset[str],
               dtype: torch.dtype = torch.float32) -> Iterator[dict[str, dict[str, Statistic]]]:
    """Hook ``modules`` (Linear/Conv1D by name) while the caller runs forward passes; yields the accumulators.

    The rows a layer receives are cast to ``dtype`` (fp32, or bf16 when the calibration runs in bf16,
    where the matmul would round them so anyway) before they update the statistics.

    Layers fed the very same input tensor (q/k/v, gate/up) share one set of accumulators, found
    on the first forward pass, so each distinct input is accumulated once.
    """
    check_needs(needs)
    acc: dict[str, dict[str, Statistic]] = {}
    last: list = [None, None]                     # [input tensor seen last, the name that owns its stats]
    handles = []
    for name, mod in modules.items():
        in_f = mod.weight.shape[0] if isinstance(mod, Conv1D) else mod.weight.shape[1]

        def hook(_mod, args, _out, name=name, in_f=in_f):
            x = args[0]
            if last[0] is x and last[1] != name:
                if name not in acc:                                      # same input as the previous layer
                    acc[name] = acc[last[1]]
                return
            last[0], last[1] = x, name
            stats = acc.setdefault(name, {s: STATS[s](in_f) for s in needs})
            rows = x.detach().reshape(-1, x.shape[-1]).to(dtype)           # (rows, in)
            for st in stats.values():
                st.update(rows)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield acc
    finally:
        last[0] = None
        for h in handles:
            h.remove()


@contextmanager
def collecting_experts(experts: nn.Module, prefix: str, needs: frozenset[str],
                       dtype: torch.dtype = torch.float32) -> Iterator[dict[str, dict[str, Statistic]]]:
    """Statistics of every routed expert's inputs in a fused MoE ``experts`` module (3-D ``gate_up_proj``,
    ``down_proj``), keyed ``<prefix>.gate_up_proj.<e>`` and ``<prefix>.down_proj.<e>``.

    A hook on the module sees the tokens and the routing of each forward call; for each expert it
    updates the statistics with the rows routed to it (``gate_up_proj``'s input) and recomputes
    ``act(gate) · up`` from the full-precision expert for ``down_proj``'s input. An expert that no
    calibration token reaches keeps ``n == 0`` (see :func:`empty_statistics`)."""
    check_needs(needs)
    n_exp, two_i, hidden = experts.gate_up_proj.shape
    acc = {f"{prefix}.{p}.{e}": {s: STATS[s](width) for s in needs}
           for p, width in (("gate_up_proj", hidden), ("down_proj", two_i // 2)) for e in range(n_exp)}

    def hook(mod, args, kwargs, _out):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hs, idx, _ = [*args, *(kwargs[k] for k in names[len(args):])][:3]
        hs = hs.detach().reshape(-1, hs.shape[-1])
        with torch.no_grad():
            for e in torch.unique(idx).tolist():
                if not 0 <= e < n_exp:
                    continue
                token_idx = torch.where(idx == e)[0]
                x = hs[token_idx]
                gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                for name, rows in ((f"{prefix}.gate_up_proj.{e}", x), (f"{prefix}.down_proj.{e}", h)):
                    for st in acc[name].values():
                        st.update(rows.to(dtype))

    handle = experts.register_forward_hook(hook, with_kwargs=True)
    try:
        yield acc
    finally:
        handle.remove()


def empty_statistics(stat: Statistic) -> bool:
    """True when no row reached the layer (e.g. an expert no calibration token was routed to)."""
    return stat.n == 0


def neutral_result(stat: Statistic) -> Tensor:
    """What a statistic stands in as when it saw no row: identity Hessian, unit activation magnitude
    (quantizers then treat every input channel alike, as round-to-nearest does)."""
    if stat.name == "hessian":
        return torch.eye(stat.in_features)
    return torch.ones(stat.in_features)
