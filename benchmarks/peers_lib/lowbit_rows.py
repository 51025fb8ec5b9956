"""lowbit itself, by preset name, and the fp32 baseline."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import lowbit
from lowbit.recipe import Recipe

from .common import Context, RowOutput, Timer, count_storage


def preset_missing(preset: str) -> str | None:
    """None if the preset exists, else the RecipeError's message (the row is then skipped)."""
    try:
        Recipe.preset(preset)
    except lowbit.errors.RecipeError as e:
        return str(e).splitlines()[0]
    return None


def describe(preset: str) -> str:
    try:
        r = Recipe.preset(preset)
    except lowbit.errors.RecipeError:
        return f"preset `{preset}`"
    group = "per channel" if r.group_size == -1 else f"g{r.group_size}"
    bits = f"{r.bits}-bit {group} {'sym' if r.symmetric else 'asym'}{' int zero' if r.int_zero else ''}"
    extra = f", outliers {r.outliers:g}" if r.outliers else ""
    extra += ", AWQ scaling" if r.scaling == "awq" else ""
    extra += (f", learned rounding {r.learned.iters} steps x {r.learned.batch} windows" if r.learned else "")
    opts = ", " + ", ".join(f"{k}={v}" for k, v in r.options.items()) if r.options else ""
    cal = f", calib {r.calibration.corpus} {r.calibration.windows}x{r.calibration.seqlen}" if r.needs_calibration else ""
    return f"`{preset}`: {r.method}, {bits}{extra}{opts}{cal}"


def run_preset(ctx: Context, preset: str) -> RowOutput:
    recipe = Recipe.preset(preset)
    notes = []
    if ctx.settings.calib_windows is not None and recipe.needs_calibration:
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration,
                                                                             windows=ctx.settings.calib_windows))
        notes.append(f"development run: {ctx.settings.calib_windows} calibration windows")
    loaded = ctx.load()
    layers = ctx.layers
    offload = None
    if recipe.learned is not None and ctx.work is not None:   # long rows: a killed row resumes after its last block
        key = json.dumps(ctx.settings.fingerprint(), sort_keys=True)
        offload = ctx.work / "offload" / f"{preset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    with Timer() as t:
        q = lowbit.quantize(loaded, recipe, progress=False, offload_dir=offload)
    seconds = t.seconds
    if q.report.earlier_seconds:
        notes.append(f"resumed after an interruption: the {q.report.earlier_seconds:.0f} s earlier processes "
                     "spent on the blocks they finished are included in the quantize time")
        seconds += q.report.earlier_seconds
    if q.offload is not None:
        q.offload.clear()                                         # the model now holds every block
    storage = count_storage(q.model, layers, recipe.bits)
    reported = q.report.bits_per_weight
    if abs(reported - storage["bits_per_weight"]) > 1e-6:
        notes.append(f"lowbit's own report says {reported:.4f} bits/weight")
    return RowOutput(q.model, seconds, storage, notes,
                     {"recipe": recipe.to_dict(), "report_bits_per_weight": reported,
                      "report_seconds": q.report.seconds, "calibration": q.report.calibration})


def run_fp32(ctx: Context) -> RowOutput:
    loaded = ctx.load()
    return RowOutput(loaded.model, None, count_storage(loaded.model, ctx.layers, None))
