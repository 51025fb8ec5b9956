#!/usr/bin/env bash
# The GPU device check (issue 9 part 2), for a session lent a GPU machine (its python3 has CUDA torch and
# Triton; nothing is installed): the Triton kernels' CUDA tests, then the GPU kernels benchmark.
#   device run:  bash scripts/gpu_check.sh            (results land in $OUT, else benchmarks/results)
# About 3-6 minutes on an H100 (most of it Triton compiling each bit width and block shape once).
# Tables go to $OUT on the device machine (else benchmarks/results); the two logs to $OUT (else a temp folder).
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LOWBIT_NO_EXT=1
out="${OUT:-benchmarks/results}"
logs="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py 2>&1 | tee "$logs/gpu_tests.log"
python3 benchmarks/gpu_kernels.py ${QUICK:+--quick} --out "$out" 2>&1 | tee "$logs/gpu_bench.log"
