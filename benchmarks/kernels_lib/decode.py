"""End-to-end greedy decode through ``generate()``: fp32 and lowbit RTN presets, with and without the int8 head.

A quantized row is ``lowbit.quantize(MODEL, recipe)`` saved under ``<work>/checkpoints/<row>`` (reused
while its recipe and source match), then loaded back with ``lowbit.load_model`` in a fresh process
and timed with ``lowbit.evaluate.speed.decode_speed`` (the prefill time is that function's
median forward over the prompt). Quantizing runs in a process of its own, so the measuring
process's peak RSS is that of loading and generating only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.errors import RecipeError
from lowbit.evaluate.speed import DEFAULT_PROMPT, decode_speed
from lowbit.models import resolve_source
from lowbit.modules.quant_linear import footprint
from lowbit.recipe import PRESETS, Recipe

from .common import MODEL, Settings, peak_rss_mb

DECODE_PRESETS = ("w8", "w4g128", "w3g128", "w2g64")
HEAD_SUFFIX = "-head8"
EAGER_SUFFIX = "-eager"
FLOOR_SUFFIX = "-floor"
F32ACT_SUFFIX = "-f32act"
UNFUSED_SUFFIX = "-unfused"
LINEARS_SUFFIX = "-linears"


class NotAvailable(Exception):
    """The row cannot be built with this lowbit (e.g. no int8-head recipe option yet)."""


@dataclass(frozen=True)
class Variant:
    """fp32 (``preset`` None), or a lowbit preset with (``head``) or without the int8 head."""

    preset: str | None
    head: bool = False
    eager: bool = False                  # LOWBIT_COMPILE=0: the eager decode path instead of the compiled one
    floor: bool = False                  # every linear layer (and the head) a free stub: the framework's own cost
    f32act: bool = False                 # LOWBIT_INT8_ACT=0: never (the default leaves it in wherever it runs)
    linears: bool = False                # only the decode step's linear calls, compiled: the kernels' share of a step
    unfused: bool = False                # LOWBIT_FUSE_LAYERS=0: decoder layers as transformers runs them, op by op

    @property
    def name(self) -> str:
        base = "fp32" if self.preset is None else self.preset + (HEAD_SUFFIX if self.head else "")
        return (base + (UNFUSED_SUFFIX if self.unfused else "")
                + (EAGER_SUFFIX if self.eager and self.preset is not None else "")
                + (F32ACT_SUFFIX if self.f32act else "")
                + (FLOOR_SUFFIX if self.floor else "")
                + (LINEARS_SUFFIX if self.linears else ""))

    @property
    def checkpoint_name(self) -> str:
        return dataclasses.replace(self, eager=False, floor=False, f32act=False, linears=False,
                                   unfused=False).name

    @property
    def config(self) -> str:
        if self.linears:
            return (f"linears only: the {dataclasses.replace(self, linears=False).name} row's linear layers and head "
                    "called in forward order on one random row, compiled like the decode step (no attention, norms, "
                    "embedding or sampling); tok/s = 1 / (time of one such pass)")
        if self.floor and self.preset is not None and not self.unfused:
            return (f"floor: the {dataclasses.replace(self, floor=False).name} row with every fused decoder layer "
                    "(decode_layer, decode_layers) and the head a free stub: what generate() and the model's own forward cost")
        if self.floor:
            return (f"floor: the {dataclasses.replace(self, floor=False).name} row with every linear layer and the head "
                    "a free stub (returns a stored row)")
        if self.preset is None:
            return "fp32 transformers model (lowbit.load_model), eager generate"
        return (f"lowbit RTN preset {self.preset}" + (", head int8 (recipe head: int8)" if self.head else ", fp32 head")
                + (", eager decode (LOWBIT_COMPILE=0)" if self.eager
                   else ", compiled decode (what lowbit.load does when layers do not fuse)" if self.unfused
                   else ", lowbit.load default: fused decoder layers, not compiled")
                + (", layers unfused (LOWBIT_FUSE_LAYERS=0)" if self.unfused else "")
                + (", fp32 activations only (LOWBIT_INT8_ACT=0)" if self.f32act else ""))

    def recipe(self) -> Recipe:
        """The recipe of this row; ``NotAvailable`` where this lowbit cannot express it."""
        if not self.head:
            return Recipe.preset(self.preset)
        if "head" not in {f.name for f in dataclasses.fields(Recipe)}:
            raise NotAvailable("recipe has no head option")
        try:
            return Recipe.from_dict({**PRESETS[self.preset], "head": "int8"}, name=self.checkpoint_name)
        except RecipeError as e:
            raise NotAvailable(f"recipe head: int8 refused: {e}") from None


def unavailable(variant: Variant) -> str | None:
    """Why this lowbit cannot build the row's recipe, or None."""
    if variant.preset is None:
        return None
    try:
        variant.recipe()
    except NotAvailable as e:
        return str(e)
    return None


def prompt_tokens() -> int:
    """Tokens of the decode prompt, as the model's tokenizer encodes it (llama-bench's ``-p``)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_source(MODEL).path)
    return len(tokenizer(DEFAULT_PROMPT)["input_ids"])


def variants() -> list[Variant]:
    return ([Variant(None)] + [Variant(p, head) for p in DECODE_PRESETS for head in (False, True)]
            + [Variant("w4g128", True, unfused=True), Variant("w4g128", True, unfused=True, eager=True)]
            + [Variant(p, True, f32act=True) for p in ("w8", "w4g128", "w3g128", "w2g64")]
            + [Variant(None, floor=True), Variant("w4g128", True, floor=True),
               Variant("w4g128", True, unfused=True, floor=True), Variant("w4g128", True, unfused=True, eager=True, floor=True)]
            + [Variant("w4g128", True, linears=True), Variant("w4g128", True, f32act=True, linears=True)])


class _Free(nn.Module):
    """Stands in for a linear layer at no cost (the floor rows): a stored random row of the output's width,
    broadcast. Not zeros: the compiler folds a graph of zeros away (attention included), which measured a
    floor of 0.13 ms per token instead of the framework's cost."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.register_buffer("row", torch.randn(out_features, generator=torch.Generator().manual_seed(out_features)) * 0.1)

    def forward(self, x):
        return self.row.expand(*x.shape[:-1], self.out_features)


def stub_linears(model: nn.Module) -> int:
    """Replace every nn.Linear and QuantLinear of ``model`` (the head included) by :class:`_Free`; returns how many."""
    from lowbit.modules import QuantLinear

    names = [(n, m.out_features) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    for name, out_f in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, _Free(out_f))
    return len(names)


def stub_fused(model: nn.Module) -> int:
    """The fused path's floor: ``decode_layer`` and ``decode_layers`` (every layer in one call) become free (return
    their input, advance the cache lengths) and the head a :class:`_Free`; returns how many decoder layers run
    fused."""
    from lowbit.decoding.fused import fused_count

    def free_layer(x, w, meta, fmeta, keys, values, length, cos, sin, mask):
        length.add_(1)
        return x

    def free_layers(x, w, meta, fmeta, keys, values, lengths, cos, sin, mask):
        for n in lengths:
            n.add_(1)
        return x

    torch.ops.lowbit.decode_layer = free_layer               # this row's process only
    torch.ops.lowbit.decode_layers = free_layers
    head = model.get_output_embeddings()
    model.set_output_embeddings(_Free(head.out_features))
    return fused_count(model)


def find_variant(name: str) -> Variant:
    (variant,) = [v for v in variants() if v.name == name]
    return variant


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_path(variant: Variant, work: Path) -> Path:
    return work / "checkpoints" / variant.checkpoint_name


def checkpoint_current(variant: Variant, work: Path) -> bool:
    """Whether the saved checkpoint was made by this row's recipe from the current source model."""
    meta_file = checkpoint_path(variant, work) / "lowbit.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    return meta["recipe"] == variant.recipe().to_dict() and meta["source"].get("sha256") == resolve_source(MODEL).sha256


def quantize(variant: Variant, work: Path) -> None:
    """Quantize and save this row's checkpoint (run in its own process: ``kernels.py --quantize``)."""
    q = lowbit.quantize(MODEL, variant.recipe(), progress=False)
    q.save(checkpoint_path(variant, work), force=True)


def ensure_checkpoint(variant: Variant, work: Path, script: Path) -> Path:
    """The row's checkpoint, quantized first (in a child process) unless current."""
    if not checkpoint_current(variant, work):
        done = subprocess.run([sys.executable, str(script), "--quantize", variant.name, "--work", str(work)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            tail = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
            raise RuntimeError(f"quantizing {variant.name} failed (exit {done.returncode}): "
                               + (tail[-1] if tail else "no output"))
    return checkpoint_path(variant, work)


# -- measuring -----------------------------------------------------------------------------------
def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (shared storage once),
    except the tables of an input embedding not shared with the head, of which one row is read per token."""
    head = model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in chain(head.parameters(), head.buffers())}
    emb = model.get_input_embeddings()
    emb_only = {t.data_ptr() for t in chain(emb.parameters(), emb.buffers())} - head_ptrs
    seen, total = set(), 0
    for t in chain(model.parameters(), model.buffers()):
        ptr = t.data_ptr()
        if t.device.type == "meta" or ptr in seen:
            continue
        seen.add(ptr)
        total += t.nbytes // t.shape[0] if ptr in emb_only and t.dim() == 2 else t.nbytes
    return total


def measure(variant: Variant, settings: Settings, work: Path, script: Path) -> dict:
    """Load the row's model in this process and time greedy decode through ``generate``."""
    source = MODEL if variant.preset is None else str(ensure_checkpoint(variant, work, script))
    torch.set_num_threads(settings.threads)
    if variant.eager:
        os.environ["LOWBIT_COMPILE"] = "0"
    if variant.f32act:
        os.environ["LOWBIT_INT8_ACT"] = "0"
    if variant.unfused:
        os.environ["LOWBIT_FUSE_LAYERS"] = "0"
    loaded = lowbit.load_model(source)
    if not variant.floor:
        stubs = 0
    elif variant.preset is not None and not variant.unfused:
        stubs = stub_fused(loaded.model)
    else:
        stubs = stub_linears(loaded.model)
    rss_load = peak_rss_mb()
    if variant.linears:
        step = linears_step_s(loaded.model, settings.repeats)
        ran = decode_kernels(loaded.model)
        return {"speed": None, "decode_tokens_per_s": 1.0 / step, "prefill_s": None, "prompt_tokens": None,
                "linears_step_ms": 1e3 * step, "bytes_per_token": bytes_per_token(loaded.model),
                "footprint": footprint(loaded.model).to_dict(), "peak_rss_load_mb": rss_load,
                "peak_rss_mb": peak_rss_mb(), "stubbed_linears": 0, "decode_kernels": ran}
    speed = decode_speed(loaded.model, loaded.tokenizer, DEFAULT_PROMPT, settings.new_tokens, settings.repeats)
    ran = decode_kernels(loaded.model)
    from lowbit.decoding.fused import fused_count

    ran_layers = fused_count(loaded.model)
    return {"fused_layers": ran_layers, "speed": speed.to_dict(), "decode_tokens_per_s": speed.decode_tokens_per_s, "prefill_s": speed.prefill_s,
            "prompt_tokens": speed.prompt_tokens, "bytes_per_token": bytes_per_token(loaded.model),
            "footprint": footprint(loaded.model).to_dict(), "peak_rss_load_mb": rss_load, "peak_rss_mb": peak_rss_mb(),
            "stubbed_linears": stubs, "decode_kernels": ran}


def linears_step_s(model: nn.Module, repeats: int, calls: int = 64) -> float:
    """Seconds of one pass over the decode step's linear calls: every QuantLinear (the head included) in forward
    order on a random row, one row object per input width (so layers sharing an input share its call, as in the
    step), compiled with the decode step's options; the median of ``repeats`` runs of ``calls`` passes."""
    from lowbit.decoding import compile_options, fast_decode
    from lowbit.modules import QuantLinear

    fast_decode(model)                                  # as lowbit.load left it: groups formed, kernels bound
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    head = model.get_output_embeddings()
    if not isinstance(head, QuantLinear):
        mods.append(head)
    gen = torch.Generator().manual_seed(0)
    rows = {m.in_features: torch.randn(1, 1, m.in_features, generator=gen) for m in mods}

    def step():
        return [m(rows[m.in_features]) for m in mods]

    compiled = torch.compile(step, options=compile_options() or None)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            compiled()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                compiled()
            times.append((time.perf_counter() - t0) / calls)
    return sorted(times)[len(times) // 2]


def decode_kernels(model: nn.Module) -> dict[str, int]:
    """How many layers ran each kernel for one-row calls (the decode step): the compiled path's bound
    kernel, else the eager path's bound one."""
    from lowbit.modules import QuantLinear

    counts: dict[str, int] = {}
    for mod in model.modules():
        if not isinstance(mod, QuantLinear):
            continue
        owner = mod._shared if getattr(mod, "_shared", None) is not None else mod     # a group binds once for its members
        plans = owner.plans if owner is not mod else mod._plans
        bound = owner._decode or next((b for key, b in plans.get("_bound", {}).items() if key[0] == 1), None)
        if bound is not None:
            counts[bound[0].name] = counts.get(bound[0].name, 0) + 1
    return counts
