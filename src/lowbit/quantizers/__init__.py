"""Quantizers: pure functions (weight, statistics, spec, options) -> stored format, registered by name.

A method declares the statistics of a layer's inputs it needs (``needs``); the pipeline
collects exactly those on the calibration windows. Methods that need none (RTN) get no
calibration data at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from lowbit.errors import RecipeError
from lowbit.formats import QuantSpec, WeightFormat
from lowbit.quantizers.gptq import gptq
from lowbit.quantizers.hqq import hqq
from lowbit.quantizers.rtn import (
    CLIP_OBJECTIVES,
    clip_qparams,
    minmax_qparams,
    round_to_grid,
    rtn,
    rtn_clip,
)

QuantizeFn = Callable[[Tensor, Mapping[str, Tensor], QuantSpec, Mapping[str, Any]], WeightFormat]


@dataclass(frozen=True)
class Method:
    name: str
    quantize: QuantizeFn
    needs: frozenset[str] = frozenset()            # statistic names, see lowbit.calibrate
    options: Mapping[str, Any] = field(default_factory=dict)   # option name -> default
    doc: str = ""
    extra_needs: Callable[[Mapping[str, Any]], frozenset[str]] | None = None   # needs that depend on options
    # each output row's result depends only on that row and the statistics: layers reading the same input
    # (q/k/v, gate/up) may be quantized as one stacked matrix (one Hessian factorization, one column loop)
    rows_independent: bool = False

    def needs_for(self, options: Mapping[str, Any]) -> frozenset[str]:
        """The statistics this method needs with ``options`` (merged with the defaults)."""
        return self.needs | (self.extra_needs({**self.options, **options}) if self.extra_needs else frozenset())

    def check_options(self, options: Mapping[str, Any]) -> dict:
        """Defaults overlaid with ``options``; an unknown option is a RecipeError."""
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise RecipeError(f"method {self.name!r}: unknown option(s) {', '.join(sorted(unknown))}; known: {known}")
        merged = {**self.options, **options}
        for k, v in merged.items():
            default = self.options[k]
            if type(v) is not type(default) and not (isinstance(default, float) and isinstance(v, int)):
                raise RecipeError(f"method {self.name!r}: option {k}={v!r} must be {type(default).__name__}")
        for key, allowed in (("clip", CLIP_OBJECTIVES), ("objective", CLIP_OBJECTIVES[1:])):
            if key in merged and merged[key] not in allowed:
                raise RecipeError(f"method {self.name!r}: {key}={merged[key]!r} must be one of {', '.join(allowed)}")
        return merged


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


_CLIP = {"clip": "none", "grid": 20, "min_ratio": 0.5}      # range fitting, see rtn.clip_qparams

register(Method("rtn", lambda w, stats, spec, opts: rtn(w, spec), doc="round to nearest on min-max ranges",
                rows_independent=True))
register(Method(
    "rtn_clip",
    lambda w, stats, spec, opts: rtn_clip(w, spec, opts["grid"], opts["min_ratio"], opts["objective"],
                                          stats.get("hessian")),
    options={"grid": 20, "min_ratio": 0.5, "objective": "weight"},
    extra_needs=lambda opts: frozenset({"hessian"}) if opts["objective"] == "output" else frozenset(),
    rows_independent=True,
    doc="round to nearest, each group's range shrunk by the ratio in [min_ratio, 1] that minimises its weight "
        "error (objective: weight) or its layer-output error through the input Hessian (objective: output)",
))

register(Method(
    "gptq",
    lambda w, stats, spec, opts: gptq(w, stats["hessian"], spec, opts["damp"], opts["block"], opts["act_order"],
                                      clip=opts["clip"], grid=opts["grid"], min_ratio=opts["min_ratio"]),
    needs=frozenset({"hessian"}),
    options={"damp": 0.01, "block": 128, "act_order": True, **_CLIP},
    rows_independent=True,
    doc="GPTQ: column-by-column rounding with inverse-Hessian error feedback; act-order with static groups; "
        "clip: weight|output fits the group ranges by a clipping search first",
))

register(Method(
    "hqq",
    lambda w, stats, spec, opts: hqq(w, spec, **opts),
    options={"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "opt_scale": False},
    doc="HQQ-style, data-free: min-max RTN with zeros (opt_scale: also scales) refined by half-quadratic l_p fitting",
))

__all__ = ["CLIP_OBJECTIVES", "clip_qparams", "gptq", "hqq", "METHODS", "Method", "get_method", "register", "minmax_qparams", "round_to_grid", "rtn",
           "rtn_clip"]
