"""Build, load and call lowbit's fused C++ CPU kernels (``torch.ops.lowbit.*``).

The sources in ``csrc/`` are compiled on first use with :func:`torch.utils.cpp_extension.load` against
the installed PyTorch into ``lowbit.cache.cache_dir() / "ext" / <key>``; the key holds the torch and
Python versions, the CPU feature level the flags were chosen for, and a hash of the sources and flags,
so a changed source, flag or PyTorch gets a fresh build and machines sharing a cache never load a
library built for a CPU they lack.  An ``fcntl`` lock beside the build directory keeps two processes
from compiling at once; the second waits and loads what the first built.  Build output stays quiet
unless the build fails.

Where the build fails (no compiler, no ninja, an unsupported platform) lowbit logs ONE warning and the
``fused`` kernel computes with the reference kernel instead; ``LOWBIT_NO_EXT=1`` skips the extension
entirely (no build, no warning).  ``LOWBIT_ISA=avx512|avx2|scalar`` forces a lower instruction-set
path than the CPU offers (``auto``, the default, takes the best); :func:`fused_info` reports which runs.

Flags: ``-O3`` plus, where the building CPU has AVX2/FMA/F16C, the x86 baseline ``-mavx2 -mfma -mf16c``
(never ``-march=native``).  ``cpp_extension.load`` passes one set of flags to every source, so the AVX2
and AVX-512 translation units raise their own target with ``#pragma GCC target`` (equivalent to
``-mavx2 -mfma -mf16c`` and ``-mavx512f -mavx512bw -mavx512vl``); the library picks a path at run time
with ``__builtin_cpu_supports``.  ``-fopenmp`` makes ``at::parallel_for`` use PyTorch's OpenMP pool
(the one ``torch.set_num_threads`` sets).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lowbit import cpu
from lowbit.errors import LowbitError, ShapeError

log = logging.getLogger("lowbit.kernels")

NAME = "lowbit_fused"
CSRC = Path(__file__).resolve().with_name("csrc")
SOURCES = ("fused_ops.cpp", "fused_layer.cpp", "fused_scalar.cpp", "fused_avx2.cpp", "fused_avx512.cpp", "fused_vnni.cpp",
           "fused_q8_avx2.cpp", "fused_q8_avxvnni.cpp", "fused_learn.cpp", "fused_gptq.cpp")
HEADERS = ("fused_common.h", "fused_step.h", "rounding.h", "super_dot.h")
# ordered as the C++ side's Isa enum; "avxvnni" (AVX2 with the 256-bit VEX vpdpbusd) is a path of the
# int8-activation kernel only: the fp32 kernels run their AVX2 code there
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avxvnni": 3, "avx512": 4}
ISA_NAMES = {1: "scalar", 2: "avx2", 3: "avxvnni", 4: "avx512"}
_BUILD_VERSION = 1                       # bump to force a rebuild without a source change

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "reason": None, "build_dir": None, "library": None}


# -- build ------------------------------------------------------------------------------------------
def feature_level() -> str:
    """The CPU feature level the build is compiled for: ``avx512``, ``avx2``, ``x86-64`` or ``<arch>``."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return machine or "unknown"
    flags = cpu.flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return "x86-64"
    return "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"


def _openmp() -> bool:
    return sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()


def build_flags(level: str | None = None) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for ``level`` (default: this machine's)."""
    level = level or feature_level()
    cflags = ["-O3", "-DNDEBUG"]
    if level in ("avx2", "avx512"):
        cflags += ["-mavx2", "-mfma", "-mf16c"]
    ldflags = []
    if _openmp():
        cflags.append("-fopenmp")
        ldflags += _openmp_link()
    return cflags, ldflags


def _openmp_link() -> list[str]:
    """Link the OpenMP runtime PyTorch itself loaded (a wheel may bundle its own libgomp, possibly under a
    hashed name): a second runtime would keep its own thread pool and ignore ``torch.set_num_threads``."""
    lib = Path(torch.__file__).resolve().parent / "lib"
    bundled = sorted(lib.glob("libgomp*.so*"))
    if bundled:
        return [str(bundled[0]), f"-Wl,-rpath,{lib}"]
    return ["-fopenmp"]


def build_key() -> str:
    level = feature_level()
    cflags, ldflags = build_flags(level)
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(repr((cflags, ldflags, os.environ.get("CXX", "c++"), _BUILD_VERSION)).encode())
    torch_v = torch.__version__.replace("+", "_")
    return f"{NAME}-torch{torch_v}-py{sys.version_info[0]}{sys.version_info[1]}-{level}-{h.hexdigest()[:16]}"


def build_dir() -> Path:
    from lowbit.cache import cache_dir

    return cache_dir() / "ext" / build_key()


def _compile(directory: Path) -> str:
    """Compile into ``directory`` (caller holds the lock); returns the library path.  Quiet unless it fails."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found (install g++ or clang++, or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja not found (pip install ninja)")
    cflags, ldflags = build_flags()
    t0 = time.perf_counter()
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    old_level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = cpp_extension.load(
                name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=cflags, extra_ldflags=ldflags,
                extra_include_paths=[str(CSRC)], build_directory=str(directory), verbose=False,
                is_python_module=False)
    finally:
        cpp_logger.setLevel(old_level)
    for w in caught:
        log.debug("cpp_extension: %s", w.message)
    log.info("built lowbit's fused CPU kernels in %.0f s into %s", time.perf_counter() - t0, directory)
    return str(path)


def _cached(directory: Path) -> Path | None:
    """The library a finished build left in ``directory`` (its name is in the ``built`` marker), if any."""
    try:
        name = (directory / "built").read_text().strip()
    except OSError:
        return None
    lib = directory / name
    return lib if name and lib.is_file() else None


def _build_and_load() -> str:
    """Load the library for this machine's key, compiling it first (under a file lock) if needed."""
    if sys.platform == "win32":
        raise RuntimeError("the fused kernels are built with gcc/clang on Linux or macOS; Windows is not supported")
    import fcntl

    from lowbit.cache import atomic_file

    directory = build_dir()
    lib = _cached(directory)
    if lib is not None:
        try:
            torch.ops.load_library(str(lib))
            return str(lib)
        except OSError as e:                                             # rebuilt below, under the lock
            log.debug("cached fused kernels %s failed to load: %s", lib, e)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            lib = _cached(directory)
            if lib is not None:                                          # another process built it meanwhile
                try:
                    torch.ops.load_library(str(lib))
                    return str(lib)
                except OSError:
                    lib.unlink(missing_ok=True)
                    (directory / "built").unlink(missing_ok=True)
            path = _compile(directory)                                   # also loads it
            with atomic_file(directory / "built") as tmp:
                tmp.write_text(Path(path).name + "\n")
            return path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can see through the ops."""

    @torch.library.register_fake("lowbit::grouped_linear")
    def _linear_fake(x, codes, scale, zero, bits, group_size, in_features, isa=0, mode=0):
        torch._check(x.dim() == 2 and codes.dim() == 2, lambda: "lowbit::grouped_linear: x and codes must be 2-D")
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("lowbit::grouped_linear_q8")
    def _linear_q8_fake(x, codes, scale, zero, bits, group_size, in_features, isa=0, layout=1):
        torch._check(x.dim() == 2 and codes.dim() == 2, lambda: "lowbit::grouped_linear_q8: x and codes must be 2-D")
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("lowbit::decode_layer")
    def _decode_layer_fake(x, w, meta, fmeta, keys, values, length, cos, sin, mask):
        return torch.empty_like(x)

    @torch.library.register_fake("lowbit::decode_layers")
    def _decode_layers_fake(x, w, meta, fmeta, keys, values, lengths, cos, sin, mask):
        return torch.empty_like(x)

    @torch.library.register_fake("lowbit::linear_f32")
    def _linear_f32_fake(x, w, bias):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("lowbit::grouped_repack")
    def _repack_fake(codes, bits, in_features, layout=0):
        return torch.empty_like(codes, memory_format=torch.contiguous_format)


def _failure_reason(text: str) -> str:
    """One line out of a build log: the first compiler/shell/linker complaint, else the first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else text
    pattern = re.compile(r"error|not found|no such file|fatal|undefined reference|cannot|unrecognized", re.IGNORECASE)
    detail = next((ln for ln in lines[1:] if pattern.search(ln) and not ln.startswith(("[", "FAILED", "ninja:"))
                   and len(ln) < 400), None)
    if head.startswith("Error building extension") and detail:
        head = f"{head.split(':')[0]}: {detail}"
    return head[:300]


def disabled() -> bool:
    return os.environ.get("LOWBIT_NO_EXT", "").strip() not in ("", "0")


def available() -> bool:
    """True when the extension is loaded (building it on first call); never raises."""
    if _state["tried"]:
        return _state["ok"]
    with _lock:
        if _state["tried"]:
            return _state["ok"]
        if disabled():
            _state.update(tried=True, ok=False, reason="disabled by LOWBIT_NO_EXT=1")
            log.info("lowbit: fused CPU kernels disabled by LOWBIT_NO_EXT=1")
            return False
        try:
            _state["build_dir"] = str(build_dir())
            _state["library"] = _build_and_load()
            _register_fakes()
            _state.update(ok=True, reason=None)
        except Exception as e:                                          # noqa: BLE001 - any failure: fall back
            text = str(e).strip() or type(e).__name__
            _state.update(ok=False, reason=_failure_reason(text))
            log.debug("fused kernel build/load failed:\n%s", text)
            # warn_explicit with no source file: one line on stderr, not two
            warnings.warn_explicit(f"lowbit: fused CPU kernels unavailable, using the reference kernel instead "
                                   f"({_state['reason']}; LOWBIT_NO_EXT=1 silences this)", RuntimeWarning,
                                   filename="lowbit.kernels", lineno=0, module="lowbit.kernels")
        _state["tried"] = True
        return _state["ok"]


# -- calling ----------------------------------------------------------------------------------------
_isa_seen: tuple = (None, 0)                   # (raw LOWBIT_ISA, parsed): read on every call, parsed once


@torch.compiler.assume_constant_result
def requested_isa() -> int:
    """``LOWBIT_ISA`` as the ops' isa argument (0 = best the CPU has); a ``torch.compile`` trace keeps the
    value it saw when it was traced."""
    global _isa_seen
    raw = os.environ.get("LOWBIT_ISA")
    if raw == _isa_seen[0]:
        return _isa_seen[1]
    value = (raw or "").strip().lower()
    if value and value not in ISA_CODES:
        raise LowbitError(f"LOWBIT_ISA={value!r} unknown; use one of {', '.join(ISA_CODES)}")
    _isa_seen = (raw, ISA_CODES[value] if value else 0)
    return _isa_seen[1]


def _fp32_path(code: int) -> str:
    """The fp32-activation kernels' path for a resolved ISA code (they have no AVX-VNNI code of their own)."""
    return "avx2" if code == ISA_CODES["avxvnni"] else ISA_NAMES[code]


def fused_info() -> dict:
    """Which fused CPU path runs here: the fp32-activation kernels' ``isa`` ('avx512', 'avx2', 'scalar'; None
    when unavailable) and every one this CPU can run (``isas``), the CPU's best level (``cpu_isa``: one of those
    or 'avxvnni'), the int8-activation kernel's path (``q8_isa``: 'avx512' with AVX-512 VNNI, 'avxvnni' with the
    256-bit AVX-VNNI, 'avx2', None) and every one this CPU can run (``q8_isas``), and why it is unavailable."""
    ok = available()
    info = {"available": ok, "isa": None, "cpu_isa": None, "isas": [], "q8_isa": None, "q8_isas": [],
            "requested": os.environ.get("LOWBIT_ISA") or "auto",
            "feature_level": feature_level(), "build_dir": _state["build_dir"], "reason": _state["reason"]}
    if ok:
        best = int(torch.ops.lowbit.fused_cpu_isa(0))
        info["cpu_isa"] = ISA_NAMES[best]
        info["isas"] = sorted({_fp32_path(i) for i in ISA_NAMES if i <= best}, key=ISA_CODES.get)
        info["isa"] = _fp32_path(int(torch.ops.lowbit.fused_cpu_isa(requested_isa())))
        info["q8_isa"] = q8_isa()
        info["q8_isas"] = sorted({q8_isa(i) for i in ISA_NAMES} - {None}, key=ISA_CODES.get)
    return info


def _shape_error(e: Exception) -> ShapeError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return ShapeError(msg)


@dataclass(eq=False)
class FusedPlan:
    """Per-layer state: the codes in the kernel layout (same bytes as stored; the stored tensor itself for
    8 bits) and references to the fp16 scales/zeros.  Never a dequantized weight."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    layout: int = 0


def describe(fmt) -> str:
    out_f, in_f = fmt.shape
    spec = fmt.spec
    return (f"{out_f}x{in_f} grouped_int layer ({spec.bits}-bit, group {spec.group_size}, "
            f"{'symmetric' if spec.symmetric else 'asymmetric'})")


def check_format(fmt) -> None:
    """The format's tensors have the shapes and dtypes its spec implies; else ShapeError naming the layer."""
    out_f, in_f = fmt.shape
    if fmt.spec.symmetric and fmt.zero is not None:
        raise ShapeError(f"fused kernel: the symmetric {describe(fmt)} must store no zero points")
    for name, (shape, dtype) in type(fmt).layout(out_f, in_f, fmt.spec).items():
        t = getattr(fmt, name)
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = "nothing" if not isinstance(t, Tensor) else f"{t.dtype} {tuple(t.shape)}"
            raise ShapeError(f"fused kernel: {name} of the {describe(fmt)} must be {dtype} {shape}, got {got}; "
                             f"the packed tensors are corrupt or belong to another layer")


def prepare(fmt, layout: int = 0) -> FusedPlan:
    """The plan of :func:`linear` (``layout=0``) or :func:`linear_q8` (``layout=1``: 4-bit codes in the int8
    kernel's nibble order, the other widths as layout 0; ``layout=2``: 2-4 bit codes in super-chunks of 512
    columns whose integer sums span a whole block of x, read by both int8 paths, see
    ``csrc/fused_common.h``; :func:`q8_layout` gives the one this CPU runs)."""
    check_format(fmt)
    out_f, in_f = fmt.shape
    bits = fmt.spec.bits
    codes = fmt.codes.contiguous()
    if bits != 8:
        try:
            codes = torch.ops.lowbit.grouped_repack(codes, bits, in_f, layout)
        except ValueError as e:
            raise _shape_error(e) from None
    zero = None if fmt.zero is None else fmt.zero_points().contiguous()      # fp16 (out, G), integer zeros unpacked
    return FusedPlan(codes, fmt.scale.contiguous(), zero, bits, fmt.spec.group_size, in_f, out_f, layout)


def linear(x: Tensor, plan: FusedPlan, mode: int = 0, isa: int | None = None) -> Tensor:
    """``x @ W.T`` (fp32) for x (m, in) fp32 on the CPU.  mode: 0 auto, 1 GEMV, 2 tiled."""
    try:
        return torch.ops.lowbit.grouped_linear(x, plan.codes, plan.scale, plan.zero, plan.bits, plan.group_size,
                                               plan.in_features, requested_isa() if isa is None else isa, mode)
    except ValueError as e:
        raise _shape_error(e) from None


def q8_available() -> bool:
    """Whether the int8-activation kernel (:func:`linear_q8`) runs here: the extension and AVX2 at least, within
    what ``LOWBIT_ISA`` allows (``scalar`` rules it out, as a CPU without AVX2 does); :func:`q8_isa` names the path."""
    return q8_isa() is not None


def q8_supports(fmt) -> bool:
    """Groups the int8-activation kernel covers: per channel or a multiple of 64 columns."""
    g = fmt.spec.group_size
    return g == -1 or g >= fmt.shape[1] or g % 64 == 0


def q8_isa(isa: int | None = None) -> str | None:
    """The int8-activation kernel's path for ``isa`` (default ``LOWBIT_ISA``): ``avx512`` (AVX-512 VNNI),
    ``avxvnni`` (256-bit AVX-VNNI, no AVX-512), ``avx2`` (vpmaddubsw) or None where it cannot run."""
    if not available():
        return None
    code = int(torch.ops.lowbit.fused_q8_isa(requested_isa() if isa is None else isa))
    return None if code == ISA_CODES["scalar"] else ISA_NAMES[code]


def q8_layout(isa: int | None = None) -> int:
    """The repack layout of :func:`linear_q8`'s plans: 2 wherever an int8 path runs (both read it and layout 1;
    layout 2 measured 0.62-0.90x layout 1's time per call with VNNI, see ``csrc/fused_vnni.cpp``, and less
    again on the AVX2 path, ``csrc/fused_q8_avx2.cpp``), 1 where none does."""
    return 2 if q8_isa(isa) is not None else 1


def linear_q8(x: Tensor, plan: FusedPlan, isa: int | None = None) -> Tensor:
    """``x @ W.T`` with x quantized per call to int8 per 32 columns (AVX-512 VNNI, or AVX2 without it; ``isa``
    as in :func:`linear`); ``plan`` from ``prepare(fmt, layout=1)`` or ``layout=2``.  Within
    about 1e-2 of the fp32 result, relative to its norm."""
    try:
        return torch.ops.lowbit.grouped_linear_q8(x, plan.codes, plan.scale, plan.zero, plan.bits, plan.group_size,
                                                  plan.in_features, requested_isa() if isa is None else isa,
                                                  max(plan.layout, 1))
    except ValueError as e:
        raise _shape_error(e) from None
