"""Spine benchmark: SmolLM2-135M in fp32 against RTN w8, w4g128, w3g128, w2g64, in one run.

Reports perplexity and KL divergence / top-1 agreement to fp32 on the same wiki windows,
honest bits per weight, bytes on disk, peak RSS of a process that loads the model and
generates, and greedy decode tokens/s as a ratio to fp32 measured in the same run.

    python benchmarks/spine.py                      # 64 windows x 512 tokens (about 15 minutes)
    python benchmarks/spine.py --windows 8          # a quick look

Checkpoints go to benchmarks/.work/ and are reused when their recipe matches (delete the folder
to start over); results are written to benchmarks/results/spine.{json,md}.
"""

from __future__ import annotations

import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)
import argparse
import json
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.cache import atomic_file
from lowbit.evaluate.result import results_to_json

HERE = Path(__file__).parent
PRESETS = ["w8", "w4g128", "w3g128", "w2g64"]


def checkpoint_for(model: str, preset: str, work: Path) -> tuple[Path, dict]:
    path = work / f"{model}-{preset}"
    recipe = lowbit.Recipe.preset(preset).to_dict()
    meta_file = path / "lowbit.json"
    if not (meta_file.exists() and json.loads(meta_file.read_text())["recipe"] == recipe):
        q = lowbit.quantize(model, preset)
        q.save(path, force=True)
    meta = json.loads(meta_file.read_text())
    return path, meta


def disk_bytes(path: str) -> int | None:
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else None


def table(results, quantize_s: dict, disk: dict) -> str:
    head = ["model", "bits/weight", "disk MB", "PPL", "KL mean", "top-1 %", "decode tok/s", "× fp32", "peak RSS MB",
            "quantize s"]
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in results:
        q, s = r.quality, r.speed
        cells = [r.name, f"{r.bits_per_weight:.3f}", f"{disk[r.name] / 1e6:.1f}" if disk.get(r.name) else "–",
                 f"{q.perplexity:.2f}", f"{q.kl_mean:.4f}", f"{100 * q.top1_agreement:.1f}",
                 f"{s.decode_tokens_per_s:.1f}" if s else "–", f"{r.speed_ratio:.2f}" if r.speed_ratio else "–",
                 f"{r.peak_rss_bytes / 1e6:.0f}" if r.peak_rss_bytes else "–",
                 f"{quantize_s[r.name]:.1f}" if r.name in quantize_s else "–"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    ckpts, quantize_s = {}, {}
    for preset in args.presets:
        path, meta = checkpoint_for(args.model, preset, args.work)
        ckpts[path.name] = str(path)
        quantize_s[path.name] = meta["quantize_seconds"]
    report = lowbit.evaluate(list(ckpts.values()), reference=args.model, corpus="wiki", seqlen=args.seqlen,
                             windows=args.windows, new_tokens=args.new_tokens)
    disk = {r.name: disk_bytes(r.model) or r.total_bytes for r in report.results}
    md = (f"# Spine benchmark: {args.model}, RTN presets against fp32\n\n"
          f"wiki, {args.windows} windows x {args.seqlen} tokens; decode: greedy, {args.new_tokens} new tokens, "
          f"median of 3, {torch.get_num_threads()} threads; `× fp32` is decode tokens/s relative to fp32 in this run. "
          f"fp32 disk size is its safetensors directory.\n\n" + table(report.results, quantize_s, disk))
    doc = results_to_json(report.results, {"benchmark": "spine", "model": args.model, "windows": args.windows,
                                           "seqlen": args.seqlen, "quantize_seconds": quantize_s, "disk_bytes": disk})
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "spine.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    with atomic_file(args.out / "spine.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
