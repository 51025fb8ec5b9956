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
from lowbit.quantizers.rtn import minmax_qparams, round_to_grid, rtn, rtn_clip

QuantizeFn = Callable[[Tensor, Mapping[str, Tensor], QuantSpec, Mapping[str, Any]], WeightFormat]


@dataclass(frozen=True)
class Method:
    name: str
    quantize: QuantizeFn
    needs: frozenset[str] = frozenset()            # statistic names, see lowbit.calibrate
    options: Mapping[str, Any] = field(default_factory=dict)   # option name -> default
    doc: str = ""

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
        return merged


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register(Method("rtn", lambda w, stats, spec, opts: rtn(w, spec), doc="round to nearest on min-max ranges"))
register(Method(
    "rtn_clip",
    lambda w, stats, spec, opts: rtn_clip(w, spec, opts["grid"], opts["min_ratio"]),
    options={"grid": 20, "min_ratio": 0.5},
    doc="round to nearest, each group's range shrunk by the ratio that minimises weight error",
))

register(Method(
    "gptq",
    lambda w, stats, spec, opts: gptq(w, stats["hessian"], spec, opts["damp"], opts["block"], opts["act_order"]),
    needs=frozenset({"hessian"}),
    options={"damp": 0.01, "block": 128, "act_order": True},
    doc="GPTQ: column-by-column rounding with inverse-Hessian error feedback; act-order with static groups",
))

register(Method(
    "hqq",
    lambda w, stats, spec, opts: hqq(w, spec, **opts),
    options={"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "opt_scale": False},
    doc="HQQ-style, data-free: min-max RTN with zeros (opt_scale: also scales) refined by half-quadratic l_p fitting",
))

__all__ = ["gptq", "hqq", "METHODS", "Method", "get_method", "register", "minmax_qparams", "round_to_grid", "rtn",
           "rtn_clip"]
