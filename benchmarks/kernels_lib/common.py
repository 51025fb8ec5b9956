"""What every part shares: settings, rows, JSON records, memory, the machine's description."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL = "smollm2-135m"
RELEVANT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                  "avx512dq", "avx512cd", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                  "amx_bf16")
ENV_VARS = ("LOWBIT_KERNEL", "LOWBIT_ISA", "LOWBIT_NO_EXT")


@dataclass(frozen=True)
class Settings:
    """Everything that makes one run's figures comparable with another's; rows are cached per settings."""

    quick: bool = False
    threads: int = 2                         # end-to-end decode, llama-bench, the bandwidth line
    kernel_threads: tuple[int, ...] = (2,)   # thread counts of the kernel table
    rows: tuple[int, ...] = (1, 64)          # rows of x in the kernel table (1 = GEMV, 64 = a prefill)
    new_tokens: int = 64
    repeats: int = 3                         # generate calls (and llama-bench repetitions); the median counts
    env: tuple[tuple[str, str], ...] = ()    # the LOWBIT_* variables that change which kernel runs

    @classmethod
    def make(cls, quick: bool, kernel_threads: tuple[int, ...]) -> Settings:
        env = tuple((k, os.environ[k]) for k in ENV_VARS if os.environ.get(k))
        return cls(quick, 2, tuple(kernel_threads), (1, 64), 16 if quick else 64, 1 if quick else 3, env)

    @property
    def rounds(self) -> int:
        """Interleaved timing rounds per kernel case."""
        return 2 if self.quick else 7

    @property
    def budget_s(self) -> float:
        """Seconds per kernel case per round."""
        return 0.01 if self.quick else 0.05

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["env"] = dict(self.env)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        tag = "quick" if self.quick else "full"
        return f"{tag}-{hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Row:
    """One cached unit of the benchmark.

    ``run(settings, work)`` runs in a child process and returns the row's figures, or raises
    :class:`Skip`. ``unavailable()``, checked in the parent before anything runs, says why the row
    cannot run with this lowbit (such a row is looked for again on every run). ``cache_skips``:
    whether a ``Skip`` raised by ``run`` is kept (True for an expensive failure, a llama.cpp build).
    """

    name: str
    group: str                               # "bandwidth" | "kernel" | "decode" | "llamacpp" | "pair"
    config: str
    run: Callable[[Settings, Path], dict]
    unavailable: Callable[[], str | None] = lambda: None
    cache_skips: bool = False


def pair_name(a: str, b: str) -> str:
    """The name of the row measuring decode row ``a`` head to head against ``b`` (a decode row, or
    ``llamacpp-<type>``): ``pair-<a>-vs-<b without "llamacpp-">``."""
    return f"pair-{a}-vs-{b.removeprefix('llamacpp-')}"


class Skip(Exception):
    """The row cannot run here; the message says exactly why."""


# -- records ------------------------------------------------------------------------------------
def finite(x):
    """Non-finite floats as strings ("inf"/"nan"), so the JSON stays strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: Path, doc: dict) -> None:
    from lowbit.cache import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(finite(doc), indent=1) + "\n")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def first_line(exc: BaseException) -> str:
    msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def peak_rss_mb() -> float | None:
    """VmHWM of this process, MB (10^6 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


# -- the machine --------------------------------------------------------------------------------
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as lowbit's kernel build reads them."""
    from lowbit.cpu import flags

    return flags()


def cpu_model() -> str:
    from lowbit.cpu import model_name

    return model_name()


def machine_info() -> dict:
    """CPU, its flags that matter to these kernels, versions, and which fused path lowbit runs."""
    import torch

    import lowbit
    from lowbit.kernels import fused_info

    flags = cpu_flags()
    return {"cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "flags": [f for f in RELEVANT_FLAGS if f in flags], "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "lowbit": lowbit.__version__,
            "python": platform.python_version(), "fused_info": fused_info(),
            "env": {k: os.environ[k] for k in (*ENV_VARS, "OMP_NUM_THREADS") if k in os.environ}}
