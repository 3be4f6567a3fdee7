#!/usr/bin/env bash
# Does the sweep choose well on real data? BCCD at one resolution for everything:
#   1. prepare BCCD (PASCAL VOC; its own train / val / test lists) at SIZE px;
#   2. frcnn anchors: the stride's ceiling per class, the spec's anchors, and shapes fitted on
#      train (the overlay fitted.yaml);
#   3. a sweep, class-balanced metric (AR@300/mean_class on val), over four anchor settings
#      (the spec's scales [8, 16, 32], [4, 8, 16], [2, 4, 8, 16] and 'fit'), two epochs of every
#      training image each (408 steps of one image; no early stopping), SGD at lr 0.01 after 50
#      warm-up steps (random initial weights: no ImageNet weights offline), the rest as
#      params.yaml;
#   4. the chosen setting and the spec's each trained through both stages (two epochs each) and
#      evaluated on test, the two side by side (two processes, one core each).
# Results: $WORK/summary.json and the tables printed at the end (benchmarks/RESULTS.md has them).
#
#   bash benchmarks/bccd_anchor_study.sh [BCCD_DIR] [WORK_DIR] [SIZE]
#
# Run from the repository root with .venv installed (make install); about an hour and a half on
# 2 cores.
set -euo pipefail
BCCD=${1:-examples/bccd}
WORK=${2:-/tmp/bccd_study}
SIZE=${3:-320}
export PATH="$(pwd)/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"

# one set of parameters for every step: BCCD, SIZE px, batch 1, one worker of one core
COMMON=(--params params.yaml --params overlays/bccd.yaml
        --set "data.source=voc:$BCCD" --set "data.image_size=$SIZE"
        --set "data.out_dir=$WORK/prepared" --set "tracking.uri=sqlite:///$WORK/mlflow.db"
        --set train.batch_size=1 --set train.lr=0.01 --set train.warmup_steps=50
        --set train.rpn_epochs=2 --set train.frcnn_epochs=2
        --set train.num_workers=1 --set train.cpus_per_worker=1.0 --set train.loader_workers=1
        --set eval.num_pictures=4 --set data.num_workers=2)
# the spec's anchors (128 / 256 / 512 px x 0.5 / 1 / 2 at 640; 9 per cell, so 'fit' fits 9)
SPEC=(--set "anchors.scales=[8,16,32]" --set "anchors.ratios=[0.5,1.0,2.0]" --set anchors.shapes=null)

echo "== prepare"
[ -f "$WORK/prepared/classes.json" ] || frcnn prepare "${COMMON[@]}"

echo "== anchor coverage on test: the spec's anchors, k-means and fitted shapes, the ceiling"
frcnn anchors "${COMMON[@]}" "${SPEC[@]}" --split test --fit --num 9 --out "$WORK/fitted.yaml" \
    | tee "$WORK/anchors.txt"

echo "== sweep: four anchor settings, AR@300/mean_class on val"
[ -f "$WORK/sweep.parquet" ] || frcnn sweep "${COMMON[@]}" "${SPEC[@]}" \
    --set sweep.image_size=0 --set sweep.max_train_images=0 --set sweep.epochs=2 \
    --set sweep.grace_period=2 \
    --set sweep.num_samples=1 --set sweep.max_concurrent_trials=2 \
    --set sweep.cpus_per_trial=1.0 --set sweep.metric=AR@300/mean_class \
    --set "sweep.storage_path=$WORK/ray_results" \
    --set "sweep.table_path=$WORK/sweep.parquet" \
    --set "sweep.best_params_path=$WORK/best_params.yaml" \
    --set "sweep.plot_path=$WORK/sweep.png" \
    --set 'sweep.space={anchors: {grid: [{scales: [8, 16, 32]}, {scales: [4, 8, 16]}, {scales: [2, 4, 8, 16]}, fit]}}' \
    | tee "$WORK/sweep.txt"

echo "== the chosen setting and the spec's, both stages, evaluated on test"
run_setting() {  # NAME ARGS...: both stages and evaluate; seconds of each in NAME/times.txt
    local name=$1; shift
    local dir="$WORK/$name"
    mkdir -p "$dir"
    local args=("$@" --set "train.storage_path=$dir/checkpoints"
                --set "train.rpn_model=$dir/rpn.pt" --set "train.frcnn_model=$dir/frcnn.pt"
                --set "train.metrics_dir=$dir/metrics" --set "eval.reports_dir=$dir/reports"
                --set "eval.metrics_path=$dir/evaluate.json" --set "eval.splits=[test]")
    : > "$dir/times.txt"
    local t0=$SECONDS
    frcnn train --stage rpn "${args[@]}" > "$dir/train_rpn.log" 2>&1
    echo "train_rpn_seconds $((SECONDS - t0))" >> "$dir/times.txt"; t0=$SECONDS
    frcnn train --stage frcnn "${args[@]}" > "$dir/train_frcnn.log" 2>&1
    echo "train_frcnn_seconds $((SECONDS - t0))" >> "$dir/times.txt"; t0=$SECONDS
    frcnn evaluate "${args[@]}" > "$dir/evaluate.log" 2>&1
    echo "evaluate_seconds $((SECONDS - t0))" >> "$dir/times.txt"
}
# side by side, one core each (wall times measured concurrently, on a 2-core machine)
run_setting spec "${COMMON[@]}" "${SPEC[@]}" &
spec=$!
# the sweep's choice: its overlay after the same files (every --set applies after every file,
# and COMMON sets no anchors)
run_setting chosen "${COMMON[@]}" --params "$WORK/best_params.yaml" &
chosen=$!
wait $spec && wait $chosen

python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
work = Path(sys.argv[1])
sweep = pd.read_parquet(work / "sweep.parquet")
keep = ["anchors", "final_AR@300/mean_class", "final_AR@300", "train_seconds", "wall_seconds"]
keep += [c for c in sweep.columns if c.startswith("final_recall@0.5/300/") and "mean" not in c]
print(sweep[keep].to_string(index=False))
out = {"sweep": sweep[keep].to_dict("records")}
for name in ("spec", "chosen"):
    values = json.loads((work / name / "evaluate.json").read_text())
    times = dict(line.split() for line in (work / name / "times.txt").read_text().splitlines())
    out[name] = {"metrics": values, "seconds": times}
    classes = sorted({k.split("/")[-1] for k in values if k.startswith("AP@0.5/")})
    print(f"\n{name}: AR@300 {values['AR@300']:.3f}  mAP@0.5 {values.get('mAP@0.5', float('nan')):.3f}"
          f"  seconds {times}")
    for c in classes:
        print(f"  {c:<10} recall@0.5/300 {values.get(f'recall@0.5/300/{c}', float('nan')):.3f}"
              f"  ceiling {values.get(f'ceiling/recall@0.5/{c}', float('nan')):.3f}"
              f"  anchors {values.get(f'anchors/recall@0.5/{c}', float('nan')):.3f}"
              f"  AP {values.get(f'AP@0.5/{c}', float('nan')):.3f}")
(work / "summary.json").write_text(json.dumps(out, indent=2, default=str))
EOF
