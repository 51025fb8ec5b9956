#!/usr/bin/env bash
# The main job: fetch SmolLM2-135M, quantize it with w4g128 and w3g128, evaluate both against fp32.
# Run from the repository root with the virtual environment's lowbit on PATH (README, first command).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
lowbit fetch smollm2-135m
for recipe in w4g128 w3g128; do
  lowbit quantize smollm2-135m --recipe "$recipe" -o "out/smollm2-$recipe" --force
done
lowbit eval out/smollm2-w4g128 out/smollm2-w3g128 --reference smollm2-135m --corpus wiki \
  --json out/main.json --md out/main.md
