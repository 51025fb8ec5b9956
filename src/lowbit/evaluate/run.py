"""``lowbit eval``: load models by spec, score them on the same windows, time them, tabulate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lowbit.data import eval_windows, load_text
from lowbit.evaluate.memory import model_nbytes, peak_rss_of_load
from lowbit.evaluate.quality import evaluate_quality
from lowbit.evaluate.result import EvalResult, markdown_table, results_to_json, with_baseline, write_results
from lowbit.evaluate.speed import decode_speed
from lowbit.head import block_footprint, describe
from lowbit.modules import quant_modules


@dataclass
class EvalReport:
    results: list[EvalResult]
    table: str
    doc: dict


def _label(spec: str, taken: set[str]) -> str:
    name = Path(spec).name if os.path.sep in spec or Path(spec).exists() else spec
    label, i = name, 2
    while label in taken:
        label, i = f"{name}#{i}", i + 1
    taken.add(label)
    return label


def _size(model) -> dict:
    """Bits per weight over the decoder blocks' linear weights (the full-precision dtype's width if none is quantized);
    an 8-bit head (``head: int8``) counts in ``total_bytes`` and gets its own ``extra["head_bits"]``."""
    if quant_modules(model):
        fp, head = block_footprint(model), describe(model)
        extra = {} if head is None else {"extra": {"head_bits": head.bits_per_weight, "head_bytes": head.nbytes}}
        return dict(bits_per_weight=fp.bits_per_weight, quantized_bytes=fp.quantized_bytes, total_bytes=fp.total_bytes,
                    **extra)
    width = 8 * next(model.parameters()).element_size()
    return dict(bits_per_weight=float(width), quantized_bytes=None, total_bytes=model_nbytes(model))


def evaluate_specs(models: Sequence[str], reference: str | None = None, corpus: str = "wiki", seqlen: int = 512,
                   windows: int = 64, speed: bool = True, memory: bool = True, new_tokens: int = 64,
                   json_path: str | os.PathLike | None = None, md_path: str | os.PathLike | None = None,
                   progress: bool = True) -> EvalReport:
    """Evaluate every model in ``models`` (and ``reference``, the baseline) on the same windows of ``corpus``."""
    from lowbit.api import load_model

    specs = ([reference] if reference else []) + [str(m) for m in models]
    taken: set[str] = set()
    labels = [_label(s, taken) for s in specs]
    loaded = {label: load_model(spec) for label, spec in zip(labels, specs)}
    tokenizer = next(iter(loaded.values())).tokenizer
    text, info = load_text(corpus)
    ids = eval_windows(tokenizer, text, seqlen, windows)
    ref_model = loaded[labels[0]].model if reference else None
    quality = evaluate_quality({k: v.model for k, v in loaded.items()}, ids, reference=ref_model, progress=progress)
    results = []
    for label, spec in tqdm(list(zip(labels, specs)), desc="speed/memory", disable=not progress or not (speed or memory)):
        model = loaded[label].model
        size = _size(model)
        results.append(EvalResult(
            name=label, model=spec, quality=quality[label],
            speed=decode_speed(model, tokenizer, new_tokens=new_tokens) if speed else None,
            peak_rss_bytes=peak_rss_of_load(spec) if memory else None,
            corpus={**info.to_dict(), "seqlen": seqlen, "n_windows": windows},
            extra={"source": loaded[label].source.to_dict(), **size.pop("extra", {})},
            **size,
        ))
    baseline = labels[0] if reference else None
    if baseline:
        results = with_baseline(results, baseline)
    meta = {"reference": reference, "corpus": info.to_dict(), "seqlen": seqlen, "windows": windows,
            "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    doc = results_to_json(results, meta)
    if json_path or md_path:
        write_results(results, meta, json_path, md_path)
    return EvalReport(results, markdown_table(results, baseline), doc)
