#!/usr/bin/env bash
# The whole peers benchmark, cheapest rows first, so that an interrupted run has the most rows
# done; every finished row is kept and skipped on the next run (resumable). Log: benchmarks/.work/peers/run.log
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for only in fp32 "lowbit-w" hqq quanto torchao "lowbit-gptq" "lowbit-awq" "lowbit-best" llmc "lowbit-ar-w3g128-fast,lowbit-ar-w2g64-fast,lowbit-ar-w4g128-fast" "autoround" "lowbit-ar"; do
    "$py" benchmarks/peers.py --only "$only"
done
"$py" benchmarks/peers.py --report
