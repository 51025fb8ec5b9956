"""The vocabulary matrices at 8 bits: ``head: int8`` in a recipe.

A 4-bit SmolLM2-135M still reads its fp32 head (49152 × 576, 113 MB) at every decode step, two
thirds of the bytes read per token. ``head: int8`` stores it as 8-bit codes, one fp16 scale per
output channel (= per token row), symmetric: 8 + 16/hidden bits per weight (8.028 for 576).

    head (``adapter.head``, nn.Linear (vocab, hidden))   -> QuantLinear, grouped_int 8-bit per channel
    token embeddings (``adapter.embeddings[0]``)
        tied to the head (same tensor)                   -> QuantEmbedding reading the head's codes:
                                                            one copy stored, loaded and moved
        not tied                                         -> QuantEmbedding with its own 8-bit table
    position embeddings (GPT-2 ``wpe``, OPT)             -> unchanged, full precision

Decisions, and why:

* **Round to nearest** on each row's absolute maximum, whatever the recipe's method: at 8 bits per
  channel the rounding error is about 0.2 % of a row's range, no calibration is needed, and
  Hessian-based methods would need the final hidden states of every calibration token for a
  49152-row matrix. It runs once, after the block walk, on the in-memory model (with
  ``offload_dir`` the head and embeddings are never offloaded: they are in memory throughout).
* **An untied embedding is quantized too**, with its own per-row table: ``head: int8`` means the
  vocabulary matrices are 8-bit, tied or not, so the same recipe gives the same kind of model in
  every family. The embedding costs memory, not bandwidth (a token reads one row), and per-row
  8-bit codes change each vector by at most half a step.
* **Gemma's embedding scale** (``√hidden``, applied inside its embedding module's ``forward``)
  moves into :class:`QuantEmbedding` (``embed_scale``); Gemma 1/2/3 then compute what they did.
* **Accounting**: the codes and scales count in the model's bytes (footprint ``total_bytes``, the
  checkpoint's ``total_tensor_bytes``) and are reported as their own figures (``head_bytes``,
  ``head_bits``: bytes and bits per weight over the *stored* vocabulary matrices, a tied embedding
  counted once); the recipe's bits per weight stays the average over the decoder blocks' layers.
  :func:`block_footprint` gives :func:`lowbit.modules.footprint` with the head left out of the
  quantized figures (where it stays in ``total_bytes``).
* **transformers' tying**: its ``tie_weights()`` would set ``lm_head.weight`` to
  ``embed_tokens.weight``, parameters neither module has any more; the tie now lives in
  :class:`QuantEmbedding`, so the model instance's ``_tied_weights_keys`` /
  ``all_tied_weights_keys`` drop the entries naming the head or the embeddings (the config still
  says ``tie_word_embeddings``, which is true) and ``tie_weights()`` leaves the modules alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from lowbit.errors import (
    CheckpointError,
    UnsupportedArchitectureError,
    WeightValueError,
)
from lowbit.formats import GroupedInt, QuantSpec
from lowbit.models.adapters import Adapter, _set_submodule, get_adapter
from lowbit.modules import Footprint, QuantEmbedding, QuantLinear, footprint
from lowbit.quantizers.rtn import rtn

HEAD_SPECS: dict[str, QuantSpec | None] = {
    "none": None,                              # head and embeddings as loaded (full precision)
    "int8": QuantSpec(8, -1, True),            # 8-bit codes, one fp16 scale per row, symmetric
}


@dataclass
class HeadReport:
    """What a quantized head stored: one record per stored vocabulary matrix.

    ``layers`` maps the head's name (and, when not tied, the embeddings' name) to
    ``{"format": meta, "bias": bool, "weights": int, "nbytes": int}``; a tied embedding has no
    record of its own (it stores nothing).
    """

    mode: str                                  # key of HEAD_SPECS, e.g. "int8"
    head: str                                  # module name of the head, e.g. "lm_head"
    embeddings: str                            # module name of the token embeddings
    tied: bool                                 # the embeddings read the head's codes
    dtype: str                                 # output dtype of the embeddings, e.g. "float32"
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        return sum(r["weights"] for r in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(r["nbytes"] for r in self.layers.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(self.bits_per_weight, 6)}

    @classmethod
    def from_dict(cls, d: dict) -> HeadReport:
        try:
            rep = cls(d["mode"], d["head"], d["embeddings"], bool(d["tied"]), d["dtype"], dict(d["layers"]))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"bad head metadata in lowbit.json ({e!r}); re-run `lowbit quantize`") from None
        if rep.head not in rep.layers or (not rep.tied and rep.embeddings not in rep.layers):
            raise CheckpointError(f"head metadata names no format for {rep.head} or {rep.embeddings}; "
                                  "re-run `lowbit quantize`")
        return rep


def quantize_head(model: nn.Module, mode: str) -> HeadReport | None:
    """Quantize ``model``'s head and token embeddings in place following ``mode`` (a HEAD_SPECS key).

    Returns what was stored (None for ``"none"``)."""
    spec = HEAD_SPECS[mode]
    if spec is None:
        return None
    adapter = get_adapter(model)
    head, emb, emb_name = _vocab_modules(model, adapter)
    tied = head.weight.data_ptr() == emb.weight.data_ptr() and head.weight.shape == emb.weight.shape
    head_q = QuantLinear(_quantize(adapter.head, head.weight, spec), head.bias)
    kw = {"padding_idx": emb.padding_idx, "embed_scale": _embed_scale(emb), "dtype": emb.weight.dtype}
    emb_q = (QuantEmbedding(tied_to=head_q, **kw) if tied
             else QuantEmbedding(_quantize(emb_name, emb.weight, spec), **kw))
    _set_submodule(model, adapter.head, head_q)
    _set_submodule(model, emb_name, emb_q)
    _drop_transformers_tie(model, (adapter.head, emb_name))
    return describe(model)


def describe(model: nn.Module) -> HeadReport | None:
    """The HeadReport of a model whose head is a :class:`QuantLinear` (None when it is not quantized)."""
    adapter = get_adapter(model)
    head = model.get_submodule(adapter.head)
    if not isinstance(head, QuantLinear):
        return None
    emb_name = adapter.embeddings[0]
    emb = model.get_submodule(emb_name)
    spec = head.fmt.spec
    mode = next((m for m, s in HEAD_SPECS.items() if s == spec), f"int{spec.bits}")
    layers = {adapter.head: _record(head.fmt, head.bias is not None)}
    if not isinstance(emb, QuantEmbedding):
        raise UnsupportedArchitectureError(f"{adapter.family}: the head is quantized but {emb_name} is a "
                                           f"{type(emb).__name__}; quantize both with lowbit.head.quantize_head")
    if not emb.tied:
        layers[emb_name] = _record(emb.fmt, False)
    dtype = str(emb.embed_scale.dtype).removeprefix("torch.")
    return HeadReport(mode, adapter.head, emb_name, emb.tied, dtype, layers)


def install_empty(model: nn.Module, meta: dict) -> HeadReport:
    """Swap in a head and embeddings with uninitialised tensors from ``lowbit.json``'s ``head``, for a checkpoint load."""
    rep = HeadReport.from_dict(meta)
    dtype = getattr(torch, rep.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"head metadata: unknown dtype {rep.dtype!r}; re-run `lowbit quantize`")
    rec = rep.layers[rep.head]
    head = QuantLinear.empty(rec["format"], rec["bias"])
    old = model.get_submodule(rep.embeddings)
    kw = {"padding_idx": getattr(old, "padding_idx", None), "embed_scale": _embed_scale(old), "dtype": dtype}
    emb = (QuantEmbedding(tied_to=head, **kw) if rep.tied
           else QuantEmbedding.empty(rep.layers[rep.embeddings]["format"], **kw))
    _set_submodule(model, rep.head, head)
    _set_submodule(model, rep.embeddings, emb)
    _drop_transformers_tie(model, (rep.head, rep.embeddings))
    return rep


def block_footprint(model: nn.Module) -> Footprint:
    """:func:`lowbit.modules.footprint` with a quantized head left out of the quantized figures.

    ``quantized_weights``/``quantized_bytes``/``bits_per_weight`` then describe the decoder blocks'
    layers (what a recipe's bits per weight means); ``total_bytes`` still counts every stored byte,
    the head's codes and scales included."""
    fp = footprint(model)
    rep = describe(model)
    if rep is None:
        return fp
    head = model.get_submodule(rep.head)
    n, b = fp.quantized_weights - head.weight_numel, fp.quantized_bytes - head.nbytes()
    return Footprint(n, b, fp.total_bytes, 8 * b / n if n else 32.0)


# -- helpers -----------------------------------------------------------------------------
def _vocab_modules(model: nn.Module, adapter: Adapter) -> tuple[nn.Linear, nn.Embedding, str]:
    head = model.get_submodule(adapter.head)
    emb_name = adapter.embeddings[0]
    emb = model.get_submodule(emb_name)
    if isinstance(head, QuantLinear) or isinstance(emb, QuantEmbedding):
        raise UnsupportedArchitectureError(f"{adapter.family}: the head is already quantized")
    if not isinstance(head, nn.Linear) or not isinstance(emb, nn.Embedding):
        raise UnsupportedArchitectureError(
            f"{adapter.family}: head: int8 needs an nn.Linear head and an nn.Embedding ({adapter.head}: "
            f"{type(head).__name__}, {emb_name}: {type(emb).__name__}); use head: none")
    return head, emb, emb_name


def _quantize(name: str, weight: Tensor, spec: QuantSpec) -> GroupedInt:
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise WeightValueError(f"{name}: weight holds NaN or Inf; "
                               "the source model is damaged, fix or re-export it before quantizing")
    return rtn(w, spec)


def _record(fmt: GroupedInt, bias: bool) -> dict:
    out_f, in_f = fmt.shape
    return {"format": fmt.meta(), "bias": bias, "weights": out_f * in_f, "nbytes": fmt.nbytes()}


def _embed_scale(emb: nn.Module) -> Tensor | float:
    """Gemma's ``√hidden`` (a buffer of its embedding module), else 1."""
    scale = getattr(emb, "embed_scale", None)
    return scale if isinstance(scale, Tensor) else 1.0


def _drop_transformers_tie(model: nn.Module, names: tuple[str, ...]) -> None:
    """Remove transformers' tie entries naming ``names`` from this model instance (see the module docstring)."""
    prefixes = tuple(f"{n}." for n in names)

    def keep(mapping: dict | None) -> dict:
        return {k: v for k, v in (mapping or {}).items() if not (k.startswith(prefixes) or v.startswith(prefixes))}

    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = keep(model._tied_weights_keys)
    if getattr(model, "all_tied_weights_keys", None):
        model.all_tied_weights_keys = keep(model.all_tied_weights_keys)
