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
from lowbit.models.lazy import LazyWeights
from lowbit.offload import Offload, fingerprint
from lowbit.quantizers import Method, get_method
from lowbit.quantizers.outliers import outlier_mask, with_outliers
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

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        return cls(d["format"], d["bias"], d["weights"], d["nbytes"])

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
def quantize_model(model: nn.Module, recipe: Recipe, calibration: Tensor | None = None, progress: bool = True,
                   offload: Offload | None = None, lazy: LazyWeights | None = None,
                   source_fingerprint: str = "") -> QuantizeReport:
    """Quantize ``model`` in place following ``recipe``; ``calibration`` (n, seqlen) token windows if the method needs them.

    With ``offload`` every finished block is recorded in that directory and a rerun of the same
    recipe on the same model and windows resumes after the last recorded block. With ``lazy``
    (which needs ``offload``) a block's weights are read from disk just before it is quantized
    and dropped once it is recorded, so memory holds one block at a time.
    """
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    method = get_method(recipe.method)
    if method.needs and calibration is None:
        raise LowbitError(f"method {method.name!r} needs calibration windows ({', '.join(sorted(method.needs))})")
    if lazy is not None and offload is None:
        raise LowbitError("quantizing a model lazily from disk needs an offload directory")
    report = QuantizeReport(recipe)
    start = 0
    if offload is not None:
        calib_hash = None if calibration is None or not method.needs else fingerprint(ids=calibration.tolist())
        start = offload.resume_point(fingerprint(recipe=recipe.to_dict(), source=source_fingerprint,
                                                 calibration=calib_hash))
        if start:
            log.info("resuming after block %d from %s", start - 1, offload.dir)
    inputs = None
    if method.needs:
        inputs = ([BlockInput(**x) for x in offload.load_inputs()] if start else
                  capture_block_inputs(model, adapter, calibration))
    blocks = adapter.blocks(model)
    bar = tqdm(blocks, desc=f"quantize {recipe.name}", unit="block", disable=not progress)
    for i, (block_name, block) in enumerate(bar):
        if i < start:                                                     # finished by an earlier run
            layers = offload.records(i)
            rel = {n[len(block_name) + 1:]: r for n, r in layers.items()}
            adapter.install_empty(block, rel)
            if lazy is None:
                offload.load_block(i, block, block_name)
            report.layers.update({n: LayerRecord.from_dict(r) for n, r in layers.items()})
            continue
        if lazy is not None:
            lazy.materialize(block, block_name)
        records = quantize_block(block_name, block, adapter, method, recipe, inputs)
        report.layers.update(records)
        if inputs is not None:
            inputs = run_block(block, inputs)
        if offload is not None:
            offload.save_block(i, block_name, block, {n: r.to_dict() for n, r in records.items()}, inputs)
        if lazy is not None:
            lazy.release(block)
        bar.set_postfix(bits=f"{report.bits_per_weight:.3f}")
    if not report.layers:
        raise RecipeError(f"recipe {recipe.name!r} selects no layer: targets={list(recipe.targets)} "
                          f"ignore={list(recipe.ignore)} matched nothing among the decoder blocks' linear layers")
    report.seconds = time.perf_counter() - t0
    return report


def quantize_block(block_name: str, block: nn.Module, adapter: Adapter, method: Method, recipe: Recipe,
                   inputs: list[BlockInput] | None) -> dict[str, LayerRecord]:
    """Collect the statistics ``method`` needs on ``inputs``, quantize the selected layers, swap them in."""
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
    records: dict[str, LayerRecord] = {}
    for rel, ref in refs.items():
        w = ref.weight()
        if not torch.isfinite(w).all():
            raise WeightValueError(f"{block_name}.{rel}: weight holds NaN or Inf; "
                                   "the source model is damaged, fix or re-export it before quantizing")
        formats[rel] = fmt = quantize_layer(method, w, stats.get(rel, {}), recipe)
        records[f"{block_name}.{rel}"] = LayerRecord(fmt.meta(), ref.bias() is not None, w.numel(), fmt.nbytes())
    adapter.install(block, formats)
    return records


def quantize_layer(method: Method, weight: Tensor, stats: dict[str, Tensor], recipe: Recipe) -> WeightFormat:
    """One layer's stored format under ``recipe``.

    With ``recipe.outliers > 0`` the most salient weights (by the Hessian when the method collected
    one, else by magnitude) are kept in fp16 and the method quantizes the rest
    (:mod:`lowbit.quantizers.outliers`)."""
    quantize = lambda dense: method.quantize(dense, stats, recipe.spec, recipe.options)  # noqa: E731
    if recipe.outliers <= 0:
        return quantize(weight)
    mask = outlier_mask(weight, recipe.outliers, stats.get("hessian"))
    return with_outliers(weight, mask, quantize, recipe.spec.group_size)
