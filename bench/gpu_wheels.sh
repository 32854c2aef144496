#!/usr/bin/env bash
# Download the pure-Python wheels the lent GPU machine lacks (Python 3.12, torch 2.11 CUDA, transformers 5.17, no trl,
# datasets or deepspeed) into .whl/ (git-ignored), at the versions pyproject.toml pins. Run once, here, before the
# device call; bench/gpu_run.sh installs them there. About 14 MB, within the 64 MiB that travels.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.23.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19
ls -la .whl
