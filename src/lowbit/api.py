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
from lowbit.errors import LowbitError
from lowbit.models import LoadedModel, SourceInfo
from lowbit.models import load_model as _load_source
from lowbit.pipeline import QuantizeReport, quantize_model
from lowbit.recipe import Recipe

log = logging.getLogger("lowbit")


def load_model(spec: str | os.PathLike) -> LoadedModel:
    """A built-in name, a Hugging Face directory, a ``.gguf`` file, or a lowbit checkpoint."""
    spec = str(spec)
    if checkpoint.is_checkpoint(spec):
        model = checkpoint.load(spec)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
        meta = model.lowbit_meta
        return LoadedModel(model, tokenizer, SourceInfo(spec, "lowbit", spec, meta["files"][checkpoint.TENSOR_FILE]["sha256"]))
    return _load_source(spec)


def load(path: str | os.PathLike) -> transformers.PreTrainedModel:
    """A checkpoint written by :func:`save` / ``lowbit quantize``, as an ordinary transformers model."""
    return checkpoint.load(path)


@dataclass
class Quantized:
    """A model quantized in memory, with what is needed to save it."""

    model: nn.Module
    tokenizer: object
    report: QuantizeReport
    source: dict

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        return checkpoint.save(self.model, self.tokenizer, path, self.report, self.source, force=force)


def quantize(model: str | os.PathLike | LoadedModel, recipe: str | Recipe = "w4g128", progress: bool = True) -> Quantized:
    """Quantize a model (a source spec or a :class:`LoadedModel`) following a recipe (preset name, file or Recipe)."""
    recipe = Recipe.resolve(recipe)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if loaded.source.kind == "lowbit":
        raise LowbitError(f"{loaded.source.spec} is already quantized; quantize the original model instead")
    windows, calib = None, None
    if recipe.needs_calibration:
        cal = recipe.calibration
        text, info = load_text(cal.corpus)
        windows = calibration_windows(loaded.tokenizer, text, cal.seqlen, cal.windows, cal.seed)
        calib = {"corpus": info.to_dict(), "windows": cal.windows, "seqlen": cal.seqlen, "seed": cal.seed}
    report = quantize_model(loaded.model, recipe, windows, progress=progress)
    report.calibration = calib
    return Quantized(loaded.model, loaded.tokenizer, report, loaded.source.to_dict())


def save(quantized: Quantized, path: str | os.PathLike, force: bool = False) -> Path:
    return quantized.save(path, force=force)
