"""``head: int8``: the head and token embeddings as 8-bit per-row codes, in every family."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import lowbit
from lowbit import checkpoint
from lowbit.cli import main
from lowbit.errors import RecipeError, UnsupportedArchitectureError
from lowbit.formats import QuantSpec
from lowbit.head import HEAD_SPECS, block_footprint, describe, quantize_head
from lowbit.models.adapters import get_adapter
from lowbit.modules import QuantEmbedding, QuantLinear, footprint
from lowbit.pipeline import quantize_model
from lowbit.quantizers import rtn
from lowbit.recipe import Recipe

# Logits with an int8 head against the same recipe with the fp32 head, on the same tiny model:
# relative mean squared error (measured 0.5e-4 to 1.4e-4 over the families, w8 blocks).
REL_MSE_BOUND = 1e-3


def _ids(n=2, t=12, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel_mse(out, ref) -> float:
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()


def _tied(family) -> bool:
    m = tiny_model(family)
    return m.get_output_embeddings().weight is m.get_input_embeddings().weight


# --- recipe -------------------------------------------------------------------------------------


def test_recipe_head_defaults_to_none_and_leaves_old_dicts_alone():
    assert Recipe().head == "none" and Recipe.preset("w4g128").head == "none"
    assert "head" not in Recipe.preset("w4g128").to_dict()           # fingerprints of existing recipes unchanged
    r = Recipe.from_dict({"bits": 4, "head": "int8"})
    assert r.to_dict()["head"] == "int8" and Recipe.from_dict(r.to_dict()) == r
    assert Recipe(head=None).head == "none"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_head_in_files(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_text('{"bits": 4, "group_size": 64, "head": "int8"}' if suffix == ".json"
                    else "bits: 4\ngroup_size: 64\nhead: int8\n")
    assert Recipe.from_file(path).head == "int8"


@pytest.mark.parametrize("bad", ["int4", "INT8", 8, True, ["int8"], "fp16"])
def test_recipe_head_bad_values(bad):
    with pytest.raises(RecipeError, match=r"head=.* must be one of none, int8"):
        Recipe.from_dict({"head": bad})


# --- QuantEmbedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(8, -1, True), QuantSpec(4, 16, False), QuantSpec(3, 24, True)])
def test_quant_embedding_is_the_dequantized_lookup_exactly(spec):
    w = torch.randn(50, 48, generator=torch.Generator().manual_seed(0))
    fmt = rtn(w, spec)
    ids = torch.tensor([[0, 7, 49, 7], [3, 3, 1, 0]])
    want = fmt.dequantize()[ids]
    own = QuantEmbedding(fmt)
    tied = QuantEmbedding(tied_to=QuantLinear(fmt))
    assert torch.equal(own(ids), want) and torch.equal(tied(ids), want)
    assert own(ids).dtype == torch.float32 and own(ids).shape == (2, 4, 48)
    assert own.nbytes() == fmt.nbytes() and tied.nbytes() == 0
    assert [n for n, _ in tied.named_buffers()] == ["embed_scale"]      # the codes are the head's, not its own


def test_quant_embedding_scale_and_dtype_follow_the_model():
    fmt = rtn(torch.randn(20, 16), QuantSpec(8, -1, True))
    emb = QuantEmbedding(fmt, embed_scale=torch.tensor(4.0))
    ids = torch.tensor([1, 2, 19])
    assert torch.equal(emb(ids), fmt.dequantize()[ids] * 4.0)
    emb.to(torch.bfloat16)
    assert emb(ids).dtype == torch.bfloat16
    assert emb.codes.dtype == torch.uint8 and emb.scale.dtype == torch.float16     # stored dtypes kept
    assert torch.equal(emb(ids), fmt.dequantize()[ids].to(torch.bfloat16) * torch.tensor(4.0, dtype=torch.bfloat16))
    assert "embed_scale" not in emb.state_dict()


# --- every family ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_saves_reloads_generates(family, tmp_path):
    ids = _ids()
    recipe = Recipe.preset("w8")
    fp_head = tiny_model(family)
    quantize_model(fp_head, recipe, progress=False)
    model = tiny_model(family)
    report = quantize_model(model, dataclasses.replace(recipe, head="int8"), progress=False)
    adapter = get_adapter(model)
    head, emb = model.get_submodule(adapter.head), model.get_submodule(adapter.embeddings[0])
    assert isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding)
    assert emb.tied == _tied(family) == report.head.tied
    with torch.no_grad():
        ref, out = fp_head(ids).logits, model(ids).logits
    assert _rel_mse(out, ref) < REL_MSE_BOUND

    path = checkpoint.save(model, tiny_tokenizer(), tmp_path / "ck", report)
    loaded = checkpoint.load(path)
    loaded.tie_weights()                                             # must not undo the swap
    l_head, l_emb = loaded.get_submodule(adapter.head), loaded.get_submodule(adapter.embeddings[0])
    assert isinstance(l_head, QuantLinear) and isinstance(l_emb, QuantEmbedding) and l_emb.tied == emb.tied
    if l_emb.tied:
        assert l_emb.fmt.codes is l_head.codes                       # one copy in memory too
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)                  # bit-exact round trip
    gen = loaded.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)

    meta = json.loads((path / "lowbit.json").read_text())
    stored = load_file(path / "model.safetensors")
    emb_name = adapter.embeddings[0]
    assert f"{adapter.head}.codes" in stored and f"{adapter.head}.weight" not in stored
    assert f"{emb_name}.weight" not in stored
    assert (f"{emb_name}.codes" in stored) == (not emb.tied)
    assert stored[f"{adapter.head}.codes"].dtype == torch.uint8 and stored[f"{adapter.head}.scale"].shape == (VOCAB, 1)
    s = meta["summary"]
    assert meta["head"] == report.head.to_dict() and meta["head"]["mode"] == "int8"
    assert s["head_bytes"] == report.head.nbytes and s["head_bits"] == pytest.approx(report.head.bits_per_weight)
    # the blocks' figures are unchanged by the head; the head counts in the whole-model bytes
    assert s["quantized_bytes"] == report.nbytes == block_footprint(loaded).quantized_bytes
    assert s["bits_per_weight"] == pytest.approx(block_footprint(loaded).bits_per_weight)
    fp32_vocab = 4 * VOCAB * model.config.hidden_size * (1 if emb.tied else 2)
    fp_emb = fp_head.get_submodule(adapter.embeddings[0])
    new_scalar = 0 if hasattr(fp_emb, "embed_scale") else emb.embed_scale.element_size()   # 1 (fp32) unless Gemma's
    assert footprint(loaded).total_bytes == footprint(model).total_bytes \
        == footprint(fp_head).total_bytes - fp32_vocab + report.head.nbytes + new_scalar


def test_head_bits_and_bytes_are_exact():
    model = tiny_model("qwen2")                                       # untied: head and embeddings both stored
    report = quantize_model(model, Recipe(bits=4, group_size=32, head="int8"), progress=False)
    h = model.config.hidden_size
    one = VOCAB * h + 2 * VOCAB                                       # codes + one fp16 scale per row
    assert report.head.nbytes == 2 * one and report.head.weights == 2 * VOCAB * h
    assert report.head.bits_per_weight == pytest.approx(8 + 16 / h)
    assert report.bits_per_weight == pytest.approx(4 + 2 * 16 / 32)   # blocks only, as without the head
    assert block_footprint(model).bits_per_weight == pytest.approx(report.bits_per_weight)


def test_tied_head_is_stored_once(tmp_path):
    """SmolLM2-like tied pair: the checkpoint shrinks by the fp32 head minus one int8 copy (~3/4 of the head)."""
    sizes = {}
    for head in ("none", "int8"):
        model = tiny_model("llama")
        report = quantize_model(model, Recipe(bits=4, group_size=32, head=head), progress=False)
        path = checkpoint.save(model, None, tmp_path / head, report)
        sizes[head] = json.loads((path / "lowbit.json").read_text())["summary"]["total_tensor_bytes"]
    h = tiny_model("llama").config.hidden_size
    fp32_head = 4 * VOCAB * h
    assert sizes["none"] - sizes["int8"] == fp32_head - (VOCAB * h + 2 * VOCAB)
    assert sizes["none"] - sizes["int8"] > 0.7 * fp32_head


def test_offloaded_run_keeps_the_head_in_memory(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    recipe = Recipe(bits=4, group_size=32, head="int8")
    mem = lowbit.quantize(str(src), recipe, progress=False).save(tmp_path / "mem")
    q = lowbit.quantize(str(src), recipe, progress=False, offload_dir=tmp_path / "off")
    assert q.report.head is not None and q.report.head.tied
    off = q.save(tmp_path / "offout")
    assert (off / "blocks").is_dir()
    rest = {k: v for k, v in load_file(mem / "model.safetensors").items() if not k.startswith("model.layers.")}
    off_rest = load_file(off / "model.safetensors")                 # blocks are in blocks/, the head is here
    assert rest.keys() == off_rest.keys() and "lm_head.codes" in rest
    assert all(torch.equal(v, off_rest[k]) for k, v in rest.items())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lowbit.load(mem)(ids).logits, lowbit.load(off)(ids).logits)


def test_bf16_model_runs_with_the_int8_head():
    model = tiny_model("gemma3_text")
    quantize_model(model, Recipe(bits=4, group_size=32, head="int8"), progress=False)
    model.to(torch.bfloat16)
    emb = model.get_input_embeddings()
    assert emb(torch.tensor([[4, 5]])).dtype == torch.bfloat16
    assert describe(model).dtype == "bfloat16"
    with torch.no_grad():
        assert model(_ids()).logits.isfinite().all()


def test_head_none_leaves_the_model_alone():
    model = tiny_model("llama")
    report = quantize_model(model, Recipe(bits=4, group_size=32), progress=False)
    assert report.head is None and describe(model) is None and quantize_head(model, "none") is None
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert set(HEAD_SPECS) == {"none", "int8"}


def test_quantizing_the_head_twice_is_an_error():
    model = tiny_model("llama")
    quantize_head(model, "int8")
    with pytest.raises(UnsupportedArchitectureError, match="already quantized"):
        quantize_head(model, "int8")


def test_eval_reports_block_bits_and_head_bits(tiny_model_dir, corpus_file, tmp_path):
    from lowbit.evaluate.run import evaluate_specs

    src = tiny_model_dir("mistral")                                  # untied: head and embeddings both stored
    q = lowbit.quantize(str(src), Recipe(bits=4, group_size=32, head="int8"), progress=False)
    path = q.save(tmp_path / "ck")
    res = evaluate_specs([str(path)], reference=str(src), corpus=str(corpus_file), seqlen=16, windows=2,
                         speed=False, memory=False, progress=False).results[1]
    assert res.bits_per_weight == pytest.approx(q.report.bits_per_weight)         # blocks only
    assert res.quantized_bytes == q.report.nbytes
    assert res.extra["head_bits"] == pytest.approx(q.report.head.bits_per_weight)
    assert res.extra["head_bytes"] == q.report.head.nbytes


# --- command line ---------------------------------------------------------------------------------


def test_cli_head_option(capsys, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "ck"
    assert main(["quantize", str(src), "-r", "w4g64", "--head", "int8", "-o", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "head int8 8.250 bits/weight" in stdout and "(tied)" in stdout
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "head            int8: lm_head (tied embeddings read its codes)" in info
    assert json.loads((out / "lowbit.json").read_text())["recipe"]["head"] == "int8"
    assert main(["quantize", str(src), "-r", "w4g64", "--head", "int4", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "lowbit: error: head='int4' must be one of none, int8" in err and "Traceback" not in err


# --- the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int8_head_perplexity_within_one_percent_of_w8():
    """w8 + head: int8 against w8 on two wiki windows of 512 tokens; the 113 MB fp32 head becomes 28.4 MB."""
    from lowbit.data import eval_windows, load_text
    from lowbit.evaluate import evaluate_quality

    w8 = lowbit.quantize("smollm2-135m", "w8", progress=False)
    w8h = lowbit.quantize("smollm2-135m", dataclasses.replace(Recipe.preset("w8"), head="int8"), progress=False)
    assert w8h.report.head.tied and w8h.report.head.nbytes == 49152 * 576 + 2 * 49152
    text, _ = load_text("wiki")
    ids = eval_windows(w8.tokenizer, text, 512, 2)
    res = evaluate_quality({"w8": w8.model, "w8h": w8h.model}, ids, progress=False)
    ratio = res["w8h"].perplexity / res["w8"].perplexity
    assert abs(ratio - 1) < 0.01, (res["w8"].perplexity, res["w8h"].perplexity)
