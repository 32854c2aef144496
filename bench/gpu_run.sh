#!/usr/bin/env bash
# The prepared GPU check, as one command for the lent device machine (run from the repo root there, with
# `carry: [".whl", ".gpudata"]` made by bench/gpu_wheels.sh):
#   bash bench/gpu_run.sh                 # Qwen2.5-VL-3B shapes, CUDA, about 2.5 minutes on one H100; then
#                                         # Qwen3-VL-8B shapes into $OUT/qwen3_vl (issue 32; GPU_RUN_QWEN3=0: not)
# Installs the wheels into /tmp/site, reads the VSP maps from .gpudata (../shared does not travel), runs
# bench/gpu_check.py with its report in $OUT (the device tool's output folder; outputs/gpu_check elsewhere) and the
# log beside it. Extra arguments go to the check.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:${PWD}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
[ -d .gpudata/vsp ] && export MIRAGE_SHARED_DATA="${MIRAGE_SHARED_DATA:-$PWD/.gpudata}"
out="${OUT:-outputs/gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia_smi.txt" || true
python3 bench/gpu_check.py --output_dir "$out" "$@" 2> >(tee "$out/gpu_check.log" >&2)
# the second backbone (issue 32): the same check on Qwen3-VL-8B shapes (the tiny Qwen3-VL with --size tiny)
if [ "${GPU_RUN_QWEN3:-1}" = 1 ] && [[ " $* " != *" --backbone "* && " $* " != *" --size 3b "* && " $* " != *" --size 7b "* ]]; then
  mkdir -p "$out/qwen3_vl"
  python3 bench/gpu_check.py --output_dir "$out/qwen3_vl" --backbone qwen3_vl "$@" \
    2> >(tee "$out/qwen3_vl/gpu_check.log" >&2) || echo "gpu_run: the qwen3_vl check failed (see $out/qwen3_vl/gpu_check.log)"
fi
