"""Fused decoder layers: one C++ call per layer and decoded token (``torch.ops.lowbit.decode_layer``).

A decoded token of a small model spends as much time around its matrix-vector products as in them:
Python and operator dispatch for the norms, the rotary embedding, the cache update and attention,
the compiled graph's wrapper and its guards (SmolLM2-135M at 4 bits: about 4 ms of an 8 ms step).
:func:`fuse_layers` gives every qualifying decoder layer a forward that, for one token of a batch of
one with a static KV cache, runs the whole layer in one call: norms, q/k/v (one GEMV over the
stacked layers of :mod:`lowbit.modules.shared`), rotary embedding, the cache write, attention,
``o_proj``, the residuals and the gated MLP. The GEMVs are the layers' own bound kernels
(:meth:`~lowbit.modules.QuantLinear.prepare_decode`), so the fused layer computes what the unfused
one does, to fp32 rounding; any other call (prefill, a batch, a dynamic cache, gradients) runs the
layer's ordinary forward.

A layer qualifies when its family computes a llama-style layer (``llama``, ``mistral``, ``qwen2``,
``qwen3``: RMS norms, rotate-half rotary embedding, grouped-query attention, a SiLU-gated MLP,
biases on q/k/v and o allowed, per-head q/k norms for qwen3), its q/k/v and gate/up layers share
one kernel call each, and every one of its linear layers is bound to lowbit's fused kernel. The
cache layer must be a ``transformers`` ``StaticLayer`` holding fp32 (sliding-window layers run
unfused). ``LOWBIT_FUSE_LAYERS=0`` turns this off. A fused layer holds its layers' kernel tensors:
moving or reloading one of them (``.to()``, ``load_state_dict``) marks it stale and the block runs
unfused until :func:`lowbit.decoding.fast_decode` is called again; code that *replaces* a layer's
modules calls ``fast_decode`` itself.

An fp32 ``nn.Linear`` head (a recipe without ``head: int8``) gets lowbit's memory-bound GEMV for
decode rows (:func:`fast_head`, any family): it is read whole for every token.
"""

from __future__ import annotations

import logging
import os
import types

import torch
from torch import Tensor, nn

from transformers.modeling_outputs import BaseModelOutputWithPast

from lowbit.errors import UnsupportedArchitectureError
from lowbit.kernels import _ext
from lowbit.models.adapters import get_adapter
from lowbit.modules import QuantLinear

log = logging.getLogger("lowbit.decoding")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_FUSED_KERNELS = {"fused": 0, "fused_q8": 1}


def enabled() -> bool:
    """Whether :func:`fuse_layers` fuses: the extension is available and ``LOWBIT_FUSE_LAYERS`` is not ``0``."""
    if os.environ.get("LOWBIT_FUSE_LAYERS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _ext.available()


class FusedLayer:
    """What one decoder layer passes to ``decode_layer``: its tensors, formats and constants."""

    def __init__(self, block: nn.Module, family: str):
        attn, mlp = block.self_attn, block.mlp
        qkv, gu = attn.q_proj._shared, mlp.gate_proj._shared
        linears = [qkv, attn.o_proj, gu, mlp.down_proj]
        empty = torch.empty(0)
        tensors, meta = [block.input_layernorm.weight, block.post_attention_layernorm.weight], []
        # a layer moved or reloaded since (QuantLinear._invalidate) marks this stale: the block then runs unfused
        # rather than compute with the tensors taken here (the norm weights are the parameters themselves)
        self.stale = False
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            m._fused_in = self
        for lin in linears:
            kernel, plan = lin._decode
            tensors += [plan.codes, plan.scale, empty if plan.zero is None else plan.zero]
            # 0: the fp32-activation kernel; the int8 one: the repack layout of its codes (1 or 2)
            meta += [plan.bits, plan.group_size, max(plan.layout, 1) if _FUSED_KERNELS[kernel.name] else 0]
        o_bias = attn.o_proj.bias
        q_norm = getattr(attn, "q_norm", None) if family == "qwen3" else None
        tensors += [empty if qkv.bias is None else qkv.bias.detach().float(),
                    empty if o_bias is None else o_bias.detach().float(),
                    empty if q_norm is None else q_norm.weight.detach(),
                    empty if q_norm is None else attn.k_norm.weight.detach()]
        cfg = attn.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.tensors = tensors
        self.meta = [self.heads, self.kv_heads, self.head_dim] + meta
        self.fmeta = [float(block.input_layernorm.variance_epsilon),
                      float(q_norm.variance_epsilon) if q_norm is not None else 0.0, float(attn.scaling)]
        self.layer_idx = attn.layer_idx
        self.hidden = block.input_layernorm.weight.shape[0]


def qualifies(block: nn.Module, family: str) -> str | None:
    """Why ``block`` cannot be fused (``None``: it can)."""
    if family not in FAMILIES:
        return f"family {family!r}"
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn/mlp"
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(attn, n, None), QuantLinear) for n in names):
        return "attention layers not all quantized"
    if not all(isinstance(getattr(mlp, n, None), QuantLinear) for n in ("gate_proj", "up_proj", "down_proj")):
        return "MLP layers not all quantized"
    qkv, gu = attn.q_proj._shared, mlp.gate_proj._shared
    if qkv is None or [m for m in qkv.members] != [attn.q_proj, attn.k_proj, attn.v_proj]:
        return "q/k/v do not share one call"
    if gu is None or [m for m in gu.members] != [mlp.gate_proj, mlp.up_proj]:
        return "gate/up do not share one call"
    for lin in (qkv, attn.o_proj, gu, mlp.down_proj):
        bound = lin._decode
        if bound is None or bound[0].name not in _FUSED_KERNELS:
            return f"a layer runs kernel {bound[0].name if bound else None!r}"
        if bound[1] is None:          # e.g. fused_q8 forced where LOWBIT_ISA rules its paths out: the reference
            return f"a layer's {bound[0].name} kernel has no plan here"
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if any(type(n).__name__ not in (f"{c}RMSNorm" for c in ("Llama", "Mistral", "Qwen2", "Qwen3")) for n in norms):
        return "norms are not llama-style RMS norms"
    if norms[0].variance_epsilon != norms[1].variance_epsilon:
        return "the two norms have different eps"
    cfg = attn.config
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {cfg.hidden_act!r}"
    if getattr(mlp, "gate_proj").bias is not None or mlp.down_proj.bias is not None:
        return "MLP biases"
    if family == "qwen3" and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
        return "qwen3 without q/k norms"
    if attn.head_dim % 2:
        return "odd head dim"
    return None


# transformers 5.25 renamed the models' ``past_key_values`` argument (and output field) ``cache``
_OUT_CACHE = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _fused_forward(self, hidden_states: Tensor, *args, **kwargs):
    """The decoder layer's forward: ``decode_layer`` for one token of a batch of one with a static fp32 cache,
    the layer's own forward otherwise (called with exactly the arguments it was given)."""
    fused: FusedLayer | None = self._lowbit_fused
    attention_mask, position_embeddings = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
    layer = None if fused is None or fused.stale or args else _static_layer(_cache_of(kwargs), fused.layer_idx)
    if (layer is None or position_embeddings is None or hidden_states.shape != (1, 1, fused.hidden)
            or hidden_states.dtype != torch.float32
            or torch.is_grad_enabled() and (hidden_states.requires_grad or self.input_layernorm.weight.requires_grad)
            or not (attention_mask is None
                    or isinstance(attention_mask, Tensor) and attention_mask.numel() == layer.keys.shape[2])):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    cos, sin = position_embeddings
    return torch.ops.lowbit.decode_layer(hidden_states, fused.tensors, fused.meta, fused.fmeta, layer.keys,
                                         layer.values, layer.cumulative_length, cos, sin, attention_mask)


def _fused_model_forward(self, *args, **kwargs):
    """The base model's forward when every decoder layer is fused: for one token of a batch of one with a static
    cache, embedding, rotary embedding, one ``decode_layer`` call per layer and the final norm, without the
    per-step mask construction and module-call machinery around the layers; the model's own forward otherwise
    (called with exactly the arguments it was given)."""
    input_ids, inputs_embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    attention_mask, cache = kwargs.get("attention_mask"), _cache_of(kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "inputs_embeds", "attention_mask", "cache",
                                                         "past_key_values", "position_ids", "use_cache")}
    layers = None if args else _model_step_layers(self, input_ids, attention_mask, cache, inputs_embeds, rest)
    if layers is None:
        return type(self).forward(self, *args, **kwargs)
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = layers[0].cumulative_length.view(1, 1).clone()
    cos, sin = _rope(self, x, position_ids, layers[0].keys.shape[2])
    w, meta, fmeta = self._lowbit_fused_stack
    keys, values, lengths = self.__dict__["_lowbit_step_memo"][2]
    x = torch.ops.lowbit.decode_layers(x, w, meta, fmeta, keys, values, lengths, cos, sin, attention_mask)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_OUT_CACHE: cache})


def _model_step_layers(base, input_ids, attention_mask, past_key_values, inputs_embeds, kwargs) -> list | None:
    """The cache layers of a one-token step that :func:`_fused_model_forward` covers, else ``None``: a batch of one
    token, a static fp32 cache in every layer, a 2-D mask or one 4-D mask row, no hidden states or attentions
    asked for, no gradients."""
    fused = base._lowbit_fused_model
    if fused is None or past_key_values is None or (input_ids is None) == (inputs_embeds is None):
        return None
    if any(f.stale for f in fused):
        return None
    if input_ids is not None and input_ids.shape != (1, 1):
        return None
    if inputs_embeds is not None and (inputs_embeds.shape[:2] != (1, 1) or inputs_embeds.dtype != torch.float32):
        return None
    if not (attention_mask is None or isinstance(attention_mask, Tensor)
            and (attention_mask.dim() == 2 or attention_mask.dim() == 4 and attention_mask.shape[2] == 1)):
        return None
    if any(kwargs.get(k) or getattr(base.config, k, False) for k in ("output_hidden_states", "output_attentions")):
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in base.norm.parameters()):
        return None
    memo = base.__dict__.get("_lowbit_step_memo")          # the last step's (cache, layers, cache tensors)
    if (memo is not None and memo[0] is past_key_values
            and all(past_key_values.layers[f.layer_idx] is layer and layer.keys is keys
                    for f, layer, keys in zip(fused, memo[1], memo[2][0]))):
        return memo[1]                                       # the same initialized layers: checked once per cache
    layers = [_static_layer(past_key_values, f.layer_idx) for f in fused]
    if any(layer is None for layer in layers):
        return None
    # (cache, its layers, their keys, values and lengths: what decode_layers takes)
    base.__dict__["_lowbit_step_memo"] = (past_key_values, layers,
                                          ([la.keys for la in layers], [la.values for la in layers],
                                           [la.cumulative_length for la in layers]))
    return layers


def _rope(base, x: Tensor, position_ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The rotary embedding's cos and sin at one position: rows of a table the model's own ``rotary_emb`` computes
    once per cache length (elementwise, so the same values as a call per step), for rotary types whose frequencies
    do not change with the length (not ``dynamic`` or ``longrope``); anything else, and a compiled step (which
    would break its graph at the position's read), calls the module."""
    rope = base.rotary_emb
    kind = str(getattr(rope, "rope_type", "default"))
    if "dynamic" in kind or kind == "longrope" or position_ids.shape != (1, 1) or torch.compiler.is_compiling():
        return rope(x, position_ids=position_ids)
    p = int(position_ids)
    if not 0 <= p < length:
        return rope(x, position_ids=position_ids)
    key = (rope.inv_freq.data_ptr(), rope.inv_freq.device, x.dtype, length)
    memo = base.__dict__.get("_lowbit_rope")
    if memo is None or memo[0] != key:
        memo = (key, *rope(x, position_ids=torch.arange(length, device=x.device).view(1, -1)))
        base.__dict__["_lowbit_rope"] = memo
    return memo[1][:, p:p + 1], memo[2][:, p:p + 1]


def _two_d_mask(*, attention_mask=None, **_unused):
    """``create_masks_for_generate`` of a fully fused, uncompiled model: ``generate()``'s 2-D mask, unchanged.

    With a static cache ``generate()`` builds a 4-D mask over the whole cache before every step (for a
    compiled graph); the fused step reads a 2-D mask directly, and an unfused call (prefill) builds its
    own masks from it, as any forward with a 2-D mask does."""
    return attention_mask


def plain_generate_masks(model: nn.Module, on: bool) -> None:
    """Let ``generate()`` pass its 2-D mask to ``model`` (``on``), or build its usual per-step masks again."""
    if on:
        model.create_masks_for_generate = _two_d_mask
    elif vars(model).get("create_masks_for_generate") is _two_d_mask:
        del model.create_masks_for_generate


def _static_layer(cache, idx: int):
    """The cache's layer ``idx`` when it is an initialized fp32 ``StaticLayer`` of batch one, else ``None``."""
    layers = getattr(cache, "layers", None)
    if layers is None or idx >= len(layers):
        return None
    layer = layers[idx]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    keys = layer.keys
    if keys.dtype != torch.float32 or keys.shape[0] != 1 or keys.device.type != "cpu":
        return None
    return layer


def fuse_layers(model: nn.Module) -> int:
    """Give every qualifying decoder layer of ``model`` the fused one-token forward (module docstring); the
    number of layers fused. Call after the layers' kernels are bound; :func:`unfuse_layers` undoes it.

    Every layer of a fusable family gets the forward wrapper and a ``_lowbit_fused`` attribute (``None``
    where it runs unfused), fused or not: a compiled decode step guards on that attribute, so models that
    differ in what is fused never share a compiled graph."""
    unfuse_layers(model)
    fast_head(model)
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return 0
    if adapter.family not in FAMILIES:
        return 0
    on = enabled()
    n, left, why = 0, 0, set()
    for _, block in adapter.blocks(model):
        reason = qualifies(block, adapter.family) if on else "LOWBIT_FUSE_LAYERS=0 or no extension"
        block._lowbit_fused = FusedLayer(block, adapter.family) if reason is None else None
        if "forward" not in block.__dict__:
            block.forward = types.MethodType(_fused_forward, block)
        if reason is None:
            n += 1
        else:
            left += 1
            why.add(reason)
    if why and on:
        log.info("fused decode: %d layer(s) left unfused (%s)", left, "; ".join(sorted(why)))
    base = _base_model(model, adapter)
    if base is not None:
        every = n > 0 and not left
        base._lowbit_fused_model = ([b._lowbit_fused for _, b in adapter.blocks(model)] if every else None)
        # every layer's arguments in one list each, for one decode_layers call per step (fused_layer.cpp)
        base._lowbit_fused_stack = (None if not every else
                                    ([t for f in base._lowbit_fused_model for t in f.tensors],
                                     [v for f in base._lowbit_fused_model for v in f.meta],
                                     [v for f in base._lowbit_fused_model for v in f.fmeta]))
        if "forward" not in base.__dict__:
            base.forward = types.MethodType(_fused_model_forward, base)
    return n


def _base_model(model: nn.Module, adapter):
    """The module holding the decoder layers, its embedding, rotary embedding and final norm (llama-style), or
    ``None``."""
    path = adapter.blocks_path.rpartition(".")[0]
    try:
        base = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    ok = all(hasattr(base, k) for k in ("embed_tokens", "rotary_emb", "norm", "layers"))
    return base if ok else None


def _head_forward(self, x: Tensor) -> Tensor:
    """An fp32 ``nn.Linear`` head's forward: lowbit's memory-bound GEMV (``linear_f32``) for a few rows of fp32 x
    without gradients, ``nn.Linear.forward`` otherwise."""
    w = self.weight
    if (self._lowbit_fused_head and x.dtype == torch.float32 and w.dtype == torch.float32 and w.device.type == "cpu"
            and x.device.type == "cpu" and x.numel() <= 8 * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return torch.ops.lowbit.linear_f32(x, w, self.bias)
    return nn.Linear.forward(self, x)


def fast_head(model: nn.Module, on: bool = True) -> bool:
    """Give ``model``'s fp32 ``nn.Linear`` head (the tied or untied output embedding) lowbit's decode GEMV
    (:func:`_head_forward`); whether it did. The head is read whole for every decoded token (113 MB on
    SmolLM2), where ``F.linear``'s one-row path measured about 12 GB/s here."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return False
    on = on and enabled()
    head._lowbit_fused_head = on
    if "forward" not in head.__dict__:
        head.forward = types.MethodType(_head_forward, head)
    return on


def unfuse_layers(model: nn.Module) -> None:
    """Every layer back to its own forward. The forward wrapper stays, with ``_lowbit_fused = None``: a compiled
    decode step keeps a guard on that attribute (:func:`lowbit.decoding._keep_guard`) and recompiles."""
    for mod in model.modules():
        for key in ("_lowbit_fused", "_lowbit_fused_model", "_lowbit_fused_stack"):
            if key in mod.__dict__:
                setattr(mod, key, None)
        if "_lowbit_fused_head" in mod.__dict__:
            mod._lowbit_fused_head = False


def fused_count(model: nn.Module) -> int:
    """How many layers of ``model`` run fused."""
    return sum(1 for m in model.modules() if m.__dict__.get("_lowbit_fused") is not None)
