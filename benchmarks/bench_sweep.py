"""What a sweep costs beyond its work: each trial's overhead and the whole command's.

Runs ``frcnn sweep`` for real (a local Ray, Ray Tune, an MLflow SQLite store, the trials' own
recall scoring) in a temporary project on the built-in synthetic set, then reads the trial table
(``reports/sweep.parquet``) and prints, per trial, ``wall_seconds`` (the trial from start to
end, Tune's clock), ``train_seconds`` (the training loop) and ``score_seconds`` (recall after
each epoch), and their difference, the trial's overhead (its process, the MLflow child run,
data, model building). The command's overhead is its wall time less the sum of the trials'
``wall_seconds`` (Ray's start, the driver's data and outputs, Tune's bookkeeping), measured
around the whole subprocess.

Defaults are the issue's target: 4 trials of 4 images at 320 px, one epoch each, one at a time.

Usage::

    python benchmarks/bench_sweep.py --image-size 320 --trials 4 --images 4 --out /tmp/sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--images", type=int, default=4, help="training images per trial")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    return p.parse_args(argv)


def _params(folder: Path, args: argparse.Namespace) -> dict:
    """params.yaml's values with a small synthetic set and the sweep under test."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(image_size=args.image_size, synthetic_images=24, num_workers=1,
                          out_dir=str(folder / "data" / "prepared"))
    params["eval"]["batch_size"] = 2
    params["train"].update(batch_size=2, loader_workers=0, warmup_steps=1)
    params["sweep"].update(
        num_samples=args.trials, max_concurrent_trials=1, epochs=args.epochs, image_size=0,
        max_train_images=args.images, workers_per_trial=args.workers_per_trial,
        cpus_per_trial=1.0, storage_path=str(folder / "ray_results"),
        table_path=str(folder / "reports" / "sweep.parquet"),
        best_params_path=str(folder / "sweeps" / "best_params.yaml"),
        plot_path=str(folder / "reports" / "sweep.png"))
    params["tracking"]["uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    return params


def _frcnn(folder: Path, *args: str) -> float:
    """Run ``frcnn ARGS`` in ``folder``; its wall seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("frcnn")), *args], cwd=folder,
                          env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"frcnn {' '.join(args)} failed ({done.returncode})")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        folder = Path(tmp)
        (folder / "params.yaml").write_text(yaml.safe_dump(_params(folder, args)))
        _frcnn(folder, "prepare")
        command = _frcnn(folder, "sweep")
        table = pd.read_parquet(folder / "reports" / "sweep.parquet")
    table["overhead_seconds"] = (table["wall_seconds"] - table["train_seconds"]
                                 - table["score_seconds"])
    columns = ["trial_id", "status", "wall_seconds", "train_seconds", "score_seconds",
               "overhead_seconds"]
    print(table[columns].to_string(index=False, float_format="%.2f"))
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "args": {k: str(v) for k, v in
                                                            vars(args).items()},
        "command_seconds": command, "trials_wall_seconds": float(table["wall_seconds"].sum()),
        "command_overhead_seconds": command - float(table["wall_seconds"].sum()),
        "trial_overhead_seconds": table["overhead_seconds"].round(2).tolist(),
        "max_trial_overhead_seconds": float(table["overhead_seconds"].max()),
        "train_seconds": table["train_seconds"].round(2).tolist(),
        "score_seconds": table["score_seconds"].round(2).tolist(),
    }
    print(f"frcnn sweep: {command:.1f} s for {len(table)} trials of {result['trials_wall_seconds']:.1f} s "
          f"in all: {result['command_overhead_seconds']:.1f} s outside the trials; largest trial "
          f"overhead {result['max_trial_overhead_seconds']:.2f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
