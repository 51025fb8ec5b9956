"""Activation-aware scaling, output-error clipping, MoE expert statistics, and every calibrated method on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, assert_save_reload_generate, tiny_model

from lowbit.calibrate import collecting_experts
from lowbit.formats import QuantSpec
from lowbit.models.adapters import get_adapter
from lowbit.models.scaling import ScaleGroup, fold, scale_groups
from lowbit.pipeline import capture_block_inputs, quantize_model, run_block
from lowbit.quantizers import gptq, rtn, rtn_clip
from lowbit.quantizers.awq import awq_search, output_error, scaled_stats
from lowbit.recipe import Recipe


def _ids(n=4, t=16, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _outlier_inputs(n=2048, width=128, seed=0):
    """Rows with correlated channels and a few channels ~20x larger, as in real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) @ (torch.eye(width) + 0.3 * torch.randn(width, width, generator=g))
    x[:, :4] *= 20
    return x


def _hessian(x):
    return 2 * x.t() @ x / x.shape[0]


# -- folding -------------------------------------------------------------------------------
EXPECTED_GROUPS = {"opt": 4, "gpt2": 2, "phi3": 3, "mixtral": 1, "qwen2_moe": 1, "qwen3_moe": 1, "olmoe": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_keeps_the_model_function(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0][1]
    groups = scale_groups(family, block)
    # llama-like test models use grouped-query attention: v_proj -> o_proj cannot fold there
    assert len(groups) == EXPECTED_GROUPS.get(family, 3)
    g = torch.Generator().manual_seed(0)
    for group in groups:
        width = block.get_submodule(group.linears[0]).weight.shape[0 if family == "gpt2" else 1]
        s = 0.5 + 1.5 * torch.rand(width, generator=g)
        assert fold(block, group, s)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fold_checks_and_undoes_a_fold_that_changes_the_block():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0][1]
    inp = capture_block_inputs(model, adapter, _ids())[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    # silu(gate) is not homogeneous: scaling gate_proj's rows does not commute with it
    wrong = ScaleGroup("mlp.gate_proj", ("mlp.down_proj",))
    s = torch.full((block.mlp.down_proj.weight.shape[1],), 3.0)
    assert not fold(block, wrong, s, check=lambda: run_block(block, [inp])[0].hidden)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gemma_gain_offset_is_folded_correctly():
    """Gemma's norms multiply by (1 + w): the fold must rewrite w as (1 + w)/s - 1, not w/s."""
    model = tiny_model("gemma")
    block = get_adapter(model).blocks(model)[0][1]
    norm = block.input_layernorm
    w0 = norm.weight.detach().clone()
    s = torch.full_like(w0, 2.0)
    assert fold(block, scale_groups("gemma", block)[0], s)
    torch.testing.assert_close(norm.weight.detach(), (1 + w0) / 2 - 1)


# -- the search ----------------------------------------------------------------------------
def test_awq_search_protects_large_activation_channels():
    x = _outlier_inputs()
    h = _hessian(x)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(3, 32, False)
    found = awq_search(w, h, x.abs().mean(0), spec, grid=20)
    assert found.alpha > 0
    assert found.error_after < 0.9 * found.error_before
    # the reported error is the real output error of rounding W·s, undoing s
    s = found.scale
    q = rtn(w * s, spec).dequantize() / s
    assert output_error(w, q, h) == pytest.approx(found.error_after, rel=1e-4)
    # and equals the mean squared output error over the rows (H = 2/n Σ xᵀx)
    y_err = ((x @ (q - w).t()) ** 2).sum() * 2 / x.shape[0]
    assert float(y_err) == pytest.approx(found.error_after, rel=1e-3)


def test_awq_search_on_a_row_sample_picks_a_similar_alpha():
    """Wide layers are searched on evenly spaced output rows; the choice stays close to the full search."""
    x = _outlier_inputs()
    h = _hessian(x)
    w = torch.randn(600, 128, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(3, 32, False)
    full = awq_search(w, h, x.abs().mean(0), spec, grid=10, max_rows=10_000)
    sampled = awq_search(w, h, x.abs().mean(0), spec, grid=10, max_rows=64)
    assert abs(full.alpha - sampled.alpha) <= 0.2 and sampled.alpha > 0


def test_scaled_stats_are_the_stats_of_scaled_inputs():
    x = _outlier_inputs(n=256, width=32)
    s = 0.5 + torch.rand(32)
    out = scaled_stats({"hessian": _hessian(x), "act_absmean": x.abs().mean(0)}, s)
    torch.testing.assert_close(out["hessian"], _hessian(x / s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["act_absmean"], (x / s).abs().mean(0))


# -- clipping by output error --------------------------------------------------------------
def test_output_clip_lowers_output_error():
    x = _outlier_inputs()
    h = _hessian(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(3, 64, False)
    err = {obj: output_error(w, rtn_clip(w, spec, objective=obj, hessian=h).dequantize(), h)
           for obj in ("none", "weight", "output")}
    assert err["output"] < err["weight"] and err["output"] < err["none"]
    with pytest.raises(ValueError, match="Hessian"):
        rtn_clip(w, spec, objective="output")


def test_gptq_with_output_clip_is_valid_and_no_worse_than_plain_on_this_layer():
    x = _outlier_inputs()
    h = _hessian(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(3, 32, False)
    plain = gptq(w, h, spec)
    clipped = gptq(w, h, spec, clip="output")
    assert clipped.unpacked().max() <= spec.maxq
    assert output_error(w, clipped.dequantize(), h) <= 1.02 * output_error(w, plain.dequantize(), h)
    assert not torch.equal(clipped.scale, plain.scale)


# -- MoE experts ---------------------------------------------------------------------------
def test_expert_statistics_are_the_routed_rows():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0][1]
    inputs = capture_block_inputs(model, adapter, _ids())
    experts = block.get_submodule(adapter.experts)
    seen = []
    handle = experts.register_forward_hook(lambda m, a, k, o: seen.append((a, k)), with_kwargs=True)
    with collecting_experts(experts, "mlp.experts", frozenset({"hessian"})) as acc:
        run_block(block, inputs)
    handle.remove()
    total = torch.zeros(64, 64)                                  # hidden size 64
    n = 0
    for (a, _k) in seen:
        hs, idx = a[0].reshape(-1, a[0].shape[-1]), a[1]
        r = hs[torch.where(idx == 1)[0]]
        total += r.t() @ r
        n += r.shape[0]
    assert n > 0
    torch.testing.assert_close(acc["mlp.experts.gate_up_proj.1"]["hessian"].result(), 2 * total / n,
                               rtol=1e-4, atol=1e-5)
    assert acc["mlp.experts.down_proj.1"]["hessian"].result().shape == (96, 96)   # intermediate size 96


# -- every calibrated method on every family ----------------------------------------------
RECIPES = {
    "gptq": dict(method="gptq", bits=4, group_size=32),
    "awq-rtn": dict(method="rtn", bits=4, group_size=32, scaling="awq"),
    "awq-gptq-clip-outliers": dict(method="gptq", bits=3, group_size=32, scaling="awq", options={"clip": "output"},
                                   outliers=0.01),
    "rtn-clip-output": dict(method="rtn_clip", bits=3, group_size=-1, options={"objective": "output"}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_calibrated_methods_on_every_family(family, name, tmp_path):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize_model(model, Recipe.from_dict(RECIPES[name], name=name), _ids(8, 32, seed=2), progress=False)
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert rel < 0.5
    assert_save_reload_generate(model, report, ids, tmp_path / "ck")
