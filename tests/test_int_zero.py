"""Integer zero points (``int_zero``): every quantizer produces integer zeros in range, at a cost in
accuracy that stays small, and the saved model reloads and generates."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, assert_save_reload_generate, tiny_model
from test_gptq import correlated_inputs, hessian_of
from test_learned import _block_error

from lowbit.formats import QuantSpec, expand_groups
from lowbit.pipeline import quantize_model
from lowbit.quantizers import gptq, rtn
from lowbit.quantizers.hqq import hqq
from lowbit.quantizers.rtn import group_sq_error, rtn_clip
from lowbit.recipe import Recipe


def _weight(out_f=48, in_f=576, seed=0, offset=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.05 + offset


def _check_int_zero(fmt, spec):
    z = fmt.zero_points().float()
    assert fmt.zero.dtype == torch.uint8 and fmt.spec == spec
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= spec.maxq


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (64, 128, -1))
def test_rtn_int_zero_grid_holds_zero_and_error_at_most_half_step(bits, group):
    spec = QuantSpec(bits, group, False, True)
    w = _weight(seed=bits)
    w[0] = w[0].abs() + 0.1                                           # a row with no negative weight
    fmt = rtn(w, spec)
    _check_int_zero(fmt, spec)
    s = expand_groups(fmt.scale.float(), spec, w.shape[1])
    err = (fmt.dequantize() - w).abs()
    # rounding the zero moves the grid by up to half a step, so the range's ends may lose up to one step
    assert (err <= s * (1 + 1e-3)).all() and (err <= s / 2 * (1 + 1e-3)).float().mean() > 0.95
    zq = fmt.zero_points().to(torch.uint8)                           # the zero code dequantizes to exactly 0
    zero_codes = zq.repeat_interleave(spec.group_width(w.shape[1]), 1)[:, : w.shape[1]]
    from lowbit.formats import dequantize_codes
    assert (dequantize_codes(zero_codes, fmt.scale, fmt.zero_points(), spec) == 0).all()


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128)])
def test_int_zero_costs_little_against_fp16_zero(bits, group):
    w = _weight(seed=7)
    e = {iz: (rtn(w, QuantSpec(bits, group, False, iz)).dequantize() - w).pow(2).mean().item() for iz in (False, True)}
    assert e[False] <= e[True] < 1.25 * e[False], e


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128)])
def test_clip_gptq_hqq_with_int_zero(bits, group):
    spec = QuantSpec(bits, group, False, True)
    x = correlated_inputs(d=256)
    w = _weight(64, 256, seed=3)
    ref = x @ w.t()
    out_err = lambda f: (x @ f.dequantize().t() - ref).pow(2).mean().item()  # noqa: E731
    base = rtn(w, spec)
    fmt_gptq = gptq(w, hessian_of(x), spec)
    _check_int_zero(fmt_gptq, spec)
    assert out_err(fmt_gptq) < 0.8 * out_err(base)
    fmt_clip = rtn_clip(w, spec)
    _check_int_zero(fmt_clip, spec)
    err = lambda f: group_sq_error(w, f.unpacked(), f.scale, f.zero_points(), spec)  # noqa: E731
    assert (err(fmt_clip) <= err(base) * (1 + 1e-6)).all() and err(fmt_clip).sum() < err(base).sum()
    fmt_hqq = hqq(w, spec)
    _check_int_zero(fmt_hqq, spec)
    # integer zeros move in whole steps, so HQQ refines the scales as well: strictly better than RTN
    assert (fmt_hqq.dequantize() - w).abs().pow(0.7).sum() < 0.98 * (base.dequantize() - w).abs().pow(0.7).sum()


def test_learned_int_zero_lowers_block_error():
    start = _block_error("rtn", None, int_zero=True)
    learned = _block_error("rtn", {"iters": 60, "batch": 2}, int_zero=True)
    assert learned < 0.8 * start


def test_recipe_int_zero_key():
    r = Recipe.from_dict({"method": "rtn", "bits": 3, "group_size": 128, "int_zero": True})
    assert r.spec.int_zero and r.to_dict()["int_zero"] is True
    assert Recipe.from_dict(r.to_dict()) == r
    assert "int_zero" not in Recipe(method="rtn").to_dict()             # old fingerprints unchanged


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int_zero_model_saves_reloads_generates(method, tmp_path):
    model = tiny_model("llama")
    recipe = Recipe(method=method, bits=3, group_size=32, int_zero=True, calibration={"dtype": "float32"})
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, recipe, ids if method == "gptq" else None, progress=False)
    # codes + fp16 scale + a 3-bit zero per 32 weights, each row's zeros padded to whole bytes (fp16 zeros: 4.0)
    assert 3 + 19 / 32 <= report.bits_per_weight < 3.7
    meta = assert_save_reload_generate(model, report, ids, tmp_path / "ckpt")
    assert meta["recipe"]["int_zero"] is True
