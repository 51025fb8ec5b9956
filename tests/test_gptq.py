"""GPTQ as a pure function, and through the pipeline on tiny models."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import VOCAB, assert_save_reload_generate, tiny_model

from lowbit.calibrate import Hessian
from lowbit.formats import QuantSpec
from lowbit.kernels import _ext
from lowbit.pipeline import quantize_model
from lowbit.quantizers import gptq, rtn
from lowbit.recipe import Recipe


def correlated_inputs(n=2048, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(-1, 1, d)                       # channels of very different magnitude
    return (torch.randn(n, d, generator=g) @ mix) * scales


def hessian_of(x):
    h = Hessian(x.shape[1])
    h.update(x)
    return h.result()


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, 32), (3, -1), (4, 40)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, group, act_order):
    x = correlated_inputs()
    w = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    spec = QuantSpec(bits, group)
    ref = x @ w.t()
    err = lambda f: (x @ f.dequantize().t() - ref).pow(2).mean().item()  # noqa: E731
    e_gptq, e_rtn = err(gptq(w, hessian_of(x), spec, act_order=act_order)), err(rtn(w, spec))
    # act-order takes the high-energy columns first and leaves the most room to absorb their error
    assert e_gptq < (0.8 if act_order else 0.97) * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_reduces_to_rtn(act_order):
    """With uncorrelated unit inputs no error is propagated: GPTQ's codes are RTN's, in natural column order."""
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(3, 32)
    h = torch.diag(torch.linspace(1, 2, 80))                 # distinct diagonal: act-order really permutes
    a, b = gptq(w, h, spec, damp=0.0, act_order=act_order), rtn(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_dead_channels_and_singular_hessian(caplog):
    x = correlated_inputs(n=32, d=64)                        # fewer rows than columns: H is singular
    x[:, 5] = 0                                              # a dead input channel
    w = torch.randn(8, 64)
    f = gptq(w, hessian_of(x), QuantSpec(4, 32), damp=0.0)
    assert torch.isfinite(f.dequantize()).all()
    # the dead column's weight is zeroed before quantization: its dequantized value is within half a step of 0
    deq = f.dequantize()[:, 5]
    step = f.scale.float()[:, 0]
    assert (deq.abs() <= step / 2 + 1e-6).all()


def test_gptq_recipe_on_tiny_models_saves_and_reloads(tmp_path):
    for family in ("llama", "gpt2", "opt"):
        model = tiny_model(family)
        windows = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
        report = quantize_model(model, Recipe(method="gptq", bits=3, group_size=32), windows, progress=False)
        assert_save_reload_generate(model, report, windows[:2, :8], tmp_path / family)


def test_gptq_lowers_model_output_error_against_rtn():
    windows = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9))
    ref = tiny_model("llama")
    with torch.no_grad():
        target = ref(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_model("llama")
        quantize_model(m, Recipe(method=method, bits=3, group_size=32), windows, progress=False)
        with torch.no_grad():
            errs[method] = (m(ids).logits - target).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.parametrize("act_order", [True, False])
def test_stacked_layers_get_what_each_gets_alone(act_order):
    """Layers reading one input (q/k/v, gate/up) are quantized as one stacked matrix: each row gets the
    codes it would get alone (the summation order of the block updates may differ in the last bit)."""
    h = hessian_of(correlated_inputs())
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(64, 96, generator=g), torch.randn(24, 96, generator=g)
    spec = QuantSpec(3, 32, False)
    stacked = gptq(torch.cat([w1, w2]), h, spec, act_order=act_order)
    for (a, z), w in (((0, 64), w1), ((64, 88), w2)):
        part, alone = stacked.rows(a, z), gptq(w, h, spec, act_order=act_order)
        assert part.shape == alone.shape
        assert (part.unpacked() == alone.unpacked()).float().mean() > 0.999
        torch.testing.assert_close(part.dequantize(), alone.dequantize(), atol=1e-2, rtol=0)


def test_pipeline_stacks_only_layers_sharing_a_hessian():
    from lowbit.models.adapters import get_adapter
    from lowbit.pipeline import _stacks
    from lowbit.quantizers import get_method

    model = tiny_model("llama")
    block = get_adapter(model).blocks(model)[0][1]
    refs = get_adapter(model).linears(block)
    shared_qkv, shared_mlp, own_o, own_down = (torch.eye(4) for _ in range(4))
    stats = {r: {"hessian": h} for r, h in (("self_attn.q_proj", shared_qkv), ("self_attn.k_proj", shared_qkv),
                                             ("self_attn.v_proj", shared_qkv), ("self_attn.o_proj", own_o),
                                             ("mlp.gate_proj", shared_mlp), ("mlp.up_proj", shared_mlp),
                                             ("mlp.down_proj", own_down))}
    units = _stacks(refs, stats, get_method("gptq"), Recipe.resolve("gptq-w4g128"))
    assert sorted(map(tuple, units)) == sorted([("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                                ("mlp.down_proj",)])
    with_outliers = Recipe.from_dict({**Recipe.resolve("gptq-w4g128").to_dict(), "outliers": 0.01})
    assert all(len(u) == 1 for u in _stacks(refs, stats, get_method("gptq"), with_outliers))


needs_ext = pytest.mark.skipif(not _ext.available(), reason="the fused extension (and so a C++ toolchain) is unavailable")
gptq_module = importlib.import_module("lowbit.quantizers.gptq")      # the package exports the function as `gptq`


@needs_ext
@pytest.mark.parametrize("bits,group,out_f,in_f", [(3, 128, 70, 576), (2, 64, 33, 200), (4, -1, 9, 130),
                                                   (8, 32, 5, 7), (4, 128, 2, 300)])
@pytest.mark.parametrize("threads", [1, 2])
def test_column_kernel_matches_the_eager_loop_bit_for_bit(monkeypatch, bits, group, out_f, in_f, threads):
    """torch.ops.lowbit.gptq_block (act-order / static groups) gives the eager column loop's codes, scales and
    zeros exactly, ragged blocks and groups included, with and without output-error clipping."""
    x = correlated_inputs(n=1024, d=in_f, seed=bits)
    h = hessian_of(x)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f)) * 0.05
    spec = QuantSpec(bits, group, int_zero=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for clip in ("none", "output"):
            got = {}
            for kernel in (True, False):
                monkeypatch.setattr(gptq_module, "USE_KERNEL", kernel)
                got[kernel] = gptq(w, h, spec, clip=clip, block=48)
            a, b = got[True], got[False]
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), (bits, group, clip)
            assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))
            assert torch.equal(a.dequantize(), b.dequantize())
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_column_kernel_rejects_bad_shapes():
    w = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="gptq_block"):
        torch.ops.lowbit.gptq_block(w, torch.eye(7), torch.ones(4, 8), torch.zeros(4, 8), 15)
    with pytest.raises(RuntimeError, match="gptq_block"):
        torch.ops.lowbit.gptq_block(w.double(), torch.eye(8), torch.ones(4, 8), torch.zeros(4, 8), 15)


@needs_ext
@pytest.mark.parametrize("out_f,b", [(37, 128), (64, 45), (1, 1)])
def test_column_kernel_values_equal_the_eager_arithmetic(out_f, b):
    """The block's updated weights, codes and errors, not only the codes: every product is rounded before it is
    subtracted (no fused multiply-add), as the eager loop's outer product and subtraction do."""
    g = torch.Generator().manual_seed(out_f + b)
    wb = torch.randn(out_f, b, generator=g)
    a = torch.randn(b, b, generator=g)
    ub = torch.linalg.cholesky(a @ a.t() / b + torch.eye(b), upper=True).contiguous()
    sb = torch.rand(out_f, b, generator=g) * 0.3 + 0.05
    zb = torch.randint(0, 8, (out_f, b), generator=g).float()
    w_ref, q_ref, e_ref = wb.clone(), torch.empty_like(wb), torch.empty_like(wb)
    for i in range(b):
        q_ref[:, i] = torch.round(w_ref[:, i] / sb[:, i] + zb[:, i]).clamp_(0, 7)
        e_ref[:, i] = (w_ref[:, i] - (q_ref[:, i] - zb[:, i]) * sb[:, i]) / ub[i, i]
        w_ref[:, i:] -= torch.outer(e_ref[:, i], ub[i, i:])
    w = wb.clone()
    q, e = torch.ops.lowbit.gptq_block(w, ub, sb, zb, 7)
    assert torch.equal(q, q_ref) and torch.equal(e, e_ref) and torch.equal(w, w_ref)
