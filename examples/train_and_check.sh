#!/usr/bin/env bash
# Learn a DuoAttention pattern for SmolLM2-135M-Instruct on this CPU, then check it: the needle
# check through the plain-torch reference, and the same model through vLLM with the new pattern
# against stock and all-streaming (python -m duo_vllm.eval). A short run (STEPS=20 at 512-1024
# tokens, a few minutes on 2 cores) shows the whole path; the shipped pattern took 150 steps
# (patterns/SmolLM2-135M-Instruct/README.md), a GPU run for a bigger model 400-2000 (docs/gate_training.md).
# Seen on our 2-core CPU (6.4 min, beside another job): needle check full 0.912, the 20-step pattern
# 0.915, inverse 0.274, all-streaming 0.252; through vLLM at 1K: stock 100, DUO 100, streaming 33.
# Usage: bash examples/train_and_check.sh [OUT]   (default OUT: /tmp/duo-example-pattern)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-/tmp/duo-example-pattern}
MODEL=$("$PY" -c "from duo_vllm.testing.models import smollm2_path; print(smollm2_path())")
export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1} HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

"$PY" -m gate_training --model "$MODEL" --out "$OUT/pattern" --work-dir "$OUT/work" --overwrite \
    --steps "${STEPS:-20}" --min-context 512 --max-context 1024 --num-passkeys 2 --passkey-length 8 \
    --sink 16 --recent 64 --eval-samples 1 --no-progress
"$PY" -m gate_training.needle --model "$MODEL" --pattern "$OUT/pattern" --context 1024 --samples 2 \
    --sparsity 0.5 --sink 16 --recent 64
"$PY" -m duo_vllm.eval needle --model "$MODEL" --backends "${BACKENDS:-stock,duo,streaming}" --lengths 1K --depths 3 \
    --samples 1 --duo "{\"pattern\": \"$OUT/pattern\", \"sparsity\": 0.5, \"sink\": 16, \"recent\": 64}" \
    --engine-args '{"dtype": "float32", "enforce_eager": true}' --out "$OUT/eval" --fresh
