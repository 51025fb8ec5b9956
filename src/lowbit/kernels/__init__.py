"""``y = x @ W.T (+ bias)`` for a stored weight format, choosing the fastest kernel per shape.

Candidates (each checks whether it supports a format):

==========  ============================================  ===========================================
kernel      formats                                       how
==========  ============================================  ===========================================
reference   every format                                  dequantize to fp32 for the call, ``F.linear``
aten_int4   4-bit, group 32/64/128/256 dividing in        ``torch.ops.aten._weight_int4pack_mm_for_cpu``
aten_int8   8-bit per channel (symmetric or asymmetric)   ``torch.ops.aten._weight_int8pack_mm``
fused       grouped_int 2/3/4/8-bit, any group size       lowbit's C++ extension (``torch.ops.lowbit``,
            (ragged last group, per channel), CPU         :mod:`lowbit.kernels._ext`): up to 8 rows (16
                                                          with AVX-512) a GEMV decoding each group's
                                                          codes in registers (AVX-512 / AVX2 / scalar,
                                                          chosen at run time); more rows dequantize a
                                                          small tile at a time into a register-blocked
                                                          FMA microkernel
fused_q8    grouped_int 2/3/4/8-bit, per channel or       the same extension: x quantized per call
            groups of a multiple of 64; at most 8 rows    to int8 per 32 columns, integer dot
                                                          products (AVX-512 VNNI, else AVX-VNNI,
                                                          else AVX2 vpmaddubsw); decode only,
                                                          within 2e-2 of fp32; see
                                                          :func:`int8_activations`
triton      grouped_int 2/3/4/8-bit, any group size,      Triton kernels (``lowbit[gpu]``,
            on a CUDA device                              :mod:`lowbit.kernels._triton`): the stored
                                                          codes decoded in registers, a GEMV up to
                                                          8 rows, a ``tl.dot`` tile kernel beyond;
                                                          registered where Triton is installed
==========  ============================================  ===========================================

``fused`` compiles on first use into lowbit's cache (see :mod:`lowbit.kernels._ext`); where that is
impossible it warns once and computes like ``reference`` (and the automatic choice leaves it out).
``LOWBIT_NO_EXT=1`` removes it from the candidates altogether (``LOWBIT_KERNEL=fused`` then runs
``reference``).  :func:`fused_info` says which instruction-set path runs (``LOWBIT_ISA=avx2`` forces a
lower one; ``avxvnni``, between ``avx2`` and ``avx512``, only changes the int8 kernel's path).

Which is fastest depends on the shape and the number of rows of ``x`` (at batch 1 on small
CPUs the aten kernels can lose to a dequantize + fp32 matmul), so the first call for a
(format layout, shape, row bucket, thread count) times every supported candidate on that layer's
weight (best of 5 interleaved rounds) and remembers the winner; measured on an idle enough machine
(1-minute load average at most 1.25 per CPU) it is kept for the machine: in
:func:`choices_file` (``<cache>/kernels/choices-<machine>.json``; ``LOWBIT_KERNEL_CHOICES=off`` keeps
choices in the process only, ``LOWBIT_KERNEL_CHOICES=<path>`` puts them elsewhere; delete the file
to measure again). ``LOWBIT_KERNEL=<name>`` forces one kernel wherever it
applies (``reference`` everywhere), which makes runs reproducible bit for bit.

An :class:`~lowbit.formats.OutlierFormat` runs the kernel chosen for its base format (the same
candidates and per-shape choice) and adds the sparse product of its outliers
(:func:`sparse_outliers`).

A kernel may keep a repacked copy of the codes (never a dequantized fp32 weight) in the
module's plan; the reference kernel keeps nothing between calls.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import cpu
from lowbit.formats import GroupedInt, OutlierFormat, WeightFormat
from lowbit.kernels import _ext

log = logging.getLogger("lowbit.kernels")

KERNELS: dict[str, "Kernel"] = {}


class Kernel(ABC):
    name: str
    max_rows: int | None = None      # the automatic choice offers it only up to this many rows of x
    max_rel_error: float | None = None   # not fp32 arithmetic: its documented error bound, relative to max |y|
    device: str = "cpu"                  # where the formats it runs live ("any" for the reference)

    def __init_subclass__(cls, register: bool = True, **kw):
        super().__init_subclass__(**kw)
        if register:
            KERNELS[cls.name] = cls()

    @abstractmethod
    def supports(self, fmt: WeightFormat) -> bool: ...

    def available(self) -> bool:
        """False when the kernel would only stand in for another (e.g. its extension could not be built):
        the automatic choice then leaves it out; forcing it still works."""
        return True

    def prepare(self, fmt: WeightFormat) -> Any:
        """Per-layer state built once (e.g. repacked codes); ``None`` when the kernel needs none."""
        return None

    @abstractmethod
    def run(self, x: Tensor, fmt: WeightFormat, state: Any) -> Tensor:
        """x fp32 (m, in) -> (m, out)."""


class Reference(Kernel):
    name = "reference"
    device = "any"

    def supports(self, fmt):
        return True

    def run(self, x, fmt, state):
        return F.linear(x, fmt.dequantize(x.dtype))


def _device(fmt: WeightFormat) -> torch.device:
    """Where the format's tensors live (and where the kernel runs)."""
    return next(iter(fmt.tensors().values())).device


class AtenInt4(Kernel):
    name = "aten_int4"

    def supports(self, fmt):
        if (not isinstance(fmt, GroupedInt) or fmt.spec.bits != 4 or fmt.codes.device.type != "cpu"
                or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            return False
        g, (out_f, in_f) = fmt.spec.group_width(fmt.in_features), fmt.shape
        return g in (32, 64, 128, 256) and in_f % g == 0 and in_f % 16 == 0 and out_f % 16 == 0

    def prepare(self, fmt):
        q = fmt.unpacked().to(torch.int32)                                    # (out, in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scale = fmt.scale.float()                                             # (out, G)
        # aten computes (q - 8) * s + z'; ours is (q - z) * s, so z' = (8 - z) * s
        zero = (8.0 - fmt.zero_points().float()) * scale
        return packed, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # (G, out, 2)

    def run(self, x, fmt, state):
        packed, scale_zero = state
        g = fmt.spec.group_width(fmt.in_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, g, scale_zero)


class AtenInt8(Kernel):
    name = "aten_int8"

    def supports(self, fmt):
        return (isinstance(fmt, GroupedInt) and fmt.spec.bits == 8 and fmt.spec.n_groups(fmt.in_features) == 1
                and fmt.codes.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"))

    def prepare(self, fmt):
        q = (fmt.codes.to(torch.int16) - 128).to(torch.int8)                  # (out, in) signed codes
        scale = fmt.scale.float()[:, 0]                                      # (out,)
        # (q_u - z) * s = (q_u - 128) * s + (128 - z) * s: the second term is a per-row offset
        offset = None if fmt.zero is None else (128.0 - fmt.zero_points().float()[:, 0]) * scale
        return q, scale, offset

    def run(self, x, fmt, state):
        q, scale, offset = state
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale)
        if offset is not None:
            y = y + x.sum(-1, keepdim=True) * offset
        return y


class Fused(Kernel, register=False):
    """lowbit's C++ fused dequantize-and-multiply for :class:`GroupedInt` on the CPU (:mod:`lowbit.kernels._ext`).

    The plan holds the codes repacked into the kernel's layout (same bytes as stored; for 8 bits the
    stored tensor itself) and the fp16 scales/zeros -- no dequantized weight.  Where the extension is
    unavailable, or ``x`` needs a gradient (the C++ ops have no backward), it computes like ``reference``.
    """

    name = "fused"

    def supports(self, fmt):
        return isinstance(fmt, GroupedInt) and fmt.codes.device.type == "cpu" and min(fmt.shape) >= 1

    def available(self):
        return _ext.available()

    def prepare(self, fmt):
        return _ext.prepare(fmt) if _ext.available() else None

    def run(self, x, fmt, state):
        if state is None or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, fmt.dequantize(x.dtype))
        return self._compute(x if x.dtype == torch.float32 else x.float(), state)

    def _compute(self, x: Tensor, state: Any) -> Tensor:
        return _ext.linear(x, state)


class FusedQ8(Fused, register=False):
    """The fused GEMV with x quantized per call to int8 per 32 columns (as llama.cpp's Q8_0 activations), multiplied
    with integer dot products: AVX-512 VNNI (``csrc/fused_vnni.cpp``), AVX-VNNI (``csrc/fused_q8_avxvnni.cpp``)
    or AVX2 (``csrc/fused_q8_avx2.cpp``).
    Offered for decode only (at most 8 rows of x, so prefill, perplexity and calibration never run it), for groups
    of a multiple of 64 columns or per channel, where :func:`int8_activations` allows it. Its products are within
    2e-2 (relative to the output's largest value) of fp32; on the decode path it costs about 1 % perplexity."""

    name = "fused_q8"
    max_rows = 8
    max_rel_error = 2e-2

    def supports(self, fmt):
        return super().supports(fmt) and _ext.q8_supports(fmt)

    def available(self):
        return int8_activations()

    def prepare(self, fmt):
        return _ext.prepare(fmt, layout=_ext.q8_layout()) if _ext.q8_available() else None

    def _compute(self, x, state):
        return _ext.linear_q8(x, state)


class TritonGPU(Kernel, register=False):
    """lowbit's Triton kernels for :class:`GroupedInt` on CUDA (:mod:`lowbit.kernels._triton`,
    ``torch.ops.lowbit.grouped_linear_gpu``): the stored codes read as they are (no repacked copy), decoded in
    registers, fp32 accumulation; a GEMV up to 8 rows of x, a ``tl.dot`` tile kernel beyond.  The plan holds
    the fp16 zero points (unpacked from ``int_zero`` formats) and nothing else.  Registered where Triton is
    installed (``lowbit[gpu]``); offered automatically for formats on a CUDA device.  With Triton's interpreter
    on (``TRITON_INTERPRET=1``, tests) it also runs CPU formats when forced (``LOWBIT_KERNEL=triton``)."""

    name = "triton"
    device = "cuda"

    def supports(self, fmt):
        if not isinstance(fmt, GroupedInt) or min(fmt.shape) < 1:
            return False
        device = fmt.codes.device.type
        return device == "cuda" or (device == "cpu" and _triton_interpreting())

    def available(self):
        return torch.cuda.is_available()

    def prepare(self, fmt):
        from lowbit.kernels import _triton  # noqa: F401 - registers torch.ops.lowbit.grouped_linear_gpu

        _ext.check_format(fmt)
        zero = None if fmt.spec.symmetric else fmt.zero_points().contiguous()   # fp16 (out, G)
        return zero, fmt.spec.group_width(fmt.in_features)

    def run(self, x, fmt, state):
        if x.requires_grad and torch.is_grad_enabled():                    # the op has no backward
            return F.linear(x, fmt.dequantize(x.dtype))
        zero, group_width = state
        return torch.ops.lowbit.grouped_linear_gpu(x if x.dtype == torch.float32 else x.float(), fmt.codes.contiguous(),
                                                   fmt.scale.contiguous(), zero, fmt.spec.bits, group_width,
                                                   fmt.in_features)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


if _triton_installed():
    KERNELS[TritonGPU.name] = TritonGPU()


def int8_activations() -> bool:
    """Whether decode may run the int8-activation kernel (``fused_q8``, chosen per shape when faster).
    ``LOWBIT_INT8_ACT=1`` or unset (``auto``): wherever a q8 path runs (AVX-512 VNNI, AVX-VNNI or AVX2); ``0``: never.
    Measured, 2 threads, weights from memory: on an AVX2 EPYC the fp32-activation GEMV is compute-bound (shift,
    convert and FMA per 8 columns) and the int8 one, 32 columns in about five integer ops, is 1.4-2x faster per
    call, w4g128-head8 decode 156 against 125 tokens/s; on an AVX-512 VNNI EPYC one vpdpbusd covers 64 columns
    and the int8 head takes 0.40 against 0.80 ms, w4g128-head8 decode 173 against 114 tokens/s. The cost: x is
    rounded to 8 bits per 32 columns (as llama.cpp's Q8_0 activations), about 1 % perplexity on decode only."""
    value = os.environ.get("LOWBIT_INT8_ACT", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    path = _ext.q8_isa()                         # the path the calls will take (LOWBIT_ISA included); None: none
    return path is not None


# LOWBIT_NO_EXT=1 leaves the kernels out entirely (LOWBIT_KERNEL=fused then means reference)
if not _ext.disabled():
    KERNELS[Fused.name] = Fused()
    KERNELS[FusedQ8.name] = FusedQ8()


def fused_info() -> dict:
    """Which path the ``fused`` kernel runs here (see :func:`lowbit.kernels._ext.fused_info`):
    ``{"available": bool, "isa": "avx512" | "avx2" | "scalar" | None, "cpu_isa": ..., "isas": [...],
    "q8_isa": "avx512" | "avxvnni" | "avx2" | None, "q8_isas": [...], ...}``."""
    return _ext.fused_info()


_CHOICE: dict[str, str] = {}              # choice key -> kernel name, this process (and the machine's file)
_CHOICES_LOADED: list = [None]            # path of the machine's file once read into _CHOICE


_FILES: dict[str, Path | None] = {}      # LOWBIT_KERNEL_CHOICES value -> choices file (the key costs a hash)


def choices_file() -> Path | None:
    """Where this machine's measured choices are kept: ``$LOWBIT_KERNEL_CHOICES`` (``off``: nowhere), else
    ``<cache>/kernels/choices-<machine>.json`` keyed by CPU model and features, torch version and the
    fused extension's build (a different machine, torch or kernel build measures again)."""
    env = os.environ.get("LOWBIT_KERNEL_CHOICES", "").strip()
    if env not in _FILES:
        _FILES[env] = None if env.lower() == "off" else Path(env) if env else _machine_file()
    return _FILES[env]


def _machine_file() -> Path:
    from lowbit.cache import cache_dir

    ident = repr((cpu.model_name(), sorted(cpu.flags() & _ISA_FLAGS), torch.__version__,
                  _ext.build_key() if _ext.available() else "no-ext", sorted(KERNELS)))
    return cache_dir() / "kernels" / f"choices-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


_ISA_FLAGS = {"avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile"}


def _remembered(key: str) -> str | None:
    path = choices_file()
    if path is not None and _CHOICES_LOADED[0] != path:
        _CHOICES_LOADED[0] = path
        _CHOICE.update(_read_choices(path))
    return _CHOICE.get(key)


def _read_choices(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return {k: v for k, v in data.get("choices", {}).items() if isinstance(v, str) and v in KERNELS}
    except (OSError, ValueError, AttributeError):
        return {}                         # absent or unreadable: measure again (and rewrite it)


def _busy() -> bool:
    """Whether other work competes for the CPU: then a timing favours single-threaded kernels (a
    multi-threaded one waits for its preempted threads), so its choice is not kept for the machine."""
    try:
        return os.getloadavg()[0] > 1.25 * (os.cpu_count() or 1)
    except OSError:
        return False


def _remember(key: str, name: str) -> None:
    _CHOICE[key] = name
    path = choices_file()
    if path is None or _busy():
        return
    from lowbit.cache import atomic_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_choices(path), key: name}          # keep what another process measured meanwhile
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"choices": merged}, indent=1, sort_keys=True))
    except OSError as e:                  # a read-only cache costs a re-measurement next time, nothing else
        log.debug("kernel choices not saved to %s: %s", path, e)


def _row_bucket(m: int) -> int:
    return 1 if m == 1 else 8 if m <= 8 else 64


def _forced() -> str | None:
    name = os.environ.get("LOWBIT_KERNEL")
    if name and name not in KERNELS and name not in (Fused.name, FusedQ8.name):
        from lowbit.errors import LowbitError

        raise LowbitError(f"LOWBIT_KERNEL={name!r} unknown; known: {', '.join(sorted(KERNELS))}")
    return name


def _time_all(candidates: list[Kernel], x: Tensor, fmt: WeightFormat, states: list, rounds: int = 5) -> dict[str, float]:
    """Best time of each candidate over ``rounds`` interleaved rounds (a busy moment hits every candidate)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for k, st in zip(candidates, states):
        k.run(x, fmt, st)
    best = {k.name: float("inf") for k in candidates}
    for _ in range(rounds):
        for k, st in zip(candidates, states):
            sync()
            t0 = time.perf_counter()
            k.run(x, fmt, st)
            sync()
            best[k.name] = min(best[k.name], time.perf_counter() - t0)
    return best


def _device_tag(fmt: WeightFormat) -> str:
    """Part of a choice's key for formats on a GPU: its model (the machine's file is keyed by the CPU only)."""
    device = _device(fmt)
    return "" if device.type == "cpu" else f" on={torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"


def choose(fmt: WeightFormat, m: int, plans: dict) -> Kernel:
    """The kernel for ``fmt`` at ``m`` rows: forced, remembered (this process, or this machine's
    :func:`choices_file`), or timed now on this layer and remembered."""
    forced = _forced()
    if forced:
        kernel = KERNELS.get(forced)
        return kernel if kernel is not None and kernel.supports(fmt) else KERNELS["reference"]
    rows = _row_bucket(m)
    candidates = [k for k in KERNELS.values()
                  if k.supports(fmt) and k.available() and (k.max_rows is None or rows <= k.max_rows)]
    if len(candidates) == 1:
        return candidates[0]
    # the candidates are part of the key: a choice made without one (LOWBIT_INT8_ACT=0) is not reused with it
    key = (f"{sorted(fmt.meta().items(), key=str)!r} rows={rows} threads={torch.get_num_threads()} "
           f"of={','.join(sorted(k.name for k in candidates))}{_device_tag(fmt)}")
    name = _remembered(key)
    if name is None or not any(k.name == name for k in candidates):
        x = torch.randn(_row_bucket(m), fmt.shape[1], device=_device(fmt))
        # losers' states are built for the timing only and dropped: a layer keeps one plan per kernel it uses
        states = [plans[k.name] if k.name in plans else k.prepare(fmt) for k in candidates]
        times = _time_all(candidates, x, fmt, states)
        name = min(times, key=times.get)
        _remember(key, name)
        log.debug("kernel for %s: %s (%s)", key, name, times)
    return KERNELS[name]


def _state(kernel: Kernel, fmt: WeightFormat, plans: dict) -> Any:
    if kernel.name not in plans:
        plans[kernel.name] = kernel.prepare(fmt)
    return plans[kernel.name]


def bind(fmt: WeightFormat, m: int, plans: dict) -> tuple[Kernel, Any]:
    """The kernel for ``fmt`` at ``m`` rows with its prepared state (and the outliers' sparse matrix), resolved
    now: what :func:`linear_bound` runs inside a ``torch.compile`` trace, where nothing may be timed or built."""
    base = fmt.base if isinstance(fmt, OutlierFormat) else fmt
    kernel = choose(base, m, plans)
    if base is not fmt:
        _outlier_matrix(fmt, plans)
    return kernel, _state(kernel, base, plans)


_BOUND = "_bound"          # key in a module's plans: its bound kernel per (row bucket, forced kernel, threads)


def linear(x: Tensor, fmt: WeightFormat, bias: Tensor | None, plans: dict) -> Tensor:
    """``x @ W.T + bias`` for x (..., in); ``plans`` is the calling module's per-kernel state.

    The kernel is bound once per module and row bucket (and per ``LOWBIT_KERNEL`` value and thread
    count), so later calls go straight to it: an eager decode step makes hundreds of these calls."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    memo = (_row_bucket(m), os.environ.get("LOWBIT_KERNEL"), os.environ.get("LOWBIT_INT8_ACT"), torch.get_num_threads())
    bound = plans.setdefault(_BOUND, {}).get(memo)
    if bound is None:
        bound = plans[_BOUND][memo] = bind(fmt, m, plans)
    return linear_bound(x, fmt, bias, bound, plans)


def module_linear(x: Tensor, fmt: WeightFormat, bias: Tensor | None, plans: dict,
                  bound: tuple[Kernel, Any] | None) -> Tensor:
    """A module's ``x @ W.T + bias`` on the kernel path, in x's dtype: inside a ``torch.compile`` trace the
    kernel bound beforehand (:func:`bind`; without one, the reference computation, traceable as is, since
    nothing may be timed or built in a trace), else :func:`linear` on fp32 rows."""
    if torch.compiler.is_compiling():
        if bound is None:
            return F.linear(x, fmt.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        return linear_bound(x, fmt, bias, bound, plans)
    if x.dtype != torch.float32:            # kernels take fp32 rows (fp16/bf16 models)
        return linear(x.float(), fmt, bias, plans).to(x.dtype)
    return linear(x, fmt, bias, plans)


def linear_bound(x: Tensor, fmt: WeightFormat, bias: Tensor | None, bound: tuple[Kernel, Any], plans: dict) -> Tensor:
    """:func:`linear` with the kernel and state already chosen (:func:`bind`)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x2.dtype
    x2 = x2.float()
    base = fmt.base if isinstance(fmt, OutlierFormat) else fmt
    kernel, state = bound
    y = kernel.run(x2, base, state)
    if base is not fmt:
        y = y + sparse_outliers(x2, fmt, plans)
    if bias is not None:
        y = y + bias
    return y.to(dtype).reshape(*lead, y.shape[-1])



# -- outliers (OutlierFormat): the base's kernel plus a sparse product ------------------------------
_OUTLIER_PLAN = "_outliers"          # key in a module's plans; no kernel carries this name


def sparse_outliers(x: Tensor, fmt: OutlierFormat, plans: dict) -> Tensor:
    """``x @ D.T`` (m, out) for the sparse ``D = values - base`` at the outlier positions of ``fmt``.

    ``D`` is a torch CSR matrix (int32 indices, fp32 corrections: 12 bytes per outlier), built
    once per module and kept in its plans; no dense copy of the weight survives the call.
    CSR ``D @ x.T`` against an index gather/scatter (``index_add_`` of ``x.index_select(1, col) * d``
    into the output columns), 0.5 % outliers, 2 shared CPU cores, best of 15-20 (us; the fp32 reference
    kernel of a 3-bit base for scale):

    ===========  ====  ===========  ==============  ==============
    out x in     rows  CSR D @ x.T  gather/scatter  base reference
    ===========  ====  ===========  ==============  ==============
    576 x 576       1        9             9              425
    1536 x 576      1       11            14              910
    576 x 1536      1       10            15              800
    576 x 576     512      240           680             2300
    1536 x 576    512      440          2900            14700
    576 x 1536    512      690          3500            13900
    ===========  ====  ===========  ==============  ==============

    CSR is never slower and 3-7x faster at 512 rows (the scatter along the output dimension
    is the slow part), so it is the only path; it adds about 1-10 % to the base's time.
    """
    with torch.autocast("cpu", enabled=False):                             # no bf16 sparse matmul on CPU
        return (_outlier_matrix(fmt, plans) @ x.float().t()).t()           # (out, m) -> (m, out)


def _outlier_matrix(fmt: OutlierFormat, plans: dict) -> Tensor:
    """The CSR matrix ``D`` of :func:`sparse_outliers`, built once per module and kept in its plans."""
    if _OUTLIER_PLAN not in plans:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)                   # "sparse CSR support is in beta"
            plans[_OUTLIER_PLAN] = torch.sparse_csr_tensor(
                fmt.row_ptr, fmt.col.to(torch.int32), fmt.corrections(), fmt.shape, check_invariants=False)
    return plans[_OUTLIER_PLAN]
