#!/usr/bin/env bash
# GPU benchmarks in one call (under ten minutes on one recent data-centre GPU): the memory sweep
# to larger images in bf16 and the throughput ratio, written to bench/results/gpu_*.json + .png.
# Fails at once, with a clear message, where CUDA is not available.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: CUDA is not available to $PY (torch.cuda.is_available() is False);" \
       "run the CPU benchmarks instead: python -m bench.memory && python -m bench.throughput" >&2
  exit 2
fi

# Skip baseline sizes predicted above 90% of the card instead of provoking OOM after OOM.
GUARD_GIB="$("$PY" -c 'import torch; print(int(0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30))')"
echo "bench/gpu.sh: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'), guard ${GUARD_GIB} GiB"

timeout 420 "$PY" -m bench.memory \
  --device cuda --precision bf16 \
  --backbones resnet50,mobilenet_v3_small \
  --sizes 512,1024,2048,4096,8192 \
  --stream-sizes 4096,8192,16384 \
  --baseline-sizes 512,1024,2048,4096,8192,16384 \
  --patch 256 --k 16 --inner 2 \
  --guard-gib "$GUARD_GIB" --timeout 300 \
  --name gpu_memory

timeout 150 "$PY" -m bench.throughput \
  --device cuda --precision bf16 \
  --configs resnet50:2048:256:16:4,resnet50:4096:256:32:1,resnet18:1024:128:16:8 \
  --repeats 3 \
  --name gpu_throughput

echo "bench/gpu.sh: wrote bench/results/gpu_memory.{json,png} and bench/results/gpu_throughput.{json,png}"
