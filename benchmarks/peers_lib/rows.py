"""Every row of the benchmark: name, bit-width group, library, exact configuration, how to run it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from .common import Context, RowOutput, installed, version

# Table sections, in order: key -> heading
GROUPS = {
    "fp32": "fp32 baseline",
    "W4": "W4 (target: 4-bit, group 128)",
    "W3": "W3 (target: 3-bit, group 128)",
    "W2": "W2 (target: 2-bit, group 64)",
    "W8": "W8 (target: 8-bit per channel; a check)",
}

# lowbit presets per bit width; a preset that does not exist (yet) makes a "skipped" row.
LOWBIT_PRESETS = {
    "W4": ["w4g128", "gptq-w4g128", "awq-w4g128", "best-w4"],
    "W3": ["w3g128", "gptq-w3g128", "awq-w3g128", "best-w3"],
    "W2": ["w2g64", "gptq-w2g64", "awq-w2g64", "best-w2"],
    "W8": ["w8"],
}

# Run order: cheap rows first, so that a long run has most of the table early.
COST = {"fast": 0, "calibrated": 1, "slow": 2}


@dataclass(frozen=True)
class Row:
    name: str
    group: str                      # key of GROUPS
    library: str                    # as shown
    dist: str | None                # PyPI distribution whose version is recorded
    module: str | None              # import name that must be importable
    config: str                     # exactly what was used, as shown in the table
    bits: int | None                # nominal code width (None for fp32)
    run: Callable[[Context], RowOutput] = field(compare=False)
    preset: str | None = None       # lowbit rows only
    cost: str = "fast"
    missing: str | None = None      # shown instead of "not installed" when the module is absent

    def skip_reason(self) -> str | None:
        """Why the row cannot run at all here (not cached: rechecked on every run), or None."""
        if self.preset is not None:
            from .lowbit_rows import preset_missing

            return preset_missing(self.preset)
        if self.module is not None and not installed(self.module):
            return self.missing or f"{self.dist} is not installed (see benchmarks/peers-requirements.txt)"
        return None

    def fingerprint(self) -> dict:
        """What, besides the run settings, must match for a cached result to be reused."""
        fp: dict = {"version": version(self.dist), "config": self.config}
        if self.preset is not None:
            from lowbit.recipe import Recipe

            try:
                fp["recipe"] = Recipe.preset(self.preset).to_dict()
            except Exception:                                   # noqa: BLE001 - a missing preset
                fp["recipe"] = None
        return json.loads(json.dumps(fp, default=str))          # as it reads back from the row's JSON


def _lowbit_row(preset: str, group: str) -> Row:
    from . import lowbit_rows

    calibrated = preset.startswith(("gptq", "awq", "best")) or _needs_calibration(preset)
    return Row(f"lowbit-{preset}", group, "lowbit", "lowbit", None, lowbit_rows.describe(preset),
               _preset_bits(preset), partial(lowbit_rows.run_preset, preset=preset), preset=preset,
               cost="calibrated" if calibrated else "fast")


def _preset_bits(preset: str) -> int | None:
    from lowbit.recipe import Recipe

    try:
        return Recipe.preset(preset).bits
    except Exception:                                           # noqa: BLE001 - a missing preset
        for b in (8, 4, 3, 2):
            if f"w{b}" in preset:
                return b
        return None


def _needs_calibration(preset: str) -> bool:
    from lowbit.recipe import Recipe

    try:
        return Recipe.preset(preset).needs_calibration
    except Exception:                                           # noqa: BLE001
        return False


def _group_of_preset(preset: str) -> str | None:
    from lowbit.recipe import Recipe

    try:
        r = Recipe.preset(preset)
    except Exception:                                           # noqa: BLE001
        return None
    return {4: "W4", 3: "W3", 2: "W2", 8: "W8"}.get(r.bits)


def all_rows() -> list[Row]:
    from . import (
        autoround_rows,
        hqq_rows,
        llmcompressor_rows,
        lowbit_rows,
        quanto_rows,
        torchao_rows,
    )

    rows: list[Row] = [Row("fp32", "fp32", "transformers (fp32)", "transformers", None,
                           "SmolLM2-135M-Instruct, fp32", None, lowbit_rows.run_fp32)]
    listed = set()
    for group, presets in LOWBIT_PRESETS.items():
        for p in presets:
            rows.append(_lowbit_row(p, group))
            listed.add(p)
    # presets added to lowbit since this list was written (outlier variants, ...)
    from lowbit.recipe import PRESETS

    for p in PRESETS:
        if p not in listed and _group_of_preset(p):
            rows.append(_lowbit_row(p, _group_of_preset(p)))

    hqq = partial(Row, library="HQQ", dist="hqq", module="hqq")
    rows += [
        hqq(name="hqq-w4g128", group="W4", config="HQQLinear nbits=4 group_size=128 axis=1, fp16 scale/zero",
            bits=4, run=partial(hqq_rows.run, nbits=4, group_size=128)),
        hqq(name="hqq-w3g128", group="W3", config="HQQLinear nbits=3 group_size=128 axis=1, fp16 scale/zero",
            bits=3, run=partial(hqq_rows.run, nbits=3, group_size=128)),
        hqq(name="hqq-w2g64", group="W2", config="HQQLinear nbits=2 group_size=64 axis=1, fp16 scale/zero",
            bits=2, run=partial(hqq_rows.run, nbits=2, group_size=64)),
        hqq(name="hqq-w8", group="W8", config="HQQLinear nbits=8 group_size=None (one group per row), fp16 scale/zero",
            bits=8, run=partial(hqq_rows.run, nbits=8, group_size=None)),
    ]
    quanto = partial(Row, library="optimum-quanto", dist="optimum-quanto", module="optimum.quanto")
    rows += [
        quanto(name="quanto-qint4", group="W4", config="weights=qint4 (quanto's groups: 96 on 576-wide, 128 on "
               "1536-wide), MaxOptimizer, fp32 scale+shift", bits=4, run=partial(quanto_rows.run, qtype="qint4", bits=4)),
        quanto(name="quanto-qint3", group="W3", config="weights='qint3' (quanto has qint2/qint4/qint8 only)",
               bits=3, run=partial(quanto_rows.run, qtype="qint3", bits=3)),
        quanto(name="quanto-qint2", group="W2", config="weights=qint2 (groups 96 / 128 as above), MaxOptimizer, "
               "fp32 scale+shift", bits=2, run=partial(quanto_rows.run, qtype="qint2", bits=2)),
        quanto(name="quanto-qint8", group="W8", config="weights=qint8, per channel symmetric (AbsmaxOptimizer), "
               "fp32 scale", bits=8, run=partial(quanto_rows.run, qtype="qint8", bits=8)),
    ]
    ao = partial(Row, library="torchao", dist="torchao", module="torchao")
    rows += [
        ao(name="torchao-int4wo-g128", group="W4", config="Int4WeightOnlyConfig(group_size=128), default packing (it leaves layers 128 does not divide, "
           "i.e. all but down_proj, in fp32)",
           bits=4, run=partial(torchao_rows.run, kind="int4", bits=4, group=128)),
        ao(name="torchao-intx4-g128", group="W4", config="IntxWeightOnlyConfig(int4, PerGroup(128), ASYMMETRIC)",
           bits=4, run=partial(torchao_rows.run, kind="intx", bits=4, group=128)),
        ao(name="torchao-intx4-g64", group="W4", config="IntxWeightOnlyConfig(int4, PerGroup(64), ASYMMETRIC): "
           "closest that runs", bits=4, run=partial(torchao_rows.run, kind="intx", bits=4, group=64)),
        ao(name="torchao-intx3-g128", group="W3", config="IntxWeightOnlyConfig(int3, PerGroup(128), ASYMMETRIC)",
           bits=3, run=partial(torchao_rows.run, kind="intx", bits=3, group=128)),
        ao(name="torchao-intx3-g64", group="W3", config="IntxWeightOnlyConfig(int3, PerGroup(64), ASYMMETRIC): "
           "closest that runs", bits=3, run=partial(torchao_rows.run, kind="intx", bits=3, group=64)),
        ao(name="torchao-intx2-g64", group="W2", config="IntxWeightOnlyConfig(int2, PerGroup(64), ASYMMETRIC)",
           bits=2, run=partial(torchao_rows.run, kind="intx", bits=2, group=64)),
        ao(name="torchao-int8wo", group="W8", config="Int8WeightOnlyConfig() (per row, symmetric)",
           bits=8, run=partial(torchao_rows.run, kind="int8", bits=8, group=None)),
    ]
    llmc = partial(Row, library="llm-compressor", dist="llmcompressor", module="llmcompressor", cost="calibrated")
    gptq = "GPTQModifier (block 128, damp 0.01, actorder static), int asym"
    rows += [
        llmc(name="llmc-gptq-w4g128", group="W4", config=f"{gptq} 4-bit group 128",
             bits=4, run=partial(llmcompressor_rows.run, bits=4, group=128, symmetric=False)),
        llmc(name="llmc-gptq-w4g64", group="W4", config=f"{gptq} 4-bit group 64: closest that runs",
             bits=4, run=partial(llmcompressor_rows.run, bits=4, group=64, symmetric=False)),
        llmc(name="llmc-gptq-w3g128", group="W3", config=f"{gptq} 3-bit group 128",
             bits=3, run=partial(llmcompressor_rows.run, bits=3, group=128, symmetric=False)),
        llmc(name="llmc-gptq-w3g64", group="W3", config=f"{gptq} 3-bit group 64: closest that runs",
             bits=3, run=partial(llmcompressor_rows.run, bits=3, group=64, symmetric=False)),
        llmc(name="llmc-gptq-w2g64", group="W2", config=f"{gptq} 2-bit group 64",
             bits=2, run=partial(llmcompressor_rows.run, bits=2, group=64, symmetric=False)),
        llmc(name="llmc-gptq-w8", group="W8", config="GPTQModifier (defaults), int 8-bit per channel symmetric (W8A16)",
             bits=8, run=partial(llmcompressor_rows.run, bits=8, group=None, symmetric=True)),
    ]
    rows.append(Row("gptqmodel-w4g128", "W4", "gptqmodel", "gptqmodel", "gptqmodel",
                    "GPTQ 4-bit group 128 (not driven: llm-compressor gives the GPTQ rows)", 4, _gptqmodel_not_driven,
                    cost="calibrated",
                    missing="not installable here: pip says 'gptqmodel 7.7.0 depends on torch>=2.14.1' "
                            "(torch is pinned to 2.13.0)"))
    ar = partial(Row, library="auto-round", dist="auto-round", module="auto_round", cost="slow")
    for bits, group in ((4, 128), (3, 128), (2, 64)):
        for iters in (200, 50):
            suffix = "" if iters == 200 else f"-i{iters}"
            rows.append(ar(name=f"autoround-w{bits}g{group}{suffix}", group=f"W{bits}",
                           config=f"scheme W{bits}A16 group_size={group} (sym), iters={iters}"
                                  f"{' (default)' if iters == 200 else ''}, nsamples 128, seqlen 512, batch 8",
                           bits=bits, run=partial(autoround_rows.run, bits=bits, group=group, iters=iters)))
    return rows


def _gptqmodel_not_driven(ctx: Context) -> RowOutput:
    raise NotImplementedError("gptqmodel is installed, but this benchmark does not drive it; "
                              "llm-compressor gives the GPTQ rows")


def find_row(name: str) -> Row | None:
    for r in all_rows():
        if r.name == name:
            return r
    if name.startswith("lowbit-"):                 # a preset named on the command line
        preset = name[len("lowbit-"):]
        return _lowbit_row(preset, _group_of_preset(preset) or "W4")
    return None


def run_order(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: COST[r.cost])            # stable: table order within a cost class
