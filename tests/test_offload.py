"""Offloaded, lazy and resumed runs give the same checkpoint as an in-memory run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.recipe import Recipe


def stored(path):
    meta = json.loads((path / "lowbit.json").read_text())
    state = {}
    for f in meta["files"]:
        state.update(load_file(path / f))
    return state, meta


def assert_same_checkpoint(a, b):
    sa, ma = stored(a)
    sb, mb = stored(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["layers"] == mb["layers"] and ma["summary"] == mb["summary"]


RECIPES = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    # block-level stages, and the full-precision activations kept on disk for learned rounding (best-* shape)
    "awq-gptq-learned": dict(method="gptq", scaling="awq", int_zero=True, learned={"iters": 6, "batch": 2}),
    # learned equivalent scales folded into producers, and the KL term on the last block (norm + head in memory)
    "learned-scaling-kl": dict(method="rtn", int_zero=True,
                               learned={"iters": 6, "batch": 2, "scaling": True, "kl": 1.0, "kl_tokens": 16}),
}


@pytest.fixture(params=sorted(RECIPES))
def recipe(request, corpus_file):
    return Recipe(**RECIPES[request.param], bits=3, group_size=32,
                  calibration={"corpus": str(corpus_file), "windows": 4, "seqlen": 32})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_offloaded_equals_in_memory(tiny_model_dir, recipe, tmp_path, family):
    src = tiny_model_dir(family)
    mem = lowbit.quantize(str(src), recipe, progress=False).save(tmp_path / "mem")
    q = lowbit.quantize(str(src), recipe, progress=False, offload_dir=tmp_path / "off")
    assert all(p.is_meta for b in q.model.get_submodule(
        "transformer.h" if family == "gpt2" else "model.layers") for p in b.parameters())  # lazily read, then dropped
    off = q.save(tmp_path / "offout")
    assert (off / "blocks").is_dir() and not (tmp_path / "off").exists()
    assert_same_checkpoint(mem, off)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(lowbit.load(mem)(ids).logits, lowbit.load(off)(ids).logits)


def test_resume_after_interruption_is_bit_identical(tiny_model_dir, recipe, tmp_path, monkeypatch):
    src = str(tiny_model_dir("llama"))
    whole = lowbit.quantize(src, recipe, progress=False, offload_dir=tmp_path / "a").save(tmp_path / "whole")

    from lowbit import pipeline

    real = pipeline.quantize_block
    calls = []

    def dies_on_second_block(name, *a, **k):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(pipeline, "quantize_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(src, recipe, progress=False, offload_dir=tmp_path / "b")
    prog = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert len(prog["blocks"]) == 1
    monkeypatch.setattr(pipeline, "quantize_block", real)
    calls.clear()
    resumed = lowbit.quantize(src, recipe, progress=False, offload_dir=tmp_path / "b")
    assert len(resumed.report.layers) == 14                        # restored block 0 + quantized block 1
    assert resumed.report.earlier_seconds == prog["blocks"][0]["seconds"] > 0    # block 0's time, counted once
    assert resumed.report.total_seconds > resumed.report.seconds
    out = resumed.save(tmp_path / "resumed")
    assert_same_checkpoint(whole, out)


def test_offload_dir_of_another_run_is_refused(tiny_model_dir, corpus_file, tmp_path):
    src = str(tiny_model_dir("llama"))
    lowbit.quantize(src, Recipe(bits=4, group_size=32), progress=False, offload_dir=tmp_path / "off")
    with pytest.raises(LowbitError, match="another recipe"):
        lowbit.quantize(src, Recipe(bits=3, group_size=32), progress=False, offload_dir=tmp_path / "off")


def test_kl_over_several_blocks_needs_them_in_memory(tiny_model_dir, corpus_file, tmp_path):
    recipe = Recipe(method="rtn", bits=3, group_size=32, learned={"iters": 2, "kl": 1.0, "kl_blocks": 2},
                    calibration={"corpus": str(corpus_file), "windows": 4, "seqlen": 32})
    with pytest.raises(LowbitError, match="kl_blocks"):
        lowbit.quantize(str(tiny_model_dir("llama")), recipe, progress=False, offload_dir=tmp_path / "off")
    assert not (tmp_path / "off" / "progress.json").exists()
