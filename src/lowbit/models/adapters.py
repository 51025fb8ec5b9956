"""Architecture adapters: where a family keeps its decoder blocks, linear layers, embeddings and head.

One small table row per family; the walk over blocks and the discovery of linear layers are
written once. Inside a block the quantizable layers are every ``nn.Linear``, every GPT-2
``Conv1D`` (whose weight is stored transposed, (in, out)) and, for MoE families, every expert
matrix of the fused ``mlp.experts`` module (3-D parameters ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I)), named ``mlp.experts.gate_up_proj.<e>`` and ``mlp.experts.down_proj.<e>``.
Routers (``mlp.gate``, ``mlp.shared_expert_gate``) stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import UnsupportedArchitectureError
from lowbit.formats import WeightFormat
from lowbit.modules import QuantExperts, QuantLinear


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str                          # attribute path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]               # token (and position) embeddings
    head: str = "lm_head"
    experts: str | None = None                # block-relative path of fused MoE experts
    keep_fp: tuple[str, ...] = ()             # block-relative names never quantized (routers)
    final_norm: str = "model.norm"            # the norm between the last block and the head

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(full name, block) for every decoder block, in order."""
        return [(f"{self.blocks_path}.{i}", b) for i, b in enumerate(model.get_submodule(self.blocks_path))]

    def logits(self, model: nn.Module, hidden: Tensor) -> Tensor:
        """The model's logits from the last block's output ``hidden`` (..., hidden): final norm, OPT's
        ``project_out``, the head, Gemma-2's final soft-capping, as the model's own forward computes them."""
        h = model.get_submodule(self.final_norm)(hidden)
        if self.family == "opt" and getattr(model.model.decoder, "project_out", None) is not None:
            h = model.model.decoder.project_out(h)
        logits = model.get_submodule(self.head)(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linears(self, block: nn.Module) -> dict[str, "LinearRef"]:
        """Block-relative name -> reference of every quantizable matrix in ``block``."""
        refs: dict[str, LinearRef] = {}
        for name, mod in block.named_modules():
            if name in self.keep_fp or not isinstance(mod, (nn.Linear, Conv1D)):
                continue
            refs[name] = LinearRef(block, name)
        if self.experts is not None:
            experts = block.get_submodule(self.experts)
            if not isinstance(experts, QuantExperts):
                for param in ("gate_up_proj", "down_proj"):
                    for e in range(getattr(experts, param).shape[0]):
                        refs[f"{self.experts}.{param}.{e}"] = LinearRef(block, self.experts, param, e)
        return refs

    def install(self, block: nn.Module, formats: dict[str, WeightFormat]) -> None:
        """Swap the quantized layers of ``block`` for :class:`QuantLinear` (and :class:`QuantExperts`)."""
        refs = self.linears(block)
        expert_fmts = {}
        for name, fmt in formats.items():
            ref = refs[name]
            if ref.param is None:
                _set_submodule(block, name, QuantLinear(fmt, ref.bias()))
            else:
                expert_fmts[(ref.param, ref.expert)] = fmt
        if expert_fmts:
            experts = block.get_submodule(self.experts)
            n = experts.gate_up_proj.shape[0]
            missing = [(p, e) for p in ("gate_up_proj", "down_proj") for e in range(n) if (p, e) not in expert_fmts]
            if missing:
                raise UnsupportedArchitectureError(
                    f"{self.family}: experts must be quantized all together; missing {missing[:3]}…")
            quant = [[QuantLinear(expert_fmts[(p, e)]) for e in range(n)] for p in ("gate_up_proj", "down_proj")]
            _set_submodule(block, self.experts, QuantExperts(*quant, experts.act_fn))

    def install_empty(self, block: nn.Module, layers: dict[str, dict]) -> None:
        """Swap in modules with uninitialised tensors from per-layer metadata, for a checkpoint load."""
        dense = {n: m for n, m in layers.items() if not n.startswith(f"{self.experts}.")} if self.experts else layers
        for name, meta in dense.items():
            _set_submodule(block, name, QuantLinear.empty(meta["format"], meta["bias"]))
        if len(dense) < len(layers):
            experts = block.get_submodule(self.experts)
            n = experts.num_experts
            quant = [[QuantLinear.empty(layers[f"{self.experts}.{p}.{e}"]["format"], False) for e in range(n)]
                     for p in ("gate_up_proj", "down_proj")]
            _set_submodule(block, self.experts, QuantExperts(*quant, experts.act_fn))


@dataclass(frozen=True)
class LinearRef:
    """One quantizable matrix of a block: a Linear/Conv1D module, or one expert's slice of a 3-D parameter."""

    block: nn.Module
    name: str
    param: str | None = None
    expert: int | None = None

    @property
    def module(self) -> nn.Module:
        return self.block.get_submodule(self.name)

    def weight(self) -> Tensor:
        """fp32 (out_features, in_features), whatever the layer's storage."""
        mod = self.module
        if self.param is not None:
            return getattr(mod, self.param)[self.expert].detach().float()
        w = mod.weight.detach()
        return (w.t() if isinstance(mod, Conv1D) else w).float().contiguous()

    def bias(self) -> Tensor | None:
        if self.param is not None:
            return None
        b = getattr(self.module, "bias", None)
        return None if b is None else b.detach()


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


_LLAMA_LIKE = dict(blocks_path="model.layers", embeddings=("model.embed_tokens",))
_MOE = dict(_LLAMA_LIKE, experts="mlp.experts", keep_fp=("mlp.gate", "mlp.shared_expert_gate"))

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in [
        *(Adapter(f, **_LLAMA_LIKE) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")),
        Adapter("opt", "model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                final_norm="model.decoder.final_layer_norm"),
        Adapter("gpt2", "transformer.h", ("transformer.wte", "transformer.wpe"), final_norm="transformer.ln_f"),
        *(Adapter(f, **_MOE) for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")),
    ]
}


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (by ``config.model_type``) or a model type name."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]

