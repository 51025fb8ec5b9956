"""Micro-benchmark of the ``fused`` CPU kernel at SmolLM2-135M's linear shapes, against fp32 ``F.linear``.

For each (in, out) shape and format (4-bit g128, 8-bit per channel, 2-bit g64, 3-bit g128, asymmetric)
it times one call of the fused kernel at m rows of x (default m = 1 and 64) and an fp32 ``F.linear`` of
the same shape in the same run, on 1 and on 2 threads, and reports microseconds per call (best of many,
measured in interleaved rounds), the ratio to fp32, and for m = 1 the bytes of codes + scales + zeros
read per second, as a share of the machine's read bandwidth measured first with a big tensor sum.

    python benchmarks/kernels_micro.py                        # all shapes, m = 1 and 64, 1 and 2 threads
    python benchmarks/kernels_micro.py --rows 1 --threads 2   # a quick look
    LOWBIT_ISA=avx2 python benchmarks/kernels_micro.py        # the AVX2 path on an AVX-512 machine

Prints a Markdown table and writes benchmarks/results/kernels_micro.{json,md}.  Timings on shared
machines are noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.cache import atomic_file
from lowbit.formats import GroupedInt, QuantSpec
from lowbit.kernels import _ext, fused_info

HERE = Path(__file__).parent
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]       # (in, out); the last is the head
SPECS = {"w4g128": QuantSpec(4, 128, False), "w8": QuantSpec(8, -1, False), "w2g64": QuantSpec(2, 64, False),
         "w3g128": QuantSpec(3, 128, False)}


def random_format(out_f: int, in_f: int, spec: QuantSpec) -> GroupedInt:
    g = torch.Generator().manual_seed(out_f + in_f)
    q = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g).to(torch.uint8)
    n = spec.n_groups(in_f)
    scale = (torch.rand(out_f, n, generator=g) * 0.02 + 0.001).half()
    zero = None if spec.symmetric else (torch.rand(out_f, n, generator=g) * spec.maxq).half()
    return GroupedInt.pack(q, scale, zero, spec)


def read_bandwidth(threads: int, mib: int = 512, reps: int = 10) -> float:
    """GB/s of ``t.sum()`` over a ``mib`` MiB fp32 tensor, best of ``reps``."""
    torch.set_num_threads(threads)
    t = torch.rand(mib * 2**20 // 4)
    t.sum()
    best = min(_timed(t.sum) for _ in range(reps))
    return t.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(cases: dict, rounds: int, budget_s: float) -> dict:
    """Best seconds per call of each case, over ``rounds`` interleaved rounds of about ``budget_s`` each."""
    best = {k: float("inf") for k in cases}
    for fn in cases.values():
        fn()                                                                        # warm up
    for _ in range(rounds):
        for k, fn in cases.items():
            end, n = time.perf_counter() + budget_s, 0
            while n < 3 or time.perf_counter() < end:
                best[k] = min(best[k], _timed(fn))
                n += 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,64", help="rows of x (comma separated)")
    ap.add_argument("--threads", default="1,2", help="thread counts (comma separated)")
    ap.add_argument("--specs", default=",".join(SPECS), help=f"formats among {', '.join(SPECS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.03, help="seconds per case per round")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kernels_micro")
    args = ap.parse_args()
    rows = [int(v) for v in args.rows.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    specs = {k: SPECS[k] for k in args.specs.split(",")}
    info = fused_info()
    if not info["available"]:
        raise SystemExit(f"the fused kernel is unavailable here: {info['reason']}")

    layers = {}
    for in_f, out_f in SHAPES:
        weight = torch.randn(out_f, in_f)
        for name, spec in specs.items():
            fmt = random_format(out_f, in_f, spec)
            layers[(in_f, out_f, name)] = (fmt, _ext.prepare(fmt), weight)

    results = []
    bandwidth = {}
    for nt in threads:
        bandwidth[nt] = read_bandwidth(nt)
        torch.set_num_threads(nt)
        for in_f, out_f in SHAPES:
            for m in rows:
                x = torch.randn(m, in_f)
                weight = layers[(in_f, out_f, next(iter(specs)))][2]
                cases = {"fp32": lambda x=x, w=weight: F.linear(x, w)}
                for name in specs:
                    _, plan, _ = layers[(in_f, out_f, name)]
                    cases[name] = lambda x=x, p=plan: _ext.linear(x, p)
                best = bench(cases, args.rounds, args.budget)
                for name in specs:
                    fmt = layers[(in_f, out_f, name)][0]
                    nbytes = fmt.nbytes()
                    results.append({
                        "threads": nt, "in": in_f, "out": out_f, "rows": m, "format": name,
                        "us": best[name] * 1e6, "fp32_us": best["fp32"] * 1e6, "x_fp32": best[name] / best["fp32"],
                        "weight_bytes": nbytes, "GB_per_s": nbytes / best[name] / 1e9,
                        "of_bandwidth": nbytes / best[name] / 1e9 / bandwidth[nt],
                    })
                    print(f"threads={nt} {in_f:5d}->{out_f:5d} m={m:2d} {name:7s} {best[name] * 1e6:9.1f} us"
                          f"  fp32 {best['fp32'] * 1e6:9.1f} us  x{best[name] / best['fp32']:5.2f}", flush=True)

    md = [f"fused kernel, ISA path `{info['isa']}` (CPU best `{info['cpu_isa']}`), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; read bandwidth (fp32 tensor sum) "
          + ", ".join(f"{bandwidth[nt]:.1f} GB/s on {nt} thread{'s' * (nt > 1)}" for nt in threads) + ".", "",
          "| threads | in -> out | rows | format | fused us | fp32 F.linear us | fused / fp32 | GB/s (m=1) | % of bandwidth |",
          "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        gbs = f"{r['GB_per_s']:.1f}" if r["rows"] == 1 else "–"
        pct = f"{100 * r['of_bandwidth']:.0f}" if r["rows"] == 1 else "–"
        md.append(f"| {r['threads']} | {r['in']} -> {r['out']} | {r['rows']} | {r['format']} | {r['us']:.1f} | "
                  f"{r['fp32_us']:.1f} | {r['x_fp32']:.2f} | {gbs} | {pct} |")
    text = "\n".join(md) + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"fused_info": info, "bandwidth_GB_per_s": bandwidth, "results": results}, indent=1))
    with atomic_file(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    main()
