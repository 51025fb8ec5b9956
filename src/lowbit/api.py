"""The public Python API: load a model, quantize it, save, load back, evaluate."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import transformers
from torch import nn

from lowbit import checkpoint
from lowbit.data import calibration_windows, load_text
from lowbit.decoding import fast_decode
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel, SourceInfo, resolve_source
from lowbit.models import load_model as _load_source
from lowbit.models.adapters import get_adapter
from lowbit.models.lazy import LazyWeights
from lowbit.offload import Offload
from lowbit.pipeline import QuantizeReport, quantize_model
from lowbit.recipe import Recipe

log = logging.getLogger("lowbit")


def load_model(spec: str | os.PathLike) -> LoadedModel:
    """A built-in name, a Hugging Face directory, a ``.gguf`` file, or a lowbit checkpoint."""
    spec = str(spec)
    if checkpoint.is_checkpoint(spec):
        model = checkpoint.load(spec)
        fast_decode(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
        meta = model.lowbit_meta
        return LoadedModel(model, tokenizer, SourceInfo(spec, "lowbit", spec, meta["files"][checkpoint.TENSOR_FILE]["sha256"]))
    return _load_source(spec)


def load(path: str | os.PathLike, compile: bool | None = None) -> transformers.PreTrainedModel:
    """A checkpoint written by :func:`save` / ``lowbit quantize``, as an ordinary transformers model.

    Its ``generate()`` takes the lean decode path (:func:`lowbit.decoding.fast_decode`: static KV cache,
    llama-style decoder layers fused into one call per token, a compiled decode step where layers do not
    fuse) unless ``compile=False``; ``compile=True`` compiles even a fully fused model, ``LOWBIT_COMPILE=0``
    never compiles."""
    model = checkpoint.load(path)
    fast_decode(model, compile)
    return model


@dataclass
class Quantized:
    """A quantized model, with what is needed to save it.

    After an offloaded run (``offload_dir``) the blocks live in the offload directory, not in
    ``model``: save it, then :func:`load` the checkpoint to run it.
    """

    model: nn.Module
    tokenizer: object
    report: QuantizeReport
    source: dict
    offload: Offload | None = None

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        out = checkpoint.save(self.model, self.tokenizer, path, self.report, self.source, force=force,
                              offload=self.offload)
        if self.offload is not None:
            self.offload.clear()                       # the checkpoint now holds every block
        return out


def quantize(model: str | os.PathLike | LoadedModel, recipe: str | Recipe = "w4g128", progress: bool = True,
             offload_dir: str | os.PathLike | None = None) -> Quantized:
    """Quantize a model (a source spec or a :class:`LoadedModel`) following a recipe (preset name, file or Recipe).

    ``offload_dir``: record each finished block there, so that the same call after an
    interruption resumes where it stopped; a model given by a built-in name or a safetensors
    directory is then also read block by block from disk (memory: about one block plus the
    calibration activations).
    """
    recipe = Recipe.resolve(recipe)
    offload = Offload(offload_dir) if offload_dir is not None else None
    lazy = None
    source = None if isinstance(model, LoadedModel) or offload is None or checkpoint.is_checkpoint(model) \
        else resolve_source(str(model))
    if isinstance(model, LoadedModel):
        loaded = model
    elif source is not None and source.kind != "gguf":                  # safetensors on disk: read lazily
        config = transformers.AutoConfig.from_pretrained(source.path)
        lazy = LazyWeights.open(source.path, keep_on_meta=(get_adapter(config.model_type).blocks_path,))
        loaded = LoadedModel(lazy.model, transformers.AutoTokenizer.from_pretrained(source.path), source)
    else:
        loaded = load_model(model)
    if loaded.source.kind == "lowbit":
        raise LowbitError(f"{loaded.source.spec} is already quantized; quantize the original model instead")
    windows, calib = None, None
    if recipe.needs_calibration:
        cal = recipe.calibration
        text, info = load_text(cal.corpus)
        windows = calibration_windows(loaded.tokenizer, text, cal.seqlen, cal.windows, cal.seed)
        calib = {"corpus": info.to_dict(), "windows": cal.windows, "seqlen": cal.seqlen, "seed": cal.seed,
                 "forward_dtype": str(recipe.calibration_dtype).removeprefix("torch.")}
    report = quantize_model(loaded.model, recipe, windows, progress=progress, offload=offload, lazy=lazy,
                            source_fingerprint=loaded.source.sha256)
    report.calibration = calib
    return Quantized(loaded.model, loaded.tokenizer, report, loaded.source.to_dict(), offload)


def save(quantized: Quantized, path: str | os.PathLike, force: bool = False) -> Path:
    return quantized.save(path, force=force)
