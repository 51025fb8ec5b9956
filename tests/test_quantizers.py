"""Quantizers against bounds: RTN error per element, clipping never worse, more bits never worse.

Tolerances (``u = 2**-11``, the unit roundoff of fp16; ``s`` the stored fp16 scale of an element's group):

* asymmetric min-max, weights with ``min <= 0 <= max``: ``|w - deq| <= s * (1/2 + 2e-4)``.
  Away from the range ends ``q = round(w/s + z)`` is never clamped, so the error is at most half a
  step whatever fp16 did to ``z`` (dequantization uses the same stored ``z``). At the ends, fp16
  rounding of ``s`` and ``z`` can push ``w/s + z`` past ``maxq + 1/2`` (or below ``-1/2``) by at most
  ``(maxq + |z|) * u / (1 - u)`` code units; with ``0 <= z <= maxq`` that is <= 0.25 < 1/2, so the
  clamped error stays below half a step. The 2e-4 code units cover fp32 arithmetic on values up to
  ``2 * maxq`` (a few ulps of 510 in fp32 is ~1e-4).
* asymmetric, any weights: ``s * max(1/2, (maxq + |z|) * u / (1 - u)) + s * 2e-4``; a group far from
  zero has a large ``|z|`` whose fp16 rounding shifts the grid by up to ``|z| * u`` code units.
* symmetric: ``s = fp16(2 * absmax / maxq)`` and ``z = 2**(bits-1)`` put ``+absmax`` at
  ``maxq + 1/2`` code units; rounding ``s`` down overshoots by up to ``maxq/2 * u / (1 - u)``, so
  ``|w - deq| <= s * (1/2 + maxq/2 * u / (1 - u) + 2e-4)`` (at 8 bits ~0.563 s; measured ~0.559 s).
"""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import RecipeError
from lowbit.formats import GroupedInt, QuantSpec, expand_groups
from lowbit.quantizers import METHODS, get_method, minmax_qparams, round_to_grid, rtn, rtn_clip

BITS = (2, 3, 4, 8)
U16 = 2.0**-11                      # fp16 unit roundoff
FP32_SLACK = 2e-4                   # code units, see the module docstring
SHAPES = [(256, 32), (256, 128), (256, -1), (200, 64), (576, 128)]   # (in_features, group); 200/64 and 576/128 are ragged


def weights(out_f, in_f, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * scale


def per_column(fmt: GroupedInt, t):
    return expand_groups(t.float(), fmt.spec, fmt.in_features)


def group_sq_errors(w, fmt):
    """(out, G) summed squared error per group, computed here independently of the library."""
    err = (w.float() - fmt.dequantize()).pow(2)
    width = fmt.spec.group_width(fmt.in_features)
    return torch.stack([err[:, i:i + width].sum(1) for i in range(0, fmt.in_features, width)], dim=1)


# --- asymmetric min-max RTN --------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("in_f", "group"), SHAPES)
def test_rtn_asymmetric_error_at_most_half_step(bits, in_f, group):
    w = weights(48, in_f, seed=bits * 10 + in_f)
    fmt = rtn(w, QuantSpec(bits, group, False))
    assert fmt.shape == (48, in_f)
    assert fmt.spec == QuantSpec(bits, group, False)
    s = per_column(fmt, fmt.scale)
    err = (w - fmt.dequantize()).abs()
    assert (err <= s * (0.5 + FP32_SLACK)).all(), (err / s).max()
    # the bound is not vacuous: the worst element uses most of its half step
    assert (err / s).max() > 0.4


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("in_f", "group"), SHAPES)
def test_rtn_codes_in_range_and_span_the_grid(bits, in_f, group):
    spec = QuantSpec(bits, group, False)
    w = weights(16, in_f, seed=bits)
    scale, zero = minmax_qparams(w, spec)
    assert scale.dtype == zero.dtype == torch.float16
    assert scale.shape == zero.shape == (16, spec.n_groups(in_f))
    q = round_to_grid(w, scale, zero, spec)
    assert q.dtype == torch.uint8 and q.shape == (16, in_f)
    assert int(q.max()) < 2**bits
    # min-max: each group's smallest weight lands on code 0 and its largest on maxq
    width = spec.group_width(in_f)
    for i in range(0, in_f, width):
        block_q, block_w = q[:, i:i + width], w[:, i:i + width]
        assert torch.equal(block_q.gather(1, block_w.argmin(1, keepdim=True)), torch.zeros(16, 1, dtype=torch.uint8))
        assert (block_q.gather(1, block_w.argmax(1, keepdim=True)) == spec.maxq).all()
    fmt = rtn(w, spec)
    assert torch.equal(fmt.unpacked(), q)
    assert torch.equal(fmt.scale, scale) and torch.equal(fmt.zero, zero)


@pytest.mark.parametrize("bits", BITS)
def test_rtn_offset_groups_obey_fp16_zero_bound(bits):
    """Groups far from zero: the fp16 zero point's rounding is the only extra error."""
    g = torch.Generator().manual_seed(5)
    w = 3.0 + 0.02 * torch.randn(8, 128, generator=g)                     # all positive, narrow range
    w[4:] = -w[4:]                                                        # and all negative
    fmt = rtn(w, QuantSpec(bits, 32, False))
    s, z = per_column(fmt, fmt.scale), per_column(fmt, fmt.zero)
    bound = s * torch.clamp((2**bits - 1 + z.abs()) * U16 / (1 - U16), min=0.5) + s * FP32_SLACK
    err = (w - fmt.dequantize()).abs()
    assert torch.isfinite(fmt.dequantize()).all()
    assert (err <= bound).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.0, -0.37, 0.37, 5.0, -1234.5, 1e-3, -6e-5])
def test_rtn_constant_group_is_exact(bits, value):
    w = weights(3, 96, seed=1)
    w[1, 32:64] = value                                                   # one constant group of 32
    w[2, :] = value                                                       # a constant row (per-channel case below)
    for group in (32, -1):
        deq = rtn(w, QuantSpec(bits, group, False)).dequantize()
        got = deq[1, 32:64] if group == 32 else deq[2]
        if value == 0.0:
            assert (got == 0).all()
        else:
            assert ((got - value).abs() <= 1e-3 * abs(value)).all(), (group, got.unique())
    # symmetric: +-absmax sit half a step off the grid (s = 2 * absmax / maxq), so only an all-zero group is exact
    if value == 0.0:
        assert (rtn(w, QuantSpec(bits, 32, True)).dequantize()[1, 32:64] == 0).all()


def test_rtn_accepts_half_precision_weights():
    w = weights(8, 64, seed=2)
    spec = QuantSpec(4, 32, False)
    a, b = rtn(w.bfloat16(), spec), rtn(w.bfloat16().float(), spec)
    for k in a.tensors():
        assert torch.equal(a.tensors()[k], b.tensors()[k])


def test_rtn_narrow_offset_group_stays_finite():
    w = torch.full((1, 16), 10.0)
    w[0, 1] = 10.0001
    deq = rtn(w, QuantSpec(4, 16, False)).dequantize()
    assert torch.isfinite(deq).all()
    assert ((deq - w).abs() <= 1e-3 * 10).all()


# --- symmetric RTN -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("in_f", "group"), SHAPES)
def test_rtn_symmetric_bound(bits, in_f, group):
    spec = QuantSpec(bits, group, True)
    w = weights(48, in_f, seed=bits * 7 + in_f)
    fmt = rtn(w, spec)
    assert fmt.zero is None
    assert set(fmt.tensors()) == {"codes", "scale"}
    s = per_column(fmt, fmt.scale)
    maxq = 2**bits - 1
    err = (w - fmt.dequantize()).abs()
    assert (err <= s * (0.5 + maxq / 2 * U16 / (1 - U16) + FP32_SLACK)).all(), (err / s).max()
    # the scale is 2 * absmax / maxq of each group, to fp16 precision
    width = spec.group_width(in_f)
    absmax = torch.stack([w[:, i:i + width].abs().amax(1) for i in range(0, in_f, width)], 1)
    torch.testing.assert_close(fmt.scale.float(), (2 * absmax / maxq).half().float(), rtol=0, atol=0)


# --- rtn_clip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("in_f", "group"), [(256, 32), (200, 64), (576, 128), (128, -1)])
def test_rtn_clip_never_worse_than_rtn_per_group(bits, symmetric, in_f, group):
    torch.manual_seed(bits + in_f)
    w = torch.distributions.StudentT(3.0).sample((32, in_f)) * 0.02      # heavy tails: clipping matters
    spec = QuantSpec(bits, group, symmetric)
    e_rtn = group_sq_errors(w, rtn(w, spec))
    clipped = rtn_clip(w, spec)
    e_clip = group_sq_errors(w, clipped)
    assert (e_clip <= e_rtn).all(), (e_clip - e_rtn).max()
    assert clipped.shape == (32, in_f) and clipped.spec == spec


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_rtn_clip_helps_on_heavy_tails(bits):
    torch.manual_seed(11)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    spec = QuantSpec(bits, 128, False)
    assert group_sq_errors(w, rtn_clip(w, spec)).sum() < group_sq_errors(w, rtn(w, spec)).sum()


def test_rtn_clip_with_ratio_one_only_is_rtn():
    w = weights(16, 200, seed=4)
    spec = QuantSpec(3, 64, False)
    a, b = rtn_clip(w, spec, grid=5, min_ratio=1.0), rtn(w, spec)
    for k in b.tensors():
        assert torch.equal(a.tensors()[k], b.tensors()[k])


# --- more bits, less error ---------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_more_bits_lower_weight_error(symmetric, group):
    w = weights(64, 384, seed=9)
    mse = [(w - rtn(w, QuantSpec(b, group, symmetric)).dequantize()).pow(2).mean().item() for b in BITS]
    assert mse == sorted(mse, reverse=True) and len(set(mse)) == len(mse), mse
    # each extra bit roughly quarters the error; 8 bits is far below 4
    assert mse[3] < mse[2] / 100


@pytest.mark.parametrize("method", ["rtn", "rtn_clip"])
def test_layer_output_error_decreases_with_bits(method):
    torch.manual_seed(3)
    w = torch.randn(96, 192) * 0.05
    x = torch.randn(32, 192)
    y = F.linear(x, w)
    m = get_method(method)
    errs = []
    for b in BITS:
        fmt = m.quantize(w, {}, QuantSpec(b, 64, False), m.check_options({}))
        errs.append((F.linear(x, fmt.dequantize()) - y).pow(2).mean().item())
    assert errs == sorted(errs, reverse=True) and len(set(errs)) == len(errs), errs
    assert errs[-1] < 1e-3 * y.pow(2).mean().item()


# --- the method registry -----------------------------------------------------------------------


def test_registered_methods():
    assert {"rtn", "rtn_clip"} <= set(METHODS)
    assert get_method("rtn").needs == frozenset()
    w = weights(8, 64, seed=6)
    spec = QuantSpec(4, 32, False)
    a, b = get_method("rtn").quantize(w, {}, spec, get_method("rtn").check_options({})), rtn(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    m = get_method("rtn_clip")
    a, b = m.quantize(w, {}, spec, m.check_options({"grid": 7})), rtn_clip(w, spec, 7, 0.5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_check_options_defaults_and_overrides():
    m = get_method("rtn_clip")
    assert m.check_options({}) == {"grid": 20, "min_ratio": 0.5, "objective": "weight"}
    assert m.check_options({"grid": 5}) == {"grid": 5, "min_ratio": 0.5, "objective": "weight"}
    assert m.check_options({"min_ratio": 1}) == {"grid": 20, "min_ratio": 1, "objective": "weight"}  # int is fine
    assert get_method("rtn").check_options({}) == {}


@pytest.mark.parametrize(("method", "options", "match"), [
    ("rtn_clip", {"grdi": 5}, "grdi"),
    ("rtn", {"grid": 5}, "grid"),
    ("rtn_clip", {"objective": "none"}, "objective"),
    ("gptq", {"clip": 1}, "clip"),
    ("rtn_clip", {"grid": 2.5}, "grid"),
    ("rtn_clip", {"grid": "20"}, "grid"),
    ("rtn_clip", {"grid": True}, "grid"),
    ("rtn_clip", {"min_ratio": "0.5"}, "min_ratio"),
])
def test_check_options_rejects(method, options, match):
    with pytest.raises(RecipeError, match=match):
        get_method(method).check_options(options)


def test_unknown_method_lists_known():
    with pytest.raises(RecipeError, match="nope") as e:
        get_method("nope")
    assert "rtn" in str(e.value) and "rtn_clip" in str(e.value)
