"""The benchmark scripts' import path: benchmarks/kernels.py must not shadow the PyPI package ``kernels``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_benchmark_folder_does_not_shadow_installed_kernels_package():
    # Python puts a script's folder first on sys.path; transformers imports `kernels` when it is installed
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (transformers 5 requires it)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _syspath, importlib.util; "
            "print(importlib.util.find_spec('kernels').origin); print(importlib.util.find_spec('kernels_lib').origin)")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, check=True)
    kernels_origin, lib_origin = out.stdout.split()
    assert Path(kernels_origin).resolve() != BENCH / "kernels.py"
    assert Path(lib_origin).resolve() == BENCH / "kernels_lib" / "__init__.py"
