"""Fused decoder layers (:mod:`lowbit.decoding.fused`): one ``decode_layer`` call per layer and token gives the
unfused layer's result to fp32 rounding, updates the static cache the same way, and steps aside for every call
it does not cover."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import _COMMON, tiny_model, tiny_tokenizer

import lowbit
from lowbit import checkpoint
from lowbit.decoding import fused
from lowbit.kernels import _ext
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the fused extension is unavailable")


@pytest.fixture(autouse=True)
def _fused_kernel(monkeypatch):
    """Layers fuse only where they run lowbit's fused kernel, and at these tiny shapes the per-process timing
    in ``kernels.choose`` may pick another one (the reference path is about as fast on a 64-wide layer):
    force it, so what is tested does not depend on a timing."""
    monkeypatch.setenv("LOWBIT_KERNEL", "fused")

FUSABLE = ["llama", "llama-bias", "mistral", "qwen2", "qwen3"]


def _model(family: str):
    if family == "llama-bias":                                          # biases on q/k/v and o
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(T.LlamaConfig(**_COMMON, attention_bias=True)).eval()
    return tiny_model(family)


def _saved(tmp_path, family: str, preset: str = "w4g64"):
    model = _model(family)
    report = quantize_model(model, Recipe.resolve(preset), progress=False)
    path = tmp_path / f"{family}-{preset}"
    checkpoint.save(model, tiny_tokenizer(), path, report, {"spec": "tiny"})
    return path


def _saved_wide(tmp_path):
    """A llama wide enough that every GEMV's rows and the attention heads split over two threads (grain: 64K weights
    per task; heads: 16K cached floats) and that its 512-column rows form a layout-2 super-chunk, at w4g64."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**_COMMON, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                           "num_key_value_heads": 2})
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    report = quantize_model(model, Recipe.resolve("w4g64"), progress=False)
    path = tmp_path / "wide"
    checkpoint.save(model, tiny_tokenizer(), path, report, {"spec": "tiny"})
    return path


def _generate(model, ids, new=10, **kw):
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def _spy(monkeypatch) -> list:
    """Count fused layer steps: one per ``decode_layer`` call, one per layer of a ``decode_layers`` call (the real
    ops still run)."""
    one, every, calls = torch.ops.lowbit.decode_layer, torch.ops.lowbit.decode_layers, []
    monkeypatch.setattr(torch.ops.lowbit, "decode_layer", lambda *a: calls.append(1) or one(*a))
    monkeypatch.setattr(torch.ops.lowbit, "decode_layers", lambda *a: calls.extend([1] * len(a[4])) or every(*a))
    return calls


@pytest.mark.parametrize("family", FUSABLE)
def test_fused_decode_gives_the_unfused_tokens_and_logits(tmp_path, monkeypatch, family):
    path = _saved(tmp_path, family)
    plain = lowbit.load(path, compile=False)                            # dynamic cache, unfused layers
    fast = lowbit.load(path)                                            # eager here (conftest), fused layers
    n_layers = fast.config.num_hidden_layers
    assert fused.fused_count(fast) == n_layers and fused.fused_count(plain) == 0
    assert fast.generation_config.cache_implementation == "static"
    assert fast.create_masks_for_generate is fused._two_d_mask                # no per-step 4-D mask
    assert "create_masks_for_generate" not in vars(plain)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    want, want_scores = _generate(plain, ids)
    calls = _spy(monkeypatch)
    got, got_scores = _generate(fast, ids)
    assert torch.equal(got, want)
    assert len(calls) == n_layers * 9                                   # every decode step, every layer
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)


def test_fused_layer_updates_the_cache_like_the_unfused_layer(tmp_path):
    path = _saved(tmp_path, "qwen2")
    model = lowbit.load(path)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    caches = []
    for on in (True, False):
        if not on:
            fused.unfuse_layers(model)
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        caches.append([(layer.keys.clone(), layer.values.clone(), int(layer.cumulative_length)) for layer in cache.layers])
    for (k1, v1, n1), (k2, v2, n2) in zip(*caches):
        assert n1 == n2 == 6 + 4                                        # prompt + 4 decode steps written
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_fused_decode_follows_the_attention_mask(tmp_path):
    """Left padding: the masked positions of the cache are not attended to, as in the unfused layer."""
    path = _saved(tmp_path, "llama")
    plain = lowbit.load(path, compile=False)
    fast = lowbit.load(path)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    want, want_scores = _generate(plain, ids, attention_mask=mask, pad_token_id=0)
    got, got_scores = _generate(fast, ids, attention_mask=mask, pad_token_id=0)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)


def test_calls_it_does_not_cover_run_the_layer_unfused(tmp_path, monkeypatch):
    path = _saved(tmp_path, "mistral")
    plain = lowbit.load(path, compile=False)
    fast = lowbit.load(path)
    batch = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(4))
    calls = _spy(monkeypatch)
    got, _ = _generate(fast, batch, new=4)                              # a batch of two
    fast.generation_config.cache_implementation = None                  # a dynamic cache
    got1, _ = _generate(fast, batch[:1], new=4)
    assert not calls
    assert torch.equal(got, _generate(plain, batch, new=4)[0])
    assert torch.equal(got1, _generate(plain, batch[:1], new=4)[0])


def test_layers_that_do_not_qualify_stay_unfused(tmp_path, monkeypatch):
    path = _saved(tmp_path, "llama")
    monkeypatch.setenv("LOWBIT_FUSE_LAYERS", "0")
    model = lowbit.load(path)
    assert fused.fused_count(model) == 0
    monkeypatch.delenv("LOWBIT_FUSE_LAYERS")
    model = lowbit.load(path)
    block = model.model.layers[0]
    assert fused.qualifies(block, "llama") is None
    assert fused.qualifies(block, "gemma") == "family 'gemma'"
    model.model.layers[0].mlp.down_proj._decode = None                  # e.g. a layer without a bound kernel
    assert "kernel" in fused.qualifies(block, "llama")
    gemma = lowbit.load(_saved(tmp_path, "gemma"))                      # another family: never fused
    assert fused.fused_count(gemma) == 0


def test_decode_layer_rejects_a_full_cache(tmp_path):
    path = _saved(tmp_path, "llama")
    model = lowbit.load(path)
    f = model.model.layers[0]._lowbit_fused
    keys = torch.zeros(1, f.kv_heads, 4, f.head_dim)
    length = torch.tensor(4)
    x, cs = torch.randn(1, 1, f.hidden), torch.ones(1, 1, f.head_dim)
    with pytest.raises(ValueError, match="outside the cache of 4 tokens"):
        torch.ops.lowbit.decode_layer(x, f.tensors, f.meta, f.fmeta, keys, keys.clone(), length, cs, cs, None)
    with pytest.raises(ValueError, match="expected 18 tensors"):
        torch.ops.lowbit.decode_layer(x, f.tensors[:-1], f.meta, f.fmeta, keys, keys.clone(), length - 1, cs, cs, None)
    # every layer in one call: the same checks, and the lists must hold whole layers
    with pytest.raises(ValueError, match="outside the cache of 4 tokens"):
        torch.ops.lowbit.decode_layers(x, f.tensors, f.meta, f.fmeta, [keys], [keys.clone()], [length], cs, cs, None)
    with pytest.raises(ValueError, match="expected per layer 18 tensors"):
        torch.ops.lowbit.decode_layers(x, f.tensors, f.meta, f.fmeta, [keys, keys], [keys, keys], [length, length],
                                       cs, cs, None)


def test_decode_layers_is_decode_layer_layer_after_layer(tmp_path):
    path = _saved(tmp_path, "qwen3")
    model = lowbit.load(path)
    fs = [b._lowbit_fused for b in model.model.layers]
    w, meta, fmeta = model.model._lowbit_fused_stack
    g = torch.Generator().manual_seed(3)
    x, cs, sn = torch.randn(1, 1, fs[0].hidden, generator=g), torch.randn(1, 1, fs[0].head_dim, generator=g), \
        torch.randn(1, 1, fs[0].head_dim, generator=g)
    caches = [(torch.randn(1, f.kv_heads, 6, f.head_dim, generator=g), torch.randn(1, f.kv_heads, 6, f.head_dim, generator=g),
               torch.tensor(3)) for f in fs]
    additive = torch.zeros(1, 1, 1, 6)
    additive[..., 1] = float("-inf")
    additive[..., 2] = -3.0
    # generate()'s 2-D mask (int64, with a gap), the same as bool, an additive float row over the cache, none
    outs = []
    for mask in (torch.tensor([[1, 0, 1, 1]]), torch.tensor([[True, False, True, True]]), additive, None):
        fresh = [(k.clone(), v.clone(), n.clone()) for k, v, n in caches]
        want, mine = x, [(k.clone(), v.clone(), n.clone()) for k, v, n in caches]
        for f, (k, v, n) in zip(fs, mine):
            want = torch.ops.lowbit.decode_layer(want, f.tensors, f.meta, f.fmeta, k, v, n, cs, sn, mask)
        got = torch.ops.lowbit.decode_layers(x, w, meta, fmeta, [k for k, _, _ in fresh], [v for _, v, _ in fresh],
                                             [n for _, _, n in fresh], cs, sn, mask)
        assert torch.equal(got, want), mask
        assert not torch.equal(got, x)
        for (k, v, n), (k2, v2, n2) in zip(fresh, mine):
            assert torch.equal(k, k2) and torch.equal(v, v2) and int(n) == int(n2) == 4
        outs.append(got)
    assert torch.equal(outs[0], outs[1])                                  # int64 and bool masks agree
    assert not torch.equal(outs[0], outs[3]) and not torch.equal(outs[2], outs[3])   # and every mask is applied


@pytest.mark.skipif(not _ext.available(), reason="no fused extension")
def test_int8_kernel_forced_where_no_int8_path_may_run(tmp_path, monkeypatch):
    """``LOWBIT_KERNEL=fused_q8`` with ``LOWBIT_ISA=scalar`` (what a CPU without AVX2 offers): the int8 kernel has
    no plan, so each layer computes the reference and no decoder layer fuses on it (it once crashed binding
    a missing plan); the tokens are the reference kernel's."""
    path = _saved(tmp_path, "llama")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    want = _generate(lowbit.load(path, compile=False), ids)[0]
    monkeypatch.setenv("LOWBIT_ISA", "scalar")
    monkeypatch.setenv("LOWBIT_INT8_ACT", "1")
    monkeypatch.setenv("LOWBIT_KERNEL", "fused_q8")
    assert not _ext.q8_available()
    model = lowbit.load(path)
    assert fused.fused_count(model) == 0
    assert torch.equal(_generate(model, ids)[0], want)


@pytest.mark.skipif(not _ext.q8_available(), reason="no AVX-512 VNNI: no int8-activation kernel")
def test_fused_decode_with_int8_activations(tmp_path, monkeypatch):
    path = _saved(tmp_path, "qwen3")
    monkeypatch.setenv("LOWBIT_INT8_ACT", "1")
    monkeypatch.setenv("LOWBIT_KERNEL", "fused_q8")
    fast = lowbit.load(path)
    # the q/k/v GEMV runs int8 activations, its codes in the layout of this CPU's int8 path (2 with VNNI)
    assert fast.model.layers[0]._lowbit_fused.meta[5] == _ext.q8_layout() >= 1
    fused.unfuse_layers(fast)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(5))
    want, want_scores = _generate(fast, ids)                            # the same kernels, layer by layer
    fused.fuse_layers(fast)
    got, got_scores = _generate(fast, ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)


def test_direct_calls_with_a_two_dimensional_mask(tmp_path, monkeypatch):
    """A forward call outside generate(): one token, a 2-D mask with a padded position, a static cache."""
    path = _saved(tmp_path, "qwen2")
    model = lowbit.load(path)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 1] = 0
    logits = []
    for on in (True, False):
        (fused.fuse_layers if on else fused.unfuse_layers)(model)
        cache = T.StaticCache(config=model.config, max_cache_len=12)
        with torch.no_grad():
            model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
            calls = _spy(monkeypatch)
            out = model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[5]]))
        assert len(calls) == (model.config.num_hidden_layers if on else 0)
        logits.append(out.logits)
        monkeypatch.undo()
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    # asking for hidden states: the layers run one by one (still fused), every state is returned
    fused.fuse_layers(model)
    cache = T.StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        out = model(ids[:, 6:], past_key_values=cache, use_cache=True, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_the_decode_path_is_described(tmp_path):
    from lowbit.decoding import describe

    path = _saved(tmp_path, "llama")
    assert describe(lowbit.load(path)).startswith("2/2 decoder layers fused, eager step, static cache, kernels ")
    assert describe(lowbit.load(path, compile=False)) == "0/2 decoder layers fused, eager step, dynamic cache"
    assert describe(tiny_model("llama")) is None                        # nothing quantized


@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_f32_matches_f_linear(m):
    g = torch.Generator().manual_seed(m)
    w, b = torch.randn(333, 70, generator=g), torch.randn(333, generator=g)
    x = torch.randn(1, m, 70, generator=g)
    torch.testing.assert_close(torch.ops.lowbit.linear_f32(x, w, b), torch.nn.functional.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)
    assert torch.ops.lowbit.linear_f32(x, w, None).shape == (1, m, 333)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.lowbit.linear_f32(x.double(), w, None)


def test_an_fp32_head_decodes_through_linear_f32(tmp_path, monkeypatch):
    path = _saved(tmp_path, "gemma")                                    # not fusable: the head still is
    model = lowbit.load(path)
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head._lowbit_fused_head
    real, calls = torch.ops.lowbit.linear_f32, []
    monkeypatch.setattr(torch.ops.lowbit, "linear_f32", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(1, 1, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)
        head(torch.randn(1, 9, head.in_features))                       # a prefill: nn.Linear's own path
    assert calls == [(1, 1, head.in_features)]
    y = head(x.requires_grad_())                                        # gradients: nn.Linear's own path
    assert y.grad_fn is not None and len(calls) == 1
    plain = lowbit.load(path, compile=False).get_output_embeddings()
    assert not getattr(plain, "_lowbit_fused_head", False)


def test_a_reloaded_model_runs_unfused_until_fused_again(tmp_path, monkeypatch):
    """New weights loaded into a fused model: its layers notice (their plans and groups changed) and run unfused
    rather than compute with the weights they were fused with; fast_decode fuses them again."""
    from lowbit.decoding import fast_decode

    path = _saved(tmp_path, "llama")
    model = lowbit.load(path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in sd if k.endswith("layers.0.self_attn.o_proj.scale"))
    sd[key] = sd[key] * 2
    model.load_state_dict(sd)
    plain = lowbit.load(path, compile=False)
    plain.load_state_dict(sd)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(7))
    want, want_scores = _generate(plain, ids)
    calls = _spy(monkeypatch)
    got, got_scores = _generate(model, ids)
    assert not calls and torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)
    fast_decode(model)
    got, got_scores = _generate(model, ids)
    assert calls and torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["fused", "fused_q8"])
def test_team_decode_step_gives_the_bits_of_a_parallel_region_per_stage(tmp_path, monkeypatch, kernel):
    """``decode_layers`` runs a step in one parallel region with a team of threads (spin barriers between the
    stages) unless ``LOWBIT_DECODE_TEAM=0``; the rows and heads are split as ``at::parallel_for`` splits them, so
    both give the same bits. Layers wide enough that every GEMV's rows and the attention heads are split over
    two threads (grain: 64K weights per task; heads: 16K cached floats)."""
    if kernel == "fused_q8" and not _ext.q8_available():
        pytest.skip("no int8-activation kernel on this CPU")
    monkeypatch.setenv("LOWBIT_KERNEL", kernel)
    monkeypatch.setenv("LOWBIT_INT8_ACT", "1" if kernel == "fused_q8" else "0")
    path = _saved_wide(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = lowbit.load(path)
        fs = [b._lowbit_fused for b in fast.model.layers]
        assert all(f is not None for f in fs)
        assert fs[0].meta[5] == (_ext.q8_layout() if kernel == "fused_q8" else 0)
        w, meta, fmeta = fast.model._lowbit_fused_stack
        g = torch.Generator().manual_seed(5)
        hd = fs[0].head_dim
        x, cs, sn = (torch.randn(1, 1, fs[0].hidden, generator=g), torch.randn(1, 1, hd, generator=g),
                     torch.randn(1, 1, hd, generator=g))
        caches = [(torch.randn(1, f.kv_heads, 48, hd, generator=g), torch.randn(1, f.kv_heads, 48, hd, generator=g),
                   torch.tensor(40)) for f in fs]
        got = {}
        for team in ("1", "0"):
            monkeypatch.setenv("LOWBIT_DECODE_TEAM", team)
            mine = [(k.clone(), v.clone(), n.clone()) for k, v, n in caches]
            y = x
            for _ in range(3):                                           # three tokens, the cache growing
                y = torch.ops.lowbit.decode_layers(y, w, meta, fmeta, [k for k, _, _ in mine],
                                                   [v for _, v, _ in mine], [n for _, _, n in mine], cs, sn, None)
            got[team] = (y, mine)
            assert torch.ops.lowbit.decode_team_threads() == (2 if team == "1" else 1)   # which path ran
        (y1, c1), (y0, c0) = got["1"], got["0"]
        assert torch.isfinite(y1).all() and not torch.equal(y1, x)
        assert torch.equal(y1, y0)
        for (k, v, n), (k0, v0, n0) in zip(c1, c0):
            assert torch.equal(k, k0) and torch.equal(v, v0) and int(n) == int(n0) == 43
    finally:
        torch.set_num_threads(threads)


def test_lowbit_isa_forces_the_fused_step_path_too(tmp_path, monkeypatch):
    """``LOWBIT_ISA=avx2`` forces the AVX2 path on the layers' own calls (the isa argument) and also inside
    ``decode_layers``, which takes no isa argument: on a VNNI CPU the two int8 paths sum in another order, so the
    forced step gives other bits (close ones), the same bits run to run.  ``LOWBIT_ISA=avxvnni`` forces the
    AVX-VNNI path, whose sums are AVX2's bit for bit at these 4-bit layers."""
    if _ext.q8_isa(_ext.ISA_CODES["avx512"]) != "avx512":
        pytest.skip("no AVX-512 VNNI here: both runs would take the AVX2 path")
    if not _ext.q8_available():
        pytest.skip("LOWBIT_ISA rules every int8 path out: the layers do not fuse on fused_q8")
    monkeypatch.setenv("LOWBIT_KERNEL", "fused_q8")
    monkeypatch.setenv("LOWBIT_INT8_ACT", "1")
    path = _saved_wide(tmp_path)
    fast = lowbit.load(path)
    w, meta, fmeta = fast.model._lowbit_fused_stack
    f0 = fast.model.layers[0]._lowbit_fused
    g = torch.Generator().manual_seed(7)
    hd = f0.head_dim
    x, cs, sn = (torch.randn(1, 1, f0.hidden, generator=g), torch.randn(1, 1, hd, generator=g),
                 torch.randn(1, 1, hd, generator=g))
    caches = [(torch.randn(1, f0.kv_heads, 16, hd, generator=g), torch.randn(1, f0.kv_heads, 16, hd, generator=g))
              for _ in fast.model.layers]

    def step(isa):
        monkeypatch.setenv("LOWBIT_ISA", isa)
        ks, vs = [k.clone() for k, _ in caches], [v.clone() for _, v in caches]
        return torch.ops.lowbit.decode_layers(x, w, meta, fmeta, ks, vs, [torch.tensor(8) for _ in caches], cs, sn,
                                              None)

    best, avx2 = step("avx512"), step("avx2")
    assert torch.equal(avx2, step("avx2"))
    assert not torch.equal(best, avx2)
    torch.testing.assert_close(avx2, best, rtol=1e-3, atol=1e-3)
    if "avxvnni" in _ext.fused_info()["q8_isas"]:          # exact int32 sums as AVX2's: the same bits at 4 bits
        assert torch.equal(step("avxvnni"), avx2)
