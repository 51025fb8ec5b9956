"""A lean decode path for ``generate()``: a static KV cache, fused decoder layers, and a compiled decode step
where layers cannot fuse.

An eager ``transformers`` decode step of a small model spends most of its time in Python and
operator dispatch, not in the matrix products (SmolLM2-135M: about 16 ms of a 25 ms step with
4-bit weights). :func:`fast_decode` removes most of that overhead without changing what
``generate()`` computes:

* ``generation_config.cache_implementation = "static"``: the KV cache is preallocated, so every
  decode step has the same shapes;
* the layers of a block that read one input (q/k/v, gate/up) run as one kernel call each
  (:mod:`lowbit.modules.shared`; ``LOWBIT_SHARE_INPUTS=0`` turns it off);
* llama-style decoder layers (llama, mistral, qwen2, qwen3) run a decoded token as one C++ call
  each: norms, GEMVs, rotary embedding, cache write and attention (:mod:`lowbit.decoding.fused`;
  ``LOWBIT_FUSE_LAYERS=0`` turns it off);
* where some layer does not fuse (other families, layers without lowbit's fused kernel),
  ``generation_config.compile_config``: ``generate()`` compiles the one-token decode step with
  ``torch.compile`` (inductor) on the CPU too; the prefill runs eagerly. Every
  :class:`~lowbit.modules.QuantLinear` binds its one-row kernel beforehand
  (:meth:`~lowbit.modules.QuantLinear.prepare_decode`) and the trace calls it directly: lowbit's
  fused C++ ops are registered ``torch.ops`` with shape functions, so the compiler sees them
  without a graph break. A model whose layers all fuse is not compiled: measured on SmolLM2, the
  compiled step was no faster than the eager one with fused layers, and compiling costs seconds.

The first compiled ``generate()`` call pays the compilation (reported once in the log); inductor keeps
its artifacts in lowbit's cache directory (``<cache>/inductor``), so later processes reuse them.
Where compilation is impossible (no C++ compiler: the fused extension is unavailable too) or
``LOWBIT_COMPILE=0`` is set, the model stays on the eager path, which computes the same tokens.
:func:`lowbit.load` applies it by default."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import CompileConfig

from lowbit.cache import cache_dir
from lowbit.decoding import fused
from lowbit.kernels import _ext
from lowbit.errors import UnsupportedArchitectureError
from lowbit.models.adapters import get_adapter
from lowbit.models.scaling import SCALE_GROUPS
from lowbit.modules import QuantLinear
from lowbit.modules.shared import share_inputs

log = logging.getLogger("lowbit.decoding")


def compile_enabled() -> bool:
    """Whether :func:`fast_decode` compiles: not with ``LOWBIT_COMPILE=0``, nor without a working C++ toolchain."""
    if os.environ.get("LOWBIT_COMPILE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _ext.available()


def fast_decode(model: nn.Module, enable: bool | None = None) -> bool:
    """Set ``model`` up for the lean decode path (see the module docstring); returns whether it compiles.

    ``enable=False`` restores the plain eager path (dynamic cache, unfused layers, no compilation).
    ``None`` (the default) fuses the decoder layers (:mod:`lowbit.decoding.fused`, unless
    ``LOWBIT_FUSE_LAYERS=0``) and compiles the decode step only where some layer could not fuse and
    :func:`compile_enabled` allows: with every layer fused, compiling measured no faster on SmolLM2
    (127 against 128 tok/s) and costs seconds on the first call. ``True`` compiles in any case."""
    gc = model.generation_config
    share_block_inputs(model)
    if enable is False or (enable is None and not (compile_enabled() or fused.enabled())):
        fused.unfuse_layers(model)
        fused.plain_generate_masks(model, False)
        gc.cache_implementation = None
        gc.compile_config = None
        return False
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.prepare_decode()
    n_fused = fused.fuse_layers(model)              # every layer gets _lowbit_fused (None where unfused)
    if n_fused:
        log.info("fused decode: %d decoder layer(s) run as one call per token", n_fused)
    compile_ = enable is True or (compile_enabled() and n_fused < _n_blocks(model))
    gc.cache_implementation = "static" if (compile_ or n_fused) else None
    # every layer fused and the step eager: generate() need not build a 4-D mask per step (fused._two_d_mask)
    fused.plain_generate_masks(model, not compile_ and n_fused == _n_blocks(model))
    if not compile_:
        gc.compile_config = None
        return False
    _use_lowbit_inductor_cache()
    options = compile_options()
    config = CompileConfig(fullgraph=False, dynamic=None, mode=None if options else "default", options=options or None)
    config._compile_all_devices = True          # transformers compiles on accelerators only unless told
    gc.compile_config = config
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    return True


def _n_blocks(model: nn.Module) -> int:
    try:
        return sum(1 for _ in get_adapter(model).blocks(model))
    except UnsupportedArchitectureError:
        return 1 << 30


def describe(model: nn.Module) -> str | None:
    """Which decode path ``model`` takes, in words (``None`` for a model without quantized layers): fused layers,
    compiled or eager step, cache, and the one-row kernels its layers bound, e.g. ``"30/30 decoder layers fused,
    eager step, static cache, kernels fused x121"``."""
    counts: dict[str, int] = {}
    seen, quantized = set(), False
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            quantized = True
            owner = mod._shared if mod._shared is not None else mod
            if id(owner) in seen or owner._decode is None:
                continue
            seen.add(id(owner))
            counts[owner._decode[0].name] = counts.get(owner._decode[0].name, 0) + 1
    if not quantized:
        return None
    gc = model.generation_config
    parts = [f"{fused.fused_count(model)}/{_n_blocks(model)} decoder layers fused",
             "compiled step" if gc.compile_config is not None else "eager step",
             f"{gc.cache_implementation or 'dynamic'} cache"]
    if counts:
        parts.append("kernels " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return ", ".join(parts)


def compile_options() -> dict:
    """The ``torch.compile`` options of the decode step (also for benchmarks timing parts of it)."""
    guard_filter = _guard_filter()
    return {} if guard_filter is None else {"guard_filter_fn": guard_filter}


def share_block_inputs(model: nn.Module) -> int:
    """Stack the layers of each block that read one input (q/k/v; gate/up) into one kernel call
    (:mod:`lowbit.modules.shared`); the number of groups formed. ``LOWBIT_SHARE_INPUTS=0`` turns it off."""
    if os.environ.get("LOWBIT_SHARE_INPUTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return 0
    groups = []
    for _, block in adapter.blocks(model):
        for group in SCALE_GROUPS.get(adapter.family, ()):
            mods = [_submodule(block, name) for name in group.linears]
            if len(mods) > 1 and all(isinstance(m, QuantLinear) for m in mods):
                groups.append(mods)
    return share_inputs(groups)


def _submodule(block: nn.Module, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


_KEPT_GUARDS = ("EQUALS_MATCH", "CONSTANT_MATCH", "ID_MATCH", "TYPE_MATCH")


def _keep_guard(entry) -> bool:
    """Dynamo guards kept on module attributes: only the cheap ones on lowbit's own decode state (each
    layer's bound kernel plan, ``_decode``, and its shared-input group, ``_shared``).

    Those hold what the compiled graph bakes in as constants (bits, group size, widths, which layers
    share a call), so a second model with other formats in the same process, or a model whose groups
    were dissolved, fails them and is compiled for itself, while every tensor guard (the costly
    ones) is dropped: tensors are read from the model at each call, so a model of the same formats
    reuses the graph correctly."""
    if not entry.orig_guard.source.is_unspecialized_nn_module():
        return True
    return entry.guard_type in _KEPT_GUARDS and any(k in entry.name for k in ("._decode", "._shared", "._lowbit_fused"))


def _lowbit_guard_filter(entries) -> list[bool]:
    return [_keep_guard(e) for e in entries]


def _guard_filter():
    """Dynamo's filter dropping most guards on module attributes, where this torch has guard filters (2.7+).

    Every call of a compiled step first evaluates its guards; with one guard per parameter and
    buffer (a 4-bit SmolLM2 has about 800 tensor guards among some 7700 on module attributes) that
    costs milliseconds per decoded token, as much as all its attention. The module tree of a loaded
    model does not change between decode steps, so those guards are dropped, except the few that
    tell one model's formats from another's (:func:`_keep_guard`); tensors that are *inputs* (ids,
    positions, the KV cache) keep theirs. A model whose modules are replaced after its first
    ``generate()`` must call :func:`fast_decode` again (``enable=False``, then ``True``), which
    recompiles."""
    if os.environ.get("LOWBIT_COMPILE_GUARDS", "").strip() == "all":
        return None
    if not hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):      # no guard filters in this torch
        return None
    return _lowbit_guard_filter


def _use_lowbit_inductor_cache() -> None:
    """Point inductor's cache at ``<lowbit cache>/inductor`` unless the user chose one.

    ``import torch._dynamo`` already wrote torch's default (``/tmp/torchinductor_<user>``) into
    ``TORCHINDUCTOR_CACHE_DIR``, so that value counts as unset; inductor reads the variable on every
    compilation, so setting it here takes effect for the decode step."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = os.path.abspath(default_cache_dir())
    except ImportError:                      # another torch layout: leave inductor's choice alone
        return
    if current is None or os.path.abspath(current) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
