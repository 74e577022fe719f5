#!/usr/bin/env bash
# `make gpu-check` on a lent GPU machine, which has no network: the wheels tools/device_kit.py fetched (carried
# as `.whl`) go into /tmp/site beside the image's own PyTorch, then bench/gpu_check.py runs with the repository on
# the path. Its log (and nvidia-smi's line) land in $OUT when the device tool sets it. Exit: gpu_check's status,
# 3 if the wheels would not install.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_gpu_check: the carried wheels did not install (run tools/device_kit.py here first)"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/nvidia_smi.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
python3 bench/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
