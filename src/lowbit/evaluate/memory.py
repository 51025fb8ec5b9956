"""Memory: bytes a model holds, and the peak resident set of loading and running it.

``peak_rss_of_load`` measures in a fresh interpreter, so the number is the cost of one model
alone (interpreter, torch and transformers imports included) and not whatever the calling
process has touched before.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from torch import nn

from lowbit.errors import LowbitError

# Code run by the child before the measurement; it gets ``spec`` and must define
# ``model`` (a causal LM with .generate) and ``tokenizer``.
DEFAULT_LOADER_CODE = """
import lowbit
loaded = lowbit.load_model(spec)
model, tokenizer = loaded.model, loaded.tokenizer
"""

# argv: spec, new_tokens. Prints one JSON line {"peak_rss_bytes": N} last on stdout.
_CHILD_CODE = """
import json, resource, sys
spec, new_tokens = sys.argv[1], int(sys.argv[2])
{loader}
import torch
inputs = tokenizer("Hello", return_tensors="pt")
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
with torch.inference_mode():
    model.generate(**inputs, do_sample=False, min_new_tokens=new_tokens,
                   max_new_tokens=new_tokens, pad_token_id=pad)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * {rss_unit}
try:  # Linux carries the parent's high-water mark into ru_maxrss across fork+exec; VmHWM is this process's own
    with open("/proc/self/status") as f:
        rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps({{"peak_rss_bytes": rss}}))
"""


def _rss_unit() -> int:
    """Bytes per unit of ``ru_maxrss``: KiB on Linux, bytes on macOS."""
    return 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of the current process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _rss_unit()


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting tied or shared tensors once."""
    seen: set[tuple] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        nbytes = t.numel() * t.element_size()
        key = ("id", id(t)) if t.is_meta else (str(t.device), t.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def peak_rss_of_load(
    spec: str,
    new_tokens: int = 8,
    loader_code: str = DEFAULT_LOADER_CODE,
    timeout: float | None = None,
) -> int:
    """Peak RSS in bytes of a fresh Python that loads ``spec`` and greedily generates ``new_tokens``.

    ``loader_code`` runs in the child with ``spec`` defined and must define ``model`` and
    ``tokenizer``; the default calls ``lowbit.load_model(spec)``.
    """
    code = _CHILD_CODE.format(loader=loader_code.strip(), rss_unit=_rss_unit())
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, spec, str(new_tokens)],
            check=False, capture_output=True, text=True, timeout=timeout, env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        raise LowbitError(f"peak RSS measurement of {spec!r} ran past {timeout} s; "
                          "raise the timeout or use a smaller model") from None
    if proc.returncode != 0:
        raise LowbitError(f"peak RSS measurement of {spec!r} failed (exit {proc.returncode}): "
                          f"{_last_line(proc.stderr) or 'no stderr'}")
    try:
        return int(json.loads(_last_line(proc.stdout))["peak_rss_bytes"])
    except (ValueError, KeyError, TypeError):
        raise LowbitError(f"peak RSS measurement of {spec!r} printed no result line; stdout ended "
                          f"with {_last_line(proc.stdout)!r}") from None


def _child_env() -> dict[str, str]:
    """The current environment, with the directory holding this ``lowbit`` first on PYTHONPATH, and the
    eager decode path (``LOWBIT_COMPILE=0``): the figure is the model's memory while it generates, not
    the one-time cost of compiling its decode step."""
    src = str(Path(__file__).resolve().parents[2])  # .../src, parent of the lowbit package
    env = dict(os.environ)
    env["LOWBIT_COMPILE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
