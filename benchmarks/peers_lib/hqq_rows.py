"""HQQ (``hqq`` package): ``HQQLinear`` per decoder linear layer, its default config otherwise.

``BaseQuantizeConfig(nbits, group_size)``: axis=1, proximal optimization of the zero points (HQQ's
default), zero rounded at 4 bits. HQQ groups the *flattened* weight, so a 576-wide row's groups of
128 run across row ends (a group may hold the tail of one row and the head of the next): the
count of groups is the same as row-wise groups would give on divisible shapes.

compute_dtype is HQQ's default fp16, so scales and zeros are stored in fp16 (what HQQ saves). HQQ's
own PyTorch forward multiplies in compute_dtype, which would need fp16 activations; to keep every
row's activations in fp32 the layer's forward is ``F.linear(x, W_deq.float())`` with ``W_deq =
layer.dequantize()``, i.e. exactly the weights HQQ reconstructs. The lm_head and embeddings stay
fp32 (HQQ's AutoHQQHFModel would also quantize the lm_head and cast the rest to fp16).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .common import Context, RowOutput, Timer, count_storage, set_module


def _fp32_forward(self, x):
    w = self.dequantize().float()
    return F.linear(x.float(), w, None if self.bias is None else self.bias.float()).to(x.dtype)


def run(ctx: Context, nbits: int, group_size: int | None) -> RowOutput:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    loaded = ctx.load()
    model, layers = loaded.model, ctx.layers
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    with Timer() as t, torch.no_grad():
        for name in layers:
            h = HQQLinear(model.get_submodule(name), cfg, compute_dtype=torch.float16, device="cpu")
            set_module(model, name, h)
    for name in layers:
        h = model.get_submodule(name)
        h.forward = types.MethodType(_fp32_forward, h)
    return RowOutput(model, t.seconds, count_storage(model, layers, nbits),
                     ["fp32 activations: forward = F.linear(x, dequantize().float())"],
                     {"quant_config": {k: v for k, v in cfg["weight_quant_params"].items()}})
