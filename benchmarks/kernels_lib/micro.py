"""Machine read bandwidth, and every candidate kernel at SmolLM2-135M's linear shapes against fp32 ``F.linear``.

Weights are random codes of the right layout (speed does not depend on their values); each
format's spec is the lowbit preset's (``Recipe.preset(name).spec``: w8 symmetric per channel,
the others asymmetric). Every kernel registered in ``lowbit.kernels.KERNELS`` that ``supports``
a format and is ``available`` is timed, next to an fp32 ``F.linear`` of the same shape, all in
interleaved rounds (best call of each round, best round), and ``lowbit.kernels.choose`` says
which one lowbit would run.

Caches: a decode step reads more weight bytes than the last-level cache holds (85 MB for w4g128
with the int8 head against a 32 MiB L3 here), so each layer's weights come from memory, while a
micro-benchmark calling one small layer again and again reads them from L2/L3 (and can exceed
the memory's bandwidth). At m = 1 each case is therefore timed twice: *cold*, with a read of a
buffer four times the last-level cache before every timed call (untimed) so the weights come from
memory, and *hot* (repeated calls, weights cached). A cold call also pays what a flush costs besides
the data (TLB and page-table misses on every page, the stream prefetchers starting over), which a
decode step's back-to-back layers do not, so m = 1 is timed a third way, *stream*, for fp32, the
kernel ``choose`` picks and ``fused_q8``: one sweep calls the kernel on as many distinct copies of
the layer as fill twice the last-level cache, back to back, and a call costs the sweep's time over
the copies -- the figure the GEMV bandwidth target uses. For lowbit's fused kernels the same sweep is
also timed from a C++ loop (``torch.ops.lowbit.time_linear_stream``: each call prepares x and runs the
rows in one ``at::parallel_for``, as a decode step's C++ calls a linear), without the few microseconds
of a Python call and operator dispatch that the per-call figure includes. m = 64 (a prefill) is timed hot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.formats import GroupedInt, QuantSpec
from lowbit.recipe import Recipe

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]   # (in, out); the last is the head
FORMATS = ("w8", "w4g128", "w3g128", "w2g64")                             # lowbit presets


def spec_of(preset: str) -> QuantSpec:
    return Recipe.preset(preset).spec


def random_format(out_f: int, in_f: int, spec: QuantSpec) -> GroupedInt:
    """Random codes, scales (and zeros) of the layout ``spec`` gives an (out_f, in_f) weight."""
    g = torch.Generator().manual_seed(out_f + in_f)
    q = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g).to(torch.uint8)
    n = spec.n_groups(in_f)
    scale = (torch.rand(out_f, n, generator=g) * 0.02 + 0.001).half()
    zero = None if spec.symmetric else (torch.rand(out_f, n, generator=g) * spec.maxq).half()
    return GroupedInt.pack(q, scale, zero, spec)


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_bandwidth(threads: int, mib: int = 512, reps: int = 10) -> float:
    """GB/s of ``t.sum()`` over a ``mib`` MiB fp32 tensor on ``threads`` threads, best of ``reps``."""
    torch.set_num_threads(threads)
    t = torch.rand(mib * 2**20 // 4)
    t.sum()
    best = min(_timed(t.sum) for _ in range(reps))
    return t.numel() * 4 / best / 1e9


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), 32 MiB where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)


def evictor() -> Callable[[], object]:
    """A call that reads a buffer four times the last-level cache, pushing earlier data out of every cache."""
    buf = torch.ones(4 * last_level_cache_bytes() // 4)
    return buf.sum


def bench(cases: dict[str, Callable], rounds: int, budget_s: float,
          before: Callable[[], object] | None = None) -> dict[str, float]:
    """Best seconds per call of each case over ``rounds`` interleaved rounds of about ``budget_s`` per case;
    ``before`` (untimed) runs ahead of every timed call."""
    best = {k: float("inf") for k in cases}
    for fn in cases.values():
        fn()                                                                # warm up
    for _ in range(rounds):
        for k, fn in cases.items():
            end, n = time.perf_counter() + budget_s, 0
            while n < 3 or time.perf_counter() < end:
                if before is not None:
                    before()
                best[k] = min(best[k], _timed(fn))
                n += 1
    return best


def candidates(fmt: GroupedInt) -> list[kernels.Kernel]:
    """The kernels ``choose`` considers for ``fmt``, plus the int8-activation kernel (``fused_q8``) where this CPU
    runs it even when ``LOWBIT_INT8_ACT=0`` leaves it out of the choice, so the table shows its speed too."""
    from lowbit.kernels import _ext

    return [k for k in kernels.KERNELS.values() if k.supports(fmt)
            and (k.available() or (k.name == "fused_q8" and _ext.q8_available()))]


def run_shape(in_f: int, out_f: int, threads: int, rows: tuple[int, ...], rounds: int, budget_s: float) -> dict:
    """Microseconds per call of fp32 ``F.linear`` and of every candidate for every format, at each m in ``rows``
    (m = 1 cold and hot, other m hot).

    Returns ``{"in", "out", "threads", "results": [{"format", "kernel", "m", "cold", "us", "fp32_us",
    "weight_bytes", "chosen"}]}``; ``chosen`` marks the kernel ``lowbit.kernels.choose`` picks.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f)                                       # (out, in) fp32 baseline
    formats = {name: random_format(out_f, in_f, spec_of(name)) for name in FORMATS}
    states = {(name, k.name): k.prepare(fmt) for name, fmt in formats.items() for k in candidates(fmt)}
    evict = evictor()
    results = []
    timings = [(m, cold) for m in rows for cold in ((True, False) if m == 1 else (False,))]
    for m, cold in timings:
        x = torch.randn(m, in_f)                                            # (m, in)
        cases = {"fp32": lambda x=x: F.linear(x, weight)}
        for (name, kname), state in states.items():
            k, fmt = kernels.KERNELS[kname], formats[name]
            cases[f"{name}/{kname}"] = lambda x=x, k=k, fmt=fmt, s=state: k.run(x, fmt, s)
        with torch.inference_mode():
            best = bench(cases, rounds, budget_s, evict if cold else None)
            chosen = {name: kernels.choose(fmt, m, {}).name for name, fmt in formats.items()}
        for name, kname in states:
            results.append({"format": name, "kernel": kname, "m": m, "cold": cold, "us": best[f"{name}/{kname}"] * 1e6,
                            "fp32_us": best["fp32"] * 1e6, "weight_bytes": formats[name].nbytes(),
                            "chosen": chosen[name] == kname})
    if 1 in rows:
        results += _stream(weight, formats, in_f, rounds, budget_s)
    return {"in": in_f, "out": out_f, "threads": threads, "llc_bytes": last_level_cache_bytes(), "results": results}


def _copies(nbytes: int) -> int:
    """Distinct copies of a layer of ``nbytes`` that fill twice the last-level cache (at least two)."""
    return max(2, -(-2 * last_level_cache_bytes() // max(nbytes, 1)))


def _stream(weight: torch.Tensor, formats: dict[str, GroupedInt], in_f: int, rounds: int, budget_s: float) -> list[dict]:
    """m = 1 *stream* timings (module docstring): fp32 ``F.linear`` and, per format, the chosen kernel and
    ``fused_q8``, each over distinct copies of the layer called back to back; seconds per call."""
    x = torch.randn(1, in_f)
    ws = [weight.clone() for _ in range(_copies(weight.numel() * 4))]
    cases = {"fp32": lambda: [F.linear(x, w) for w in ws]}
    per = {"fp32": len(ws)}
    picks, plans_of = [], {}
    with torch.inference_mode():
        for name, fmt in formats.items():
            chosen = kernels.choose(fmt, 1, {}).name
            for k in candidates(fmt):
                if k.name not in (chosen, "fused_q8"):
                    continue
                copies = [GroupedInt(fmt.codes.clone(), fmt.scale.clone(), None if fmt.zero is None else fmt.zero.clone(),
                                     fmt.spec, fmt.in_features) for _ in range(_copies(fmt.nbytes()))]
                plans = [(c, k.prepare(c)) for c in copies]
                plans_of[f"{name}/{k.name}"] = plans
                cases[f"{name}/{k.name}"] = lambda k=k, plans=plans: [k.run(x, c, st) for c, st in plans]
                per[f"{name}/{k.name}"] = len(plans)
                picks.append((name, k.name, k.name == chosen))
        best = bench(cases, rounds, budget_s)
        # the same sweeps from a C++ loop (torch.ops.lowbit.time_linear_stream): the kernel as a decode step's
        # C++ calls it, without the ~3-5 us of a Python call and operator dispatch around each call
        cpp = {}
        for name, kname, _ in picks:
            if kname not in ("fused", "fused_q8"):
                continue
            states = [st for _, st in plans_of[f"{name}/{kname}"]]
            if any(st is None for st in states):
                continue
            st0 = states[0]
            secs = torch.ops.lowbit.time_linear_stream(
                x[0].contiguous(), [st.codes for st in states], [st.scale for st in states],
                [torch.empty(0) if st.zero is None else st.zero for st in states], st0.bits, st0.group_size,
                in_f, max(st0.layout, 1) if kname == "fused_q8" else 0, max(5, 3 * rounds))
            cpp[(name, kname)] = min(secs)
    fp32_us = best["fp32"] / per["fp32"] * 1e6
    rows = [{"format": name, "kernel": kname, "m": 1, "cold": False, "stream": True,
             "us": best[f"{name}/{kname}"] / per[f"{name}/{kname}"] * 1e6, "fp32_us": fp32_us,
             "weight_bytes": formats[name].nbytes(), "chosen": chosen, "copies": per[f"{name}/{kname}"]}
            for name, kname, chosen in picks]
    rows += [{"format": name, "kernel": kname, "m": 1, "cold": False, "stream": True, "cpp_loop": True,
              "us": cpp[(name, kname)] * 1e6, "fp32_us": fp32_us, "weight_bytes": formats[name].nbytes(),
              "chosen": chosen, "copies": per[f"{name}/{kname}"]}
             for name, kname, chosen in picks if (name, kname) in cpp]
    return rows
