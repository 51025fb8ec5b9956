"""Peers benchmark: lowbit against the quantization libraries a user would install from PyPI, in one run.

Model: SmolLM2-135M-Instruct in fp32 (``lowbit.load_model("smollm2-135m")``; hidden size 576,
which group 128 does not divide: 576 = 4 x 128 + 64). Targets: W4 g128, W3 g128, W2 g64, and W8
per channel as a check. Rows:

* ``fp32``: the baseline.
* ``lowbit-<preset>``: ``lowbit.quantize(loaded_model, preset)`` for the presets listed in
  ``peers_lib/rows.py`` (``LOWBIT_PRESETS``: RTN, GPTQ, AWQ, "best") plus any other preset lowbit
  has when the run starts (outlier variants ...). A preset that does not exist yet is shown as
  ``skipped: <RecipeError message>`` and is looked for again on every run.
* HQQ (``hqq``), optimum-quanto, torchao, llm-compressor (GPTQ) and auto-round (200 iterations,
  its default, and 50), each at its closest configuration to each target; the table's *config*
  column says exactly what was used. Where a library cannot run a configuration here (CPU only,
  a group size that does not divide 576, no such bit width) the row shows the library's error
  (first line), and a "closest that runs" row follows. Details of each library:
  ``peers_lib/<library>_rows.py``. gptqmodel is listed as a skipped row: gptqmodel 7.7.0
  requires torch>=2.14.1 (torch is pinned to 2.13.0); llm-compressor provides the GPTQ rows.

Every calibrated row (lowbit's calibrated presets, llm-compressor, auto-round) sees the same
calibration set: the 128 x 512-token owt windows (seed 0) that ``lowbit.quantize`` samples for
its recipes, built by the same call (``lowbit.data.calibration_windows(tokenizer,
load_text("owt")[0], 512, 128, 0)``). HQQ, quanto and torchao are data-free.

Every row is scored by ``lowbit.evaluate.quality.evaluate_quality`` on the same wiki windows
(``--windows``, default 32, x 512 tokens) against the fp32 model: perplexity, mean KL divergence
to fp32, top-1 agreement. Also recorded: honest bits per weight, counted the same way for every
library from the tensors it actually keeps for the 210 decoder linear layers (packed codes,
scales, zero points, shifts, g_idx, shape tensors ...; fp32 scales count 32 bits; see
``peers_lib/common.py``), whether the codes are really packed, the quantize call's wall time,
and the peak RSS of the row's process (VmHWM, after quantizing and at the end).

Each row runs in its own child process (``--row NAME``), so a crash or a memory peak stays in
that row. A finished row is written atomically to ``benchmarks/.work/peers/rows/<row>.json``
(its log beside it in ``logs/``) and reused by later runs while its settings, library version
(and, for lowbit, the preset's recipe) are unchanged; ``--redo ROW`` runs it again. A row
that crashes is recorded as such (exit status, last log line). The results are assembled into
``benchmarks/results/peers.json`` and ``benchmarks/results/peers.md`` (a table per bit width,
then what each row stores) after every row, so the table fills in as the run goes.

Rows run cheapest first. Measured on this 2-core machine with 1 torch thread while other work
shared it: data-free rows quantize in 1-30 s (HQQ is the slowest, 24 s); llm-compressor GPTQ
on 128 x 512 tokens took 17 min (w4g64); auto-round took about 1 min per block at 50
iterations (30 blocks: ~30 min), so about 2 h per 200-iteration row; the evaluation costs
~5 s per wiki window (fp32 reference + the row), ~3 min per row at 32 windows. The whole run is
therefore most of a working day (auto-round's six rows are more than half of it); ``--only``
runs a part of it.

    python benchmarks/peers.py --list                     # rows, and which are done / skipped
    python benchmarks/peers.py                            # everything (many hours: auto-round)
    python benchmarks/peers.py --only hqq,quanto          # rows whose name contains a substring
    python benchmarks/peers.py --only torchao --windows 2 # a quick look (results kept apart by settings)
    python benchmarks/peers.py --redo hqq-w4g128          # run that row again
    python benchmarks/peers.py --report                   # only rebuild peers.json / peers.md

Whole run in the background, from the repository root:

    mkdir -p benchmarks/.work/peers
    nohup .venv/bin/python benchmarks/peers.py > benchmarks/.work/peers/run.log 2>&1 &

Install the peers with ``benchmarks/peers-requirements.txt`` (its header says how; torch and
transformers are pinned by a constraints file so that nothing replaces them).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)

from child import spawn_row, why_no_result
from peers_lib.common import (
    CALIBRATION,
    Context,
    Settings,
    env_threads,
    first_line,
    peak_rss_mb,
    short_traceback,
)
from peers_lib.report import cpu_summary, header_info, markdown, placeholder
from peers_lib.rows import Row, all_rows, find_row, run_order

WORK = HERE / ".work" / "peers"
OUT = HERE / "results"


def _atomic_write_json(path: Path, doc: dict) -> None:
    from lowbit.cache import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _finite(x):
    """Non-finite floats as strings ("inf"/"nan"), so the JSON stays strict."""
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# -- child: one row -----------------------------------------------------------------------
def run_child(row: Row, settings: Settings, work: Path) -> int:
    import torch

    from lowbit.evaluate.quality import evaluate_quality

    env_threads(settings)
    torch.manual_seed(0)
    t_row = time.perf_counter()
    rec = placeholder(row, "running", None)
    rec.update(settings=settings.fingerprint(), fingerprint=row.fingerprint(), threads=torch.get_num_threads(),
               log=str(work / "logs" / f"{row.name}.log"), cpu=cpu_summary())
    skip = row.skip_reason()
    if skip:
        rec.update(status="skipped", error=skip)
        print(f"[{row.name}] skipped: {skip}", flush=True)
        return _finish(rec, work, t_row, cache=False)
    ctx = Context(settings)
    ctx.work = work
    try:
        out = row.run(ctx)
    except Exception as e:                                      # noqa: BLE001 - the row records it
        rec.update(status="error", error=first_line(e), stage="quantize", traceback=short_traceback(e))
        print(short_traceback(e, 40), file=sys.stderr, flush=True)
        return _finish(rec, work, t_row)
    rec.update(quantize_s=out.quantize_s, peak_rss_quantize_mb=peak_rss_mb(), notes=out.notes, extra=out.extra)
    if isinstance(out.storage, dict):
        rec["storage"] = out.storage
    try:
        reference = out.model if row.name == "fp32" else ctx.load().model
        windows = ctx.eval_windows()
        with torch.no_grad():
            q = evaluate_quality({row.name: out.model}, windows=windows, reference=reference, progress=True)
        rec["quality"] = _finite(q[row.name].to_dict())
        del reference
        if callable(out.storage):
            rec["storage"] = out.storage()
    except Exception as e:                                      # noqa: BLE001
        rec.update(status="error", error=first_line(e), stage="evaluate", traceback=short_traceback(e))
        print(short_traceback(e, 40), file=sys.stderr, flush=True)
        return _finish(rec, work, t_row)
    rec.update(status="ok", bits_per_weight=rec["storage"]["bits_per_weight"], packed=rec["storage"]["packed"],
               peak_rss_mb=peak_rss_mb())
    return _finish(rec, work, t_row)


def _finish(rec: dict, work: Path, t_row: float, cache: bool = True) -> int:
    rec["row_wall_s"] = time.perf_counter() - t_row
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if cache:
        _atomic_write_json(work / "rows" / f"{rec['name']}.json", _finite(rec))
    q = rec.get("quality") or {}
    print(f"[{rec['name']}] {rec['status']}"
          + (f": {rec['error']}" if rec.get("error") else "")
          + (f" | bits {rec['storage']['bits_per_weight']:.3f} packed={rec['storage']['packed']}"
             if rec.get("storage") else "")
          + (f" | ppl {q.get('perplexity')} kl {q.get('kl_mean')} top1 {q.get('top1_agreement')}" if q else "")
          + (f" | quantize {rec['quantize_s']:.1f}s" if rec.get("quantize_s") is not None else "")
          + f" | row {rec['row_wall_s']:.0f}s", flush=True)
    return 0


# -- parent -------------------------------------------------------------------------------
def _cached(row: Row, settings: Settings, work: Path) -> dict | None:
    path = work / "rows" / f"{row.name}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("settings") != settings.fingerprint() or rec.get("fingerprint") != row.fingerprint():
        return None
    return rec


def seed_from_results(rows: list[Row], settings: Settings, work: Path, out: Path) -> int:
    """Copy finished rows from the published ``peers.json`` into an empty work cache.

    The work folder is not committed, so on a new checkout only ``benchmarks/results/peers.json``
    holds the rows measured before. A row is taken from it only where the work cache has none
    and its run settings and fingerprint (library version, config, lowbit recipe) still match, so
    ``--only``/``--redo`` on a new machine rebuild the whole table rather than just their rows. A peer
    library that is not installed here cannot be rerun, so its published rows are taken whatever
    version they record (the rest of the fingerprint must still match): without that, a lowbit row
    rerun in a virtual environment without the peers would drop every peer row from the table.
    """
    try:
        published = json.loads((out / "peers.json").read_text()).get("rows", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return 0
    by_name = {r.get("name"): r for r in published if isinstance(r, dict)}
    seeded = 0
    for row in rows:
        rec = by_name.get(row.name)
        if rec is None or rec.get("status") == "crashed" or (work / "rows" / f"{row.name}.json").exists():
            continue
        want, have = row.fingerprint(), dict(rec.get("fingerprint") or {})
        if want.get("version") is None and row.dist is not None:           # the library is not installed here
            have["version"] = None
        if rec.get("settings") != settings.fingerprint() or have != want:
            continue
        _atomic_write_json(work / "rows" / f"{row.name}.json", rec)
        seeded += 1
    return seeded


def _child_args(settings: Settings, work: Path) -> list[str]:
    args = ["--windows", str(settings.windows), "--seqlen", str(settings.seqlen), "--model", settings.model,
            "--work", str(work)]
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    if settings.calib_windows:
        args += ["--calib-windows", str(settings.calib_windows)]
    if settings.iters:
        args += ["--iters", str(settings.iters)]
    return args


def run_parent_row(row: Row, settings: Settings, work: Path, timeout: float | None) -> dict:
    log = work / "logs" / f"{row.name}.log"
    path = work / "rows" / f"{row.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row.name, *_child_args(settings, work)]
    t0 = time.perf_counter()
    rc = spawn_row(cmd, log, HERE.parent, timeout)
    if path.exists():
        return json.loads(path.read_text())
    if rc == 0:                                 # the child found the row skipped: not cached, rechecked next run
        return placeholder(row, "skipped", row.skip_reason() or "the row's process wrote no result")
    rec = placeholder(row, "crashed", why_no_result(rc, log, timeout))
    rec.update(settings=settings.fingerprint(), fingerprint=row.fingerprint(), log=str(log),
               row_wall_s=time.perf_counter() - t0)
    _atomic_write_json(path, rec)
    return rec


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def assemble(rows: list[Row], settings: Settings, work: Path, out: Path) -> Path:
    records = []
    for row in rows:
        rec = _cached(row, settings, work)
        if rec is None:
            skip = row.skip_reason()
            rec = placeholder(row, "skipped" if skip else "not run", skip or "not run yet with these settings")
        records.append(rec)
    cal = CALIBRATION if not settings.calib_windows else None
    calib = (f"{cal.corpus}, {cal.windows} windows x {cal.seqlen} tokens, seed {cal.seed}" if cal else
             f"{CALIBRATION.corpus}, {settings.calib_windows} windows x {CALIBRATION.seqlen} tokens, seed "
             f"{CALIBRATION.seed} (development)")
    header = header_info(settings.__dict__, calib)
    doc = {"benchmark": "peers", "settings": settings.fingerprint() | {"threads": settings.threads},
           **header, "rows": records}
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(out / "peers.json", _finite(doc))
    from lowbit.cache import atomic_file

    md = markdown(records, settings.__dict__, header)
    with atomic_file(out / "peers.md") as tmp:
        tmp.write_text(md)
    return out / "peers.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32, help="wiki evaluation windows (default 32)")
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default 512)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's)")
    ap.add_argument("--only", action="append", help="run rows whose name contains one of these substrings "
                                                     "(comma-separated or repeated)")
    ap.add_argument("--redo", action="append", help="rerun these rows (exact names, comma-separated or repeated)")
    ap.add_argument("--list", action="store_true", help="list the rows and their state, run nothing")
    ap.add_argument("--report", action="store_true", help="only assemble peers.json / peers.md from finished rows")
    ap.add_argument("--row", help=argparse.SUPPRESS)                       # child mode
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds before a row's process is killed")
    ap.add_argument("--calib-windows", type=int, default=None,
                    help="development only: fewer calibration windows (results are kept apart)")
    ap.add_argument("--iters", type=int, default=None,
                    help="development only: auto-round iterations override (results are kept apart)")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    settings = Settings(args.model, args.windows, args.seqlen, args.calib_windows, args.iters, args.threads)

    if args.row:
        row = find_row(args.row)
        if row is None:
            print(f"peers: unknown row {args.row!r}", file=sys.stderr)
            return 2
        return run_child(row, settings, args.work)

    rows = all_rows()
    names = {r.name for r in rows}
    redo = set(_split(args.redo))
    unknown = redo - names
    if unknown:
        print(f"peers: unknown row(s) for --redo: {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    only = _split(args.only)
    selected = [r for r in rows if (only and any(s in r.name for s in only)) or r.name in redo
                or not (only or redo)]
    if only and not selected:
        print(f"peers: no row name contains {', '.join(only)}; see --list", file=sys.stderr)
        return 2

    seeded = seed_from_results(rows, settings, args.work, args.out)
    if seeded:
        print(f"peers: took {seeded} finished row(s) from {args.out / 'peers.json'} into {args.work}", flush=True)

    if args.list:
        for r in selected:
            rec = _cached(r, settings, args.work)
            skip = None if rec else r.skip_reason()
            state = (f"done: {rec['status']}" + (f" ({rec.get('error')})" if rec.get("error") else "")) if rec \
                else (f"skipped: {skip}" if skip else "to run")
            print(f"{r.name:28s} {r.group:4s} {r.library:16s} {r.cost:10s} {state}")
            print(f"{'':28s} {r.config}")
        return 0

    if not args.report:
        todo = run_order(selected)
        print(f"peers: {len(todo)} row(s); settings {settings.fingerprint()}; work {args.work}", flush=True)
        for i, row in enumerate(todo, 1):
            if row.name not in redo and (rec := _cached(row, settings, args.work)) is not None:
                print(f"[{i}/{len(todo)}] {row.name}: done before ({rec['status']})", flush=True)
                continue
            skip = row.skip_reason()
            if skip:
                print(f"[{i}/{len(todo)}] {row.name}: skipped: {skip}", flush=True)
                continue
            print(f"[{i}/{len(todo)}] {row.name}: running (log: {args.work / 'logs' / (row.name + '.log')})",
                  flush=True)
            rec = run_parent_row(row, settings, args.work, args.row_timeout)
            q = rec.get("quality") or {}
            print(f"[{i}/{len(todo)}] {row.name}: {rec['status']}"
                  + (f": {rec.get('error')}" if rec.get("error") else "")
                  + (f"; bits {rec['storage']['bits_per_weight']:.3f}, PPL {q.get('perplexity')}" if q else "")
                  + f"; {rec.get('row_wall_s', 0):.0f}s", flush=True)
            assemble(rows, settings, args.work, args.out)               # the table grows as rows finish
    md = assemble(rows, settings, args.work, args.out)
    print(f"peers: wrote {md} and {md.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
