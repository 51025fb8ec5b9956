"""The lean decode path (:mod:`lowbit.decoding`): a static cache and a compiled decode step that give the
same greedy tokens as the eager path, with lowbit's kernels inside the graph (no graph break)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from torch._dynamo.utils import counters

import lowbit
from lowbit import checkpoint, decoding
from lowbit.decoding import fused
from lowbit.kernels import _ext
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _quantized(tmp_path, preset: str):
    model = tiny_model("llama")
    report = quantize_model(model, Recipe.resolve(preset), progress=False)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / preset, report, {"spec": "tiny"})
    return tmp_path / preset


@pytest.mark.skipif(not _ext.available(), reason="the fused extension (and so a C++ toolchain) is unavailable")
def test_compiled_decode_gives_the_eager_tokens(tmp_path, monkeypatch):
    path = _quantized(tmp_path, "w4g64")
    monkeypatch.setenv("LOWBIT_KERNEL", "fused")        # layers fuse only on lowbit's kernel; no per-process timing
    eager = lowbit.load(path, compile=False)
    assert eager.generation_config.compile_config is None
    monkeypatch.setenv("LOWBIT_COMPILE", "1")
    assert lowbit.load(path).generation_config.compile_config is None   # every layer fuses: not compiled
    fast = lowbit.load(path, compile=True)                              # compiled, fused layers inside
    assert fast.generation_config.cache_implementation == "static"
    qmods = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert all((m._shared._decode if m._shared is not None else m._decode) is not None for m in qmods)
    assert any(m._shared is not None for m in qmods)                  # q/k/v and gate/up: one call each
    assert fused.fused_count(fast) == fast.config.num_hidden_layers      # one decode_layer call per layer
    ids2 = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    # a second length: another cache size; then a batch of two: new input shapes (the guards dropped on
    # module attributes keep those on the inputs)
    for new, ids in ((12, ids2[:1]), (20, ids2[:1]), (12, ids2)):
        want = eager.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        got = fast.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] >= 1                       # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])    # lowbit's ops inside the graph
    # the same checkpoint unfused, in the same process: its own graph, not the fused model's
    monkeypatch.setenv("LOWBIT_FUSE_LAYERS", "0")
    unfused = lowbit.load(path)                                         # nothing fuses: compiled by default
    assert fused.fused_count(unfused) == 0 and unfused.generation_config.compile_config is not None
    want = eager.generate(ids2[:1], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    calls = []
    one, every = torch.ops.lowbit.decode_layer, torch.ops.lowbit.decode_layers
    monkeypatch.setattr(torch.ops.lowbit, "decode_layer", lambda *a: calls.append(1) or one(*a))
    monkeypatch.setattr(torch.ops.lowbit, "decode_layers", lambda *a: calls.append(1) or every(*a))
    assert torch.equal(unfused.generate(ids2[:1], max_new_tokens=12, min_new_tokens=12, do_sample=False), want)
    assert not calls


def test_compiled_step_on_the_reference_kernel_gives_the_eager_tokens(tmp_path, monkeypatch):
    """What runs without the extension (``LOWBIT_NO_EXT=1``, no compiler) when a compiled step is asked for: the
    reference kernel's dequantization traced into the graph, ragged last group included (96 columns, groups of 64).
    Its writes through views of the output once broke the compiled step on torch 2.13 (``Dimension out of
    range`` in AOT autograd's replay of the aliased result)."""
    path = _quantized(tmp_path, "w4g64")
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = lowbit.load(path, compile=False).generate(ids, **kw)
    torch._dynamo.reset()
    compiled = lowbit.load(path, compile=True)
    assert compiled.generation_config.compile_config is not None and fused.fused_count(compiled) == 0
    assert torch.equal(compiled.generate(ids, **kw), want)


def test_compile_can_be_turned_off(tmp_path, monkeypatch):
    path = _quantized(tmp_path, "w8")
    monkeypatch.setenv("LOWBIT_COMPILE", "0")
    assert not decoding.compile_enabled()
    model = lowbit.load(path)
    assert model.generation_config.compile_config is None
    # eager: a static cache only where decoder layers run fused (lowbit.decoding.fused)
    assert (model.generation_config.cache_implementation == "static") == (fused.fused_count(model) > 0)
    assert lowbit.load(path, compile=False).generation_config.cache_implementation is None
    monkeypatch.setenv("LOWBIT_COMPILE", "1")
    monkeypatch.setattr(_ext, "available", lambda: False)               # no C++ toolchain: eager, not an error
    assert not decoding.compile_enabled()
    model = lowbit.load(path)
    assert model.generation_config.compile_config is None
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
