#!/usr/bin/env bash
# Prepare, here, what the lent GPU machine lacks (Python 3.12, torch 2.11 CUDA, transformers 5.17, no trl, datasets
# or deepspeed, no network, and none of ../shared): the pure-Python wheels at the versions pyproject.toml pins into
# .whl/ (about 16 MB), and the VSP maps the check builds its rows from into .gpudata/vsp (about 10 MB). Both are
# git-ignored and travel with the device call's `carry: [".whl", ".gpudata"]`; bench/gpu_run.sh uses them there.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.gpudata/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.17.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19
shared="${MIRAGE_SHARED_DATA:-../shared/data}"
[ -d "$shared/vsp" ] || { echo "gpu_wheels.sh: no VSP data at $shared/vsp; set MIRAGE_SHARED_DATA to the shared/data folder" >&2; exit 1; }
mkdir -p .gpudata && rm -rf .gpudata/vsp.tmp && cp -r "$shared/vsp" .gpudata/vsp.tmp
rm -rf .gpudata/vsp && mv .gpudata/vsp.tmp .gpudata/vsp  # .gpudata is ours (git-ignored, made here)
du -sh .whl .gpudata
