"""What this CPU is, as far as lowbit's speed depends on it: one reader of ``/proc/cpuinfo`` for the kernel
build (:mod:`lowbit.kernels`), the calibration dtype (:mod:`lowbit.calibrate`) and the benchmarks' records.
Read once per process."""

from __future__ import annotations

import functools
import platform

import torch

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str | None, frozenset[str] | None]:
    """(model name, flags) of the first processor in ``/proc/cpuinfo``; ``None`` for what it does not say."""
    name = flags = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, flags


def flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512f``, ...). Without ``/proc/cpuinfo`` (not Linux), the vector
    width PyTorch itself dispatches to, as the flags that implies."""
    found = _cpuinfo()[1]
    if found is not None:
        return found
    cap = torch.backends.cpu.get_cpu_capability().upper()           # "AVX512", "AVX2", "DEFAULT", ...
    if not cap.startswith("AVX"):
        return frozenset()
    return frozenset({"avx2", "fma", "f16c"} | ({"avx512f", "avx512bw", "avx512vl"} if cap.startswith("AVX512") else set()))


def model_name() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Where it does not, PyTorch emulates bf16
    matmuls: measured 7.5x slower than fp32 on an AVX2 EPYC (a 4096x576 @ 576x1536 product, 2 threads),
    where one with AVX-512 BF16 ran the pipeline's bf16 passes 2.3x faster than fp32."""
    return any(f in flags() for f in _BF16_FLAGS)


def summary() -> str:
    """Model name and widest vector / bf16 support, e.g. ``AMD EPYC 9B14, AVX2 only, bf16 emulated``."""
    f = flags()
    isa = ("AVX-512" + (" BF16" if "avx512_bf16" in f else "") if "avx512f" in f
           else "AVX2 only, bf16 emulated" if "avx2" in f else "no AVX2")
    return f"{model_name()}, {isa}"
