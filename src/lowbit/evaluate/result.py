"""One result schema for everything ``lowbit eval`` reports, and its JSON and Markdown forms.

JSON layout (``SCHEMA_VERSION`` 1)::

    {"schema_version": 1, "created": "2025-01-01T12:00:00+00:00",
     "versions": {"python": ..., "torch": ..., "transformers": ..., "lowbit": ...},
     "threads": 2, "meta": {...},
     "results": [EvalResult.to_dict(), ...]}

Non-finite floats (a diverged model's perplexity) are written as the strings "inf", "-inf" or
"nan" so the file stays strict JSON; ``EvalResult.from_dict`` reads them back as floats.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.cache import atomic_file
from lowbit.errors import LowbitError
from lowbit.evaluate.quality import QualityResult
from lowbit.evaluate.speed import SpeedResult, ratio

SCHEMA_VERSION = 1
MISSING = "–"  # en dash, shown for a value that was not measured

COLUMNS = (
    "model", "bits/weight", "size MB", "PPL", "ΔPPL % vs baseline", "KL mean", "top-1 %",
    "decode tok/s", "speed × baseline", "peak RSS MB",
)


@dataclass(frozen=True)
class EvalResult:
    """Everything measured about one model; a field left None was not measured."""

    name: str  # short label, e.g. "fp32" or "w4g128"
    model: str  # spec or path the model was loaded from
    quality: QualityResult | None = None
    speed: SpeedResult | None = None
    baseline: str | None = None  # name of the result that speed_ratio and ΔPPL compare against
    speed_ratio: float | None = None  # decode tok/s of this / of baseline
    bits_per_weight: float | None = None  # over quantized linear weights, scales included
    quantized_bytes: int | None = None  # bytes of the quantized weights
    total_bytes: int | None = None  # bytes of all parameters and buffers
    peak_rss_bytes: int | None = None
    corpus: dict = field(default_factory=dict)  # name, split, seqlen, n_windows, sha256, ...
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["quality"] = None if self.quality is None else self.quality.to_dict()
        d["speed"] = None if self.speed is None else self.speed.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EvalResult:
        """Inverse of ``to_dict`` (also of its JSON form)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LowbitError(f"result {d.get('name')!r} has unknown fields {sorted(unknown)}; "
                              f"is it from a newer lowbit? known: {sorted(known)}")
        d = dict(d)
        d["quality"] = None if d.get("quality") is None else QualityResult.from_dict(d["quality"])
        d["speed"] = None if d.get("speed") is None else SpeedResult.from_dict(d["speed"])
        if d.get("speed_ratio") is not None:
            d["speed_ratio"] = float(d["speed_ratio"])
        if d.get("bits_per_weight") is not None:
            d["bits_per_weight"] = float(d["bits_per_weight"])
        return cls(**d)


def with_baseline(results: Sequence[EvalResult], baseline: str) -> list[EvalResult]:
    """Copies of ``results`` with ``baseline`` set and ``speed_ratio`` computed against it."""
    base = _find(results, baseline)
    base_tps = base.speed.decode_tokens_per_s if base.speed else None
    return [
        dataclasses.replace(r, baseline=baseline,
                            speed_ratio=ratio(r.speed.decode_tokens_per_s if r.speed else None, base_tps))
        for r in results
    ]


def results_to_json(results: Sequence[EvalResult], meta: Mapping[str, Any]) -> dict:
    """The JSON document for ``results``: schema version, time, versions, threads, meta."""
    return _json_safe({
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "meta": dict(meta),
        "results": [r.to_dict() for r in results],
    })


def results_from_json(doc: Mapping) -> list[EvalResult]:
    """The results of a document written by ``results_to_json``."""
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LowbitError(f"results file has schema_version {version!r}; this lowbit reads "
                          f"{SCHEMA_VERSION}; re-run `lowbit eval` or upgrade lowbit")
    return [EvalResult.from_dict(r) for r in doc["results"]]


def markdown_table(results: Sequence[EvalResult], baseline: str | None = None) -> str:
    """A GitHub Markdown table, one row per result; "–" marks values not measured.

    ΔPPL is against ``baseline`` (default: the results' own ``baseline`` field). Sizes are in
    MB = 10**6 bytes.
    """
    baseline = baseline or next((r.baseline for r in results if r.baseline), None)
    base = _find(results, baseline) if baseline else None
    base_ppl = base.quality.perplexity if base and base.quality else None
    lines = [_row(COLUMNS), _row(["---"] + ["---:"] * (len(COLUMNS) - 1))]
    for r in results:
        q = r.quality
        ppl = q.perplexity if q else None
        delta = None if ppl is None or not base_ppl else 100.0 * (ppl / base_ppl - 1.0)
        lines.append(_row([
            r.name.replace("|", "\\|"),
            _fmt(r.bits_per_weight, "{:.2f}"),
            _fmt(r.total_bytes, "{:.1f}", scale=1e-6),
            _fmt(ppl, "{:.2f}"),
            _fmt(delta, "{:+.2f}"),
            _fmt(q.kl_mean if q else None, "{:.4f}"),
            _fmt(q.top1_agreement if q else None, "{:.1f}", scale=100.0),
            _fmt(r.speed.decode_tokens_per_s if r.speed else None, "{:.1f}"),
            _fmt(r.speed_ratio, "{:.2f}"),
            _fmt(r.peak_rss_bytes, "{:.0f}", scale=1e-6),
        ]))
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[EvalResult], meta: Mapping[str, Any],
                  json_path: str | os.PathLike | None, md_path: str | os.PathLike | None) -> dict:
    """Write the JSON document and/or the Markdown table (those given), each atomically; return the document."""
    doc = results_to_json(results, meta)
    if json_path is not None:
        with atomic_file(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    if md_path is not None:
        with atomic_file(md_path) as tmp:
            tmp.write_text(markdown_table(results), encoding="utf-8")
    return doc


def _find(results: Sequence[EvalResult], name: str) -> EvalResult:
    for r in results:
        if r.name == name:
            return r
    raise LowbitError(f"baseline {name!r} is not among the results; known: "
                      f"{', '.join(r.name for r in results)}")


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return MISSING if value is None else spec.format(value * scale)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _versions() -> dict[str, str | None]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lowbit": _lowbit_version(),
    }


def _lowbit_version() -> str | None:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        import lowbit

        return getattr(lowbit, "__version__", None)


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by "inf"/"-inf"/"nan" (strict JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
