#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`, carrying .whl): installs .whl/gpu-site.tar.xz
# (made here by bench/gpu_prepare.sh) beside the image's PyTorch, runs the GPU tests and the GPU
# checks (bench/gpu_lora.py), and writes the figures and logs under $OUT (else bench/results).
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
SITE=${SITE:-/tmp/gpu-site}
PACK=${PACK:-.whl/gpu-site.tar.xz}
mkdir -p "$SITE/bin" "$OUT"
tar -xJf "$PACK" -C "$SITE" || exit 1
# The `ray` command for this interpreter (the carried one's first line names another python).
printf '#!/bin/sh\nexec python3 -m ray.scripts.scripts "$@"\n' > "$SITE/bin/ray"
chmod +x "$SITE/bin/ray"
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FTLAUNCH_HOME=/tmp/ftlaunch-home FTLAUNCH_RAY_AUTH_MODE=disabled
python3 -c "import ray, pydantic, peft, torch, transformers; print('ray', ray.__version__, 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
# GPU_LORA_ARGS=--smoke: the same on a machine with no GPU (a check of this script and the pack)
timeout 420 python3 -m bench.gpu_lora --out "$OUT/gpu_lora.json" ${GPU_LORA_ARGS:-} 2>&1 | tee "$OUT/gpu_lora.log" | \
  grep -v -i "warn" | tail -60
