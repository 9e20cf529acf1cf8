#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct with DuoAttention through vLLM's OpenAI-compatible server (CPU), with
# the shipped pattern at 50% streaming heads. Then ask it with any OpenAI client, e.g.
#   .venv/bin/python examples/openai_client.py
# Usage: bash examples/serve_duo.sh [more `vllm serve` arguments]   (PORT=8000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=$("$PY" -c "from duo_vllm.testing.models import smollm2_path; print(smollm2_path())")
export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1} HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache on CPU
# A bounded oneDNN primitive cache keeps a CPU server's memory flat under load (README, "Serving").
export ONEDNN_PRIMITIVE_CACHE_CAPACITY=${ONEDNN_PRIMITIVE_CACHE_CAPACITY:-0}
exec "$PY" -m vllm.entrypoints.cli.main serve "$MODEL" \
    --attention-backend DUO --additional-config '{"duo": {"sparsity": 0.5}}' \
    --dtype bfloat16 --enforce-eager --max-model-len 4096 \
    --host 127.0.0.1 --port "${PORT:-8000}" "$@"
