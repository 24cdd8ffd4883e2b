#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no package registry), fetched here into .whl/ for the device tool's
# `carry`: torchao, for --train.fp8. Built for the device image's Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "torchao==0.18.0"
ls -l .whl
