"""GPTQ as a pure function, and through the pipeline on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, assert_save_reload_generate, tiny_model

from lowbit.calibrate import Hessian
from lowbit.formats import QuantSpec
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
