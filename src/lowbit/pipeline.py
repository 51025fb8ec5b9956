"""The block-by-block walk that quantizes a model.

    inputs = inputs of block 0 on the calibration windows            (only if the method needs statistics)
    for block in blocks:
        stats   = statistics of each target layer's inputs          (hooks, one pass over inputs)
        formats = method.quantize(weight, stats, spec) per target layer
        swap the targets for QuantLinear
        inputs  = block(inputs)                                       (the *quantized* block)

Only one block's activations exist at a time: peak memory is the model plus
``windows × seqlen × hidden`` floats twice (inputs and outputs of the current block).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.calibrate import collecting
from lowbit.errors import LowbitError, RecipeError, WeightValueError
from lowbit.formats import WeightFormat
from lowbit.models.adapters import Adapter, get_adapter
from lowbit.quantizers import get_method
from lowbit.recipe import Recipe

log = logging.getLogger("lowbit.pipeline")


@dataclass
class LayerRecord:
    format: dict
    bias: bool
    weights: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights

    def to_dict(self) -> dict:
        return {"format": self.format, "bias": self.bias, "weights": self.weights, "nbytes": self.nbytes,
                "bits_per_weight": round(self.bits_per_weight, 6)}


@dataclass
class QuantizeReport:
    recipe: Recipe
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    seconds: float = 0.0
    calibration: dict | None = None

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.layers.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights if self.weights else 32.0


# -- capturing and replaying block inputs ----------------------------------------------
class _Captured(Exception):
    pass


@dataclass
class BlockInput:
    """One calibration batch as a block sees it: hidden states plus the other arguments of its forward."""

    hidden: Tensor                       # (batch, seq, hidden)
    args: tuple                          # positional arguments after the hidden states
    kwargs: dict[str, Any]


def capture_block_inputs(model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int = 8) -> list[BlockInput]:
    """Run the model on ``windows`` (n, seqlen) up to its first block; return what that block received."""
    first = adapter.blocks(model)[0][1]
    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        if args:
            captured.append(BlockInput(args[0], args[1:], dict(kwargs)))
        else:
            kwargs = dict(kwargs)
            captured.append(BlockInput(kwargs.pop("hidden_states"), (), kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The block's outputs, packaged as the next block's inputs."""
    out = []
    with torch.no_grad():
        for inp in inputs:
            y = block(inp.hidden, *inp.args, **inp.kwargs)
            out.append(BlockInput(y[0] if isinstance(y, tuple) else y, inp.args, inp.kwargs))
    return out


# -- the walk --------------------------------------------------------------------------
def quantize_model(model: nn.Module, recipe: Recipe, calibration: Tensor | None = None,
                   progress: bool = True) -> QuantizeReport:
    """Quantize ``model`` in place following ``recipe``; ``calibration`` (n, seqlen) token windows if the method needs them."""
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    method = get_method(recipe.method)
    report = QuantizeReport(recipe)
    inputs = None
    if method.needs:
        if calibration is None:
            raise LowbitError(f"method {method.name!r} needs calibration windows ({', '.join(sorted(method.needs))})")
        inputs = capture_block_inputs(model, adapter, calibration)
    blocks = adapter.blocks(model)
    bar = tqdm(blocks, desc=f"quantize {recipe.name}", unit="block", disable=not progress)
    for block_name, block in bar:
        refs = {rel: ref for rel, ref in adapter.linears(block).items() if recipe.selects(f"{block_name}.{rel}")}
        stats: dict[str, dict[str, Tensor]] = {}
        if method.needs and refs:
            dense = {rel: ref.module for rel, ref in refs.items() if ref.param is None}
            if len(dense) < len(refs):
                raise LowbitError(f"{block_name}: method {method.name!r} needs statistics, "
                                  "which are not collected for fused MoE experts yet; use rtn or rtn_clip")
            with collecting(dense, method.needs) as acc:
                run_block(block, inputs)
            stats = {rel: {k: s.result() for k, s in st.items()} for rel, st in acc.items()}
        formats: dict[str, WeightFormat] = {}
        for rel, ref in refs.items():
            w = ref.weight()
            if not torch.isfinite(w).all():
                raise WeightValueError(f"{block_name}.{rel}: weight holds NaN or Inf; "
                                       "the source model is damaged, fix or re-export it before quantizing")
            formats[rel] = fmt = method.quantize(w, stats.get(rel, {}), recipe.spec, recipe.options)
            report.layers[f"{block_name}.{rel}"] = LayerRecord(fmt.meta(), ref.bias() is not None, w.numel(), fmt.nbytes())
        adapter.install(block, formats)
        if inputs is not None:
            inputs = run_block(block, inputs)
        bar.set_postfix(bits=f"{report.bits_per_weight:.3f}")
    if not report.layers:
        raise RecipeError(f"recipe {recipe.name!r} selects no layer: targets={list(recipe.targets)} "
                          f"ignore={list(recipe.ignore)} matched nothing among the decoder blocks' linear layers")
    report.seconds = time.perf_counter() - t0
    return report
