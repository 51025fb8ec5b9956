"""optimum-quanto: ``quantize(model, weights=qintN, include=<decoder linears>)`` then ``freeze``.

Quanto picks the group size itself (128, reduced by 32 until it divides the input width): 96 on
SmolLM2's 576-wide layers, 128 on the 1536-wide down_proj. Its default optimizer is MaxOptimizer
(asymmetric min-max) for qint2/qint4, AbsmaxOptimizer (symmetric per channel) for qint8. Scales
and shifts take the weight's dtype: fp32 here. There is no 3-bit type.

lowbit's evaluator runs under ``torch.inference_mode()``, where quanto's packed-weight forward
fails; quanto models are evaluated under ``torch.no_grad()`` instead (as ``generate`` runs them).
"""

from __future__ import annotations

from .common import Context, NoInferenceMode, RowOutput, Timer, count_storage


def run(ctx: Context, qtype: str, bits: int) -> RowOutput:
    from optimum.quanto import freeze, qtypes, quantize

    loaded = ctx.load()
    model, layers = loaded.model, ctx.layers
    notes = []
    if qtype not in qtypes:
        notes.append("optimum-quanto weight types: " + ", ".join(sorted(qtypes)))
    with Timer() as t:
        quantize(model, weights=qtype, include=list(layers))
        freeze(model)
    groups = sorted({getattr(model.get_submodule(n), "weight_group_size", None) or 0 for n in layers})
    storage = count_storage(model, layers, bits)
    notes.append("evaluated under torch.no_grad() with inference mode off: quanto's QBitsTensor raises "
                 "'RuntimeError: Cannot set version_counter for inference tensor' under torch.inference_mode()")
    return RowOutput(NoInferenceMode(model), t.seconds, storage, notes, {"group_sizes": groups})
