"""What every row shares: the model and token windows, storage counting, memory, errors.

Bits per weight are counted the same way for every library: for each decoder-block linear layer
of the fp32 model (q/k/v/o/gate/up/down of the 30 blocks), take whatever module the library left
at that name and add up the real ``nbytes`` of every tensor it holds: parameters and buffers
(recursively), the inner tensors of tensor subclasses (torchao, optimum-quanto: via
``__tensor_flatten__``), and tensors kept in a ``meta`` dict (HQQ keeps its scales and zeros
there). Biases are left out (SmolLM2 has none). Shared storage is counted once. The sum, times 8,
divided by the number of weights of those layers, is the bits per weight; an unquantized fp32
layer therefore counts 32 bits per weight.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import lowbit
from lowbit.data import calibration_windows, eval_windows, load_text
from lowbit.models.adapters import get_adapter
from lowbit.recipe import CalibrationSpec, Recipe


# -- versions, memory, errors -------------------------------------------------------------
def version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float | None:
    """VmHWM of this process, MB (10^6 bytes)."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb * 1024 / 1e6


def first_line(exc: BaseException) -> str:
    """``Type: first non-empty line of the message``, as the table shows an error."""
    msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def short_traceback(exc: BaseException, lines: int = 12) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(tb.rstrip().splitlines()[-lines:])


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


# -- the model and the windows ------------------------------------------------------------
@dataclass
class Settings:
    """Everything that makes a row's result comparable with another's; stored in each row."""

    model: str = "smollm2-135m"
    windows: int = 32               # wiki evaluation windows
    seqlen: int = 512               # evaluation window length
    calib_windows: int | None = None  # None: the recipe's (128); smaller only for development
    iters: int | None = None        # auto-round iterations override; only for development
    threads: int | None = None      # torch threads; None: torch's default

    def fingerprint(self) -> dict:
        return {"model": self.model, "windows": self.windows, "seqlen": self.seqlen,
                "calib_windows": self.calib_windows, "iters": self.iters}


# Calibration exactly as ``lowbit.quantize`` builds it for its calibrated presets (api.py):
#   text, info = load_text(cal.corpus)
#   windows = calibration_windows(tokenizer, text, cal.seqlen, cal.windows, cal.seed)
CALIBRATION = Recipe().calibration                       # a recipe's default: owt, 128 windows x 512, seed 0


class Context:
    """Lazily loaded things a row needs; one per child process."""

    def __init__(self, settings: Settings, work: Path | None = None):
        self.settings = settings
        self.work = work                # the benchmark's work folder (resumable rows keep their state there)
        self._tokenizer = None
        self._layers: dict[str, int] | None = None
        self._calib: Tensor | None = None

    @property
    def calibration_spec(self) -> CalibrationSpec:
        n = self.settings.calib_windows
        return CALIBRATION if n is None else dataclasses.replace(CALIBRATION, windows=n)

    def load(self):
        """A fresh fp32 LoadedModel (model, tokenizer, source)."""
        loaded = lowbit.load_model(self.settings.model)
        loaded.model.eval()
        if self._tokenizer is None:
            self._tokenizer = loaded.tokenizer
        if self._layers is None:
            self._layers = decoder_linears(loaded.model)
        return loaded

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    @property
    def layers(self) -> dict[str, int]:
        """Name -> number of weights of every decoder-block linear layer of the fp32 model."""
        if self._layers is None:
            self.load()
        return self._layers

    def calibration(self) -> Tensor:
        """(n, seqlen) int64: the very windows ``lowbit.quantize`` samples for its calibrated presets."""
        if self._calib is None:
            cal = self.calibration_spec
            text, _ = load_text(cal.corpus)
            self._calib = calibration_windows(self.tokenizer, text, cal.seqlen, cal.windows, cal.seed)
        return self._calib

    def eval_windows(self) -> Tensor:
        text, _ = load_text("wiki")
        return eval_windows(self.tokenizer, text, seqlen=self.settings.seqlen, n=self.settings.windows)


def decoder_linears(model: nn.Module) -> dict[str, int]:
    adapter = get_adapter(model)
    out = {}
    for block_name, block in adapter.blocks(model):
        for rel, ref in adapter.linears(block).items():
            out[f"{block_name}.{rel}"] = ref.module.weight.numel()
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# -- what a row returns -------------------------------------------------------------------
@dataclass
class RowOutput:
    """A quantized model ready to evaluate, and how it was made.

    ``storage`` is a dict from :func:`count_storage`, or a callable returning one that is called
    after the evaluation (for libraries that pack only on export, such as llm-compressor).
    """

    model: nn.Module
    quantize_s: float | None
    storage: dict | Callable[[], dict]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# -- storage counting ---------------------------------------------------------------------
def _is_wrapper(t: Tensor) -> bool:
    return type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def layer_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Every tensor ``module`` stores for its weight (not the bias), flattened, each storage once."""
    seen: set = set()
    out: list[tuple[str, Tensor]] = []

    def add(name: str, t: Any) -> None:
        if not isinstance(t, Tensor):
            return
        if _is_wrapper(t):
            inner, _ = t.__tensor_flatten__()
            for n in inner:
                add(f"{name}.{n}", getattr(t, n))
            return
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes) if t.device.type != "meta" else id(t)
        except (RuntimeError, NotImplementedError):
            key = id(t)
        if key in seen:
            return
        seen.add(key)
        out.append((name, t))

    def walk_dict(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk_dict(f"{prefix}{k}.", v)
            else:
                add(f"{prefix}{k}", v)

    for n, p in module.named_parameters(recurse=True):
        if n.rsplit(".", 1)[-1] != "bias":
            add(n, p)
    for n, b in module.named_buffers(recurse=True):
        if n.rsplit(".", 1)[-1] != "bias":
            add(n, b)
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        walk_dict("meta.", meta)
    return out


def count_storage(model: nn.Module, layers: dict[str, int], bits: int | None) -> dict:
    """Bytes the library stores for the decoder linear layers, bits per weight, and whether codes are packed.

    ``bits``: the nominal code width of the configuration (None for fp32). Packing is judged on
    each layer's largest tensor (its codes): integer and about ``bits`` bits per weight = packed.
    """
    total_bytes = 0
    total_weights = 0
    code_bytes = 0
    float_layers = 0
    kinds: dict[str, dict] = {}
    module_types: dict[str, int] = {}
    for name, n_weights in layers.items():
        module = model.get_submodule(name)
        module_types[type(module).__module__ + "." + type(module).__qualname__] = \
            module_types.get(type(module).__module__ + "." + type(module).__qualname__, 0) + 1
        tensors = layer_tensors(module)
        if not tensors:
            raise RuntimeError(f"{name}: found no stored tensor in {type(module).__name__}")
        for tname, t in tensors:
            k = kinds.setdefault(tname, {"dtype": str(t.dtype).replace("torch.", ""), "bytes": 0, "layers": 0,
                                         "shape_example": list(t.shape)})
            k["bytes"] += t.nbytes
            k["layers"] += 1
        biggest = max(tensors, key=lambda nt: nt[1].nbytes)[1]
        code_bytes += biggest.nbytes
        if biggest.dtype.is_floating_point:
            float_layers += 1
        total_bytes += sum(t.nbytes for _, t in tensors)
        total_weights += n_weights
    code_bits = 8 * code_bytes / total_weights
    big_dtypes = sorted({k["dtype"] for k in kinds.values()})
    if bits is None:
        packed = "n/a (fp32)"
    elif float_layers == len(layers):
        packed = "no: float weights (fake-quantized)"
    elif float_layers:
        packed = f"partly: {float_layers}/{len(layers)} layers hold a float weight"
    elif code_bits <= bits + 0.3:
        packed = "yes"
    else:
        packed = f"no: {code_bits:.1f} bits per {bits}-bit code"
    return {
        "bits_per_weight": 8 * total_bytes / total_weights,
        "bytes": total_bytes,
        "weights": total_weights,
        "layers": len(layers),
        "code_bits_per_weight": code_bits,
        "float_layers": float_layers,
        "packed": packed,
        "tensors": kinds,
        "dtypes": big_dtypes,
        "module_types": module_types,
    }


def storage_summary(storage: dict) -> str:
    """One line: each stored tensor kind with its dtype and bits per weight, e.g. ``W_q uint8 4.00``."""
    w = storage["weights"]
    parts = [f"{name} {k['dtype']} {8 * k['bytes'] / w:.3f}" for name, k in
             sorted(storage["tensors"].items(), key=lambda kv: -kv[1]["bytes"])]
    return ", ".join(parts)


def env_threads(settings: Settings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NoInferenceMode(nn.Module):
    """Runs the wrapped model under ``torch.no_grad()`` with inference mode switched off.

    ``evaluate_quality`` runs under ``torch.inference_mode()``; a library whose tensor subclass
    fails there (optimum-quanto) is evaluated this way instead, as ``generate`` would run it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(*args, **kwargs)
