#!/usr/bin/env bash
# Every check that needs a GPU, in one call (about 7 minutes on one H200, 10 at most):
#
#   phase 1, three lanes side by side (each measures its own process's peak, so sharing the card
#   does not change a memory figure; six small accuracy runs leave most of the card idle anyway):
#     - the CUDA tests: the gpu-marked engine tests, and training, prediction and plan tasks on a
#       real prefork worker, which picks CUDA by itself;
#     - the accuracy benchmark: PatchGD vs the full-image baseline vs the downscaled baseline;
#     - the planner's predicted vs measured peak on CUDA, then the bf16 memory sweep;
#   phase 2, alone on the card: throughput (PatchGD vs ideal vs the plain full-image baseline) with
#   fp32/bf16 and channels_last off/on.
#
# Writes bench/results/gpu_*.json + .png, one log per part in bench/results/gpu_logs/ and a
# one-line-per-part summary (gpu_logs/summary.log). A part that fails or runs past its time limit
# is reported and the others go on. Fails at once where CUDA is not available.
set -uo pipefail
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

LOGS=bench/results/gpu_logs
mkdir -p "$LOGS"
: > "$LOGS/summary.log"
export PYTHONUNBUFFERED=1

# part NAME LIMIT_S COMMAND...: run COMMAND with a time limit, its output in gpu_logs/NAME.log.
part() {
  local name=$1 limit=$2 started rc
  shift 2
  started=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - started )) s (limit $limit s)" | tee -a "$LOGS/summary.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
torch.cuda.get_device_name(0))'
} 2>&1 | tee "$LOGS/machine.log"

# Baseline sizes predicted above 90% of the card are recorded as "does not fit", not provoked.
GUARD_GIB="$("$PY" -c 'import torch; print(int(0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30))')"

part tests 240 "$PY" -m pytest -q -raP -p no:cacheprovider -o addopts="" -o filterwarnings=default \
  tests/engine/test_gradients.py tests/engine/test_memory.py tests/engine/test_train.py \
  tests/engine/test_config.py tests/training/test_budget.py \
  tests/training/test_worker.py::test_patchgd_and_baseline_succeed_and_a_cancel_ends_a_run \
  tests/training/test_worker.py::test_on_cuda_a_budgeted_patchgd_task_records_its_peak_against_the_enforced_budget \
  tests/training/test_predictions_worker.py tests/training/test_plans.py &
TESTS=$!

part accuracy 330 "$PY" -m bench.accuracy --device cuda --sizes 256 512 --train 300 --val 150 \
  --epochs 10 --grid 4 --parallel 6 --threads 2 --name gpu_accuracy &
ACCURACY=$!

(
  part planner 140 "$PY" -m bench.planner --device cuda --precision bf16 --name gpu_planner \
    --scenario patchgd:resnet18:512:128:8:1:16 \
    --scenario patchgd:resnet50:2048:256:8:1:16 \
    --scenario patchgd-streamed:resnet50:8192:256:8:1:16 \
    --scenario patchgd:efficientnet_b0:2048:256:8:1:16 \
    --scenario patchgd:mobilenet_v3_small:2048:256:8:1:16 \
    --scenario baseline:resnet50:1024:1:16 \
    --scenario patchgd:resnet50:4096:256:32:1:4
  part memory 180 "$PY" -m bench.memory --device cuda --precision bf16 \
    --backbones resnet50 --sizes 1024,4096,8192 --stream-sizes 16384 \
    --baseline-sizes 1024,2048,4096,8192 \
    --patch 256 --k 16 --inner 2 --guard-gib "$GUARD_GIB" --timeout 120 --name gpu_memory
) &
MEMORY=$!

wait $TESTS $ACCURACY $MEMORY

for precision in fp32 bf16; do
  for layout in off on; do
    part "throughput_${precision}_cl_${layout}" 60 "$PY" -m bench.throughput --device cuda \
      --precision "$precision" --channels-last "$layout" --repeats 3 \
      --configs resnet50:2048:256:16:4,resnet18:1024:128:16:8 \
      --name "gpu_throughput_${precision}_cl_${layout}"
  done
done

echo "bench/gpu.sh: results in bench/results/gpu_*.json, logs in $LOGS/"
