"""GPU kernels benchmark: lowbit's Triton kernels (``lowbit[gpu]``) at SmolLM2's shapes on a CUDA device.

For each shape (out x in: 576x576, 192x576, 1536x576, 576x1536 and the 49152x576 head), bit width (2, 3, 4
at group 128 with int zero points; 8 per channel) and row count (1 and 8 for decode, 512 for prefill):
microseconds per call of the Triton kernel, of the reference kernel (dequantize, then ``F.linear``) and of
``F.linear`` on the dense weight in fp16 and fp32; the bytes the kernel must read (codes, scales, zeros and
x) and the rate it reads them at, as a fraction of the device's read bandwidth measured in the same run (a
1 GiB tensor reduction).  Every timed call reads weights that are not in the L2 cache: the layer is copied
enough times to fill 4x the L2 and the calls rotate through the copies.  The kernel's result is checked
against the reference in float64 first (max error relative to max |y|).

    python benchmarks/gpu_kernels.py                  # writes benchmarks/results/gpu_kernels.{json,md}
    python benchmarks/gpu_kernels.py --quick          # fewer shapes and repeats (a first look)
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --dry-run --out /tmp/g   # check the script on a CPU

Needs a CUDA device and Triton (``pip install -e '.[gpu]'``); without them it says so in one line, exits 0
and writes nothing (CI has no GPU: this benchmark is run by hand on a lent GPU machine).
"""

from __future__ import annotations

import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
QUICK_SHAPES = [(1536, 576), (49152, 576)]
SPECS = [(4, 128), (3, 128), (2, 128), (8, -1)]


DEVICE = "cuda"          # --dry-run: "cpu" (Triton's interpreter; checks this script, measures nothing real)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean microseconds of ``calls`` back-to-back calls."""
    samples = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        _sync()
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


def read_bandwidth(numel: int = 256 * 1024 * 1024) -> float:
    """GB/s of a 1 GiB fp32 tensor sum (best of 10)."""
    t = torch.ones(numel, device=DEVICE)
    t.sum()
    best = float("inf")
    for _ in range(10):
        _sync()
        t0 = time.perf_counter()
        t.sum()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def random_layer(out_f: int, in_f: int, bits: int, group: int, seed: int):
    from lowbit.formats import GroupedInt, QuantSpec

    spec = QuantSpec(bits, group, False, bits != 8)
    g = torch.Generator().manual_seed(seed)
    n_groups = spec.n_groups(in_f)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.001).half()
    zero = torch.randint(0, 2**bits, (out_f, n_groups), generator=g).half()
    if not spec.int_zero:
        zero = zero + 0.5
    fmt = GroupedInt.pack(q, scale, zero, spec)
    return GroupedInt(fmt.codes.to(DEVICE), fmt.scale.to(DEVICE), fmt.zero.to(DEVICE), spec, in_f)


def measure(out_f, in_f, bits, group, rows, bandwidth, repeats, l2_bytes) -> dict:
    from lowbit.kernels import KERNELS

    triton_k, ref_k = KERNELS["triton"], KERNELS["reference"]
    fmt = random_layer(out_f, in_f, bits, group, seed=out_f + bits)
    x = torch.randn(rows, in_f, device=DEVICE)
    state = triton_k.prepare(fmt)
    y = triton_k.run(x, fmt, state).double()
    y64 = x.double() @ fmt.dequantize().double().t()
    rel_err = ((y - y64).abs().max() / y64.abs().max()).item()
    weight_bytes = fmt.nbytes() + (state[0].numel() * 2 if state[0] is not None and fmt.spec.int_zero else 0)
    copies = max(1, -(-4 * l2_bytes // weight_bytes))
    layers = [fmt] + [type(fmt)(fmt.codes.clone(), fmt.scale.clone(), fmt.zero.clone(), fmt.spec, in_f)
                      for _ in range(copies - 1)]
    states = [state] + [triton_k.prepare(f) for f in layers[1:]]
    dense32 = [f.dequantize() for f in layers[: max(1, -(-4 * l2_bytes // (out_f * in_f * 4)))]]
    dense16 = [w.half() for w in dense32]
    x16 = x.half()
    calls = max(len(layers), 20)
    t_triton = _timed(lambda i: triton_k.run(x, layers[i % len(layers)], states[i % len(layers)]), calls, repeats)
    t_ref = _timed(lambda i: ref_k.run(x, layers[i % len(layers)], None), calls, repeats)
    t_f16 = _timed(lambda i: F.linear(x16, dense16[i % len(dense16)]), calls, repeats)
    t_f32 = _timed(lambda i: F.linear(x, dense32[i % len(dense32)]), calls, repeats)
    read = weight_bytes + x.numel() * 4
    gbs = read / (t_triton * 1e-6) / 1e9
    return {"shape": [out_f, in_f], "bits": bits, "group": group, "rows": rows, "rel_err": rel_err,
            "bytes": read, "triton_us": t_triton, "reference_us": t_ref, "fp16_linear_us": t_f16,
            "fp32_linear_us": t_f32, "triton_gbs": gbs, "bandwidth_fraction": gbs / bandwidth,
            "vs_fp16": t_f16 / t_triton}


def write_tables(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_kernels.json").write_text(json.dumps(result, indent=1))
    lines = [f"# GPU kernels ({result['device']}, read bandwidth {result['bandwidth_gbs']:.0f} GB/s, "
             f"{result['when']})", "",
             "| out x in | bits | group | rows | triton us | GB/s | of bandwidth | reference us | fp16 linear us | "
             "fp32 linear us | fp16 / triton | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['group']} | {r['rows']} | "
                     f"{r['triton_us']:.1f} | {r['triton_gbs']:.0f} | {100 * r['bandwidth_fraction']:.0f} % | "
                     f"{r['reference_us']:.1f} | {r['fp16_linear_us']:.1f} | {r['fp32_linear_us']:.1f} | "
                     f"{r['vs_fp16']:.2f}x | {r['rel_err']:.1e} |")
    (out_dir / "gpu_kernels.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python benchmarks/gpu_kernels.py --quick",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, 4-bit and 8-bit only, fewer repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--dry-run", action="store_true",
                    help="development: tiny shapes on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 "
                         "must be set); checks the script, measures nothing real, writes under --out")
    args = ap.parse_args(argv)
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        from lowbit.kernels import KERNELS

        if "triton" not in KERNELS or not __import__("os").environ.get("TRITON_INTERPRET"):
            print("gpu_kernels: --dry-run needs Triton installed and TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        rows = [measure(o, i, b, g, m, read_bandwidth(2**22), 1, 2**16)
                for o, i in ((40, 576), (7, 13)) for b, g in SPECS for m in (1, 40)]
        write_tables({"device": "cpu (Triton interpreter, dry run)", "bandwidth_gbs": 0.0, "l2_bytes": 2**16,
                      "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, args.out)
        print(f"gpu_kernels: dry run wrote {args.out / 'gpu_kernels.md'}; max rel err "
              f"{max(r['rel_err'] for r in rows):.1e}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    from lowbit.kernels import KERNELS

    if "triton" not in KERNELS:
        print("gpu_kernels: Triton is not installed (pip install -e '.[gpu]'); nothing measured")
        return 0
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    bandwidth = read_bandwidth()
    shapes, specs = (QUICK_SHAPES, [(4, 128), (8, -1)]) if args.quick else (SHAPES, SPECS)
    repeats = 5 if args.quick else 11
    rows = []
    for out_f, in_f in shapes:
        for bits, group in specs:
            for m in (1, 8, 512):
                r = measure(out_f, in_f, bits, group, m, bandwidth, repeats, l2_bytes)
                rows.append(r)
                print(f"{out_f}x{in_f} w{bits} g{group} rows={m}: triton {r['triton_us']:.1f} us "
                      f"({r['triton_gbs']:.0f} GB/s, {100 * r['bandwidth_fraction']:.0f} %), fp16 linear "
                      f"{r['fp16_linear_us']:.1f} us, reference {r['reference_us']:.1f} us, err {r['rel_err']:.1e}",
                      flush=True)
    result = {"device": props.name, "bandwidth_gbs": bandwidth, "l2_bytes": l2_bytes,
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows}
    write_tables(result, args.out)
    print(f"gpu_kernels: wrote {args.out / 'gpu_kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
