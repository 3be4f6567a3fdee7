"""Images per second of the project's own training loop, in one process, without Ray.

What ``frcnn train`` runs on every Ray Train worker, :func:`pipeline.training.loop.train`, here
alone: the loader (Parquet -> PNG decode in ``--loader-workers`` processes -> flip), the model,
SGD, the LR schedule and autocast, on synthetic images that ``frcnn prepare`` makes. Set against
``bench_detector.py``'s training images/s (the model alone on tensors already on the device),
the difference is what the loader and the loop's bookkeeping cost.

Imports neither Ray nor MLflow, so it runs wherever torch, torchvision, pandas, pyarrow and
Pillow are (the lent GPU machines included).

Usage::

    python benchmarks/bench_train_loop.py --device cuda --image-size 640 --batch-size 8 \\
        --amp bf16 --images 256 --steps 30 --loader-workers 8
    python benchmarks/bench_train_loop.py --device cpu --image-size 128 --batch-size 2 \\
        --images 8 --steps 4
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config  # noqa: E402
from pipeline.prepare.stage import prepare_dataset  # noqa: E402
from pipeline.training.loop import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="bf16")
    p.add_argument("--images", type=int, default=256, help="synthetic training images")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per stage")
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--stages", default="rpn,frcnn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cfg = Config().replace({
            "data.synthetic_images": args.images, "data.image_size": args.image_size,
            "data.val_fraction": 0.0, "data.test_fraction": 0.0,
            "data.out_dir": str(Path(tmp) / "prepared"),
            "train.batch_size": args.batch_size, "train.max_steps": args.steps,
            "train.amp": args.amp,
            "train.loader_workers": args.loader_workers, "train.log_every": 10**6,
            "train.checkpoint_every": 0,
        })
        prepared = prepare_dataset(cfg, progress=False)
        rows = []
        for stage in args.stages.split(","):
            result = train(cfg, stage=stage, train_path=Path(tmp) / "prepared" / "train.parquet",
                           num_classes=len(prepared.classes), device=device,
                           say=lambda msg: None)
            memory = (torch.cuda.max_memory_allocated(device) / 2**30
                      if device.type == "cuda" else None)
            rows.append((stage, result.steps, result.images, result.train_seconds,
                         result.images_per_s, memory))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; date {datetime.date.today()}")
    print(f"command: python benchmarks/bench_train_loop.py {' '.join(argv or sys.argv[1:])}")
    print()
    print("| stage | steps | images | seconds | images / s | peak GPU memory (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for stage, steps, images, seconds, rate, memory in rows:
        mem = "n/a" if memory is None else f"{memory:.1f}"
        print(f"| {stage} | {steps} | {images} | {seconds:.1f} | {rate:.2f} | {mem} |")


if __name__ == "__main__":
    main()
