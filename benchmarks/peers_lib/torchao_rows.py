"""torchao: ``quantize_(model, config, filter_fn=<decoder linears>)``.

* ``Int4WeightOnlyConfig(group_size)``: torchao's int4 weight-only (packed). Its default packing
  needs the CUDA ``mslk`` kernels, and a layer whose width the group does not divide is silently
  left in full precision (576 % 128 != 0: every layer but down_proj).
* ``IntxWeightOnlyConfig(torch.intN, PerGroup(g), ASYMMETRIC)``: torchao's 1..8-bit weight-only
  path; the codes are stored one per int8 byte (``IntxUnpackedToInt8Tensor``), scales in the
  weight's dtype (fp32), zero points int8. The group must divide the width.
* ``Int8WeightOnlyConfig()``: int8 per output channel (symmetric; fp32 scale, int8 zero point).
"""

from __future__ import annotations

import torch

from .common import Context, RowOutput, Timer, count_storage


def _config(kind: str, bits: int, group: int | None):
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
    )

    if kind == "int4":
        return Int4WeightOnlyConfig(group_size=group)
    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "intx":
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group),
                                    mapping_type=MappingType.ASYMMETRIC)
    raise ValueError(kind)


def run(ctx: Context, kind: str, bits: int, group: int | None) -> RowOutput:
    from torchao.quantization import quantize_

    loaded = ctx.load()
    model, layers = loaded.model, ctx.layers
    cfg = _config(kind, bits, group)
    names = set(layers)
    with Timer() as t:
        quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in names)
    storage = count_storage(model, layers, bits)
    notes = []
    if storage["float_layers"]:
        notes.append(f"{storage['float_layers']} of {len(layers)} layers left in fp32 by torchao")
    return RowOutput(model, t.seconds, storage, notes, {"config": repr(cfg)})
