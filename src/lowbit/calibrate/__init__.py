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

from lowbit.errors import LowbitError

STATS: dict[str, type["Statistic"]] = {}


class Statistic(ABC):
    """Accumulates one statistic of the rows ``x`` (n, in) a layer receives."""

    name: str

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        STATS[cls.name] = cls

    def __init__(self, in_features: int):
        self.n = 0

    @abstractmethod
    def update(self, x: Tensor) -> None: ...

    @abstractmethod
    def result(self) -> Tensor: ...


class Hessian(Statistic):
    name = "hessian"

    def __init__(self, in_features):
        super().__init__(in_features)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)

    def update(self, x):
        self.xtx += (x.t() @ x).double()            # fp32 product per batch, fp64 running sum
        self.n += x.shape[0]

    def result(self):
        return (2.0 / max(self.n, 1) * self.xtx).float()


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
def collecting(modules: dict[str, nn.Module], needs: frozenset[str]) -> Iterator[dict[str, dict[str, Statistic]]]:
    """Hook ``modules`` (Linear/Conv1D by name) while the caller runs forward passes; yields the accumulators.

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
            rows = x.detach().reshape(-1, x.shape[-1]).float()             # (rows, in)
            for st in stats.values():
                st.update(rows)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield acc
    finally:
        last[0] = None
        for h in handles:
            h.remove()
