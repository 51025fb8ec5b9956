"""Assemble the per-row JSON files into ``peers.json`` and the Markdown table ``peers.md``."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform

from .common import storage_summary, version
from .rows import GROUPS, Row

MISSING = "–"


def _num(x, fmt: str) -> str:
    if x is None:
        return MISSING
    if isinstance(x, str):                       # "inf"/"nan" written by a diverged model
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt)


def _ppl(x) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x) and x >= 1e4:
        return f"{x:.3g}"
    return _num(x, ".2f")


def _cell(s: str, limit: int = 240) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def cpu_summary() -> str:
    """The CPU a row ran on, as far as speed depends on it: model name and widest vector / bf16 support."""
    from lowbit.cpu import summary

    return summary()


def row_note(rec: dict) -> str:
    status = rec.get("status")
    if status == "ok":
        notes = list(rec.get("notes") or [])
        if rec.get("cpu"):
            notes.insert(0, f"ran on {rec['cpu']}")
        return "; ".join(notes)
    if status == "skipped":
        return f"skipped: {rec.get('error')}"
    if status == "not run":
        return rec.get("error") or "not run yet"
    return f"{status}: {rec.get('error')}"


def markdown(records: list[dict], settings: dict, header: dict) -> str:
    lines = [f"# Peers benchmark: {settings['model']}, lowbit against PyPI quantization libraries", ""]
    lines.append(
        f"wiki, {settings['windows']} windows x {settings['seqlen']} tokens (lowbit.evaluate.quality, the same "
        f"windows for every row; KL and top-1 against the fp32 model). Calibration for every calibrated row: "
        f"{header['calibration']}. Each row ran in its own process; {header['threads']}. "
        f"torch {header['versions'].get('torch')}, transformers {header['versions'].get('transformers')}, "
        f"{header['machine']}. Written {header['created']}. Rows ran on 2-core virtual machines: those whose "
        f"note names no CPU on an AMD EPYC with AVX-512 BF16 (before 2026-12-04), the others on the CPU their note "
        f"names (rows on different CPUs differ in speed: compare quantize times within one CPU); "
        f"lowbit's calibration passes run in bf16 only where the CPU has native bf16, else fp32.")
    if settings.get("calib_windows") or settings.get("iters"):
        lines.append("")
        lines.append(f"**Development settings**: calibration windows {settings.get('calib_windows')}, "
                     f"auto-round iterations {settings.get('iters')}: not the benchmark's numbers.")
    legend = ("*bits/weight*: 8 x (every byte the library keeps for the 210 decoder linear layers: codes, "
              "scales, zero points, shifts, g_idx, shapes ...) / (weights of those layers); an fp32 layer "
              "counts 32. *packed?*: whether those layers' codes are stored as packed integers of about the "
              "nominal width. *quantize s*: the library's quantize call only. *peak RSS*: VmHWM after "
              "quantizing / at the end of the row (the row also holds the fp32 reference for KL). "
              "The storage table below lists what each library stores.")
    lines += ["", legend, ""]
    head = ["row", "library", "config", "bits/weight", "packed?", "PPL", "KL mean", "top-1 %", "quantize s",
            "peak RSS MB", "note / error"]
    for key, title in GROUPS.items():
        group = [r for r in records if r["group"] == key]
        if not group:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |",
                  "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in group:
            q = r.get("quality") or {}
            st = r.get("storage") or {}
            lib = r["library"] + (f" {r['version']}" if r.get("version") else "")
            rss = MISSING
            if r.get("peak_rss_mb"):
                rss = f"{_num(r.get('peak_rss_quantize_mb'), '.0f')} / {r['peak_rss_mb']:.0f}"
            top1 = q.get("top1_agreement")
            cells = [r["name"], lib, _cell(r["config"]), _num(st.get("bits_per_weight"), ".3f"),
                     _cell(st.get("packed", MISSING)), _ppl(q.get("perplexity")), _num(q.get("kl_mean"), ".4f"),
                     _num(None if top1 is None else 100 * top1, ".1f"), _num(r.get("quantize_s"), ".1f"), rss,
                     _cell(row_note(r))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    stored = [r for r in records if r.get("storage")]
    if stored:
        lines += ["## What each row stores for the decoder linear layers", "",
                  "Per tensor kind: dtype and its share of the bits per weight (summed over the 210 layers).", "",
                  "| row | module type | tensors (dtype, bits/weight) | bytes |", "| --- | --- | --- | ---: |"]
        for r in stored:
            st = r["storage"]
            types = ", ".join(f"{t.split('.', 1)[0]}.{t.rsplit('.', 1)[-1]}"
                              + (f" x{n}" if len(st["module_types"]) > 1 else "")
                              for t, n in st["module_types"].items())
            extra = f" ({st['format']})" if st.get("format") else ""
            lines.append(f"| {r['name']} | {types}{extra} | {_cell(storage_summary(st), 400)} | {st['bytes']:,} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def header_info(settings: dict, calibration: str) -> dict:
    threads = settings.get("threads")
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {d: version(d) for d in ("torch", "transformers", "lowbit", "hqq", "optimum-quanto", "torchao",
                                             "llmcompressor", "compressed-tensors", "auto-round", "datasets")},
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": f"torch threads {threads}" if threads else "torch's default thread count",
        "calibration": calibration,
    }


def placeholder(row: Row, status: str, error: str | None) -> dict:
    from .common import version as v

    return {"name": row.name, "group": row.group, "library": row.library, "dist": row.dist,
            "version": v(row.dist), "config": row.config, "bits": row.bits, "status": status, "error": error}
