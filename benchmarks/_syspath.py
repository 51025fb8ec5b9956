"""Moves this folder to the end of ``sys.path``; every script here imports it before anything else.

Python runs a script with the script's folder first on the path. Here that folder holds ``kernels.py``
(the kernels benchmark), which would then shadow the PyPI package ``kernels``: transformers 5 requires
that package and imports it while loading a model, so every benchmark died with "cannot import name
'CUDAProperties' from 'kernels' (benchmarks/kernels.py)". Last on the path, this folder still provides
``child``, ``kernels_lib`` and ``peers_lib``, and installed packages come first.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
