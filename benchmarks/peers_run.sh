#!/usr/bin/env bash
# The whole peers benchmark. Rows run in the order that answers the targets soonest (the low-bit
# comparisons first: lowbit best/GPTQ, learned rounding against AutoRound at 50 iterations; the
# 200-iteration rows last), so that an interrupted run has the most useful rows done; every finished
# row is kept and skipped on the next run (resumable). Log: benchmarks/.work/peers/run.log
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for only in fp32 "lowbit-w" hqq quanto \
    "lowbit-best-w3,lowbit-best-w2,lowbit-gptq-w3g128,lowbit-gptq-w2g64" \
    "lowbit-ar-w3g128-fast,autoround-w3g128-i50" "lowbit-ar-w2g64-fast,autoround-w2g64-i50" \
    "lowbit-best-w4,lowbit-gptq-w4g128" \
    "llmc-gptq-w3g128,llmc-gptq-w2g64,llmc-gptq-w3g64" \
    torchao "lowbit-awq" llmc \
    "lowbit-ar-w4g128-fast" "autoround-w4g128-i50" \
    "lowbit-ar-w3g128,lowbit-ar-w2g64" "autoround-w3g128,autoround-w2g64" \
    "lowbit-ar" "autoround"; do
    "$py" benchmarks/peers.py --only "$only"
done
"$py" benchmarks/peers.py --report
