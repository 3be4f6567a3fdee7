"""Images per second that ONE CPU core turns from a prepared table into training batches.

What each ``DataLoader`` worker process of the training loop does per image
(:class:`pipeline.training.loader.DetectionDataset`): read the row from the Parquet table,
decode the PNG or JPEG bytes (:func:`pipeline.images.decode`, libpng / libjpeg through
torchvision), convert to float, flip with probability 0.5, and, per batch, collate (stack).
Run single-threaded in this process, so the figure is per core: a GPU training at R images/s
needs about ``R / rate`` loader cores.

The images are the project's synthetic set at the given size, prepared by ``frcnn prepare``'s
own code (``data.image_format`` png and jpeg) into a temporary folder; nothing is written
elsewhere. No Ray, MLflow or DVC.

Usage::

    python benchmarks/bench_loader.py --image-size 640 --images 48 --passes 3
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config  # noqa: E402
from pipeline.images import decode  # noqa: E402
from pipeline.prepare.stage import prepare_dataset  # noqa: E402
from pipeline.prepared_table import PreparedTable, split_path  # noqa: E402
from pipeline.training.loader import DetectionDataset, collate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--images", type=int, default=48, help="synthetic images to prepare")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=3, help="timed passes over the images")
    p.add_argument("--formats", default="png,jpeg")
    return p.parse_args(argv)


def rate(path: Path, *, batch_size: int, passes: int) -> dict[str, float]:
    """Single-threaded images/s of read + decode + flip + collate over the table at ``path``,
    and of decode alone, best of ``passes`` passes (one warm-up pass first)."""
    dataset = DetectionDataset(path, hflip=0.5, seed=0)
    n = len(dataset)
    raw = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    best_all = best_decode = 0.0
    for p in range(passes + 1):
        dataset.set_epoch(p)
        start = time.perf_counter()
        batch = []
        for i in range(n):
            batch.append(dataset[i])
            if len(batch) == batch_size:
                collate(batch)
                batch = []
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        for data in raw:
            decode(data)
        decode_seconds = time.perf_counter() - start
        if p:  # the first pass warms caches up
            best_all = max(best_all, n / seconds)
            best_decode = max(best_decode, n / decode_seconds)
    size = PreparedTable(path).num_bytes / n / 1024
    return {"images_per_s": best_all, "decode_per_s": best_decode, "kib_per_image": size}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(f"# bench_loader: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, one thread, {args.images} synthetic images at "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}")
    print(f"# command: python benchmarks/bench_loader.py {' '.join(sys.argv[1:])}")
    print("| format | KiB / image | decode only, images/s per core | read + decode + flip + "
          "collate, images/s per core | cores for 250 images/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for fmt in args.formats.split(","):
            cfg = Config().replace({
                "data.synthetic_images": args.images, "data.image_size": args.image_size,
                "data.image_format": fmt, "data.val_fraction": 0.0, "data.test_fraction": 0.0,
                "data.num_workers": 2, "data.out_dir": f"{tmp}/{fmt}"})
            prepare_dataset(cfg, progress=False)
            r = rate(split_path(f"{tmp}/{fmt}", "train"), batch_size=args.batch_size,
                     passes=args.passes)
            print(f"| {fmt} | {r['kib_per_image']:.0f} | {r['decode_per_s']:.1f} | "
                  f"{r['images_per_s']:.1f} | {250 / r['images_per_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
