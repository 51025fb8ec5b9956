"""Block-wise learned rounding and ranges (AutoRound-style signed gradient descent)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, VOCAB, assert_save_reload_generate, tiny_model

from lowbit.errors import RecipeError
from lowbit.kernels import _ext
from lowbit.formats import QuantSpec, expand_groups
from lowbit.models.adapters import get_adapter
from lowbit.pipeline import (
    capture_block_inputs,
    quantize_block,
    quantize_model,
    run_block,
)
from lowbit.quantizers import get_method, gptq, rtn
from lowbit.quantizers.learned import LearnedSpec, LearnedWeight
from lowbit.quantizers.outliers import with_outliers
from lowbit.recipe import PRESETS, Recipe


def _ids(n=8, t=32, seed=2):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _block_error(method: str, learned: dict | None, seed: int = 0, int_zero: bool = False,
                 family: str = "llama") -> float:
    """MSE of block 1's output (quantized) against the full-precision block on the same inputs."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    inputs = capture_block_inputs(model, adapter, _ids(), batch_size=4)
    block0 = adapter.blocks(model)[0][1]
    inputs = run_block(block0, inputs)                      # correlated inputs: a real block's outputs
    name, block = adapter.blocks(model)[1]
    targets = run_block(block, inputs)
    recipe = Recipe(method=method, bits=2, group_size=32, int_zero=int_zero, learned=learned,
                    calibration={"dtype": "float32"})
    quantize_block(name, block, adapter, get_method(method), recipe, inputs, targets, seed=seed)
    out = run_block(block, inputs)
    return sum(float((o.hidden - t.hidden).pow(2).mean()) for o, t in zip(out, targets))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_learned_lowers_block_error_from_the_same_start(method):
    start = _block_error(method, None)
    learned = _block_error(method, {"iters": 60, "batch": 2})
    assert learned < 0.8 * start


def test_learned_weight_stays_in_range_and_reproduces_its_start():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g)
    x = torch.randn(512, 80, generator=g) @ torch.randn(80, 80, generator=g)
    h = 2 * x.t() @ x / 512
    spec = QuantSpec(3, 32, False)
    init = gptq(w, h, spec)
    lw = LearnedWeight(w, init, spec, LearnedSpec(iters=10))
    # the start reproduces GPTQ's codes, with v 0 wherever they are round-to-nearest's
    assert torch.equal(lw.to_format().unpacked(), init.unpacked())
    x0 = w / expand_groups(init.scale.float(), spec, 80) + expand_groups(init.zero_points().float(), spec, 80)
    rtn_like = init.unpacked().float() == torch.round(x0).clamp(0, spec.maxq)
    assert (lw.v.detach()[rtn_like] == 0).all() and (lw.v.detach()[~rtn_like] != 0).all()
    start = LearnedWeight(w, rtn(w, spec), spec, LearnedSpec(iters=10))   # RTN: offsets at 0 (but where the
    assert (start.v.detach() == 0).float().mean() > 0.99 and start.v_lo is None  # fp16 scale moved a code)
    opt_params = [p for p in lw.parameters() if p.requires_grad]
    for _ in range(20):
        loss = (lw() @ x.t()).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for p in opt_params:
                p.sub_(0.3 * p.grad.sign())
                p.grad = None
        lw.project()
    if lw.v_lo is None:
        assert lw.v.abs().max() <= 0.5
    else:                                            # widened only where GPTQ's code needs it
        assert (lw.v >= lw.v_lo).all() and (lw.v <= lw.v_hi).all() and (lw.v_hi - lw.v_lo).max() <= 2
    assert (lw.gamma - 1).abs().max() <= 0.5 and lw.delta.abs().max() <= 1.0
    fmt = lw.to_format()
    assert fmt.unpacked().max() <= spec.maxq
    torch.testing.assert_close(fmt.dequantize(), lw().detach(), rtol=0, atol=2e-2 * w.abs().max().item())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("group, sym", [(128, False), (32, True), (-1, False)])
def test_learned_weight_matches_the_plain_formula_on_ragged_groups(group, sym, fused):
    """The fake-quantized weight (the C++ pass of ``fake_quant`` where the extension is built, else built from
    broadcast views) equals the module docstring's formula with each group's scale and zero gathered per column
    (indexing by group), in value and in every parameter's gradient; the group ranges equal a per-group min/max
    with zero included. 200 columns: a ragged last group at 128 and 32."""
    if fused and not _ext.available():
        pytest.skip("the fused extension is unavailable")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 200, generator=g)
    spec = QuantSpec(3, group, sym, not sym)
    lw = LearnedWeight(w, rtn(w, spec), spec, LearnedSpec())
    lw.fused = fused
    with torch.no_grad():
        lw.v.uniform_(-0.5, 0.5, generator=g)
        lw.gamma.uniform_(0.8, 1.2, generator=g)
        lw.delta.uniform_(-0.5, 0.5, generator=g) if not sym else None
        lw.w[0, :50] *= 4                                   # codes clamped at both ends
    upstream = torch.randn(12, 200, generator=g)

    def grads(fn):
        for p in lw.parameters():
            p.grad = None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), [None if p.grad is None else p.grad.clone() for p in lw.parameters()]

    def plain():
        s, z = lw._params()
        s = s + (s.half().float() - s).detach()
        z = z + (z.half().float() - z).detach()
        gidx = torch.arange(200) // spec.group_width(200)
        s, z = s[:, gidx], z[:, gidx]
        q = torch.clamp(torch.round(w / s + z + lw.v) - (w / s + z + lw.v).detach() + (w / s + z + lw.v), 0, spec.maxq)
        return (q - z) * s

    got, got_g = grads(lw)
    want, want_g = grads(plain)
    assert torch.equal(got, want)
    for a, b in zip(got_g, want_g):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lo, hi = lw._ranges(w)
    width = spec.group_width(200)
    for j in range(lo.shape[1]):
        cols = w[:, j * width:(j + 1) * width]
        assert torch.equal(lo[:, j], cols.amin(1).clamp(max=0)) and torch.equal(hi[:, j], cols.amax(1).clamp(min=0))


def test_learned_keeps_outliers_exact():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(2, 32, False)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[3, 5] = mask[7, 60] = True
    w[3, 5], w[7, 60] = 9.0, -7.0
    init = with_outliers(w, mask, lambda dense: rtn(dense, spec), 32)
    fmt = LearnedWeight(w, init, spec, LearnedSpec()).to_format()
    dq = fmt.dequantize()
    assert dq[3, 5] == 9.0 and dq[7, 60] == -7.0
    assert fmt.nbytes() == init.nbytes()


def _count_compiled_steps(monkeypatch) -> list[int]:
    """Every block learns through the compiled block (size threshold 0); returns a list that counts the steps
    the compiled block computed."""
    from lowbit import decoding, pipeline

    monkeypatch.setenv("LOWBIT_COMPILE", "1")                     # conftest turns it off for the suite
    if not decoding.compile_enabled():
        pytest.skip("torch.compile needs a C++ toolchain (or LOWBIT_COMPILE=0 is set)")
    monkeypatch.setattr(pipeline, "_COMPILE_MIN_WEIGHTS", 0)
    calls = []
    real = pipeline._compiled_step

    def counted(*args, **kwargs):
        y = real(*args, **kwargs)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(pipeline, "_compiled_step", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])                 # gpt2: Conv1D weights are (in, out)
def test_compiled_learning_steps_learn_like_eager_ones(family, monkeypatch):
    start = _block_error("rtn", None, family=family)
    eager = _block_error("rtn", {"iters": 30, "batch": 2}, family=family)
    calls = _count_compiled_steps(monkeypatch)
    compiled = _block_error("rtn", {"iters": 30, "batch": 2}, family=family)
    assert len(calls) == 30 and all(calls)                           # every step through the compiled block
    assert compiled < 0.8 * start and eager < 0.8 * start
    assert abs(compiled - eager) < 0.1 * start                       # float differences only, not another method


def test_compile_failure_falls_back_to_eager_bit_identically(monkeypatch):
    from lowbit import pipeline

    def run():
        model = tiny_model("llama")
        quantize_model(model, Recipe(method="rtn", bits=2, group_size=32, learned={"iters": 6, "batch": 2}),
                       _ids(), progress=False)
        return model.state_dict()

    eager = run()
    calls = _count_compiled_steps(monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(pipeline, "_block_call_compiled", None)
    monkeypatch.setattr(torch, "compile", broken)
    fallen = run()
    assert calls and not any(calls)                                  # tried, failed, learned eagerly
    assert all(torch.equal(eager[k], fallen[k]) for k in eager)


def test_same_seed_is_bit_identical_and_the_seed_matters():
    def run(seed):
        model = tiny_model("llama")
        quantize_model(model, Recipe(method="rtn", bits=2, group_size=32, learned={"iters": 8, "batch": 2,
                                                                                      "seed": seed}),
                       _ids(), progress=False)
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_learned_spec_is_validated():
    with pytest.raises(RecipeError, match="iters"):
        Recipe(method="rtn", learned={"iters": 0})
    with pytest.raises(RecipeError, match="unknown learned key"):
        Recipe(method="rtn", learned={"itres": 5})
    with pytest.raises(RecipeError, match="target"):
        Recipe(method="rtn", learned={"target": "x"})
    r = Recipe.from_dict(Recipe(method="rtn", learned={"iters": 7}).to_dict())
    assert r.learned == LearnedSpec(iters=7) and r.needs_calibration


LEARNED_PRESETS = sorted(n for n in PRESETS if PRESETS[n].get("learned"))


def test_learned_presets_exist():
    assert {"ar-w4g128", "ar-w3g128", "ar-w2g64", "ar-w4g128-fast", "ar-w3g128-fast", "ar-w2g64-fast"} <= set(
        LEARNED_PRESETS)
    assert Recipe.preset("ar-w3g128").learned.iters == 200 and Recipe.preset("ar-w3g128-fast").learned.iters == 50


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", LEARNED_PRESETS)
def test_learned_presets_on_every_family(family, preset, tmp_path):
    spec = copy.deepcopy(PRESETS[preset])
    spec["learned"] = {**spec["learned"], "iters": 3, "batch": 2}         # the walk, not the optimisation
    model = tiny_model(family)
    ids = _ids(4, 16, seed=3)
    report = quantize_model(model, Recipe.from_dict(spec, name=preset), _ids(4, 32), progress=False)
    assert_save_reload_generate(model, report, ids, tmp_path / "ck")


# -- learned equivalent scaling and the KL term ------------------------------------------------
def test_learned_scaling_lowers_block_error():
    plain = sum(_block_error("rtn", {"iters": 60, "batch": 2, "seed": s}, int_zero=True) for s in (0, 1))
    scaled = sum(_block_error("rtn", {"iters": 60, "batch": 2, "seed": s, "scaling": True}, int_zero=True)
                 for s in (0, 1))
    assert scaled < 0.97 * plain


def test_scaling_and_kl_spec_are_validated_and_kept_out_of_old_fingerprints():
    with pytest.raises(RecipeError, match="scaling"):
        Recipe(method="rtn", learned={"scaling": "yes"})
    with pytest.raises(RecipeError, match="kl"):
        Recipe(method="rtn", learned={"kl": -1})
    with pytest.raises(RecipeError, match="target"):
        Recipe(method="rtn", learned={"kl": 1.0, "target": "block"})
    with pytest.raises(RecipeError, match="kl_tokens"):
        Recipe(method="rtn", learned={"kl": 1.0, "kl_tokens": 0})
    assert Recipe(method="rtn", learned={"iters": 7}).to_dict()["learned"] == {
        "iters": 7, "lr": 0.0, "batch": 8, "scale_range": 0.5, "zero_range": 1.0, "target": "fp", "seed": 0}
    r = Recipe(method="rtn", learned={"scaling": True, "kl": 0.5, "kl_blocks": 2})
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("family", FAMILIES)
def test_learned_scaling_is_folded_exactly_on_every_family(family, monkeypatch, tmp_path):
    """Every foldable scale group learns a scale, and the stored block (codes, fp16 scales, 1/c folded into
    the producer) computes what the learned block computed."""
    import lowbit.pipeline as pl

    seen = []
    verify = pl._Folded.verify
    monkeypatch.setattr(pl._Folded, "verify", lambda self, *a: seen.append((self.groups, verify(self, *a))))
    model = tiny_model(family)
    recipe = Recipe(method="rtn", bits=3, group_size=32, int_zero=True, calibration={"dtype": "float32"},
                    learned={"iters": 6, "batch": 2, "scaling": True, "lr": 0.05})
    report = quantize_model(model, recipe, _ids(4, 32), progress=False)
    assert len(seen) == 2 and all(groups >= 1 for groups, _ in seen)
    assert all(rel < 1e-3 for _, rel in seen), seen
    assert_save_reload_generate(model, report, _ids(2, 12, seed=4), tmp_path / "ck")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_logits_are_the_models(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    got = {}
    hook = model.get_submodule(adapter.final_norm).register_forward_pre_hook(
        lambda _m, args: got.setdefault("h", args[0]))
    with torch.no_grad():
        ref = model(input_ids=_ids(2, 12)).logits
        hook.remove()
        torch.testing.assert_close(adapter.logits(model, got["h"]), ref, rtol=0, atol=0)


def _final_kl(model, ref_logp, ids) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits, -1)
    return float(torch.nn.functional.kl_div(logp.flatten(0, 1), ref_logp.flatten(0, 1), log_target=True,
                                            reduction="batchmean"))


def test_kl_term_lowers_the_final_kl():
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = torch.log_softmax(tiny_model("llama")(input_ids=ids).logits, -1)
    kls = []
    for extra in ({}, {"kl": 1.0, "kl_blocks": 2, "kl_tokens": 64}):
        model = tiny_model("llama")
        quantize_model(model, Recipe(method="rtn", bits=2, group_size=32, int_zero=True,
                                     calibration={"dtype": "float32"},
                                     learned={"iters": 40, "batch": 2, **extra}), ids, progress=False)
        kls.append(_final_kl(model, ref, ids))
    assert kls[1] < 0.95 * kls[0], kls


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_term_on_every_family(family, tmp_path):
    model = tiny_model(family)
    recipe = Recipe(method="rtn", bits=3, group_size=32, int_zero=True,
                    learned={"iters": 3, "batch": 2, "kl": 1.0, "kl_blocks": 2, "kl_tokens": 16, "scaling": True})
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    report = quantize_model(model, recipe, _ids(4, 32), progress=False)
    kept = {n: p.requires_grad for n, p in model.named_parameters()
            if n in before and n.rpartition(".")[0] not in report.layers}    # not a quantized layer's bias
    assert kept and kept == {n: before[n] for n in kept}                      # the model is unfrozen again
    assert_save_reload_generate(model, report, _ids(2, 12, seed=4), tmp_path / "ck")


def test_bf16_calibration_path_runs_where_the_cpu_lacks_it_too(monkeypatch, tmp_path):
    """The bf16 autocast passes (learned rounding with its KL term and scaling), forced on whatever CPU runs the
    tests: a CPU without native bf16 would otherwise never take them."""
    import lowbit.calibrate as cal

    monkeypatch.setattr(cal, "native_bf16", lambda: True)
    model = tiny_model("llama")
    recipe = Recipe(method="gptq", bits=3, group_size=32, int_zero=True,
                    learned={"iters": 3, "batch": 2, "kl": 1.0, "kl_tokens": 16, "scaling": True})
    assert recipe.calibration_dtype == torch.bfloat16
    report = quantize_model(model, recipe, _ids(4, 32), progress=False)
    assert_save_reload_generate(model, report, _ids(2, 12, seed=4), tmp_path / "ck")
