"""The block-by-block walk, adapters and checkpoints on tiny models of every supported family."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch
import transformers as T
from conftest import FAMILIES, VOCAB, assert_save_reload_generate, tiny_model, tiny_tokenizer

from lowbit import checkpoint
from lowbit.calibrate import Hessian
from lowbit.errors import CheckpointError, RecipeError, UnsupportedArchitectureError, WeightValueError
from lowbit.models.adapters import ADAPTERS, get_adapter
from lowbit.modules import QuantExperts, QuantLinear
from lowbit.pipeline import capture_block_inputs, quantize_model
from lowbit.quantizers import METHODS, Method, register, rtn
from lowbit.recipe import Recipe


def _ids(n=2, t=12, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_every_family_has_a_test_model():
    assert set(FAMILIES) == set(ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["w8", "w4g64", "w3g128", "w2g64"])
def test_quantize_save_load_generate(family, preset, tmp_path):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    n_linear = len([1 for _, b in get_adapter(model).blocks(model) for _ in get_adapter(model).linears(b)])
    report = quantize_model(model, Recipe.preset(preset), progress=False)
    assert len(report.layers) == n_linear > 0
    # nothing quantizable is left as an nn.Linear / Conv1D / fused experts inside the blocks
    for _, block in get_adapter(model).blocks(model):
        assert not get_adapter(model).linears(block)
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert rel < {"w8": 1e-3, "w4g64": 0.1, "w3g128": 0.4, "w2g64": 2.0}[preset]
    assert_save_reload_generate(model, report, ids, tmp_path / "ck")


def test_load_keeps_no_fp32_quantized_weight(tmp_path):
    model = tiny_model("llama")
    report = quantize_model(model, Recipe.preset("w4g64"), progress=False)
    loaded = checkpoint.load(checkpoint.save(model, None, tmp_path / "ck", report))
    for name, mod in loaded.named_modules():
        if isinstance(mod, QuantLinear):
            assert all(t.dtype in (torch.uint8, torch.float16) for t in mod.buffers()), name
            assert not hasattr(mod, "weight")
    assert not any(p.is_meta for p in loaded.parameters())


def test_gpt2_conv1d_weight_is_transposed():
    model = tiny_model("gpt2")
    block = model.transformer.h[0]
    conv = block.attn.c_attn                                 # Conv1D stores (in, out)
    ref = get_adapter(model).linears(block)["attn.c_attn"]
    assert torch.equal(ref.weight(), conv.weight.t())
    x = torch.randn(3, conv.weight.shape[0])
    report = quantize_model(model, Recipe.preset("w8"), progress=False)
    assert "transformer.h.0.attn.c_attn" in report.layers
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, QuantLinear) and (q.in_features, q.out_features) == tuple(conv.weight.shape)
    torch.testing.assert_close(q(x), conv(x), rtol=0.02, atol=0.02)


def test_moe_experts_all_quantized():
    model = tiny_model("mixtral")
    report = quantize_model(model, Recipe.preset("w4g64"), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.num_experts == 4
    assert sum(".experts." in n for n in report.layers) == 2 * 2 * 4
    assert not isinstance(model.model.layers[0].mlp.gate, QuantLinear)      # the router stays full precision


def test_targets_and_ignore():
    model = tiny_model("llama")
    recipe = Recipe(bits=4, group_size=32, ignore=("*.mlp.down_proj", "re:model\\.layers\\.1\\..*"))
    report = quantize_model(model, recipe, progress=False)
    assert all(".layers.0." in n and not n.endswith("down_proj") for n in report.layers)
    assert len(report.layers) == 6
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    with pytest.raises(RecipeError, match="selects no layer"):
        quantize_model(tiny_model("llama"), Recipe(targets=("*.nothing",)), progress=False)


def test_nan_weight_is_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(WeightValueError, match="model.layers.1.self_attn.k_proj"):
        quantize_model(model, Recipe.preset("w4g64"), progress=False)


def test_unsupported_architecture_lists_supported():
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    with pytest.raises(UnsupportedArchitectureError, match="llama.*"):
        get_adapter(T.BertModel(cfg))


def test_walk_collects_statistics_from_quantized_previous_blocks():
    """A method that needs the Hessian gets exactly 2/n Σ xᵀx of its layer's inputs, taken after earlier blocks are quantized."""
    seen = {}

    def spy(w, stats, spec, opts):
        seen[len(seen)] = stats["hessian"]
        return rtn(w, spec)

    register(Method("_spy", spy, needs=frozenset({"hessian"})))
    try:
        model = tiny_model("llama")
        windows = _ids(4, 16)
        recipe = Recipe(method="_spy", bits=4, group_size=32, targets=("*.q_proj",),
                        calibration={"dtype": "float32"})           # exact; bf16 is checked below
        quantize_model(model, recipe, windows, progress=False)
        # recompute block 1's q_proj input on the (now fully quantized) model
        adapter = get_adapter(model)
        inputs = capture_block_inputs(model, adapter, windows)
        captured = []
        h = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
        blk0 = model.model.layers[0]
        blk1 = model.model.layers[1]
        with torch.no_grad():
            for inp in inputs:
                y = blk0(inp.hidden, *inp.args, **inp.kwargs)
                blk1(y[0] if isinstance(y, tuple) else y, *inp.args, **inp.kwargs)
        h.remove()
        hess = Hessian(64)
        for x in captured:
            hess.update(x.reshape(-1, 64))
        # block 1's q_proj was quantized after block 0: its statistics came from the quantized block 0
        torch.testing.assert_close(seen[1], hess.result(), rtol=1e-4, atol=1e-5)
        # the default bf16 calibration gives the same statistics to bf16 precision
        seen.clear()
        quantize_model(tiny_model("llama"), dataclasses.replace(recipe, calibration={"dtype": "bfloat16"}),
                       windows, progress=False)
        rel = (seen[1] - hess.result()).norm() / hess.result().norm()
        from lowbit.calibrate import native_bf16

        if native_bf16():
            assert 0 < rel < 3e-2
        else:                                               # no native bf16 on this CPU: the passes ran in fp32
            assert rel == 0
        with pytest.raises(Exception, match="calibration"):
            quantize_model(tiny_model("llama"), recipe, None, progress=False)
    finally:
        METHODS.pop("_spy")


# -- checkpoints -------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    report = quantize_model(model, Recipe.preset("w4g64"), progress=False)
    return checkpoint.save(model, tiny_tokenizer(), tmp_path / "ck", report, source={"spec": "tiny"}), model


def test_existing_output_needs_force(saved):
    path, model = saved
    report = quantize_model(tiny_model("llama"), Recipe.preset("w8"), progress=False)
    with pytest.raises(CheckpointError, match="--force"):
        checkpoint.save(model, None, path, report)
    checkpoint.save(model, None, path, report, force=True)
    assert json.loads((path / "lowbit.json").read_text())["recipe"]["name"] == "w8"
    assert [p.name for p in path.parent.iterdir()] == ["ck"]            # no temporary left behind


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    report = quantize_model(model, Recipe.preset("w4g64"), progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "sha256_file", boom)      # dies after the tensors are written
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, None, tmp_path / "ck", report)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_truncated_checkpoints(saved):
    path, _ = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(path)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)
    (path / "lowbit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        checkpoint.load(path.parent)


def test_shape_mismatch_is_detected(saved):
    path, _ = saved
    meta = json.loads((path / "lowbit.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["format"]["shape"][1] *= 2               # metadata lies about the width
    (path / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_pass_skips_only_the_unread_last_product(family):
    """The statistics pass skips the product of the block's last linear layer (nothing inside the block
    reads it) and still gives every layer exactly the statistics of a full forward."""
    from lowbit.calibrate import collecting
    from lowbit.pipeline import collect_statistics, last_linear, run_block

    model = tiny_model(family)
    adapter = get_adapter(model)
    inputs = capture_block_inputs(model, adapter, _ids(6, 16), batch_size=2)
    block = adapter.blocks(model)[0][1]
    refs = adapter.linears(block)
    needs = frozenset({"hessian", "act_absmean"})
    last = last_linear(block, adapter, inputs[:1], torch.float32)
    expected_last = {"gpt2": "mlp.c_proj", "opt": "fc2", "phi3": "mlp.down_proj"}.get(family, "mlp.down_proj")
    if family in ("mixtral", "qwen3_moe", "olmoe"):
        assert last is None                                              # routed experts run last
    elif family != "qwen2_moe":
        assert last is block.get_submodule(expected_last)
    got = collect_statistics(block, adapter, refs, needs, inputs, torch.float32)
    dense = {rel: ref.module for rel, ref in refs.items() if ref.param is None}
    with collecting(dense, needs) as acc:
        run_block(block, inputs)
    for rel in dense:
        for k in needs:
            assert torch.equal(got[rel][k], acc[rel][k].result()), (rel, k)
    # and the block still computes its real output afterwards
    assert not any("forward" in vars(m) for m in block.modules())


def test_bf16_calibration_runs_only_where_the_cpu_has_it(monkeypatch):
    import lowbit.calibrate as cal

    recipe = Recipe(method="gptq")
    monkeypatch.setattr(cal, "native_bf16", lambda: True)
    assert recipe.calibration_dtype == torch.bfloat16
    assert Recipe(method="gptq", calibration={"dtype": "float32"}).calibration_dtype == torch.float32
    monkeypatch.setattr(cal, "native_bf16", lambda: False)
    assert recipe.calibration_dtype == torch.float32
