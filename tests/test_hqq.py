"""HQQ-style refinement against bounds: never worse than min-max RTN, exact fp16 storage, data-free in the pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from lowbit.errors import RecipeError
from lowbit.formats import QuantSpec
from lowbit.pipeline import quantize_model
from lowbit.quantizers import get_method, hqq, round_to_grid, rtn
from lowbit.recipe import Recipe

P = 0.7                                                     # the l_p norm hqq optimises by default
CASES = [(b, g, 256) for b in (2, 3, 4) for g in (32, 64, 128)] + [(b, 64, 200) for b in (2, 3, 4)]   # 200: ragged


def heavy_tailed(out_f=64, in_f=256, seed=0):
    """Heavy-tailed weights (a normal over the root of a uniform) with sparse 8x outliers, like trained LLM layers."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(out_f, in_f, generator=g) / torch.rand(out_f, in_f, generator=g).clamp(min=0.05).sqrt()
    w = 0.02 * t                                            # normal / sqrt(uniform): heavy (Pareto-like) tails
    idx = torch.randint(0, out_f * in_f, (out_f * in_f // 200,), generator=g)
    w.view(-1)[idx] *= 8                                    # sparse outliers
    return w


def errors(w, fmt):
    d = w - fmt.dequantize()
    return d.pow(2).sum().item(), d.abs().pow(P).sum().item()


@pytest.mark.parametrize(("bits", "group", "in_f"), CASES)
def test_hqq_no_worse_than_rtn(bits, group, in_f):
    w = heavy_tailed(in_f=in_f, seed=bits * 100 + group)
    spec = QuantSpec(bits, group)
    (mse_h, lp_h), (mse_r, lp_r) = errors(w, hqq(w, spec)), errors(w, rtn(w, spec))
    assert lp_h <= lp_r and mse_h <= mse_r, (mse_h / mse_r, lp_h / lp_r)


@pytest.mark.parametrize("opt_scale", [False, True])
@pytest.mark.parametrize(("in_f", "group"), [(256, 32), (256, 64), (256, 128), (200, 64), (200, -1)])
def test_hqq_strictly_better_at_low_bits(in_f, group, opt_scale):
    tot = {"hqq": [0.0, 0.0], "rtn": [0.0, 0.0]}
    for bits in (2, 3):
        w, spec = heavy_tailed(48, in_f, seed=bits + in_f), QuantSpec(bits, group)
        for name, fmt in (("hqq", hqq(w, spec, opt_scale=opt_scale)), ("rtn", rtn(w, spec))):
            mse, lp = errors(w, fmt)
            tot[name][0] += mse
            tot[name][1] += lp
    assert tot["hqq"][0] < 0.97 * tot["rtn"][0] and tot["hqq"][1] < 0.99 * tot["rtn"][1], tot


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("in_f", "group", "symmetric"),
                         [(256, 64, False), (200, 64, False), (200, -1, False), (200, 64, True), (256, -1, True)])
@pytest.mark.parametrize("opt_scale", [False, True])
def test_hqq_format_is_exact_and_in_range(bits, in_f, group, symmetric, opt_scale):
    w = heavy_tailed(32, in_f, seed=bits)
    w[0] += 5.0                                             # a row far from zero: large zero points
    w[1] = 0.3                                              # a constant row
    spec = QuantSpec(bits, group, symmetric)
    fmt = hqq(w, spec, iters=10, opt_scale=opt_scale)
    q = fmt.unpacked()
    assert fmt.shape == (32, in_f) and fmt.spec == spec
    assert int(q.max()) <= spec.maxq
    assert torch.isfinite(fmt.scale).all() and (fmt.scale > 0).all()
    assert (fmt.zero is None) == symmetric
    assert torch.isfinite(fmt.zero_points()).all()
    # the stored codes are exactly RTN on the stored fp16 parameters: dequantize reproduces the optimum
    assert torch.equal(round_to_grid(w, fmt.scale, fmt.zero_points(), spec), q)
    assert torch.isfinite(fmt.dequantize()).all()
    # never worse than the min-max start in the norm it optimises, symmetric (scale-only) included
    assert errors(w, fmt)[1] <= errors(w, rtn(w, spec))[1]


def test_hqq_is_deterministic_and_iters_0_is_rtn():
    w, spec = heavy_tailed(seed=7), QuantSpec(3, 64)
    a, b, r = hqq(w, spec), hqq(w.clone(), spec), rtn(w, spec)
    for t in ("codes", "scale", "zero"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    z = hqq(w, spec, iters=0)
    assert torch.equal(z.codes, r.codes) and torch.equal(z.scale, r.scale) and torch.equal(z.zero, r.zero)


def test_hqq_bad_options():
    w, spec = heavy_tailed(8, 64), QuantSpec(3, 32)
    for kw in ({"lp_norm": 2.0}, {"lp_norm": 0.0}, {"beta": 0.0}, {"kappa": 0.5}, {"iters": -1}):
        with pytest.raises(RecipeError):
            hqq(w, spec, **kw)
    with pytest.raises(RecipeError, match="known: beta, iters, kappa, lp_norm, opt_scale"):
        Recipe(method="hqq", options={"lp": 0.5})


def test_hqq_is_registered_without_statistics():
    m = get_method("hqq")
    assert m.needs == frozenset()
    assert m.check_options({"opt_scale": True})["iters"] == 20


def test_hqq_pipeline_needs_no_calibration_and_beats_rtn():
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        target = tiny_model("llama")(ids).logits
    errs = {}
    for method in ("rtn", "hqq"):
        m = tiny_model("llama")
        report = quantize_model(m, Recipe(method=method, bits=3, group_size=32), None, progress=False)
        assert report.layers
        with torch.no_grad():
            errs[method] = (m(ids).logits - target).pow(2).mean().item()
    assert errs["hqq"] < errs["rtn"], errs


@pytest.mark.slow
def test_hqq_on_a_smollm2_layer():
    import lowbit

    w = lowbit.load_model("smollm2-135m").model.model.layers[0].mlp.down_proj.weight.detach().float()
    spec = QuantSpec(3, 128)                                # (576, 1536): 12 groups per row
    mse = {name: errors(w, f(w, spec))[0] for name, f in (("hqq", hqq), ("rtn", rtn))}
    assert mse["hqq"] < 0.98 * mse["rtn"], mse
