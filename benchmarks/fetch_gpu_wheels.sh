#!/usr/bin/env bash
# The wheels gpu_suite.sh installs on the GPU machine (no registry there), fetched here into .whl/ (git-ignored
# through .git/info/exclude: the device call names `.whl` in carry). Python 3.12, x86-64, as that machine runs.
set -eu -o pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
du -sh .whl
