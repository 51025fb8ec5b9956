"""Where activation-aware scales can be folded: per family, which module produces each shared input.

A :class:`ScaleGroup` names a module of a decoder block (a norm, or a linear layer whose output
rows feed the next layers through an op that commutes with a positive per-channel scale) and the
linear layers that read its output. Folding a scale ``s`` divides the producer's output channel
``i`` by ``s_i`` and multiplies the consumers' input column ``i`` by ``s_i``: the block computes the
same function in full precision, and the consumers' weights are then quantized with their
important columns magnified.

Producers handled:

* RMSNorm with gain ``w`` (``y = w · x̂``): ``w → w / s``
* RMSNorm with gain ``1 + w`` (Gemma): ``w → (1 + w) / s - 1`` (which convention a module uses is
  found by probing it, not by its class name)
* LayerNorm: ``w → w / s``, ``b → b / s``
* Linear / GPT-2 Conv1D rows (and bias), optionally only a row range (Phi-3's fused gate/up: the
  up half feeds ``down_proj``)

Folding is verified: :func:`fold` checks on a probe input that the block's output did not move
and undoes the fold otherwise (a family whose norm sits after the residual, or whose activation
does not commute with scaling, is then left unscaled rather than broken).

Where a group cannot be folded (a grouped-query ``v_proj → o_proj``, whose shapes differ) it is
skipped: no extra per-layer scale vector is stored, so scaling never costs bits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger("lowbit.scaling")


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                          # block-relative producer module
    linears: tuple[str, ...]           # block-relative consumers, all reading prev's output
    rows: str = "all"                  # which output rows of a linear producer: "all" or "second_half"


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA = (ScaleGroup("input_layernorm", _ATTN), ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
          ScaleGroup("post_attention_layernorm", _MLP), ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
_GEMMA2 = (ScaleGroup("input_layernorm", _ATTN), ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
           ScaleGroup("pre_feedforward_layernorm", _MLP), ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
_MOE = (ScaleGroup("input_layernorm", _ATTN), ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))

SCALE_GROUPS: dict[str, tuple[ScaleGroup, ...]] = {
    **{f: _LLAMA for f in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    **{f: _GEMMA2 for f in ("gemma2", "gemma3_text")},
    "phi3": (ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
             ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
             ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), rows="second_half")),
    "opt": (ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
            ScaleGroup("final_layer_norm", ("fc1",)), ScaleGroup("fc1", ("fc2",))),
    "gpt2": (ScaleGroup("ln_1", ("attn.c_attn",)), ScaleGroup("ln_2", ("mlp.c_fc",))),
    # MoE: the routed experts (and the router) read the MLP input; only attention is scaled
    **{f: _MOE for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
}


def scale_groups(family: str, block: nn.Module) -> list[ScaleGroup]:
    """The groups of ``family`` that exist in ``block`` and whose producer width matches the consumers'."""
    groups = []
    for g in SCALE_GROUPS.get(family, ()):
        try:
            prev = block.get_submodule(g.prev)
            mods = [block.get_submodule(n) for n in g.linears]
        except AttributeError:
            continue
        width = _out_width(prev, g.rows)
        if width is None or any(_in_width(m) != width for m in mods):
            continue                                            # e.g. grouped-query v_proj -> o_proj
        groups.append(g)
    return groups


def _in_width(mod: nn.Module) -> int | None:
    if isinstance(mod, Conv1D):
        return mod.weight.shape[0]
    if isinstance(mod, nn.Linear):
        return mod.weight.shape[1]
    return None


def _out_width(mod: nn.Module, rows: str) -> int | None:
    if isinstance(mod, (nn.Linear, Conv1D)):
        out = mod.weight.shape[1] if isinstance(mod, Conv1D) else mod.weight.shape[0]
        return out // 2 if rows == "second_half" else out
    w = getattr(mod, "weight", None)
    return w.shape[0] if isinstance(w, Tensor) and w.dim() == 1 else None


def _gain_offset(norm: nn.Module) -> float:
    """1.0 if the norm multiplies by ``1 + weight`` (Gemma), else 0.0: probed with a zero gain."""
    with torch.no_grad():
        saved = norm.weight.detach().clone()
        bias = getattr(norm, "bias", None)
        saved_b = None if bias is None else bias.detach().clone()
        try:
            norm.weight.zero_()
            if bias is not None:
                bias.zero_()
            y = norm(torch.randn(2, norm.weight.shape[0], dtype=norm.weight.dtype))
        finally:
            norm.weight.copy_(saved)
            if bias is not None:
                bias.copy_(saved_b)
    return 0.0 if bool((y == 0).all()) else 1.0


def divide_output(prev: nn.Module, rows: str, s: Tensor) -> None:
    with torch.no_grad():
        if isinstance(prev, (nn.Linear, Conv1D)):
            w = prev.weight
            n = w.shape[1] if isinstance(prev, Conv1D) else w.shape[0]
            sl = slice(n - s.numel(), n) if rows == "second_half" else slice(0, n)
            if isinstance(prev, Conv1D):
                w[:, sl] /= s.to(w.dtype)[None, :]
            else:
                w[sl] /= s.to(w.dtype)[:, None]
            if prev.bias is not None:
                prev.bias[sl] /= s.to(prev.bias.dtype)
            return
        offset = _gain_offset(prev)
        prev.weight.copy_((prev.weight.float() + offset) / s - offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_(prev.bias.float() / s)


def _multiply_input(mod: nn.Module, s: Tensor) -> None:
    with torch.no_grad():
        w = mod.weight
        if isinstance(mod, Conv1D):
            w *= s.to(w.dtype)[:, None]
        else:
            w *= s.to(w.dtype)[None, :]


def foldable(block: nn.Module, group: ScaleGroup, check) -> bool:
    """Whether folding a scale into ``group`` leaves ``block``'s output unchanged: a random positive scale
    (seeded) is folded, ``check()`` (the block's output on a probe input) compared, and every touched
    parameter restored exactly, whatever the answer."""
    prev = block.get_submodule(group.prev)
    width = _out_width(prev, group.rows)
    s = torch.exp(torch.empty(width).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(width)))
    touched = [prev, *(block.get_submodule(n) for n in group.linears)]
    saved = [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in touched]
    try:
        return fold(block, group, s, check, quiet=True)
    finally:
        with torch.no_grad():
            for m, params in zip(touched, saved):
                for k, v in params.items():
                    getattr(m, k).copy_(v)


def fold(block: nn.Module, group: ScaleGroup, s: Tensor, check=None, quiet: bool = False) -> bool:
    """Fold ``s`` into ``group`` of ``block`` in place; with ``check`` (a callable returning the block's
    output on a probe input) keep the fold only if the output is unchanged (relative error < 1e-3)."""
    prev = block.get_submodule(group.prev)
    mods = [block.get_submodule(n) for n in group.linears]
    touched = [prev, *mods]
    saved = [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in touched]
    before = check() if check is not None else None
    divide_output(prev, group.rows, s)
    for m in mods:
        _multiply_input(m, s)
    if check is None:
        return True
    after = check()
    rel = float((after - before).norm() / before.norm().clamp(min=1e-12))
    if rel < 1e-3:
        return True
    (log.debug if quiet else log.warning)("scaling %s -> %s changes the block's output (relative %.2g): left "
                                          "unscaled", group.prev, ", ".join(group.linears), rel)
    with torch.no_grad():
        for m, params in zip(touched, saved):
            for k, v in params.items():
                getattr(m, k).copy_(v)
    return False
