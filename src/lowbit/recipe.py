"""Recipes: the declarative "what to do", validated when built; presets by name.

A recipe in YAML (or the same keys in JSON)::

    method: rtn_clip          # see `lowbit.quantizers.METHODS`
    bits: 3                   # 2, 3, 4 or 8
    group_size: 128           # -1 = one group per output channel
    symmetric: false
    int_zero: false           # asymmetric zeros as packed integer codes (true) or fp16 (false, default)
    options: {grid: 20}       # method-specific, checked against the method's options
    targets: ["*"]            # module-name patterns to quantize
    ignore: ["*.mlp.down_proj", "re:.*layers\\.0\\..*"]
    calibration: {corpus: owt, windows: 128, seqlen: 512, seed: 0}
    outliers: 0.005           # fraction in [0, 0.1] of each layer's weights kept exactly in fp16
                              # (most salient: w²/diag(H⁻¹)² if the method collects a Hessian, else |w|),
                              # stored sparse; their values and indices count in bits per weight
    scaling: awq              # activation-aware per-channel scales, folded into the preceding norm or
    scaling_grid: 20          # linear (lowbit.models.scaling); α searched on this grid by output error
    head: int8                # none (default) | int8: the head and token embeddings as 8-bit codes, one
                              # fp16 scale per row (lowbit.head); a tied pair is stored once

``calibration.dtype`` (``bfloat16`` by default, or ``float32``) is the precision of the calibration
forward passes; statistics are summed in fp32/fp64 either way. ``bfloat16`` runs bf16 autocast only on
a CPU with native bf16 matmuls (AVX-512 BF16, AMX) and fp32 elsewhere, where emulated bf16 is several
times slower (``lowbit.calibrate.forward_dtype``); the report's calibration record says which ran.

Patterns match full module names such as ``model.layers.3.self_attn.q_proj``: shell globs
(``fnmatch``), or regular expressions after ``re:`` (``re.fullmatch``). Only linear layers inside
decoder blocks are candidates; the head and token embeddings follow ``head`` instead (full
precision unless ``head: int8``), and the recipe's bits per weight stays the blocks' average.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from lowbit.errors import RecipeError
from lowbit.formats import QuantSpec
from lowbit.head import HEAD_SPECS
from lowbit.quantizers import get_method
from lowbit.quantizers.learned import LearnedSpec

CALIBRATION_DTYPES = ("bfloat16", "float32")
_LATER_LEARNED_KEYS = ("scaling", "scaling_range", "kl", "kl_blocks", "kl_tokens")
SCALINGS = ("none", "awq")


@dataclass(frozen=True)
class CalibrationSpec:
    """Which text and how many windows a method that needs statistics sees."""

    corpus: str = "owt"
    windows: int = 128
    seqlen: int = 512
    seed: int = 0
    dtype: str = "bfloat16"        # precision of the calibration forward passes (statistics: fp32/fp64 sums)

    def __post_init__(self):
        if self.dtype not in CALIBRATION_DTYPES:
            raise RecipeError(f"calibration.dtype={self.dtype!r} must be one of {', '.join(CALIBRATION_DTYPES)}")
        for k in ("windows", "seqlen"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RecipeError(f"calibration.{k}={v!r} must be a positive integer")
        if not isinstance(self.corpus, str) or not self.corpus:
            raise RecipeError(f"calibration.corpus={self.corpus!r} must be a corpus name or a text file path")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RecipeError(f"calibration.seed={self.seed!r} must be an integer")

    @classmethod
    def coerce(cls, value: "CalibrationSpec | Mapping[str, Any]") -> "CalibrationSpec":
        """A CalibrationSpec from itself or a mapping of its keys (unknown keys are an error)."""
        if isinstance(value, CalibrationSpec):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"calibration must be a mapping such as {{corpus: owt, windows: 128}}, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(value) - known:
            raise RecipeError(f"unknown calibration key(s) {', '.join(sorted(set(value) - known))}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**value)


def _compile(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern.strip():
        raise RecipeError(f"bad pattern {pattern!r}: use a non-empty glob such as '*.q_proj' or 're:<regex>'")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise RecipeError(f"bad pattern {pattern!r}: {e}") from None
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    int_zero: bool = False                     # asymmetric zero points as packed integer codes (formats.spec)
    options: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    calibration: CalibrationSpec = CalibrationSpec()
    outliers: float = 0.0                      # fraction kept in fp16, see lowbit.quantizers.outliers
    scaling: str = "none"                      # "awq": activation-aware scales folded before rounding
    scaling_grid: int = 20                     # α candidates 0, 1/grid, …, (grid-1)/grid
    learned: LearnedSpec | None = None         # block-wise learned rounding and ranges, see quantizers.learned
    head: str = "none"                         # "int8": head + token embeddings 8-bit per row, see lowbit.head

    def __post_init__(self):
        if self.head is None:
            object.__setattr__(self, "head", "none")
        if not isinstance(self.head, str) or self.head not in HEAD_SPECS:
            raise RecipeError(f"head={self.head!r} must be one of {', '.join(HEAD_SPECS)} (int8: the head and "
                              "token embeddings as 8-bit codes with one fp16 scale per row; none: full precision)")
        if self.scaling not in SCALINGS:
            raise RecipeError(f"scaling={self.scaling!r} must be one of {', '.join(SCALINGS)}")
        if not isinstance(self.scaling_grid, int) or isinstance(self.scaling_grid, bool) or self.scaling_grid < 1:
            raise RecipeError(f"scaling_grid={self.scaling_grid!r} must be a positive integer")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) \
                or not 0.0 <= self.outliers <= 0.1:
            raise RecipeError(f"outliers={self.outliers!r} must be a fraction in [0, 0.1] "
                              "(e.g. 0.005 keeps 0.5 % of each layer's weights in fp16); 0 turns it off")
        object.__setattr__(self, "outliers", float(self.outliers))
        if self.learned is not None and not isinstance(self.learned, LearnedSpec):
            if not isinstance(self.learned, Mapping):
                raise RecipeError(f"learned must be a mapping such as {{iters: 200}}, got {self.learned!r}")
            known = {f.name for f in dataclasses.fields(LearnedSpec)}
            if set(self.learned) - known:
                raise RecipeError(f"unknown learned key(s) {', '.join(sorted(set(self.learned) - known))}; "
                                  f"known: {', '.join(sorted(known))}")
            object.__setattr__(self, "learned", LearnedSpec(**self.learned))
        object.__setattr__(self, "calibration", CalibrationSpec.coerce(self.calibration))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        self.spec                                                      # validates bits/group/symmetric
        object.__setattr__(self, "options", get_method(self.method).check_options(dict(self.options)))
        for p in self.targets + self.ignore:
            _compile(p)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.int_zero)

    def selects(self, module_name: str) -> bool:
        """Whether the layer called ``module_name`` is quantized by this recipe."""
        hit = lambda pats: any(_compile(p).fullmatch(module_name) for p in pats)  # noqa: E731
        return hit(self.targets) and not hit(self.ignore)

    @property
    def needs(self) -> frozenset[str]:
        """The statistics of layer inputs this recipe needs (method, its options, scaling)."""
        needs = get_method(self.method).needs_for(self.options)
        if self.scaling == "awq":
            needs |= {"hessian", "act_absmean"}
        return needs

    @property
    def calibration_dtype(self) -> torch.dtype:
        from lowbit.calibrate import forward_dtype

        return forward_dtype(self.calibration.dtype)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs) or self.learned is not None

    # -- (de)serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, except ``head`` at its default ``none``, ``int_zero`` when false and the later ``learned``
        keys (scaling, kl ...) at their defaults: the dict (and so
        offload fingerprints, checkpoint metadata and benchmark caches) of a recipe written before those
        keys existed is unchanged."""
        d = dataclasses.asdict(self)
        d["targets"], d["ignore"], d["options"] = list(self.targets), list(self.ignore), dict(self.options)
        if self.head == "none":
            del d["head"]
        if not self.int_zero:
            del d["int_zero"]
        if self.learned is not None:                   # learned keys added later, at their defaults
            for f in dataclasses.fields(LearnedSpec):
                if f.name in _LATER_LEARNED_KEYS and d["learned"][f.name] == f.default:
                    del d["learned"][f.name]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        data = dict(data)
        if name is not None:
            data.setdefault("name", name)
        for k in ("targets", "ignore"):
            if isinstance(data.get(k), str):
                data[k] = [data[k]]
        try:
            return cls(**data)
        except TypeError as e:
            raise RecipeError(f"bad recipe: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{str(e).splitlines()[0]}") from None
        return cls.from_dict(data or {}, name=path.stem)

    @classmethod
    def preset(cls, name: str) -> "Recipe":
        if name not in PRESETS:
            raise RecipeError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)} (or a .yaml/.json file)")
        return cls.from_dict(PRESETS[name], name=name)

    @classmethod
    def resolve(cls, name_or_path: str | Path | "Recipe") -> "Recipe":
        """A Recipe, a preset name, or a path to a YAML/JSON recipe file."""
        if isinstance(name_or_path, Recipe):
            return name_or_path
        s = str(name_or_path)
        if s in PRESETS:
            return cls.preset(s)
        if s.endswith((".yaml", ".yml", ".json")) or Path(s).exists():
            return cls.from_file(s)
        return cls.preset(s)


PRESETS: dict[str, dict[str, Any]] = {
    "w8": dict(method="rtn", bits=8, group_size=-1, symmetric=True),
    "w4g128": dict(method="rtn", bits=4, group_size=128),
    "w4g64": dict(method="rtn", bits=4, group_size=64),
    "w3g128": dict(method="rtn", bits=3, group_size=128),
    "w2g64": dict(method="rtn", bits=2, group_size=64),
    # GPTQ (act-order, static groups, 1 % damping) on 128 x 512 owt calibration windows, integer zero points
    # as GPTQ checkpoints store them (on SmolLM2 3-bit g128 63.4 perplexity at 3.16 bits against 82.0 at
    # 3.27 with fp16 zeros), each group's range shrunk by the ratio that minimises its output error through
    # the Hessian (clip: output): 2-bit g64 137.9 against 2626 with plain min-max ranges (183 by weight error)
    **{f"gptq-w{b}g{g}": dict(method="gptq", bits=b, group_size=g, int_zero=True, options={"clip": "output"})
       for b, g in ((4, 128), (3, 128), (2, 64))},
    # activation-aware scaling (folded, no extra bits) + round to nearest
    "awq-w4g128": dict(method="rtn", bits=4, group_size=128, scaling="awq"),
    "awq-w3g128": dict(method="rtn", bits=3, group_size=128, scaling="awq"),
    "awq-w2g64": dict(method="rtn", bits=2, group_size=64, scaling="awq"),
    # learned rounding and ranges against each block's full-precision output (AutoRound-style), with
    # integer zero points packed at the code width, as AutoRound and GPTQ checkpoints store them
    **{f"ar-w{b}g{g}{suffix}": dict(method="rtn", bits=b, group_size=g, int_zero=True, learned={"iters": iters})
       for b, g in ((4, 128), (3, 128), (2, 64)) for suffix, iters in (("", 200), ("-fast", 50))},
    # the best combination measured so far at each width (README "Recipes"): activation-aware
    # scaling, GPTQ with group ranges fitted by output-error clipping, then 50 steps of learned
    # rounding and ranges from GPTQ's codes; integer zero points (AutoRound's bits per weight). At 3
    # bits the learned steps also adjust the equivalent scaling (SmolLM2: 36.17 perplexity, KL 0.375,
    # against 36.80 / 0.389 without); at 2 bits that measured no gain (72.56 against 72.64) for 1.1x
    # the time, and at 4 bits it is not measured.
    **{f"best-w{b}": dict(method="gptq", bits=b, group_size=g, scaling="awq", options={"clip": "output"},
                          int_zero=True, learned={"iters": 50, **({"scaling": True} if b == 3 else {})})
       for b, g in ((4, 128), (3, 128), (2, 64))},
}
