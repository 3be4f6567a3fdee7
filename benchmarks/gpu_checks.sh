#!/usr/bin/env bash
# Everything the GPU figures need, in one call on a lent GPU machine (its own python3 with torch
# and torchvision; no Ray, MLflow or DVC needed) or on your own GPU box:
#   1. the detector's tests, which add a CUDA case where a GPU is present (tests/detector);
#   2. bench_detector.py at 640x640, batch 8, bf16 (this detector vs torchvision's FasterRCNN);
#   3. bench_train_loop.py: the training loop alone (loader + model + SGD), both stages.
# Usage: bash benchmarks/gpu_checks.sh   (results under $OUT, default gpu_results/)
# Copy the tables into benchmarks/RESULTS.md with the device, date and commands they print.
set -uo pipefail
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

"$PY" -m pytest -q -p no:cacheprovider tests/detector >"$OUT/tests_detector.txt" 2>&1
echo "tests/detector: exit $? ($(tail -1 "$OUT/tests_detector.txt"))"

"$PY" benchmarks/bench_detector.py --device cuda --image-size 640 --batch-size 8 --amp bf16 \
    --steps 20 --warmup 5 2>&1 | tee "$OUT/bench_detector.txt"

"$PY" benchmarks/bench_train_loop.py --device cuda --image-size 640 --batch-size 8 --amp bf16 \
    --images 256 --steps 30 --loader-workers 8 2>&1 | tee "$OUT/bench_train_loop.txt"
