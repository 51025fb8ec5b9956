"""Assemble the row records into ``kernels.json``, ``kernels.md`` (targets, decode table, kernel table) and
``kernels.png`` (bytes per token against tokens/s, with the read-bandwidth line)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from .common import Settings, pair_name

MISSING = "–"
GEMV_SHAPES = [(576, 1536), (1536, 576), (576, 49152)]     # (in, out): SmolLM2's largest, judged at 4 bits
GEMV_SHARE = 0.60


@dataclass(frozen=True)
class Check:
    """One target: what it asks, the figures, and whether they meet it (None: not measurable)."""

    target: str
    figure: str
    met: bool | None

    def to_dict(self) -> dict:
        return {"target": self.target, "figure": self.figure, "met": self.met}


def _num(x, fmt: str) -> str:
    return MISSING if not isinstance(x, (int, float)) else format(x, fmt)


def _cell(s) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _ok(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok"


def bandwidth(records: dict, threads: int) -> float | None:
    rec = records.get("bandwidth")
    if not _ok(rec):
        return None
    return next((b["GB_per_s"] for b in rec["bandwidth"] if b["threads"] == threads), None)


def status_note(rec: dict) -> str:
    if rec.get("status") == "ok":
        return ""
    return f"{rec.get('status')}: {rec.get('error') or ''}".strip()


# -- end-to-end ----------------------------------------------------------------------------------
def decode_rows(records: dict) -> list[dict]:
    """The decode and llama.cpp records with ratios to the fp32 row and the share of the bandwidth bound."""
    fp32 = records.get("decode-fp32")
    base = fp32 if _ok(fp32) else None
    rows = []
    for rec in records.values():
        if rec["group"] not in ("decode", "llamacpp"):
            continue
        r = dict(rec)
        if _ok(rec) and base and not rec["name"].endswith("-linears"):      # a part of a step: no ratio
            r["x_fp32"] = rec["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            if rec.get("prefill_s") is not None:                   # a linears-only row times no prefill
                r["prefill_x_fp32"] = rec["prefill_s"] / base["prefill_s"]
            r["other_run"] = rec.get("run") != base.get("run")
        rows.append(r)
    return rows


def _decode_table(rows: list[dict], bw: float | None) -> list[str]:
    head = ["row", "engine", "config", "bytes/token MB", "decode tok/s", "× fp32", "prefill ms (tokens)",
            "prefill × fp32", "% of bandwidth bound", "peak RSS MB", "note"]
    out = ["| " + " | ".join(head) + " |", "| --- | --- | --- |" + " ---: |" * 7 + " --- |"]
    for r in rows:
        ok = r.get("status") == "ok"
        bpt, tps = r.get("bytes_per_token"), r.get("decode_tokens_per_s")
        share = 100 * bpt * tps / (bw * 1e9) if ok and bw and bpt else None
        prefill = f"{1e3 * r['prefill_s']:.1f} ({r['prompt_tokens']})" if ok and r.get("prefill_s") is not None else MISSING
        note = status_note(r) or ("† measured in another run than fp32" if r.get("other_run") else "")
        if ok and r["group"] == "llamacpp":
            types = ", ".join(f"{k} x{v}" for k, v in r["tensor_types"].items())
            note = (note + "; " if note else "") + "tensors " + types
        if ok and r.get("decode_kernels"):
            ran = ", ".join(f"{k} x{v}" for k, v in sorted(r["decode_kernels"].items()))
            note = (note + "; " if note else "") + "decode kernels " + ran
        if ok and r.get("fused_layers"):
            note = (note + "; " if note else "") + f"{r['fused_layers']} decoder layers fused"
        out.append("| " + " | ".join([
            r["name"], "llama.cpp" if r["group"] == "llamacpp" else "lowbit", _cell(r["config"]),
            _num(bpt / 1e6 if bpt else None, ".1f"), _num(tps, ".1f"), _num(r.get("x_fp32"), ".2f"), prefill,
            _num(r.get("prefill_x_fp32"), ".2f"), _num(share, ".0f"), _num(r.get("peak_rss_mb"), ".0f"),
            _cell(note)]) + " |")
    return out


def _llamacpp_note(records: dict) -> str:
    built = next((r for r in records.values() if r["group"] == "llamacpp" and _ok(r)), None)
    if built is None:
        return "llama.cpp: no row measured (see the notes above)."
    b = built["build"]
    on = " ".join(k.removeprefix("GGML_") for k, v in b["cmake_options"].items() if k.startswith("GGML_") and v == "ON")
    ggml = f" (ggml {b['ggml_version']})" if b.get("ggml_version") else ""
    return (f"llama.cpp: the sources vendored in llama-cpp-python {b['version']}{ggml}, built here ({b['compiler']}) "
            f"with GGML_NATIVE=OFF and {on}; GGUFs by llama-quantize (F32 from the shipped Q4_1 file, Q8_0 and Q4_0 "
            "from that F32 file, llama.cpp's default tensor types).")


def _pair_section(records: dict) -> list[str]:
    pairs = [r for r in records.values() if r["group"] == "pair"]
    if not pairs:
        return []
    out = ["", "## Head to head", "",
           ("One process per pair: rounds of one timing of each side (lowbit: one `generate()` as the decode rows "
            "time it, one repeat; llama.cpp: `llama-bench -r 1` as its rows), the order swapped every round, so "
            "both sides of a round are measured seconds apart. The median ratio judges the target."), "",
           "| pair | rounds: tok/s of a / b (ratio) | median ratio a / b |", "| --- | --- | ---: |"]
    for r in pairs:
        if not _ok(r) or "a" not in r:
            out.append(f"| {r['name']} | {_cell(status_note(r) or 'an older record: run it again')} | {MISSING} |")
            continue
        cells = "; ".join(f"{x['a']:.1f} / {x['b']:.1f} ({q:.2f})" for x, q in zip(r["rounds"], r["ratios"]))
        out.append(f"| {r['name']} | {cells} | {r['ratio_median']:.2f}× |")
    return out


# -- kernels -------------------------------------------------------------------------------------
def kernel_results(records: dict) -> list[dict]:
    """Every timed (shape, threads, format, m, kernel), flattened, with its row's status."""
    out = []
    bw_run = (records.get("bandwidth") or {}).get("run")
    for rec in records.values():
        if rec["group"] == "kernel" and _ok(rec):
            out += [{"in": rec["in"], "out": rec["out"], "threads": rec["threads"], "other_run": rec["run"] != bw_run,
                     **r} for r in rec["results"]]
    return out


def _kernel_table(results: list[dict], records: dict) -> list[str]:
    head = ["threads", "in -> out", "format", "m", "caches", "kernel", "µs", "fp32 F.linear µs", "speed-up vs fp32",
            "GB/s (m=1)", "% of bandwidth (m=1)"]
    out = ["| " + " | ".join(head) + " |", "| ---: | --- | --- | ---: | --- | --- |" + " ---: |" * 5]
    for r in results:
        bw = bandwidth(records, r["threads"])
        gbs = r["weight_bytes"] / r["us"] / 1e3 if r["m"] == 1 else None
        kernel = f"**{r['kernel']}** (chosen)" if r["chosen"] else r["kernel"]
        out.append("| " + " | ".join([
            str(r["threads"]), f"{r['in']} -> {r['out']}", r["format"], str(r["m"]),
            ("stream, C++ loop" if r.get("cpp_loop") else "stream") if r.get("stream") else "cold" if r.get("cold")
            else "hot", kernel, f"{r['us']:.1f}",
            f"{r['fp32_us']:.1f}", f"{r['fp32_us'] / r['us']:.2f}", _num(gbs, ".1f"),
            _num(100 * gbs / bw if gbs and bw else None, ".0f") + (" †" if gbs and r["other_run"] else "")]) + " |")
    return out


def _kernel_problems(records: dict) -> list[str]:
    return [f"- {rec['name']}: {status_note(rec)}" for rec in records.values()
            if rec["group"] == "kernel" and not _ok(rec)]


# -- targets -------------------------------------------------------------------------------------
def targets(records: dict, settings: Settings) -> list[Check]:
    rows = {r["name"]: r for r in decode_rows(records)}
    checks = [_gemv_check(kernel_results(records), bandwidth(records, settings.threads), settings.threads)]

    def tps(name: str) -> float | None:
        r = rows.get(name)
        return r["decode_tokens_per_s"] if r and r.get("status") == "ok" else None

    def why(name: str) -> str:
        r = rows.get(name)
        return f"{name}: " + (status_note(r) if r else "not run")

    def dagger(a: str, b: str) -> str:
        return " † (measured in different runs)" if rows[a].get("run") != rows[b].get("run") else ""

    def ratio_check(name: str, at_least: float) -> Check:
        r = rows.get(name)
        if tps(name) is None or "x_fp32" not in r:
            missing = name if tps(name) is None else "decode-fp32"
            return Check(f"{_short(name)} decode ≥ {at_least}× fp32", why(missing), None)
        figure = f"{r['x_fp32']:.2f}×" + dagger(name, "decode-fp32")
        return Check(f"{_short(name)} decode ≥ {at_least}× fp32", figure, r["x_fp32"] >= at_least)

    def versus(name: str, other: str, label: str) -> Check:
        a, b = tps(name), tps(other)
        if a is None or b is None:
            return Check(f"{_short(name)} decode ≥ {label}", why(name if a is None else other), None)
        return Check(f"{_short(name)} decode ≥ {label}, separate rows", f"{a:.1f} vs {b:.1f} tok/s" + dagger(name, other),
                     a >= b)

    def faster(name: str, than: str) -> Check:
        a, b = tps(name), tps(than)
        if a is None or b is None:
            return Check(f"{_short(name)} decode faster than {_short(than)}", why(name if a is None else than), None)
        figure = f"{a:.1f} vs {b:.1f} tok/s" + dagger(name, than)
        return Check(f"{_short(name)} decode faster than {_short(than)}, separate rows", figure, a > b)

    def paired(a: str, b: str, label: str, strict: bool) -> Check:
        """The pair row of a against b (names without "decode-"): met when the median ratio a / b is above 1
        (strict) or at least 1."""
        pair = records.get(pair_name(a, b))
        label += ", head to head"
        if not _ok(pair) or "a" not in pair:
            why = status_note(pair) if pair and not _ok(pair) else "an older record: run it again" if pair else "not run"
            return Check(label, f"pair row: {why}", None)
        figure = (f"median {pair['ratio_median']:.2f}× over {len(pair['ratios'])} alternating rounds (range "
                  f"{pair['ratio_min']:.2f}-{pair['ratio_max']:.2f}×; {pair['a_tokens_per_s']:.1f} vs "
                  f"{pair['b_tokens_per_s']:.1f} tok/s)")
        return Check(label, figure, pair["ratio_median"] > 1.0 if strict else pair["ratio_median"] >= 1.0)

    def vs_llamacpp(a: str, qtype: str) -> Check:
        return paired(a, f"llamacpp-{qtype}", f"{a} decode ≥ llama.cpp {qtype}", False)

    def faster_paired(a: str, b: str) -> Check:
        return paired(a, b, f"{a} decode faster than {b}", True)

    d = "decode-"
    checks += [ratio_check(d + "w4g128", 2.5), ratio_check(d + "w4g128-head8", 3.5),
               vs_llamacpp("w4g128-head8", "Q4_0"), versus(d + "w4g128-head8", "llamacpp-Q4_0", "llama.cpp Q4_0")]
    for a, b in (("w2g64", "w4g128"), ("w3g128", "w4g128"), ("w2g64-head8", "w4g128-head8"),
                 ("w3g128-head8", "w4g128-head8")):
        checks += [faster_paired(a, b), faster(d + a, d + b)]
    checks += [ratio_check(d + "w8", 1.7), versus(d + "w8", "llamacpp-Q8_0", "llama.cpp Q8_0"),
               ratio_check(d + "w8-head8", 1.7), vs_llamacpp("w8-head8", "Q8_0"),
               versus(d + "w8-head8", "llamacpp-Q8_0", "llama.cpp Q8_0")]
    for name, r in rows.items():
        if r["group"] == "decode" and name != d + "fp32" and not name.endswith("-linears"):
            x = r.get("prefill_x_fp32")
            figure = _num(x, ".2f") + "×" + dagger(name, d + "fp32") if x else why(name)
            checks.append(Check(f"{_short(name)} prefill ≤ 1.5× fp32's time", figure,
                                None if x is None else x <= 1.5))
    return checks


def _gemv_check(results: list[dict], bw: float | None, threads: int) -> Check:
    target = (f"4-bit GEMV (w4g128, m=1, weights streamed from memory, {threads} threads, the kernel lowbit "
              "chooses) at " + ", ".join(f"{i}->{o}" for i, o in GEMV_SHAPES)
              + f" ≥ {GEMV_SHARE:.0%} of the read bandwidth")
    def stream(cpp: bool, pick) -> dict:
        return {(r["in"], r["out"]): r for r in results
                if r["format"] == "w4g128" and r["m"] == 1 and r.get("stream") and r["threads"] == threads
                and bool(r.get("cpp_loop")) == cpp and pick(r)}

    chosen = stream(False, lambda r: r["chosen"])
    if bw is None or any(s not in chosen for s in GEMV_SHAPES):
        return Check(target, "not measured (kernel rows or bandwidth missing)", None)

    def shares(rows: dict) -> dict:
        return {s: rows[s]["weight_bytes"] / rows[s]["us"] / 1e3 / bw for s in GEMV_SHAPES if s in rows}

    per_call = shares(chosen)
    figure = "called from Python: " + ", ".join(f"{i}->{o}: {100 * v:.0f} % ({chosen[(i, o)]['kernel']})"
                                               for (i, o), v in per_call.items())
    q8 = shares(stream(False, lambda r: r["kernel"] == "fused_q8"))
    if len(q8) == len(GEMV_SHAPES):
        figure += "; with int8 activations (fused_q8, the default wherever it runs): " + ", ".join(
            f"{100 * v:.0f} %" for v in q8.values())
    # the kernel as lowbit's decode step calls it (from C++, fused_layer.cpp): the figure the target is judged on
    cpp = stream(True, lambda r: r["chosen"])
    in_cpp = shares(cpp)
    if len(in_cpp) < len(GEMV_SHAPES):
        return Check(target, figure + "; not measured from C++", all(v >= GEMV_SHARE for v in per_call.values()))
    figure = ("called from C++ as a decode step does: " + ", ".join(
        f"{i}->{o}: {100 * v:.0f} % ({cpp[(i, o)]['kernel']})" for (i, o), v in in_cpp.items()) + "; " + figure)
    return Check(target, figure, all(v >= GEMV_SHARE for v in in_cpp.values()))


def _short(name: str) -> str:
    return name.removeprefix("decode-")


def _mark(met: bool | None) -> str:
    return "not measured" if met is None else "**met**" if met else "**not met**"


# -- documents -----------------------------------------------------------------------------------
def markdown(records: dict, settings: Settings, checks: list[Check], png: Path | None, png_note: str | None) -> str:
    machine = (records.get("bandwidth") or {}).get("machine") or {}
    fused = machine.get("fused_info") or {}
    bw = bandwidth(records, settings.threads)
    lines = [f"# Kernels and decode speed: SmolLM2-135M on CPU, {settings.threads} threads", ""]
    if settings.quick:
        lines += ["**Quick settings** (fewer repetitions, fewer tokens): a smoke test, not the benchmark's figures.",
                  ""]
    lines += [
        f"{machine.get('cpu', '?')} ({machine.get('cpus', '?')} CPUs; flags {' '.join(machine.get('flags', []))}), "
        f"torch {machine.get('torch', '?')} (CPU capability {machine.get('torch_cpu_capability', '?')}), lowbit "
        f"{machine.get('lowbit', '?')}, fused kernel path `{fused.get('isa')}` (CPU best `{fused.get('cpu_isa')}`)"
        + (f", int8-activation path `{fused['q8_isa']}`" if fused.get("q8_isa") else "")
        + (f", environment {machine['env']}" if machine.get("env") else "") + ". Read bandwidth (fp32 tensor sum, "
        + ", ".join(f"{b['threads']} thread{'s' * (b['threads'] > 1)}: {b['GB_per_s']:.1f} GB/s"
                    for b in (records.get("bandwidth") or {}).get("bandwidth", [])) + "). "
        f"Written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}. Timings on a shared machine are "
        "noisy: compare rows of one run.", ""]
    lines += ["## Targets", "", "| target | figure | |", "| --- | --- | --- |"]
    lines += [f"| {_cell(c.target)} | {_cell(c.figure)} | {_mark(c.met)} |" for c in checks]
    rows = decode_rows(records)
    lines += ["", "## End-to-end greedy decode", "",
              (f"lowbit rows: `generate()` on the model `lowbit.load` returns, greedy, {settings.new_tokens} new "
              f"tokens after the prompt of `lowbit.evaluate.speed` (median of {settings.repeats} runs); prefill: "
              "median forward over that prompt. llama.cpp rows: `llama-bench` with the same thread count, `-n "
              f"{settings.new_tokens}`, `-p` = that prompt's token count, `-r {settings.repeats}` (medians). × fp32: "
              "tokens/s over the fp32 row's, measured in the same run; prefill × fp32: prefill time over the fp32 "
              "row's (lower is faster). Bytes/token: weight bytes one decode step "
              "reads (quantized codes + scales + zeros, the rest as stored; a tied head counted once, as the head; "
              "an untied input embedding one row); % of bandwidth bound: tokens/s × bytes/token over the read "
              "bandwidth. Peak RSS: the measuring process (lowbit: load + generate; llama.cpp: llama-bench)."), ""]
    lines += _decode_table(rows, bw) + ["", _llamacpp_note(records)]
    lines += _pair_section(records)
    results = kernel_results(records)
    lines += ["", "## Kernels at SmolLM2-135M's shapes", "",
              ("Random codes in each preset's layout (w8: symmetric per channel; w4g128, w3g128, w2g64: asymmetric, "
              "576 columns at group 128 leave a last group of 64). Every kernel that supports the format, timed "
              "with an fp32 `F.linear` of the same shape in interleaved rounds (best call); **chosen**: what "
              "`lowbit.kernels.choose` runs. *cold*: the caches are flushed (a read of four times the last-level "
              "cache, untimed) before every call, so the weights come from memory, and the call also pays the "
              "flush's TLB and prefetcher restarts; *stream*: the kernel on distinct copies of the layer filling "
              "twice the last-level cache, back to back, as a decode step's layers run (µs per call: the sweep "
              "over the copies); *stream, C++ loop*: the same sweep timed from C++ (`torch.ops.lowbit.time_linear_stream`), as a decode step's C++ calls the kernel, without the Python call around each; *hot*: repeated calls, the weights stay in L2/L3 and can beat the memory "
              "bandwidth. GB/s: stored bytes (codes + "
              "scales + zeros) per second at m = 1 († : the bandwidth it is compared with was measured in another "
              "run)."), ""]
    lines += _kernel_table(results, records) + _kernel_problems(records)
    lines += ["", "## Bytes per token against tokens/s", ""]
    lines += [f"![bytes per token against decode tokens/s]({png.name})" if png else f"No plot: {png_note}"]
    return "\n".join(lines) + "\n"


def plot(records: dict, settings: Settings, path: Path) -> str | None:
    """Write the PNG; return why not where it cannot (matplotlib missing, nothing measured)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (benchmarks/kernels-requirements.txt)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    points = [r for r in decode_rows(records) if r.get("status") == "ok"
              and not r["name"].endswith(("-floor", "-linears"))]           # parts of a step, not whole steps
    bw = bandwidth(records, settings.threads)
    if not points:
        return "no end-to-end row measured yet"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for engine, marker in (("decode", "o"), ("llamacpp", "s")):
        pts = [r for r in points if r["group"] == engine]
        ax.scatter([r["bytes_per_token"] / 1e6 for r in pts], [r["decode_tokens_per_s"] for r in pts], marker=marker,
                   label="lowbit" if engine == "decode" else "llama.cpp", zorder=3)
        for r in pts:
            ax.annotate(r["name"].split("-", 1)[1], (r["bytes_per_token"] / 1e6, r["decode_tokens_per_s"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    if bw:
        mb = [r["bytes_per_token"] / 1e6 for r in points]
        xs = [min(mb) * 0.8, max(mb) * 1.2]
        ax.plot(xs, [bw * 1e3 / x for x in xs], "--", color="grey", label=f"read bandwidth {bw:.1f} GB/s / bytes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else "")     # 1, 2, 5, 10, 20, 50 ...
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("weight bytes read per token (MB)")
    ax.set_ylabel("decode tokens/s")
    quick = " (quick settings)" if settings.quick else ""
    ax.set_title(f"SmolLM2-135M greedy decode, {settings.threads} threads{quick}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
