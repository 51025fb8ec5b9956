"""Outlier protection: the sparse fp16 side matrix (format), its selection (quantizer), kernel and pipeline.

Kernel tolerance as in test_kernels: ``max|y - F.linear(x, fmt.dequantize())| <= 1e-3 * max|y| + 1e-4``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, assert_save_reload_generate, tiny_model
from safetensors.torch import load_file, save_file

from lowbit import kernels
from lowbit.errors import CheckpointError, RecipeError, ShapeError
from lowbit.formats import GroupedInt, OutlierFormat, QuantSpec, format_from_tensors
from lowbit.kernels import KERNELS
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.quantizers import rtn
from lowbit.quantizers.outliers import neutral_fill, outlier_count, outlier_mask, salience, with_outliers
from lowbit.recipe import Recipe


def heavy_tailed(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(out_f, in_f, generator=g) / torch.rand(out_f, in_f, generator=g).clamp(min=0.02).sqrt()
    return 0.02 * t                                                     # Student-t-like, a few big weights


def outlier_fmt(out_f=48, in_f=80, spec=QuantSpec(3, 32), fraction=0.02, seed=0):
    w = heavy_tailed(out_f, in_f, seed)
    mask = outlier_mask(w, fraction)
    return w, mask, with_outliers(w, mask, lambda d: rtn(d, spec), spec.group_size)


def outlier_bytes(out_f, in_f, nnz):
    return 4 * (out_f + 1) + (2 if in_f <= 32767 else 4) * nnz + 2 * nnz


# -- format: hand-built layout -----------------------------------------------------------
def test_csr_layout_hand_built():
    base = rtn(torch.zeros(3, 4), QuantSpec(8, -1))
    mask = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    w = torch.tensor([[0.0, 1.5, 0, 0], [0, 0, 0, 0], [-2.0, 0, 0, 0.25]])
    fmt = OutlierFormat.from_mask(base, mask, w)
    t = fmt.tensors()
    assert t["outlier_row_ptr"].tolist() == [0, 1, 1, 3] and t["outlier_row_ptr"].dtype == torch.int32
    assert t["outlier_col"].tolist() == [1, 0, 3] and t["outlier_col"].dtype == torch.int16
    assert t["outlier_values"].tolist() == [1.5, -2.0, 0.25] and t["outlier_values"].dtype == torch.float16
    assert set(t) == {"codes", "scale", "zero", "outlier_row_ptr", "outlier_col", "outlier_values"}
    assert torch.equal(fmt.dequantize(), w)
    assert fmt.meta() == {"kind": "outliers", "shape": [3, 4], "nnz": 3, "base": base.meta()}


@pytest.mark.parametrize(("out_f", "in_f"), [(48, 80), (2, 40000)])
def test_nbytes_exact(out_f, in_f):
    spec = QuantSpec(8, -1) if in_f > 32767 else QuantSpec(3, 32)
    w, mask, fmt = outlier_fmt(out_f, in_f, spec)
    assert fmt.col.dtype == (torch.int16 if in_f <= 32767 else torch.int32)
    nnz = int(mask.sum())
    assert fmt.nnz == nnz == outlier_count(out_f * in_f, 0.02)
    assert fmt.nbytes() == fmt.base.nbytes() + outlier_bytes(out_f, in_f, nnz)
    assert fmt.bits_per_weight() == pytest.approx(8 * fmt.nbytes() / (out_f * in_f))


def test_dequantize_is_fp16_weight_at_outliers_and_base_elsewhere():
    w, mask, fmt = outlier_fmt()
    dq = fmt.dequantize()
    assert torch.equal(dq[mask], w[mask].half().float())                   # exact up to fp16 rounding of w
    assert torch.equal(dq[~mask], fmt.base.dequantize()[~mask])
    assert fmt.dequantize(torch.float16).dtype == torch.float16


def test_safetensors_round_trip_bit_exact(tmp_path):
    _, _, fmt = outlier_fmt()
    save_file(fmt.tensors(), tmp_path / "f.safetensors")
    meta = json.loads(json.dumps(fmt.meta()))
    back = format_from_tensors(meta, load_file(tmp_path / "f.safetensors"))
    assert isinstance(back, OutlierFormat) and isinstance(back.base, GroupedInt)
    for name, t in fmt.tensors().items():
        assert torch.equal(back.tensors()[name], t) and back.tensors()[name].dtype == t.dtype, name
    assert torch.equal(back.dequantize(), fmt.dequantize())


def test_empty_has_exact_shapes():
    _, _, fmt = outlier_fmt()
    empty = OutlierFormat.empty(fmt.meta())
    shapes = lambda f: {n: (t.dtype, tuple(t.shape)) for n, t in f.tensors().items()}  # noqa: E731
    assert shapes(empty) == shapes(fmt)


def test_bad_tensors_and_metadata():
    _, _, fmt = outlier_fmt()
    meta, t = fmt.meta(), fmt.tensors()
    with pytest.raises(CheckpointError, match="outlier_col"):
        format_from_tensors(meta, {n: v for n, v in t.items() if n != "outlier_col"})
    with pytest.raises(ShapeError, match="values"):
        format_from_tensors(meta, {**t, "outlier_values": t["outlier_values"].float()})
    with pytest.raises(ShapeError, match="col"):
        format_from_tensors(meta, {**t, "outlier_col": t["outlier_col"].int()})
    with pytest.raises(ShapeError, match="nnz"):
        format_from_tensors({**meta, "nnz": fmt.nnz + 1}, t)
    bad_ptr = t["outlier_row_ptr"].clone()
    bad_ptr[1] = bad_ptr[-1] + 1
    with pytest.raises(ShapeError, match="row_ptr"):
        format_from_tensors(meta, {**t, "outlier_row_ptr": bad_ptr})
    with pytest.raises(ShapeError, match="column"):
        format_from_tensors(meta, {**t, "outlier_col": torch.full_like(t["outlier_col"], 80)})
    with pytest.raises(CheckpointError, match="metadata"):
        OutlierFormat.empty({"kind": "outliers", "shape": [48, 80]})


def test_quant_linear_buffers_and_empty_load():
    _, _, fmt = outlier_fmt()
    mod = QuantLinear(fmt, torch.randn(48))
    state = mod.state_dict()
    assert {"outlier_row_ptr", "outlier_col", "outlier_values"} <= set(state)
    fresh = QuantLinear.empty(json.loads(json.dumps(mod.meta)), bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 80)
    assert torch.equal(fresh(x), mod(x))
    assert fresh.nbytes() == fmt.nbytes()
    assert fresh.float().outlier_col.dtype == torch.int16                 # dtype casts leave stored tensors alone


# -- selection ---------------------------------------------------------------------------
def test_count_is_nearest_integer_halves_up():
    assert outlier_count(10, 0.25) == 3                                    # 2.5 -> 3
    assert outlier_count(6144, 0.01) == 61                                 # 61.44
    assert outlier_count(100, 0.0) == 0
    w = heavy_tailed(64, 96)
    for frac in (0.0, 0.001, 0.005, 0.01, 0.1):
        assert int(outlier_mask(w, frac).sum()) == outlier_count(w.numel(), frac)
        assert int(outlier_mask(w, frac, torch.eye(96)).sum()) == outlier_count(w.numel(), frac)


def test_magnitude_and_hessian_rules_hand_built():
    w = torch.tensor([[0.1, 1.0, 0.2, 5.0],
                      [0.3, 0.5, 2.0, 4.0]])
    h = torch.diag(torch.tensor([100.0, 1.0, 1.0, 0.0]))                  # input 3 is dead
    # magnitude: the two largest |w| (both in the dead column)
    assert outlier_mask(w, 0.25).nonzero().tolist() == [[0, 3], [1, 3]]
    # Hessian: dead column -> 1, lam = 0.01 * mean(100, 1, 1, 1); diag(H^-1) = 1 / (d + lam)
    lam = 0.01 * 103 / 4
    want = w.pow(2) * (torch.tensor([100.0, 1.0, 1.0, 1.0]) + lam).pow(2)
    want[:, 3] = 0.0
    assert torch.allclose(salience(w, h), want, rtol=1e-5)
    assert outlier_mask(w, 0.25, h).nonzero().tolist() == [[0, 0], [1, 0]]
    assert outlier_mask(w, 0.5, h).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 2]]   # 100, 1.6, 900, 6.3


def test_hessian_salience_matches_explicit_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g) * torch.linspace(0.1, 3, 16)
    h = 2 / 200 * x.t() @ x
    w = torch.randn(8, 16, generator=g)
    hd = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(16, dtype=torch.float64)
    want = w.double().pow(2) / torch.linalg.inv(hd).diagonal().pow(2)
    assert torch.allclose(salience(w, h).double(), want, rtol=1e-3)


def test_neutral_fill_is_group_mean_of_the_rest():
    w = torch.tensor([[1.0, 2.0, 9.0, 3.0, -1.0, -3.0, 7.0]])
    mask = torch.tensor([[False, False, True, False, False, False, True]])
    filled = neutral_fill(w, mask, group_size=4)                           # groups [0:4], [4:7] (ragged)
    assert filled.tolist() == [[1.0, 2.0, 2.0, 3.0, -1.0, -3.0, -2.0]]
    assert neutral_fill(w, torch.ones_like(mask), 4).tolist() == [[0.0] * 7]


def test_outliers_lower_output_error_at_3_bits():
    w = heavy_tailed(128, 256, seed=1)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(3, 64)
    y = F.linear(x, w)
    err = lambda fmt: (F.linear(x, fmt.dequantize()) - y).pow(2).mean().item()  # noqa: E731
    plain = err(rtn(w, spec))
    h = 2 / 64 * x.t() @ x
    for hessian in (None, h):
        fmt = with_outliers(w, outlier_mask(w, 0.005, hessian), lambda d: rtn(d, spec), spec.group_size)
        assert err(fmt) < 0.8 * plain, hessian is None


def test_bad_fraction_and_mask():
    w = heavy_tailed(4, 8)
    with pytest.raises(RecipeError):
        outlier_mask(w, 1.5)
    with pytest.raises(ValueError):
        with_outliers(w, torch.zeros(4, 8), lambda d: rtn(d, QuantSpec(3, 8)))


# -- kernel ------------------------------------------------------------------------------
BASES = [QuantSpec(4, 32), QuantSpec(4, 32, symmetric=True), QuantSpec(8, -1), QuantSpec(8, -1, symmetric=True),
         QuantSpec(3, 32), QuantSpec(2, -1)]


@pytest.mark.parametrize("spec", BASES, ids=str)
def test_every_kernel_matches_dequantize(spec, monkeypatch):
    w, _, fmt = outlier_fmt(48, 96, spec, fraction=0.01)
    names = [k.name for k in KERNELS.values() if k.supports(fmt.base)]
    aten_op = {4: "_weight_int4pack_mm_for_cpu", 8: "_weight_int8pack_mm"}.get(spec.bits)
    if aten_op and hasattr(torch.ops.aten, aten_op):
        assert "reference" in names and any(n.startswith("aten_") for n in names)   # aten applies to the base
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(m, 96, generator=g) for m in (1, 8, 64)] + [torch.randn(2, 5, 96, generator=g)]
    dq = fmt.dequantize()
    for name in names:
        monkeypatch.setenv("LOWBIT_KERNEL", name)
        plans: dict = {}
        for x in xs:
            y = kernels.linear(x, fmt, None, plans)
            want = F.linear(x, dq)
            assert y.shape == want.shape
            rel = KERNELS[name].max_rel_error or 1e-3                        # fused_q8: int8 activations
            tol = rel * want.abs().max().item() + 1e-4
            assert (y - want).abs().max().item() <= tol, (name, tuple(x.shape))
        assert name in plans and "_outliers" in plans                      # the forced kernel ran on the base


def test_auto_choice_matches_and_bias_applies(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    _, _, fmt = outlier_fmt(48, 96, QuantSpec(4, 32), fraction=0.01)
    b = torch.randn(48)
    x = torch.randn(8, 96)
    y = kernels.linear(x, fmt, b, {})
    assert torch.allclose(y, F.linear(x, fmt.dequantize(), b), atol=1e-4, rtol=1e-3)


# -- pipeline and checkpoints ------------------------------------------------------------
def test_recipe_outliers_key():
    assert Recipe().outliers == 0.0
    r = Recipe.from_dict({"bits": 3, "outliers": 0.005})
    assert r.outliers == 0.005 and Recipe.from_dict(r.to_dict()) == r
    assert Recipe(outliers=0).outliers == 0.0 and isinstance(Recipe(outliers=0).outliers, float)
    for bad in (-0.01, 0.2, "0.01", True, float("nan")):
        with pytest.raises(RecipeError, match="outliers"):
            Recipe(outliers=bad)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_quantize_save_load_generate_with_outliers(family, tmp_path):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = quantize_model(tiny_model(family), Recipe(bits=3, group_size=32), progress=False)
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_model(model, Recipe(bits=3, group_size=32, outliers=0.01), progress=False)
    with torch.no_grad():
        out = model(ids).logits
    # bits per weight include the outliers: exactly their bytes on top of the same base formats
    extra = 0
    for name, rec in report.layers.items():
        out_f, in_f = rec.format["shape"]
        assert rec.format["kind"] == "outliers" and rec.format["base"] == plain.layers[name].format
        assert rec.format["nnz"] == outlier_count(out_f * in_f, 0.01)
        extra += outlier_bytes(out_f, in_f, rec.format["nnz"])
    assert report.nbytes - plain.nbytes == extra
    assert report.bits_per_weight - plain.bits_per_weight == pytest.approx(8 * extra / report.weights)
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert rel < 0.4
    meta = assert_save_reload_generate(model, report, ids, tmp_path / "ck")
    assert meta["recipe"]["outliers"] == 0.01


def test_gptq_with_outliers_uses_the_hessian(monkeypatch):
    import lowbit.pipeline as pipeline

    seen = []
    real = pipeline.outlier_mask
    monkeypatch.setattr(pipeline, "outlier_mask", lambda w, f, h=None: seen.append(h is not None) or real(w, f, h))
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method="gptq", bits=3, group_size=32, outliers=0.01)
    report = quantize_model(tiny_model("llama"), recipe, ids, progress=False)
    assert seen and all(seen)
    assert all(r.format["kind"] == "outliers" for r in report.layers.values())
