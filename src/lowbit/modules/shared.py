"""Layers that read one input, run as one kernel call: q/k/v after the attention norm, gate/up after the MLP norm.

A decoded token makes about 210 small matrix-vector calls on SmolLM2, and each call has a fixed
cost (dispatch, a parallel region, the compiled graph's wrapper) besides the bytes it reads.
:class:`SharedInput` stacks the rows of layers that always see the same input tensor into one
format, so that ``q_proj``, ``k_proj`` and ``v_proj`` cost one call (960 rows instead of 576 + 192
+ 192), and ``gate_proj`` with ``up_proj`` another.

How a member gets its rows: the first member called with a tensor computes every member's output
and keeps it; the others, called with *that same tensor object*, take their rows of it. The kept
output is dropped once every member has read it, and a member called with another tensor (or
twice) computes afresh, so a caller that does not follow the block's pattern still gets exact
results, only without the saving. This works under ``torch.compile`` too: the identity test and
the bookkeeping are traced as Python, and the compiled step makes one kernel call per group.

Storage does not change: each member keeps its own format tensors (``state_dict`` and checkpoints
are as before) as row views of the group's stacked tensors, so the bytes are held once. Moving or
reloading any member (``.to()``, ``load_state_dict``) dissolves its group first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit import kernels
from lowbit.formats import GroupedInt


def can_share(mods: list) -> bool:
    """Whether ``mods`` (QuantLinear modules) can be stacked: plain grouped formats of one spec and width, on
    the CPU, biases all present or all absent, none already in a group."""
    if len(mods) < 2:
        return False
    fmts = [m.fmt for m in mods]
    first = fmts[0]
    return (all(type(f) is GroupedInt for f in fmts)
            and all(f.spec == first.spec and f.in_features == first.in_features for f in fmts)
            and all(f.codes.device.type == "cpu" for f in fmts)
            and len({m.bias is None for m in mods}) == 1
            and all(m._shared is None and m._dense is None for m in mods))


class SharedInput:
    """The stacked format of ``members`` and the call bookkeeping described in the module docstring."""

    def __init__(self, members: list):
        if not can_share(members):
            raise ValueError("these layers cannot share one kernel call")
        fmts = [m.fmt for m in members]
        stacked = {name: torch.cat([f.tensors()[name] for f in fmts]) for name in fmts[0].tensors()}
        self.fmt = GroupedInt(stacked["codes"], stacked["scale"], stacked.get("zero"), fmts[0].spec,
                              fmts[0].in_features)
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.members = list(members)
        self.n = len(members)
        self.plans: dict = {}
        self._decode = None
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._left = 0
        start = 0
        for m in members:
            stop = start + m.out_features
            m._invalidate()
            for name, t in stacked.items():                        # the member's stored tensors: row views
                m._buffers[name] = t[start:stop]
            m._shared, m._rows = self, (start, stop)
            start = stop

    def prepare_decode(self) -> None:
        if self._decode is None:
            self._decode = kernels.bind(self.fmt, 1, self.plans)

    def run(self, member, x: Tensor) -> Tensor:
        """``member``'s output for ``x``: its rows of the group's output, computed by the first member that asks."""
        if self._left == 0 or x is not self._x:
            y = kernels.module_linear(x, self.fmt, self.bias, self.plans, self._decode)
            self._x, self._y, self._left = x, y, self.n
        y = self._y
        self._left -= 1
        if self._left == 0:
            self._x = self._y = None
        a, b = member._rows
        return y[..., a:b]

    def dissolve(self) -> None:
        """Give every member tensors of its own again and leave the group."""
        for m in self.members:
            if m._shared is self:
                m._shared, m._rows = None, None
                for name, t in list(m._buffers.items()):
                    if t is not None:
                        m._buffers[name] = t.clone()
                m._invalidate()
        self.members, self.plans, self._decode, self._x, self._y = [], {}, None, None, None


def share_inputs(groups: list[list]) -> int:
    """Stack every group of QuantLinear modules that :func:`can_share`; the number of groups formed."""
    formed = 0
    for mods in groups:
        if can_share(mods):
            SharedInput(mods)
            formed += 1
    return formed


__all__ = ["SharedInput", "can_share", "share_inputs"]
