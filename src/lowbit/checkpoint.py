"""Save and load compressed models.

A checkpoint directory::

    config.json, generation_config.json     the source model's transformers config
    tokenizer.json, tokenizer_config.json…  the tokenizer
    model.safetensors                       every tensor: quantized layers' codes/scale/zero, the rest as is
    lowbit.json                             recipe, versions, source, per-layer format/bits/bytes, checksums

Quantized layer ``L`` stores ``L.codes``, ``L.scale`` (and ``L.zero``, ``L.bias``) in place of
``L.weight``; tied tensors (a head tied to the embeddings) are stored once. With ``head: int8``
(:mod:`lowbit.head`) the head stores ``lm_head.codes``/``lm_head.scale``, an untied token embedding
its own ``codes``/``scale``, a tied one nothing (it reads the head's); ``lowbit.json``'s ``head``
says which, and its summary adds ``head_bytes`` and ``head_bits``. The directory is
written beside its target under a temporary name and renamed when complete. :func:`load`
checks every tensor file's sha256 and every tensor's shape, then builds the model with its
linear weights on the ``meta`` device, so no fp32 copy of a quantized weight ever exists.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit import head as vocab
from lowbit.cache import atomic_dir, sha256_file
from lowbit.errors import CheckpointError
from lowbit.models.adapters import get_adapter
from lowbit.offload import Offload
from lowbit.pipeline import QuantizeReport

FORMAT_VERSION = 1
META_FILE = "lowbit.json"
TENSOR_FILE = "model.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors kept once, and {dropped name: kept name}."""
    state, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()                      # a view into a larger tensor (modules.shared): its own bytes only
        state[name] = t
    return state, tied


def save(model: nn.Module, tokenizer, path: str | os.PathLike, report: QuantizeReport,
         source: dict | None = None, force: bool = False, offload: Offload | None = None) -> Path:
    """Write a quantized model to ``path`` atomically; refuse to overwrite unless ``force``.

    With ``offload`` (a run that recorded its blocks there) the blocks' tensors are taken from
    its block files, stored as ``blocks/block-NNNN.safetensors``, and ``model.safetensors``
    holds the rest (embeddings, final norm, head).
    """
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists; choose another output or pass --force to overwrite it")
    state, tied = _unique_state(model)
    head = vocab.describe(model)                    # a quantized head and embeddings (head: int8), or None
    if offload is not None:
        blocks_path = get_adapter(model).blocks_path + "."
        state = {k: v for k, v in state.items() if not k.startswith(blocks_path)}
        tied = {k: v for k, v in tied.items() if not k.startswith(blocks_path)}
    with atomic_dir(path, force=force) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, tmp / TENSOR_FILE, metadata={"format": "pt", "producer": "lowbit"})
        os.chmod(tmp / TENSOR_FILE, 0o644)
        files = [TENSOR_FILE]
        if offload is not None:
            (tmp / "blocks").mkdir()
            for f in offload.files():
                shutil.copyfile(f, tmp / "blocks" / f.name)
                files.append(f"blocks/{f.name}")
        meta = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "source": source or {},
            "model_type": model.config.model_type,
            "recipe": report.recipe.to_dict(),
            "calibration": report.calibration,
            "quantize_seconds": round(report.total_seconds, 3),
            "summary": {
                "quantized_layers": len(report.layers),
                "quantized_weights": report.weights,
                "quantized_bytes": report.nbytes,
                "bits_per_weight": report.bits_per_weight,
                # every tensor in the file: quantized layers + what stays full precision (tied stored once)
                "total_tensor_bytes": sum(_tensor_bytes(tmp / f) for f in files),
                # head: int8 -- the stored vocabulary matrices (included in total_tensor_bytes, not in the above)
                **({"head_bytes": head.nbytes, "head_bits": head.bits_per_weight} if head is not None else {}),
            },
            **({"head": head.to_dict()} if head is not None else {}),
            "tied": tied,
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
            "layers": {name: rec.to_dict() for name, rec in report.layers.items()},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def _tensor_bytes(f: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size minus the 8-byte length and the JSON header)."""
    with open(f, "rb") as h:
        header = int.from_bytes(h.read(8), "little")
    return f.stat().st_size - 8 - header


def read_meta(path: str | os.PathLike) -> dict:
    """``lowbit.json`` of a checkpoint, checked for presence and version."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {META_FILE}); quantize a model with `lowbit quantize`")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE} is corrupt ({e}); re-run `lowbit quantize`") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported by lowbit "
                              f"{lowbit.__version__} (reads version {FORMAT_VERSION})")
    return meta


def verify(path: str | os.PathLike, meta: dict) -> None:
    """Every tensor file is present with the recorded size and sha256."""
    path = Path(path)
    for name, rec in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: tensor file {name} is missing; the checkpoint is incomplete")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {rec['bytes']}: the file is truncated "
                                  "or corrupt; re-run `lowbit quantize`")
        if sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch, the file is corrupt; re-run `lowbit quantize`")


def load(path: str | os.PathLike, verify_checksums: bool = True) -> transformers.PreTrainedModel:
    """Rebuild a quantized model saved by :func:`save` as an ordinary transformers model."""
    path = Path(path)
    meta = read_meta(path)
    if verify_checksums:
        verify(path, meta)
    config = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):           # parameters on meta, buffers (rotary…) real
        model = transformers.AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(model)
    for block_name, block in adapter.blocks(model):
        prefix = f"{block_name}."
        layers = {n[len(prefix):]: rec for n, rec in meta["layers"].items() if n.startswith(prefix)}
        adapter.install_empty(block, layers)
    if meta.get("head"):
        vocab.install_empty(model, meta["head"])            # before tie_weights(), which then leaves them alone
    state = {}
    for name in meta["files"]:
        try:
            state.update(load_file(path / name))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name} cannot be read ({e}); re-run `lowbit quantize`") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in meta.get("tied", {})]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"{path}: tensors never loaded: {on_meta[:3]}")
    model.eval()
    model.lowbit_meta = meta
    return model
