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

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.calibrate import (
    collecting,
    collecting_experts,
    empty_statistics,
    neutral_result,
)
from lowbit.errors import LowbitError, RecipeError, WeightValueError
from lowbit.formats import WeightFormat
from lowbit.head import HeadReport, quantize_head
from lowbit.models.adapters import Adapter, _set_submodule, get_adapter
from lowbit.models.lazy import LazyWeights
from lowbit.models.scaling import ScaleGroup, divide_output, fold, foldable, scale_groups
from lowbit.modules.quant_linear import dense_weights
from lowbit.offload import Offload, fingerprint
from lowbit.quantizers import Method, get_method
from lowbit.quantizers.awq import awq_search, scaled_stats
from lowbit.quantizers.learned import LearnedWeight
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
    head: HeadReport | None = None             # head/embeddings with ``head: int8`` (not in layers or bits_per_weight)
    earlier_seconds: float = 0.0               # blocks finished by an earlier, interrupted run (offload)

    @property
    def total_seconds(self) -> float:
        """Wall time of the whole quantization, the blocks an earlier interrupted run finished included."""
        return self.seconds + self.earlier_seconds

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


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()


def window_slice(inp: BlockInput, a: int, z: int) -> BlockInput:
    """Windows ``a:z`` of a batch: every tensor whose leading dimension is the batch size is sliced."""
    b = inp.hidden.shape[0]
    if a == 0 and z >= b:
        return inp

    def cut(v):
        if isinstance(v, Tensor):
            return v[a:z] if v.dim() and v.shape[0] == b else v
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return BlockInput(inp.hidden[a:z], cut(inp.args), cut(inp.kwargs))


def run_block(block: nn.Module, inputs: list[BlockInput], dtype: torch.dtype = torch.float32) -> list[BlockInput]:
    """The block's outputs, packaged as the next block's inputs (forward under bf16 autocast if ``dtype`` is bf16)."""
    out = []
    with torch.no_grad(), _autocast(dtype), dense_weights(block, dtype):
        for inp in inputs:
            y = block(inp.hidden, *inp.args, **inp.kwargs)
            y = y[0] if isinstance(y, tuple) else y
            out.append(BlockInput(y.to(inp.hidden.dtype), inp.args, inp.kwargs))
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
    needs = recipe.needs
    if recipe.needs_calibration and calibration is None:
        what = ", ".join(sorted(needs | ({"block outputs"} if recipe.learned else set())))
        raise LowbitError(f"recipe {recipe.name!r} needs calibration windows ({what})")
    if lazy is not None and offload is None:
        raise LowbitError("quantizing a model lazily from disk needs an offload directory")
    if lazy is not None and recipe.learned is not None and recipe.learned.kl > 0 and recipe.learned.kl_blocks > 1:
        raise RecipeError("learned.kl_blocks > 1 runs later blocks in full precision while a block learns, but a "
                          "model quantized lazily from disk holds one block at a time: use kl_blocks: 1, or "
                          "quantize in memory")
    report = QuantizeReport(recipe)
    start = 0
    if offload is not None:
        calib_hash = (None if calibration is None or not recipe.needs_calibration
                      else fingerprint(ids=calibration.tolist()))
        if calib_hash is not None and recipe.calibration.dtype == "bfloat16" \
                and recipe.calibration_dtype != torch.bfloat16:   # bf16 asked, fp32 runs (no native bf16 here):
            calib_hash = fingerprint(ids=calib_hash, forward="float32")  # a bf16 run's blocks do not resume here
        start = offload.resume_point(fingerprint(recipe=recipe.to_dict(), source=source_fingerprint,
                                                 calibration=calib_hash))
        if start:
            log.info("resuming after block %d from %s", start - 1, offload.dir)
    inputs = fp_inputs = None                 # quantized model's / full-precision model's activations
    fp_stream = recipe.learned is not None and recipe.learned.target == "fp"
    blocks = adapter.blocks(model)
    if recipe.needs_calibration and start < len(blocks):
        if start:
            saved, saved_fp = offload.load_inputs(start)
            inputs = [BlockInput(**x) for x in saved]
            fp_inputs = [BlockInput(**x) for x in saved_fp] if saved_fp is not None else None
        else:
            inputs = capture_block_inputs(model, adapter, calibration)
            fp_inputs = inputs if fp_stream else None
    bar = tqdm(blocks, desc=f"quantize {recipe.name}", unit="block", disable=not progress)
    mark = t0
    for i, (block_name, block) in enumerate(bar):
        if i < start:                                                     # finished by an earlier run
            report.earlier_seconds += offload.block_seconds(i)
            layers = offload.records(i)
            rel = {n[len(block_name) + 1:]: r for n, r in layers.items()}
            adapter.install_empty(block, rel)
            if lazy is None:
                offload.load_block(i, block, block_name)
            report.layers.update({n: LayerRecord.from_dict(r) for n, r in layers.items()})
            mark = time.perf_counter()
            continue
        if lazy is not None:
            lazy.materialize(block, block_name)
        targets = None
        if recipe.learned is not None:                                    # before anything changes the block
            targets = run_block(block, fp_inputs if fp_stream else inputs, recipe.calibration_dtype)
        tail = None
        if recipe.learned is not None and recipe.learned.kl > 0 and i >= len(blocks) - recipe.learned.kl_blocks:
            tail = LogitsTail(model, adapter, [b for _, b in blocks[i + 1:]])
        records = quantize_block(block_name, block, adapter, method, recipe, inputs, targets, seed=i, tail=tail)
        report.layers.update(records)
        last = i == len(blocks) - 1
        if inputs is not None:                       # the next block's inputs (none after the last block)
            inputs = None if last else run_block(block, inputs, recipe.calibration_dtype)
        if fp_stream:
            fp_inputs = None if last else targets
        if offload is not None:
            offload.save_block(i, block_name, block, {n: r.to_dict() for n, r in records.items()}, inputs,
                               fp_inputs, seconds=time.perf_counter() - mark)
            mark = time.perf_counter()
        if lazy is not None:
            lazy.release(block)
        bar.set_postfix(bits=f"{report.bits_per_weight:.3f}")
    if not report.layers:
        raise RecipeError(f"recipe {recipe.name!r} selects no layer: targets={list(recipe.targets)} "
                          f"ignore={list(recipe.ignore)} matched nothing among the decoder blocks' linear layers")
    report.head = quantize_head(model, recipe.head)                     # in memory, also after an offloaded walk
    report.seconds = time.perf_counter() - t0
    return report


def quantize_block(block_name: str, block: nn.Module, adapter: Adapter, method: Method, recipe: Recipe,
                   inputs: list[BlockInput] | None, targets: list[BlockInput] | None = None,
                   seed: int = 0, tail: "LogitsTail | None" = None) -> dict[str, LayerRecord]:
    """Collect the statistics the recipe needs on ``inputs``, apply block-level stages (scaling), quantize
    the selected layers one at a time, refine them jointly against ``targets`` (learned rounding; with
    ``tail``, also against the final logits), swap them in."""
    refs = {rel: ref for rel, ref in adapter.linears(block).items() if recipe.selects(f"{block_name}.{rel}")}
    stats: dict[str, dict[str, Tensor]] = {}
    needs = recipe.needs
    if needs and refs:
        stats = collect_statistics(block, adapter, refs, needs, inputs, recipe.calibration_dtype)
    if recipe.scaling == "awq" and refs:
        stats = scale_block(block_name, block, adapter, recipe, stats, inputs)
    formats: dict[str, WeightFormat] = {}
    records: dict[str, LayerRecord] = {}
    weights = {}
    for rel, ref in refs.items():
        weights[rel] = ref.weight()
        if not torch.isfinite(weights[rel]).all():
            raise WeightValueError(f"{block_name}.{rel}: weight holds NaN or Inf; "
                                   "the source model is damaged, fix or re-export it before quantizing")
    for names in _stacks(refs, stats, method, recipe):
        stacked = quantize_layer(method, torch.cat([weights[n] for n in names]), stats.get(names[0], {}), recipe)
        if len(names) == 1:
            formats[names[0]] = stacked
            continue
        start = 0
        for n in names:
            formats[n] = stacked.rows(start, start + weights[n].shape[0])
            start += weights[n].shape[0]
    folded = None
    if recipe.learned is not None and formats:
        formats, folded = refine_block(block_name, block, refs, formats, recipe, inputs, targets, seed, tail, adapter)
    for rel, fmt in formats.items():
        ref = refs[rel]
        records[f"{block_name}.{rel}"] = LayerRecord(fmt.meta(), ref.bias() is not None, fmt.shape[0] * fmt.shape[1],
                                                     fmt.nbytes())
    adapter.install(block, formats)
    if folded is not None:
        folded.verify(block_name, block)
    return records


def _stacks(refs: dict, stats: dict[str, dict[str, Tensor]], method: Method, recipe: Recipe) -> list[list[str]]:
    """The block's layers in quantization units: layers reading the same input (sharing one Hessian: q/k/v,
    gate/up) form one unit when the method treats rows independently and no outliers are kept (their
    fraction is per layer); every other layer is a unit of its own. Stacking gives each row what it would
    get alone (up to floating-point summation order) with one factorization and one column loop."""
    units: dict[int, list[str]] = {}
    for rel, ref in refs.items():
        h = stats.get(rel, {}).get("hessian")
        stack = method.rows_independent and recipe.outliers <= 0 and h is not None and ref.param is None
        units.setdefault(id(h) if stack else id(ref), []).append(rel)
    return list(units.values())


class _LearnedLinear(nn.Module):
    """Stand-in for a Linear/Conv1D during learned rounding: ``x @ ŵᵀ + b`` with ŵ from a LearnedWeight."""

    def __init__(self, learned: LearnedWeight, bias: Tensor | None):
        super().__init__()
        self.learned = learned
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.learned().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class LogitsTail:
    """What follows a block in the model: the later blocks (full precision, frozen), the final norm and the
    head. Learned rounding's KL term (``learned.kl``) compares the log-probabilities it gives on drawn token
    positions for the learned block's output and for the target."""

    def __init__(self, model: nn.Module, adapter: Adapter, later: list[nn.Module]):
        self.model, self.adapter, self.later = model, adapter, later

    def __call__(self, hidden: Tensor, inp: BlockInput, positions: Tensor) -> Tensor:
        for blk in self.later:
            y = blk(hidden, *inp.args, **inp.kwargs)
            hidden = y[0] if isinstance(y, tuple) else y
        h = hidden.reshape(-1, hidden.shape[-1])[positions]
        with torch.autocast("cpu", enabled=False):                 # logits and softmax in fp32
            return F.log_softmax(self.adapter.logits(self.model, h.float()).float(), dim=-1)


@dataclass
class _Folded:
    """The learned block's own output on a probe window, to check that the stored block (codes, fp16 scales,
    input scales folded into producers) reproduces what was learned."""

    probe: BlockInput
    expected: Tensor
    groups: int

    def verify(self, block_name: str, block: nn.Module) -> float:
        got = run_block(block, [self.probe])[0].hidden
        rel = float((got - self.expected).norm() / self.expected.norm().clamp(min=1e-12))
        if rel > 1e-3:
            log.warning("%s: the stored block differs from the learned one by %.2g (relative) on a probe window",
                        block_name, rel)
        else:
            log.debug("%s: stored block matches the learned one (relative %.2g, %d scale groups folded)",
                      block_name, rel, self.groups)
        return rel


def _probe_output(block: nn.Module, probe: BlockInput) -> Callable[[], Tensor]:
    """The block's output on ``probe``, recomputed at each call: how a fold is checked to change nothing."""
    return lambda: run_block(block, [probe])[0].hidden


def _equivalent_groups(block: nn.Module, adapter: Adapter, learned: dict[str, LearnedWeight],
                       probe: BlockInput) -> list[ScaleGroup]:
    """The block's scale groups whose consumers are all learned and whose producer is a norm, an unquantized
    linear or a learned linear; each checked by folding a random scale on ``probe`` (:func:`foldable`)."""
    check = _probe_output(block, probe)
    groups = []
    for g in scale_groups(adapter.family, block):
        if not all(n in learned for n in g.linears):
            continue
        if foldable(block, g, check):
            groups.append(g)
    return groups


@contextlib.contextmanager
def _experts_as_quantized(block: nn.Module, refs: dict, formats: dict[str, WeightFormat]):
    """While active, fused MoE experts compute with their quantized weights (dequantized into their 3-D
    parameters), so that the learned dense layers see the error the stored experts will make."""
    saved = {}
    with torch.no_grad():
        for rel, fmt in formats.items():
            ref = refs[rel]
            if ref.param is None:
                continue
            param = getattr(ref.module, ref.param)
            if id(param) not in saved:
                saved[id(param)] = (param, param.detach().clone())
            param[ref.expert].copy_(fmt.dequantize(torch.float32).to(param.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for param, orig in saved.values():
                param.copy_(orig)


def refine_block(block_name: str, block: nn.Module, refs: dict, formats: dict[str, WeightFormat], recipe: Recipe,
                 inputs: list[BlockInput], targets: list[BlockInput], seed: int = 0, tail: LogitsTail | None = None,
                 adapter: Adapter | None = None) -> tuple[dict[str, WeightFormat], _Folded | None]:
    """Learn the rounding offsets and group ranges of the block's layers jointly (:mod:`lowbit.quantizers.learned`).

    Minimises the mean squared error between the block's output with fake-quantized weights on
    ``inputs`` (the quantized model's activations) and ``targets`` by signed gradient descent
    with a linearly decaying step; each step takes ``learned.batch`` windows of one capture batch
    (a random contiguous run when the capture batch holds more), the capture batches visited in a
    seeded shuffled order, every one once per pass; keeps the iterate with the lowest step loss.

    With ``tail`` (``learned.kl`` > 0, the last ``kl_blocks`` blocks) the loss is
    ``MSE / MSE₀ + kl · KL / KL₀`` (plain MSE without it): KL the divergence of the model's next-token distribution (the rest of
    the model run on the block's output, at ``kl_tokens`` drawn positions) from the one the targets give,
    each term divided by its value at the first step. With ``learned.scaling`` the equivalent input
    scales of the block's foldable scale groups are learned too, then folded into their producers.
    Fused MoE experts keep their starting formats (logged) and compute with them while the dense layers
    learn. Large blocks without experts or a KL tail run their steps through the compiled block
    (:func:`_compile_learning`, :func:`_compiled_step`). Returns the formats and, when anything was learned,
    the check of the stored block."""
    spec = recipe.learned
    dense = [rel for rel in formats if refs[rel].param is None]
    if len(dense) < len(formats):
        log.info("%s: fused MoE experts keep their %s rounding (learned rounding covers dense layers)",
                 block_name, recipe.method)
    if not dense:
        return formats, None
    probe = window_slice(inputs[0], 0, 1)
    learners = {rel: LearnedWeight(refs[rel].weight(), formats[rel], recipe.spec, spec) for rel in dense}
    groups = _equivalent_groups(block, adapter, learners, probe) if spec.scaling and adapter is not None else []
    log_scales = []
    for g in groups:
        a = nn.Parameter(torch.zeros(refs[g.linears[0]].weight().shape[1]))
        for n in g.linears:
            learners[n].scale_inputs(a)
        log_scales.append(a)
    originals = {rel: refs[rel].module for rel in dense}
    params = [p for lw in learners.values() for p in lw.parameters() if p.requires_grad] + log_scales
    frozen = [p for p in (tail.model if tail is not None else block).parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    def install_learned():
        for rel, lw in learners.items():
            bias = refs[rel].bias()
            _set_submodule(block, rel, _LearnedLinear(lw, None if bias is None else bias.detach()))

    compiled = tail is None and len(dense) == len(formats) and _compile_learning(learners)
    if not compiled:                    # compiled: the block keeps its own layers, fed the learned weights
        install_learned()
    gen = torch.Generator().manual_seed(spec.seed * 100003 + seed)
    order: list[int] = []               # capture batches in a seeded shuffled order, each once per pass
    best_loss, best_state, first = float("inf"), None, None
    try:
        with _experts_as_quantized(block, refs, formats):
            for it in range(spec.iters):
                if not order:
                    order = torch.randperm(len(inputs), generator=gen).tolist()
                b = order.pop()
                inp, tgt = inputs[b], targets[b].hidden
                n = inp.hidden.shape[0]
                if n > spec.batch:                                                # a random run of windows
                    a = int(torch.randint(n - spec.batch + 1, (1,), generator=gen))
                    inp, tgt = window_slice(inp, a, a + spec.batch), tgt[a:a + spec.batch]
                with torch.enable_grad(), _autocast(recipe.calibration_dtype):
                    if compiled:
                        weights = {f"{rel}.weight": _as_stored(originals[rel], lw()) for rel, lw in learners.items()}
                        y = _compiled_step(block, weights, inp, check=it == 0, name=block_name)
                        if y is None:                          # the compiled block failed its check: eager
                            compiled = False
                            install_learned()
                    if not compiled:
                        y = block(inp.hidden, *inp.args, **inp.kwargs)
                        y = y[0] if isinstance(y, tuple) else y
                    mse = F.mse_loss(y.float(), tgt.float())
                    kl = None
                    if tail is not None:
                        pos = torch.randperm(y.shape[0] * y.shape[1], generator=gen)[:spec.kl_tokens]
                        with torch.no_grad():
                            teacher = tail(tgt, inp, pos)
                        kl = F.kl_div(tail(y, inp, pos), teacher, log_target=True, reduction="batchmean")
                if first is None:                                # the normalisers: each term's first value
                    first = (max(mse.item(), 1e-30), None if kl is None else max(kl.item(), 1e-30))
                loss = mse if kl is None else mse / first[0] + spec.kl * kl / first[1]
                loss_v = loss.item()
                if loss_v < best_loss:
                    best_loss = loss_v
                    best_state = [p.detach().clone() for p in params]
                if it == spec.iters - 1:
                    break
                loss.backward()
                lr = spec.step * (1 - it / spec.iters)
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.add_(p.grad.sign_(), alpha=-lr)             # p - lr·sign(grad), in place
                            p.grad = None
                    for lw in learners.values():
                        lw.project()
                    for a in log_scales:
                        a.clamp_(-spec.scaling_range, spec.scaling_range)
            if compiled:
                install_learned()
            with torch.no_grad():
                for p, v in zip(params, best_state):
                    p.copy_(v)
                expected = run_block(block, [probe])[0].hidden
                for g, a in zip(groups, log_scales):             # fold 1/c into each group's producer
                    _fold_producer(block, g, torch.exp(a), learners, originals)
        out = dict(formats)
        out.update({rel: lw.to_format() for rel, lw in learners.items()})
    finally:
        for rel, mod in originals.items():
            _set_submodule(block, rel, mod)
        for p in frozen:
            p.requires_grad_(True)
    kl_note = "" if first[1] is None else f" (MSE and KL, each / its first value; KL₀ {first[1]:.4g})"
    log.info("%s: learned rounding, block loss %.4g -> %.4g%s (%d steps%s)", block_name,
             first[0] if first[1] is None else 1.0 + spec.kl, best_loss, kl_note, spec.iters,
             f", {len(groups)} scale groups" if groups else "")
    return out, _Folded(probe, expected, len(groups))


# -- compiled learning steps ------------------------------------------------------------
_COMPILE_MIN_WEIGHTS = 1_000_000        # smaller blocks learn eagerly: compiling costs more than it saves
_block_call_compiled: Callable | None = None


def _compile_learning(learners: dict[str, LearnedWeight]) -> bool:
    """Whether a block's learning steps run through the compiled block (:func:`_compiled_step`): its learned
    layers hold at least ``_COMPILE_MIN_WEIGHTS`` weights, and compiling is enabled (not ``LOWBIT_COMPILE=0``,
    a C++ toolchain present). Measured on SmolLM2 (3.5 M weights a block, bf16, 2 cores): 0.35-0.38 s a step
    against 0.38-0.40 s eager, after about 10 s compiling once for all blocks."""
    from lowbit.decoding import compile_enabled

    return sum(lw.w.numel() for lw in learners.values()) >= _COMPILE_MIN_WEIGHTS and compile_enabled()


def _block_call(block: nn.Module, weights: dict[str, Tensor], hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
    y = torch.func.functional_call(block, weights, (hidden, *args), kwargs, strict=False)
    return y[0] if isinstance(y, tuple) else y


def _as_stored(module: nn.Module, w_hat: Tensor) -> Tensor:
    """A learned (out, in) weight in the orientation ``module`` keeps its weight (Conv1D: (in, out))."""
    return w_hat.t() if isinstance(module, Conv1D) else w_hat


def _compiled_step(block: nn.Module, weights: dict[str, Tensor], inp: BlockInput, check: bool,
                   name: str) -> Tensor | None:
    """The block's output with ``weights`` (the fake-quantized weights, computed eagerly and differentiable)
    in place of its own, through ``torch.compile`` of the block. The fake-quantizer stays outside the
    compiled graph: compiled inside it (fp16 rounding of the scales under bf16 autocast), the block's
    output was NaN. With ``check`` (a block's first step) the output is compared with the eager block's;
    on a mismatch or any compile error the step returns None (logged) and the block learns eagerly."""
    global _block_call_compiled
    try:
        if _block_call_compiled is None:
            _block_call_compiled = torch.compile(_block_call)
        y = _block_call_compiled(block, weights, inp.hidden, inp.args, inp.kwargs)
    except Exception as e:                                                # noqa: BLE001 - any compiler failure
        log.warning("%s: compiled learning step failed (%s: %s); learning eagerly", name, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None
    if check:
        with torch.no_grad():
            ref = _block_call(block, weights, inp.hidden, inp.args, inp.kwargs).float()
            err = float((y.detach().float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
        if not (err < 0.05):                                              # NaN fails too
            log.warning("%s: compiled learning step differs from eager (max error %.3g of the output's "
                        "range); learning eagerly", name, err)
            return None
    return y


def _fold_producer(block: nn.Module, group: ScaleGroup, c: Tensor, learners: dict[str, LearnedWeight],
                   originals: dict[str, nn.Module]) -> None:
    """Divide the output of ``group``'s producer by ``c``: a learned linear's stored row scales (and its bias),
    else the norm's gain or the unquantized linear's rows (:func:`lowbit.models.scaling.divide_output`)."""
    if group.prev not in learners:
        divide_output(block.get_submodule(group.prev), group.rows, c)
        return
    lw = learners[group.prev]
    n = lw.w.shape[0]
    rows = slice(n - c.numel(), n) if group.rows == "second_half" else slice(0, n)
    lw.scale_outputs(c, rows)
    bias = getattr(originals[group.prev], "bias", None)         # installed with the stored layer
    if bias is not None:
        with torch.no_grad():
            bias[rows] /= c.to(bias.dtype)


def collect_statistics(block: nn.Module, adapter: Adapter, refs: dict, needs: frozenset[str],
                       inputs: list[BlockInput], dtype: torch.dtype) -> dict[str, dict[str, Tensor]]:
    """One forward pass of ``block`` over ``inputs`` with hooks: the statistics of every layer in ``refs``.

    Layers that saw no input row (routed experts no calibration token reached) get neutral
    statistics (identity Hessian), so Hessian-based methods treat them as round-to-nearest would,
    and the log says so."""
    dense = {rel: ref.module for rel, ref in refs.items() if ref.param is None}
    with contextlib.ExitStack() as stack:
        acc = stack.enter_context(collecting(dense, needs, dtype))
        if len(dense) < len(refs):
            experts = stack.enter_context(
                collecting_experts(block.get_submodule(adapter.experts), adapter.experts, needs, dtype))
        last = last_linear(block, adapter, inputs[:1], dtype)
        with _output_skipped(last):
            run_block(block, inputs[1:], dtype)
    if len(dense) < len(refs):
        acc = {**acc, **{n: st for n, st in experts.items() if n in refs}}
    stats = {}
    unseen = []
    results: dict[int, Tensor] = {}          # layers fed the same input share accumulators: finish each once
    for rel, st in acc.items():
        stats[rel] = {}
        for k, s in st.items():
            if id(s) not in results:
                results[id(s)] = neutral_result(s) if empty_statistics(s) else s.result()
            if empty_statistics(s):
                unseen.append(rel)
            stats[rel][k] = results[id(s)]
    if unseen:
        log.info("%d layer(s) saw no calibration row (e.g. %s): neutral statistics used", len(set(unseen)), unseen[0])
    return stats


def last_linear(block: nn.Module, adapter: Adapter, inputs: list[BlockInput], dtype: torch.dtype) -> nn.Module | None:
    """Runs ``block`` on ``inputs``; returns the dense linear layer that ran last, once, after every other
    linear and routed-experts module of the block, or None when there is no such layer.

    Nothing inside the block reads that layer's output (only the block output does, which a statistics
    pass throws away), so later statistics passes can skip its product (:func:`_output_skipped`):
    a llama block's ``down_proj``, a quarter of its weights."""
    linears = [ref.module for ref in adapter.linears(block).values() if ref.param is None]
    experts = [block.get_submodule(adapter.experts)] if adapter.experts else []
    fired: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda mod, _args: fired.append(mod)) for m in linears + experts]
    try:
        run_block(block, inputs, dtype)
    finally:
        for h in handles:
            h.remove()
    if not fired or any(fired[-1] is e for e in experts) or sum(m is fired[-1] for m in fired) != 1:
        return None
    return fired[-1]


@contextlib.contextmanager
def _output_skipped(module: nn.Module | None):
    """While active, ``module`` (a Linear or Conv1D) returns zeros instead of its product; its hooks still see the input."""
    if module is None:
        yield
        return
    out_f = module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]
    own = vars(module).get("forward")                   # an instance-level forward (e.g. accelerate's hooks)
    module.forward = lambda x, *args, **kwargs: x.new_zeros(*x.shape[:-1], out_f)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def scale_block(block_name: str, block: nn.Module, adapter: Adapter, recipe: Recipe,
                stats: dict[str, dict[str, Tensor]], inputs: list[BlockInput]) -> dict[str, dict[str, Tensor]]:
    """Activation-aware scaling of every foldable group of ``block`` (:mod:`lowbit.quantizers.awq`).

    For each group (in the family's order) the scale is searched on the stacked weights of the layers
    reading the shared input, folded into the block (verified to leave its output unchanged on one
    calibration window), and the group's statistics are rewritten for the scaled inputs. Returns the
    updated statistics."""
    check = _probe_output(block, window_slice(inputs[0], 0, 1))
    refs = adapter.linears(block)
    for group in scale_groups(adapter.family, block):
        st = next((stats[n] for n in group.linears if n in stats), None)
        if st is None:                                          # no layer of the group is quantized
            continue
        weight = torch.cat([refs[n].weight() for n in group.linears])
        found = awq_search(weight, st["hessian"], st["act_absmean"], recipe.spec, recipe.scaling_grid)
        if found.alpha == 0.0 or not fold(block, group, found.scale, check):
            continue
        log.debug("%s: %s alpha %.2f output error %.4g -> %.4g", block_name, group.prev, found.alpha,
                  found.error_before, found.error_after)
        scaled = scaled_stats(st, found.scale)
        for n in group.linears:
            if n in stats:
                stats[n] = scaled
    return stats


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
