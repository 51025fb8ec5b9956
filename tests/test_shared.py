"""Layers reading one input run as one kernel call (lowbit.modules.shared): same outputs, same checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, VOCAB, tiny_model, tiny_tokenizer

import lowbit
from lowbit import checkpoint
from lowbit.decoding import share_block_inputs
from lowbit.modules import QuantLinear
from lowbit.modules.shared import SharedInput, can_share
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe


def _quantized(family="llama", preset="w4g64"):
    model = tiny_model(family)
    report = quantize_model(model, Recipe.resolve(preset), progress=False)
    return model, report


def _ids(n=2, t=11, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fused_kernel(monkeypatch):
    """One kernel for every shape, so that stacked and separate calls do the same arithmetic."""
    from lowbit.kernels import _ext
    monkeypatch.setenv("LOWBIT_KERNEL", "fused" if _ext.available() else "reference")


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_model_computes_the_same_logits(family, fused_kernel):
    model, _ = _quantized(family)
    ref = copy.deepcopy(model)
    ids = _ids()
    formed = share_block_inputs(model)
    qmods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert formed == len({id(m._shared) for m in qmods if m._shared is not None})
    if family in ("llama", "qwen2", "mistral"):
        assert formed == 2 * model.config.num_hidden_layers                  # q/k/v and gate/up in every block
    with torch.inference_mode():
        want, got = ref(ids).logits, model(ids).logits
        assert torch.equal(got, want)
        assert torch.equal(model(ids[:, :1]).logits, ref(ids[:, :1]).logits)  # one row: the decode shape
        out = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))


def test_members_called_out_of_pattern_stay_exact(fused_kernel):
    model, _ = _quantized()
    attn = model.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    x1, x2 = torch.randn(1, 3, mods[0].in_features), torch.randn(1, 3, mods[0].in_features)
    with torch.inference_mode():
        want = {(i, k): m(x) for i, m in enumerate(mods) for k, x in (("1", x1), ("2", x2))}
        SharedInput(mods)
        assert all(m._shared is not None for m in mods)
        for i, k in [(0, "1"), (2, "1"), (0, "2"), (0, "2"), (1, "1"), (1, "2"), (2, "2"), (1, "2")]:
            x = x1 if k == "1" else x2
            assert torch.equal(mods[i](x), want[(i, k)]), (i, k)
        # the pattern the block uses: one computation, then the others read it and it is dropped
        for i in range(3):
            assert torch.equal(mods[i](x1), want[(i, "1")])
        assert mods[0]._shared._left == 0 and mods[0]._shared._y is None


def test_checkpoint_of_a_shared_model_is_unchanged(tmp_path):
    model, report = _quantized()
    ref = copy.deepcopy(model)
    share_block_inputs(model)
    a = checkpoint.save(ref, tiny_tokenizer(), tmp_path / "plain", report)
    b = checkpoint.save(model, tiny_tokenizer(), tmp_path / "shared", report)
    sa, sb = checkpoint.load(a).state_dict(), checkpoint.load(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # member tensors are row views of the group's stacked tensors: the bytes are held once
    q = model.model.layers[0].self_attn.q_proj
    assert q.codes.untyped_storage().data_ptr() == q._shared.fmt.codes.untyped_storage().data_ptr()


def test_moving_or_reloading_a_member_dissolves_its_group(fused_kernel):
    model, _ = _quantized()
    ids = _ids()
    with torch.inference_mode():
        want = model(ids).logits
    state = copy.deepcopy(model.state_dict())
    share_block_inputs(model)
    mlp = model.model.layers[1].mlp
    group = mlp.gate_proj._shared
    mlp.up_proj.to(torch.float64)                                       # _apply: the group is dissolved
    assert mlp.gate_proj._shared is None and mlp.up_proj._shared is None and group.members == []
    assert mlp.gate_proj.codes.untyped_storage().nbytes() == mlp.gate_proj.codes.nbytes
    share_block_inputs(model)
    model.load_state_dict(state)
    assert all(m._shared is None for m in model.modules() if isinstance(m, QuantLinear))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)


def test_what_cannot_share(tmp_path):
    model, _ = _quantized(preset="w4g64")
    attn = model.model.layers[0].self_attn
    assert can_share([attn.q_proj, attn.k_proj]) and not can_share([attn.q_proj])
    mixed, _ = _quantized(preset="w3g128")
    assert not can_share([attn.q_proj, mixed.model.layers[0].self_attn.k_proj])  # another spec
    with pytest.raises(ValueError):
        SharedInput([attn.q_proj])


def test_switch_off_and_load_default(tmp_path, monkeypatch):
    model, report = _quantized()
    path = checkpoint.save(model, tiny_tokenizer(), tmp_path / "ck", report)
    monkeypatch.setenv("LOWBIT_SHARE_INPUTS", "0")
    off = lowbit.load(path, compile=False)
    assert not any(m._shared is not None for m in off.modules() if isinstance(m, QuantLinear))
    monkeypatch.delenv("LOWBIT_SHARE_INPUTS")
    on = lowbit.load(path, compile=False)
    assert any(m._shared is not None for m in on.modules() if isinstance(m, QuantLinear))
    ids = _ids(1, 6)
    with torch.inference_mode():
        torch.testing.assert_close(on(ids).logits, off(ids).logits, rtol=1e-5, atol=1e-5)
