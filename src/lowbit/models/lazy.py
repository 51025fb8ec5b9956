"""Models larger than memory: a transformers model whose tensors stay on the ``meta`` device
until a block asks for them, read straight from the source's safetensors files.

    lazy = LazyWeights.open(hf_dir)           # skeleton on meta; embeddings, norms, head loaded
    lazy.materialize(block, "model.layers.3") # that block's tensors read from disk
    ...                                        # quantize it, write it out
    lazy.release(block)                        # back to meta: memory is one block at a time
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from lowbit.errors import ModelSourceError


@dataclass
class LazyWeights:
    """Where every tensor of an HF directory lives, and the model skeleton that refers to them."""

    model: nn.Module
    root: Path
    file_of: dict[str, str]                 # tensor name -> safetensors file name

    @classmethod
    def open(cls, hf_dir: str | Path, keep_on_meta: tuple[str, ...], dtype: torch.dtype = torch.float32) -> "LazyWeights":
        """Skeleton of the model in ``hf_dir``; every tensor outside the ``keep_on_meta`` prefixes is loaded now."""
        import transformers

        root = Path(hf_dir)
        file_of = _tensor_files(root)
        config = transformers.AutoConfig.from_pretrained(root)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()                                  # a tied head is then the embeddings' parameter
        lazy = cls(model.eval(), root, file_of)
        keep = tuple(p + "." for p in keep_on_meta)
        eager = [n for n in model.state_dict() if not n.startswith(keep)]
        lazy._load(model, "", eager)
        model.tie_weights()
        return lazy

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read ``module``'s tensors (named ``prefix.<name>`` in the files) from disk."""
        self._load(module, prefix + ".", list(module.state_dict()))

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop ``module``'s tensors (back to ``meta``)."""
        module.to_empty(device=torch.device("meta"))

    def _load(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        dtypes = {n: t.dtype for n, t in module.state_dict(keep_vars=True).items()}
        tied = _tied_names(module)
        by_file: dict[str, list[str]] = {}
        for n in names:
            full = prefix + n
            if full in self.file_of:
                by_file.setdefault(self.file_of[full], []).append(n)
            elif n not in tied:                            # a tied copy (head = embeddings) is not stored
                raise ModelSourceError(f"{self.root}: tensor {full} is missing from the safetensors files")
        state = {}
        for fname, group in by_file.items():
            with safe_open(self.root / fname, framework="pt") as f:
                for n in group:
                    state[n] = f.get_tensor(prefix + n).to(dtypes[n])
        module.load_state_dict(state, strict=False, assign=True)


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that are the same object as an earlier-named one."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return tied


def _tensor_files(root: Path) -> dict[str, str]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{root}: no safetensors files; offloaded quantization reads weights from "
                               "safetensors (convert the model with save_pretrained first)")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out
